/*
 * null_preload.c - the cheapest possible malloc interposer, as a reference.
 *
 * It forwards malloc, calloc, realloc and free to the next definition
 * (glibc) and does nothing else: no header, no thread-local state, no
 * accounting. Preloading it measures what interposing alone costs (one more
 * call through the PLT and one indirect jump per function), which is the
 * floor under any LD_PRELOAD design.
 *
 *   cc -O2 -shared -fPIC -o null_preload.so null_preload.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))

static void *(*next_malloc)(size_t);
static void *(*next_calloc)(size_t, size_t);
static void *(*next_realloc)(void *, size_t);
static void (*next_free)(void *);

/* dlsym may allocate while we resolve; serve that from a static pool that is
 * never freed. */
static _Alignas(16) char boot[16384];
static size_t boot_used;
static int resolving;

static void *boot_alloc(size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (boot_used + n > sizeof boot)
        return NULL;
    void *p = boot + boot_used;
    boot_used += n;
    return p;
}

static int in_boot(void *p) { return (char *)p >= boot && (char *)p < boot + sizeof boot; }

static void resolve(void) {
    resolving = 1;
    next_malloc = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    next_calloc = (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc");
    next_realloc = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    next_free = (void (*)(void *))dlsym(RTLD_NEXT, "free");
    resolving = 0;
}

EXPORT void *malloc(size_t n) {
    if (__builtin_expect(!next_malloc, 0)) {
        if (resolving)
            return boot_alloc(n);
        resolve();
    }
    return next_malloc(n);
}

EXPORT void *calloc(size_t n, size_t m) {
    if (__builtin_expect(!next_calloc, 0)) {
        if (resolving)
            return boot_alloc(n * m); /* the pool is static, hence zeroed */
        resolve();
    }
    return next_calloc(n, m);
}

EXPORT void *realloc(void *p, size_t n) {
    if (__builtin_expect(!next_realloc, 0)) {
        if (resolving)
            return NULL;
        resolve();
    }
    if (__builtin_expect(p && in_boot(p), 0)) {
        size_t avail = (size_t)(boot + sizeof boot - (char *)p);
        void *q = next_malloc(n);
        if (q)
            memcpy(q, p, n < avail ? n : avail);
        return q;
    }
    return next_realloc(p, n);
}

EXPORT void free(void *p) {
    if (__builtin_expect(!p || in_boot(p), 0))
        return;
    if (__builtin_expect(!next_free, 0))
        resolve();
    next_free(p);
}
