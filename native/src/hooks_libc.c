/*
 * hooks_libc.c - the malloc family, exported for LD_PRELOAD.
 *
 * Every hook has the same shape: decide (ap__charge, which is the whole fast
 * path), get a block (up to 256 bytes from the thread's spans, spans.h; else
 * from the thread's small-block cache or the backend, with a header), or undo
 * the charge when the backend fails. Frees of span blocks credit the span's
 * instance; other frees read the header, credit the instance named in it, then
 * keep the block in the cache or give it to the backend. The entry points all
 * funnel into alloc_block() and release_block(), so alignment and failure
 * handling live in one place; the C++ family (hooks_cxx.c) reaches them
 * through ap__alloc_for() and ap__release().
 *
 * Semantics follow glibc where the standards leave room: realloc(p, 0) frees
 * and returns NULL; memalign/aligned_alloc round an alignment that is not a
 * power of two up to the next one; posix_memalign rejects it with EINVAL.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "spans.h"

/* The hot path is spread over small helpers for reading; they must still
 * compile into one function per hook (the compiler's size heuristics would
 * otherwise call out to backend_block from malloc). */
#define AP__INLINE inline __attribute__((always_inline))

static _Atomic uint64_t foreign_frees;

uint64_t ap__foreign_frees(void) { return atomic_load_explicit(&foreign_frees, memory_order_relaxed); }

/* 1 if `p` carries our header; blocks from the bootstrap pool do too. */
static AP__INLINE int is_ours(void *p) {
    return (ap__header_of(p)->size_tag >> 48) == AP__TAG;
}

static inline uint64_t block_size(void *p) { return ap__header_of(p)->size_tag & AP__SIZE_MASK; }

static AP__NOINLINE void *refuse(void) {
    errno = ENOMEM;
    return NULL;
}

/*
 * Blocks whose user pointer is 2^32 bytes or more into their backend block
 * (alignments of 2^32 and more) do not fit the header's 32-bit offset. Their
 * header carries AP__FAR_TAG instead of AP__TAG, and the full offset sits in
 * the 8 bytes just below the header (the padding in front of such a block is
 * at least 2^32 - 16 bytes, so they are always there and unused). The other
 * tag keeps them off the fast paths, which test for AP__TAG anyway: they
 * reach the same functions as foreign pointers do, and those look for it.
 */
#define AP__FAR_TAG 0xFA12u

static inline uint64_t *far_offset_of(void *user) {
    return (uint64_t *)((char *)user - AP__HEADER_SIZE) - 1;
}

static inline int is_far(void *p) { return (ap__header_of(p)->size_tag >> 48) == AP__FAR_TAG; }

static inline uint64_t block_offset(void *user) {
    return is_far(user) ? *far_offset_of(user) : ap__header_of(user)->offset;
}

static AP__INLINE void write_header(void *user, uint64_t size, uint64_t offset) {
    ap__header *h = ap__header_of(user);
    h->instance = ap__tls.cur | ap__tls.owner_bits;
    if (AP__LIKELY(offset <= UINT32_MAX)) {
        h->size_tag = size | (uint64_t)AP__TAG << 48;
        h->offset = (uint32_t)offset;
    } else {
        h->size_tag = size | (uint64_t)AP__FAR_TAG << 48;
        *far_offset_of(user) = offset;
        h->offset = 0;
    }
}

/* What the caller may use of one of our blocks: the backend's usable size
 * from the user pointer on. realloc copies exactly this much when it moves an
 * aligned block, so nothing the caller was entitled to write is lost. */
static size_t usable_size(void *p) {
    if (ap__pool_owns(p))
        return block_size(p);
    uint64_t offset = block_offset(p);
    size_t usable = ap__next.malloc_usable_size((char *)p - offset);
    return usable > offset ? usable - offset : 0;
}

/* ---- The small-block cache (see internal.h) ------------------------------ */

static AP__INLINE void *cache_pop(ap__tls_t *t, uint64_t size) {
    uint32_t cls = ap__cache_class(size);
    char *base = t->cache[cls];
    /* A cached block's header holds its capacity (see cache_push). */
    if (!base || (((ap__header *)base)->size_tag & AP__SIZE_MASK) < size)
        return NULL;
    t->cache[cls] = *(void **)(base + AP__HEADER_SIZE);
    t->cached[cls]--;
    return base;
}

