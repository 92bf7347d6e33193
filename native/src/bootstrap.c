/*
 * bootstrap.c - find the next allocator in the chain without using the heap.
 *
 * Under LD_PRELOAD our malloc can be called before our constructor runs (by
 * another library's constructor, or by ld.so itself), and resolving the next
 * allocator with dlsym(RTLD_NEXT) may call malloc/calloc again (dlerror state).
 * So `ap__next` starts out pointing at stub functions: the first call resolves
 * the real functions; calls made while resolving, on the resolving thread, are
 * served from a static pool that free() recognises and ignores.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sched.h>
#include <string.h>

#include "internal.h"

_Alignas(64) char ap__pool[AP__POOL_SIZE];
static _Atomic size_t pool_used;

enum { UNRESOLVED = 0, RESOLVING = 1, RESOLVED = 2 };
_Atomic int ap__ready;
static AP__TLS int resolving_here;

void *ap__pool_alloc(size_t size, size_t align) {
    if (align < 16)
        align = 16;
    size_t used = atomic_load(&pool_used);
    for (;;) {
        size_t start = (used + align - 1) & ~(align - 1);
        if (start + size > AP__POOL_SIZE || start + size < start)
            return NULL;
        if (atomic_compare_exchange_weak(&pool_used, &used, start + size))
            return ap__pool + start;
    }
}

/* Stubs: what ap__next holds until the real functions are known. */
static void *stub_malloc(size_t n);
static void stub_free(void *p);
static void *stub_calloc(size_t n, size_t m);
static void *stub_realloc(void *p, size_t n);
static size_t stub_malloc_usable_size(void *p);

ap__backend_t ap__next = {
#define AP__X(name, ret, args) .name = stub_##name,
    AP__BACKEND_FUNCTIONS(AP__X)
#undef AP__X
};

void ap__bootstrap(void) {
    int expect = UNRESOLVED;
    if (atomic_compare_exchange_strong(&ap__ready, &expect, RESOLVING)) {
        resolving_here = 1;
        ap__tls.owner_bits = AP__POOL_OWNER;
        ap__backend_t found;
#define AP__X(name, ret, args) found.name = (ret(*) args)dlsym(RTLD_NEXT, #name);
        AP__BACKEND_FUNCTIONS(AP__X)
#undef AP__X
        ap__next = found;
        /* Still resolving: the lookups may allocate from the pool. */
        ap__spans_configure((void *)found.malloc);
        resolving_here = 0;
        ap__tls.owner_bits = 0;
        ap__threads_init();
        ap__policy_from_environment();
        atomic_store(&ap__ready, RESOLVED);
        /* The allocation that got here (libstdc++'s constructor runs before
         * ours in a C++ program) was decided before the thread could register
         * its exit destructor. Left alone, the fast path would serve the
         * thread from then on without ever registering it, and its
         * small-block cache, which needs the destructor, would stay off for
         * good. An empty allowance sends its next allocation through the slow
         * path, which registers. */
        ap__publish(&ap__tls);
        ap__refill(&ap__tls);
        return;
    }
    /* Another thread is resolving; dlsym takes no lock we hold, so wait. */
    while (atomic_load(&ap__ready) != RESOLVED && !resolving_here)
        sched_yield();
}

/* While this thread resolves, serve from the pool; otherwise resolve and go on. */
#define AP__IN_BOOTSTRAP() (resolving_here || (ap__bootstrap(), resolving_here))

static void *stub_malloc(size_t n) {
    if (AP__IN_BOOTSTRAP())
        return ap__pool_alloc(n, 16);
    return ap__next.malloc(n);
}

static void stub_free(void *p) {
    if (!p || ap__pool_owns(p))
        return;
    ap__bootstrap();
    if (ap__next.free != stub_free)
        ap__next.free(p);
}

static void *stub_calloc(size_t n, size_t m) {
    if (AP__IN_BOOTSTRAP()) {
        size_t total;
        if (__builtin_mul_overflow(n, m, &total))
            return NULL;
        return ap__pool_alloc(total, 16); /* static storage is zeroed, never reused */
    }
    return ap__next.calloc(n, m);
}

static void *stub_realloc(void *p, size_t n) {
    if (AP__IN_BOOTSTRAP())
        return NULL; /* callers of realloc during dlsym do not exist in glibc */
    return ap__next.realloc(p, n);
}

static size_t stub_malloc_usable_size(void *p) {
    if (AP__IN_BOOTSTRAP())
        return 0;
    return ap__next.malloc_usable_size(p);
}

/* Resolve early when loaded normally; harmless if a hook already did. */
__attribute__((constructor)) static void ap__init(void) {
    if (atomic_load(&ap__ready) == UNRESOLVED)
        ap__bootstrap();
}
