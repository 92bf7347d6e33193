/*
 * small_cache.c - the runtime's per-thread cache of small blocks.
 *
 *   small_cache double-free   free one block twice (expected to abort)
 *   small_cache calloc        calloc of a class whose cached block is dirty
 *   small_cache shrink        blocks shrunk by realloc serve their class fully
 *   small_cache threads       blocks cached by threads that then exit
 *   small_cache capacity      blocks above 256 bytes: allocated with their own
 *                             size, and a cached one never serves a larger
 *                             request of its class
 */
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int double_free(void) {
    void *p = malloc(40);
    free(p);
    free(p);
    puts("survived");
    return 0;
}

static int calloc_zeroed(void) {
    /* Dirty a block of every small class, free it into the cache, then ask
     * for zeroed memory of the same class: it must come back all zero. */
    for (size_t size = 1; size <= 1024; size++) {
        unsigned char *p = malloc(size);
        memset(p, 0xAB, size);
        free(p);
        unsigned char *q = calloc(1, size);
        for (size_t i = 0; i < size; i++)
            if (q[i] != 0) {
                printf("calloc(%zu) byte %zu is %#x\n", size, i, q[i]);
                return 1;
            }
        free(q);
    }
    puts("zeroed");
    return 0;
}

static int shrink(void) {
    /* A block shrunk by realloc to a small size is cached under that size's
     * class; the next malloc of the class may write its whole capacity. */
    for (int round = 0; round < 1000; round++) {
        size_t small = 1 + (size_t)round % 1024;
        char *p = malloc(4096);
        p = realloc(p, small);
        free(p);
        /* the capacity of small's class: 8-byte steps to 256, then 64 */
        size_t full = small <= 256 ? (small + 7) / 8 * 8 : 256 + (small - 256 + 63) / 64 * 64;
        char *q = malloc(full);
        memset(q, 0x5A, full);
        char *r = malloc(full); /* a neighbour the overflow would hit */
        memset(r, 0x33, full);
        free(q);
        free(r);
    }
    puts("shrunk");
    return 0;
}

static int capacity(void) {
    /* Over glibc a 1000-byte block is a 1016-byte request with the header
     * (a 1024-byte chunk), not its class's 1024 + 16 (1056). */
    void *p = malloc(1000);
    size_t usable = malloc_usable_size(p);
    free(p);
    if (usable < 1000 || usable >= 1016) {
        printf("malloc(1000) has %zu usable bytes\n", usable);
        return 1;
    }
    /* The smallest and the largest request of each class above 256 bytes
     * (classes 64 bytes apart). */
    for (size_t small = 257; small <= 1024; small += 64) {
        size_t larger = small + 63;
        free(malloc(small)); /* cached, with `small` bytes of room */
        unsigned char *q = malloc(larger);
        if (malloc_usable_size(q) < larger) {
            printf("malloc(%zu) after a free of %zu bytes has %zu usable\n", larger, small,
                   malloc_usable_size(q));
            return 1;
        }
        memset(q, 0x77, larger);
        free(q);
    }
    puts("capacity");
    return 0;
}

static void *churn(void *arg) {
    (void)arg;
    void *keep[64];
    for (int i = 0; i < 64; i++)
        keep[i] = malloc(16 + (size_t)i * 3);
    for (int i = 0; i < 64; i++)
        free(keep[i]);
    return NULL;
}

static int threads(void) {
    for (int round = 0; round < 200; round++) {
        pthread_t t[4];
        for (int i = 0; i < 4; i++)
            pthread_create(&t[i], NULL, churn, NULL);
        for (int i = 0; i < 4; i++)
            pthread_join(t[i], NULL);
    }
    puts("threads");
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "double-free"))
        return double_free();
    if (!strcmp(mode, "calloc"))
        return calloc_zeroed();
    if (!strcmp(mode, "shrink"))
        return shrink();
    if (!strcmp(mode, "threads"))
        return threads();
    if (!strcmp(mode, "capacity"))
        return capacity();
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