/* Keep a freed block for reuse; 0 if it must go to the backend. */
static AP__INLINE int cache_push(ap__tls_t *t, ap__header *h, void *base, uint64_t size) {
    if (size > AP__CACHE_MAX || h->offset != AP__HEADER_SIZE || !t->registered)
        return 0;
    uint32_t cls = ap__cache_class(size);
    if (t->cached[cls] >= AP__CACHE_DEPTH)
        return 0;
    /* The capacity it was allocated with, for cache_pop: a block's size
     * class capacity up to 256 bytes, its size above. */
    h->size_tag = (uint64_t)AP__CACHED_TAG << 48 | ap__capacity(size);
    *(void **)((char *)base + AP__HEADER_SIZE) = t->cache[cls];
    t->cache[cls] = base;
    t->cached[cls]++;
    return 1;
}

void ap__cache_flush(ap__tls_t *t) {
    for (uint32_t cls = 0; cls < AP__CACHE_CLASSES; cls++) {
        while (t->cache[cls]) {
            char *base = t->cache[cls];
            t->cache[cls] = *(void **)(base + AP__HEADER_SIZE);
            ((ap__header *)base)->size_tag = 0;
            ap__next.free(base);
        }
        t->cached[cls] = 0;
    }
}

/* 1 if `base` sits in this thread's cache, i.e. its block was freed already. */
static int cached_here(const ap__tls_t *t, const void *base) {
    for (uint32_t cls = 0; cls < AP__CACHE_CLASSES; cls++)
        for (const char *b = t->cache[cls]; b; b = *(void *const *)(b + AP__HEADER_SIZE))
            if (b == base)
                return 1;
    return 0;
}

/*
 * An aligned block (alignment > 16, the memalign family and aligned C++ new):
 * a plain backend block with room for the alignment, aligned inside. The
 * header sits just below the user pointer, so the first aligned address at
 * least 16 bytes into a 16-byte aligned block is at most `align` bytes in,
 * and `size + align` bytes always hold it.
 *
 * Asking the backend's posix_memalign instead (for `size + align` bytes,
 * since the header needs the room in front) costs twice the alignment in
 * address space: glibc, whose memalign takes `size + align` from its malloc
 * itself, then refuses alignments it serves its own callers (with 24 GiB and
 * the default overcommit heuristic: posix_memalign(2^34, 64) works, a block
 * of 2^34 + 64 bytes so aligned does not). Some backends also get small
 * aligned requests wrong (mimalloc 2.0.9, Debian 12's, for 256..1024 bytes
 * with an equal or half alignment; microsoft/mimalloc#700).
 *
 * The block gets at least its size class's capacity too: when the aligned
 * address happens to be 16 bytes in, its offset looks like a plain block's,
 * and the cache and realloc may treat it as one.
 */
static AP__NOINLINE void *aligned_block(uint64_t size, size_t align, int zero,
                                        uint64_t *offset) {
    uint64_t total;
    if (__builtin_add_overflow(ap__capacity(size), (uint64_t)align, &total))
        return NULL;
    char *base = ap__next.malloc(total);
    if (!base)
        return NULL;
    uintptr_t user = ((uintptr_t)base + AP__HEADER_SIZE + align - 1) & ~(uintptr_t)(align - 1);
    *offset = user - (uintptr_t)base;
    if (zero)
        memset((void *)user, 0, size);
    return base;
}

/* Backend call for a block of `size` user bytes aligned to `align` (> 16 only
 * for the memalign family). Returns the user pointer. */
static AP__INLINE void *backend_block(uint64_t size, size_t align, int zero, uint64_t *offset) {
    void *base;
    if (AP__LIKELY(align <= AP__HEADER_SIZE)) {
        *offset = AP__HEADER_SIZE;
        uint64_t capacity = ap__capacity(size);
        if (capacity <= AP__CACHE_MAX && (base = cache_pop(&ap__tls, size)) != NULL) {
            if (zero)
                memset((char *)base + AP__HEADER_SIZE, 0, size);
        } else {
            base = zero ? ap__next.calloc(1, capacity + AP__HEADER_SIZE)
                        : ap__next.malloc(capacity + AP__HEADER_SIZE);
        }
    } else {
        base = aligned_block(size, align, zero, offset);
    }
    return base ? (char *)base + *offset : NULL;
}

static AP__INLINE void *alloc_block(uint64_t size, size_t align, int zero) {
    if (AP__UNLIKELY(!ap__charge(size, AP_DOMAIN_LIBC)))
        return refuse();
    if (AP__LIKELY(size <= AP__SPAN_MAX && align <= AP__HEADER_SIZE)) {
        void *b = ap__span_alloc(&ap__tls, size);
        if (AP__LIKELY(b != NULL)) {
            if (zero)
                memset(b, 0, size);
            return b;
        }
    }
    uint64_t offset;
    void *user = backend_block(size, align, zero, &offset);
    if (AP__UNLIKELY(!user)) {
        ap__credit(ap__tls.cur, size, AP__UNDO);
        ap__backend_failed(size, AP_DOMAIN_LIBC);
        return refuse();
    }
    write_header(user, size, offset);
    return user;
}

