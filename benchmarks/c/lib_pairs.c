/*
 * lib_pairs.c - the hot-path cost of library scopes: malloc/free pairs made
 * by the program itself or by a shared library it loads.
 *
 * Built twice from this file: as the shared library libpairs_bench.so (with
 * -DLIB_PAIRS_LIBRARY) and as the program lib_pairs, which loads it with
 * dlopen so the same binary runs under every table.
 *
 *   lib_pairs LIBRARY WHO SIZE PAIRS
 *
 *   WHO   main  the program's own code calls malloc/free (with a library scope
 *               bound to libpairs_bench.so, the caller does not match: every
 *               call looks up its caller and hits the per-thread cache)
 *         lib   libpairs_bench.so calls malloc/free (bound: the caller matches)
 *
 * Prints "cpu_ns_per_pair=<thread CPU ns / PAIRS>".
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>

#ifdef LIB_PAIRS_LIBRARY
/* The compiler must not pair up and drop the calls: the pointer escapes. */
void lib_pairs(long n, size_t size, void *volatile *sink) {
    for (long i = 0; i < n; i++) {
        void *p = malloc(size);
        *sink = p;
        free(p);
    }
}
#else
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static void main_pairs(long n, size_t size, void *volatile *sink) {
    for (long i = 0; i < n; i++) {
        void *p = malloc(size);
        *sink = p;
        free(p);
    }
}

static double cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: lib_pairs LIBRARY main|lib SIZE PAIRS\n");
        return 2;
    }
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h) {
        fprintf(stderr, "lib_pairs: %s\n", dlerror());
        return 1;
    }
    void (*lib)(long, size_t, void *volatile *) =
        (void (*)(long, size_t, void *volatile *))dlsym(h, "lib_pairs");
    int in_lib = strcmp(argv[2], "lib") == 0;
    size_t size = (size_t)atol(argv[3]);
    long pairs = atol(argv[4]);
    void *volatile sink = NULL;
    /* Warm up: caches, the caller lookup's first miss, the library instance. */
    (in_lib ? lib : main_pairs)(pairs / 10 + 1, size, &sink);
    double t0 = cpu_ns();
    (in_lib ? lib : main_pairs)(pairs, size, &sink);
    double t1 = cpu_ns();
    printf("cpu_ns_per_pair=%.2f\n", (t1 - t0) / (double)pairs);
    return 0;
}
#endif
