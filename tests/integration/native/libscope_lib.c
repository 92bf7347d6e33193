/*
 * libscope_lib.c - a shared library that allocates, for the library-scope
 * tests (test_library_scopes.py). Built twice, as libaptest_a.so and
 * libaptest_b.so, so that one can be bound to a scope and the other not, and
 * loaded from Python through ctypes.
 *
 * Every allocation here is made by this library's own code, so its immediate
 * caller (what library scopes match) is this object.
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Per thread, so that threads calling in at once keep their own blocks. */
#define KEEP_MAX 4096
static __thread void *kept[KEEP_MAX];
static __thread size_t nkept;

/* Allocate up to `count` blocks of `size` bytes, keeping them (for the calling
 * thread), and stop at the first NULL (this library checks). Returns how many
 * it got. */
int aptest_alloc(size_t size, int count) {
    int got = 0;
    for (int i = 0; i < count && nkept < KEEP_MAX; i++) {
        void *p = malloc(size);
        if (!p)
            break;
        memset(p, 0xA5, size < 64 ? size : 64);
        kept[nkept++] = p;
        got++;
    }
    return got;
}

/* The address of kept block `i` (the caller may free it with libc's free). */
void *aptest_kept(int i) { return (size_t)i < nkept ? kept[i] : NULL; }

/* Forget the kept blocks without freeing them (someone else frees them). */
void aptest_forget(void) { nkept = 0; }

void aptest_free_all(void) {
    while (nkept)
        free(kept[--nkept]);
}

/* One allocation of `size` bytes through entry point `which`; 1 if it
 * succeeded (the block is freed again), 0 if it returned NULL. */
int aptest_entry(int which, size_t size) {
    void *p = NULL;
    switch (which) {
    case 0: p = malloc(size); break;
    case 1: p = calloc(1, size); break;
    case 2: {
        void *small = malloc(16);
        if (!small)
            return 0;
        p = realloc(small, size);
        if (!p)
            free(small);
        break;
    }
    case 3:
        if (posix_memalign(&p, 64, size) != 0)
            p = NULL;
        break;
    case 4: p = aligned_alloc(64, (size + 63) & ~(size_t)63); break;
    case 5: p = memalign(128, size); break;
    case 6: p = valloc(size); break;
    case 7: p = reallocarray(NULL, 1, size); break;
    default: return -1;
    }
    if (!p)
        return 0;
    free(p);
    return 1;
}

#define APTEST_ENTRIES 8
int aptest_entries(void) { return APTEST_ENTRIES; }

/* Code that does not check for NULL (the case raise_only_from is for). */
size_t aptest_unchecked(size_t size) {
    char *p = malloc(size);
    p[0] = 1; /* crashes on NULL */
    size_t first = (size_t)p[0];
    free(p);
    return first;
}