/* A block with a far offset (see AP__FAR_TAG): credited as release_block
 * credits, never cached. */
static void release_far(void *p) {
    ap__header *h = ap__header_of(p);
    uint64_t size = h->size_tag & AP__SIZE_MASK;
    uint32_t instance = h->instance;
    void *base = (char *)p - *far_offset_of(p);
    h->size_tag = 0;
    ap__credit(instance, size, AP_DOMAIN_LIBC);
    ap__next.free(base);
}

static AP__NOINLINE void release_foreign(void *p) {
    ap__header *h = ap__header_of(p);
    if (is_far(p)) {
        release_far(p);
        return;
    }
    if ((h->size_tag >> 48) == AP__CACHED_TAG && cached_here(&ap__tls, h)) {
        /* The block is in this thread's cache: it was freed already. */
        ap__abort_double_free(p);
    }
    atomic_fetch_add_explicit(&foreign_frees, 1, memory_order_relaxed);
    ap__next.free(p);
}

static AP__INLINE void release_block(void *p) {
    /* Spans first: nothing in front of a span block may be read as a header. */
    if (AP__LIKELY(ap__span_owns(p))) {
        ap__span_free(&ap__tls, p);
        return;
    }
    if (AP__UNLIKELY(!is_ours(p))) {
        /* Not handed out by us (e.g. allocated before an interposer chain
         * changed): give it to the backend untouched. Or one of ours with a
         * far offset. */
        release_foreign(p);
        return;
    }
    ap__header *h = ap__header_of(p);
    uint64_t size = h->size_tag & AP__SIZE_MASK;
    uint32_t instance = h->instance;
    void *base = (char *)p - h->offset;
    ap__tls_t *t = &ap__tls;
    /* Read everything needed from the header first: after the backend free,
     * another thread may own these bytes. Clearing the tag makes a double
     * free look foreign, so the backend rejects it (as an invalid pointer)
     * instead of us crediting the block twice. */
    h->size_tag = 0;
    if (AP__UNLIKELY(!ap__credit_fast(t, instance, size))) {
        if (AP__UNLIKELY(instance & AP__POOL_OWNER))
            return; /* bootstrap pool: static storage, never reused */
        ap__credit_slow(instance, size, AP_DOMAIN_LIBC);
    }
    if (!cache_push(t, h, base, size))
        ap__next.free(base);
}

/* ---- Library scopes (libscope.c) ------------------------------------------
 *
 * While the policy binds libraries (ap__libs_on), each entry point hands its
 * return address, the code that called the allocator, to ap__lib_call, which
 * runs the allocation below in that code's library scope. The address must be
 * taken in the exported function itself; internal calls between entry points
 * (realloc -> malloc) are recognised there as nested. When nothing is bound
 * the cost is one load of a read-mostly flag and a branch never taken. */
typedef struct {
    void *p;
    size_t a, b;
    int rc;
} lib_args;

#define AP__LIBS_ON() AP__UNLIKELY(atomic_load_explicit(&ap__libs_on, memory_order_relaxed))

static void *lib_malloc(void *x) { return alloc_block(((lib_args *)x)->a, 0, 0); }

AP__EXPORT void *malloc(size_t size) {
    if (AP__LIBS_ON())
        return ap__lib_call(AP__CALLER(), size, lib_malloc, &(lib_args){.a = size});
    return alloc_block(size, 0, 0);
}

/* Our malloc under a name no one can interpose, for ap_is_preloaded(). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmissing-attributes"
extern void *ap__malloc_here(size_t) __attribute__((alias("malloc"), visibility("hidden")));
#pragma GCC diagnostic pop

AP__EXPORT void free(void *p) {
    if (AP__LIKELY(p != NULL))
        release_block(p);
}

static void *lib_calloc(void *x) { return alloc_block(((lib_args *)x)->a, 0, 1); }

AP__EXPORT void *calloc(size_t n, size_t m) {
    size_t total;
    if (__builtin_mul_overflow(n, m, &total))
        return refuse();
    if (AP__LIBS_ON())
        return ap__lib_call(AP__CALLER(), total, lib_calloc, &(lib_args){.a = total});
    return alloc_block(total, 0, 1);
}

/* Round an alignment up as glibc's memalign does; 0 when it cannot be met. */
static inline size_t fit_alignment(size_t align) {
    if (align <= AP__HEADER_SIZE)
        return AP__HEADER_SIZE;
    if (align & (align - 1)) {
        if (align > ((size_t)1 << 62))
            return 0;
        align = (size_t)1 << (64 - __builtin_clzl(align));
    }
    return align;
}

