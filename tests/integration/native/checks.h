/*
 * checks.h - what the native programs that compare counts share: their
 * "check WHAT GOT expected WANT ok|MISMATCH" lines, and binding the runtime's
 * functions by name (so that the program also starts without the runtime, and
 * says so), and freeing blocks on another thread. Define CHECKS_PROGRAM, the
 * program's name, before including it.
 */
#ifndef CHECKS_H
#define CHECKS_H

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static int failures;

static void expect(const char *what, long long got, long long want) {
    int ok = got == want;
    printf("check %s %lld expected %lld %s\n", what, got, want, ok ? "ok" : "MISMATCH");
    if (!ok)
        failures++;
}

/* In a function returning int: 0 when the runtime does not define `sym`. */
#define CHECKS_BIND(slot, sym)                                                          \
    if (!(*(void **)&(slot) = dlsym(RTLD_DEFAULT, sym))) {                              \
        fprintf(stderr, "%s: %s not found; run with the runtime preloaded\n",           \
                CHECKS_PROGRAM, sym);                                                   \
        return 0;                                                                       \
    }

typedef struct {
    void **blocks;
    long n;
} checks_batch;

static void *checks_free_all(void *arg) {
    checks_batch *b = arg;
    for (long i = 0; i < b->n; i++)
        free(b->blocks[i]);
    return NULL;
}

/* Free `n` blocks on a thread of their own, and wait for it. */
static void free_on_thread(void **blocks, long n) {
    checks_batch b = {blocks, n};
    pthread_t t;
    pthread_create(&t, NULL, checks_free_all, &b);
    pthread_join(t, NULL);
}

#endif
