/*
 * alloc_steps.c - C code that handles malloc failure the usual way, for
 * comparing fault injectors side by side (fiu-run and allocpolicy).
 *
 *   alloc_steps [N]    build a list of N records (default 200), one malloc
 *                      each, then free it; print "built N records" and exit 0
 *
 * On the first failed malloc it writes "step K: malloc of S bytes failed" to
 * stderr, frees what it built and exits 3. Both the message and the exit
 * status depend only on which call failed, so two runs that fail the same
 * call print the same thing. Nothing is printed before the loop (stdio would
 * allocate its buffer first) and the failure message goes to the unbuffered
 * stderr, so the program's own malloc calls are the only ones it makes.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct record {
    struct record *next;
    int step;
    char payload[];
};

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 200;
    struct record *head = NULL;
    for (int step = 1; step <= n; step++) {
        /* Sizes vary with the step, as real records do. */
        size_t size = sizeof(struct record) + 16 + (size_t)(step % 7) * 24;
        struct record *r = malloc(size);
        if (r == NULL) {
            fprintf(stderr, "step %d: malloc of %zu bytes failed\n", step, size);
            while (head) {
                struct record *next = head->next;
                free(head);
                head = next;
            }
            return 3;
        }
        r->next = head;
        r->step = step;
        memset(r->payload, step & 0xff, size - sizeof *r);
        head = r;
    }
    int count = 0;
    while (head) {
        struct record *next = head->next;
        count++;
        free(head);
        head = next;
    }
    printf("built %d records\n", count);
    return 0;
}