static void *memalign_block(size_t align, size_t size) {
    align = fit_alignment(align);
    if (!align) {
        errno = EINVAL;
        return NULL;
    }
    return alloc_block(size, align, 0);
}

static void *lib_memalign(void *x) {
    lib_args *a = x;
    return memalign_block(a->b, a->a);
}

/* For the C++ family (hooks_cxx.c), whose entry points take their caller's
 * address themselves. `align` 0 asks for malloc's alignment. */
void *ap__alloc_for(void *caller, size_t size, size_t align) {
    if (AP__LIBS_ON()) {
        lib_args a = {.a = size, .b = align};
        return ap__lib_call(caller, size, align ? lib_memalign : lib_malloc, &a);
    }
    return AP__LIKELY(!align) ? alloc_block(size, 0, 0) : memalign_block(align, size);
}

void ap__release(void *p) {
    if (AP__LIKELY(p != NULL))
        release_block(p);
}

AP__EXPORT void *memalign(size_t align, size_t size) {
    if (AP__LIBS_ON())
        return ap__lib_call(AP__CALLER(), size, lib_memalign, &(lib_args){.a = size, .b = align});
    return memalign_block(align, size);
}

AP__EXPORT void *aligned_alloc(size_t align, size_t size) {
    if (AP__LIBS_ON())
        return ap__lib_call(AP__CALLER(), size, lib_memalign, &(lib_args){.a = size, .b = align});
    return memalign_block(align, size);
}

static int posix_memalign_block(void **out, size_t align, size_t size) {
    if (align % sizeof(void *) != 0 || (align & (align - 1)) != 0 || align == 0)
        return EINVAL;
    int saved = errno; /* posix_memalign reports through its result only */
    void *p = alloc_block(size, align, 0);
    errno = saved;
    if (!p)
        return ENOMEM;
    *out = p;
    return 0;
}

static void *lib_posix_memalign(void *x) {
    lib_args *a = x;
    void *p = NULL;
    a->rc = posix_memalign_block(&p, a->b, a->a);
    /* A rejected alignment is no allocation: not counted as a failure. */
    return a->rc == EINVAL ? (void *)a : p;
}

AP__EXPORT int posix_memalign(void **out, size_t align, size_t size) {
    if (AP__LIBS_ON()) {
        lib_args a = {.a = size, .b = align};
        void *p = ap__lib_call(AP__CALLER(), size, lib_posix_memalign, &a);
        if (a.rc == 0)
            *out = p;
        return a.rc;
    }
    return posix_memalign_block(out, align, size);
}

static inline size_t page_size(void) {
    static _Atomic size_t cached;
    size_t ps = atomic_load_explicit(&cached, memory_order_relaxed);
    if (!ps) {
        ps = (size_t)sysconf(_SC_PAGESIZE);
        atomic_store_explicit(&cached, ps, memory_order_relaxed);
    }
    return ps;
}

static void *lib_page_aligned(void *x) { return alloc_block(((lib_args *)x)->a, page_size(), 0); }

AP__EXPORT void *valloc(size_t size) {
    if (AP__LIBS_ON())
        return ap__lib_call(AP__CALLER(), size, lib_page_aligned, &(lib_args){.a = size});
    return alloc_block(size, page_size(), 0);
}

AP__EXPORT void *pvalloc(size_t size) {
    size_t ps = page_size();
    size_t rounded;
    if (__builtin_add_overflow(size, ps - 1, &rounded))
        return refuse();
    rounded &= ~(ps - 1);
    if (AP__LIBS_ON())
        return ap__lib_call(AP__CALLER(), rounded, lib_page_aligned, &(lib_args){.a = rounded});
    return alloc_block(rounded, ps, 0);
}

/* realloc of an aligned block (realloc promises malloc's alignment only) or
 * of a bootstrap-pool block (static storage; free() ignores it): a fresh
 * block, then everything the caller may have written into the old one, up to
 * its usable size (glibc's realloc copies that much too). */
static AP__NOINLINE void *move_block(void *p, size_t size) {
    size_t keep = usable_size(p);
    void *q = malloc(size);
    if (q) {
        memcpy(q, p, keep < size ? keep : size);
        free(p);
    }
    return q;
}

/*
 * realloc of a span block: in place while the size stays in its class and
 * the caller's instance is the span's (only the difference is charged or
 * credited); otherwise a malloc, a copy and a free, which charge and credit
 * exactly as those calls would. On a refusal the old block is untouched.
 */
static AP__NOINLINE void *realloc_span_block(void *p, size_t size) {
    ap__span *s = ap__span_of(p);
    uint32_t idx = ap__span_block(s, p);
    uint64_t old = ap__span_block_size(s, idx);
    uint32_t owner = atomic_load_explicit(&s->instance, memory_order_relaxed);
    if (size <= AP__SPAN_MAX && ((uint64_t)size + 15) >> 4 == ((uint64_t)s->capacity >> 4) &&
        owner == ap__tls.cur) {
        if (size > old && !ap__charge(size - old, AP_DOMAIN_LIBC))
            return refuse();
        ap__span_sizes(s)[idx] = (uint8_t)((int64_t)size - s->base_size);
        if (old > size)
            ap__credit(owner, old - size, AP_DOMAIN_LIBC);
        return p;
    }
    /* All the caller may have written: the block's capacity (what
     * malloc_usable_size reports), as glibc's realloc copies. */
    size_t keep = s->capacity;
    void *q = malloc(size);
    if (q) {
        memcpy(q, p, keep < size ? keep : size);
        free(p);
    }
    return q;
}

/*
 * realloc: decide first, then let the backend move the block. When the block
 * belongs to the calling thread's instance only the growth is charged;
 * otherwise the new block is charged in full to the caller's instance and the
 * old size credited to its owner, exactly as a malloc + free would be. On any
 * failure the old block is untouched and still accounted where it was.
 */
static void *realloc_block(void *p, size_t size) {
    if (!p)
        return malloc(size);
    if (size == 0) {
        free(p);
        return NULL;
    }
    if (ap__span_owns(p))
        return realloc_span_block(p, size);
    if (AP__UNLIKELY(!is_ours(p)))
        return is_far(p) ? move_block(p, size) : ap__next.realloc(p, size);
    ap__header *h = ap__header_of(p);
    uint64_t old = h->size_tag & AP__SIZE_MASK;
    if (AP__UNLIKELY(h->offset != AP__HEADER_SIZE || ap__pool_owns(p)))
        return move_block(p, size);
    uint32_t owner = h->instance;
    int same = owner == ap__tls.cur;
    uint64_t charged = same ? (size > old ? size - old : 0) : size;
    if (charged && !ap__charge(charged, AP_DOMAIN_LIBC))
        return refuse();
    /* Small blocks keep their class's full capacity (larger ones their size),
     * so that the block can go to the cache when freed. */
    void *nb = ap__next.realloc((char *)p - AP__HEADER_SIZE,
                                ap__capacity(size) + AP__HEADER_SIZE);
    if (AP__UNLIKELY(!nb)) {
        if (charged)
            ap__credit(ap__tls.cur, charged, AP__UNDO);
        ap__backend_failed(size, AP_DOMAIN_LIBC);
        return refuse();
    }
    if (same) {
        if (old > size)
            ap__credit(owner, old - size, AP_DOMAIN_LIBC);
    } else {
        ap__credit(owner, old, AP_DOMAIN_LIBC);
    }
    void *user = (char *)nb + AP__HEADER_SIZE;
    write_header(user, size, AP__HEADER_SIZE);
    return user;
}

static void *lib_realloc(void *x) {
    lib_args *a = x;
    return realloc_block(a->p, a->a);
}

AP__EXPORT void *realloc(void *p, size_t size) {
    /* realloc(p, 0) frees: not an allocation to look up or count. */
    if (AP__LIBS_ON() && size)
        return ap__lib_call(AP__CALLER(), size, lib_realloc, &(lib_args){.p = p, .a = size});
    return realloc_block(p, size);
}

AP__EXPORT void *reallocarray(void *p, size_t n, size_t m) {
    size_t total;
    if (__builtin_mul_overflow(n, m, &total))
        return refuse();
    if (AP__LIBS_ON() && total)
        return ap__lib_call(AP__CALLER(), total, lib_realloc, &(lib_args){.p = p, .a = total});
    return realloc_block(p, total);
}

AP__EXPORT size_t malloc_usable_size(void *p) {
    if (!p)
        return 0;
    if (ap__span_owns(p)) {
        ap__span *s = ap__span_of(p);
        ap__span_block(s, p);
        return s->capacity;
    }
    if (!is_ours(p) && !is_far(p))
        return ap__next.malloc_usable_size(p);
    return usable_size(p);
}
