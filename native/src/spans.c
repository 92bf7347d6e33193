/*
 * spans.c - where spans come from and where they go (see spans.h).
 *
 * A span is in one of three states. Owned: in one thread's `spans` table,
 * which alone allocates from it and frees into its local list. Given up:
 * its token is AP__SPAN_UNOWNED, nobody allocates from it, and the free of
 * its last block (counted in `remote_state`) sends it to the pool. Pooled:
 * on the process-wide lock-free stack, with no live block, for any thread's
 * next span of any class. Arenas are never unmapped, so their table bits
 * never go stale; pooled spans beyond AP__POOL_KEEP give their pages back.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
#include <sys/mman.h>

#include "spans.h"

_Atomic uint64_t ap__arena_bits[AP__ARENA_WORDS];

#define AP__SPANS_PER_ARENA (AP__ARENA_SIZE / AP__SPAN_SIZE)
/* Pooled spans that keep their pages (1 MiB). */
#define AP__POOL_KEEP 16

/* The arena spans are cut from: its base | the index of its next span. A
 * fetch-and-add past the last index is harmless: far fewer threads than
 * AP__ARENA_SIZE can overshoot before one of them installs a new arena. */
static _Atomic uintptr_t arena_next;
/* The pool: a span address | a 16-bit ABA tag (spans are 64 KiB aligned). */
static _Atomic uintptr_t pool_head;
static _Atomic uint32_t pooled;
static _Atomic uint64_t next_token;
static _Atomic int spans_on;

/*
 * Spans only when the backend is glibc's malloc. jemalloc and mimalloc are
 * preloaded behind the runtime for their own small-block allocators (their
 * size classes leave the header less to cost, too); serving small blocks
 * from spans would take those blocks away from them. glibc is recognised by
 * the object its malloc is in: the one that defines gnu_get_libc_version
 * (jemalloc and mimalloc define __libc_malloc themselves, so that name would
 * not tell). dladdr takes the loader's lock and allocates nothing.
 */
void ap__spans_configure(void *backend_malloc) {
    Dl_info mine, libc;
    void *marker = dlsym(RTLD_DEFAULT, "gnu_get_libc_version");
    int on = marker && dladdr(backend_malloc, &mine) && dladdr(marker, &libc) &&
             mine.dli_fbase == libc.dli_fbase;
#ifdef AP_SPANS_ANY_BACKEND
    /* The ThreadSanitizer build (tests/sanitize.py), whose backend is the
     * sanitizer's allocator: the spans' cross-thread paths are what it is
     * there to check. */
    on = 1;
#endif
    atomic_store_explicit(&spans_on, on, memory_order_relaxed);
}

static void pool_push(ap__span *s) {
    uintptr_t head = atomic_load_explicit(&pool_head, memory_order_relaxed);
    uintptr_t next;
    do {
        atomic_store_explicit(&s->pool_next, (ap__span *)(head & ~(AP__SPAN_SIZE - 1)),
                              memory_order_relaxed);
        next = (uintptr_t)s | ((head + 1) & (AP__SPAN_SIZE - 1));
    } while (!atomic_compare_exchange_weak_explicit(&pool_head, &head, next,
                                                    memory_order_release, memory_order_relaxed));
}

static ap__span *pool_pop(void) {
    uintptr_t head = atomic_load_explicit(&pool_head, memory_order_acquire);
    for (;;) {
        ap__span *s = (ap__span *)(head & ~(AP__SPAN_SIZE - 1));
        if (!s)
            return NULL;
        /* `s` may be popped and reused meanwhile: then the tag has moved on
         * and the exchange fails. Its memory stays mapped either way. */
        ap__span *below = atomic_load_explicit(&s->pool_next, memory_order_relaxed);
        uintptr_t next = (uintptr_t)below | ((head + 1) & (AP__SPAN_SIZE - 1));
        if (atomic_compare_exchange_weak_explicit(&pool_head, &head, next, memory_order_acquire,
                                                  memory_order_acquire)) {
            atomic_fetch_sub_explicit(&pooled, 1, memory_order_relaxed);
            return s;
        }
    }
}

/* A span with no live block (every byte of its size table is 0) goes to the
 * pool, its pages given back when the pool holds enough of them already. */
static void release_span(ap__span *s) {
    s->local = NULL;
    s->bump = 0;
    s->used = 0;
    atomic_store_explicit(&s->remote, NULL, memory_order_relaxed);
    atomic_store_explicit(&s->remote_state, 0, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&pooled, 1, memory_order_relaxed) >= AP__POOL_KEEP) {
        /* The header page keeps the class; the rest reads as zero again,
         * size table included. */
        madvise((char *)s + 4096, AP__SPAN_SIZE - 4096, MADV_DONTNEED);
    }
    pool_push(s);
}

/* A fresh arena, aligned to its size, marked in the table; NULL if the
 * kernel refuses (then blocks keep their header, as without spans). */
static char *map_arena(void) {
    size_t len = 2 * AP__ARENA_SIZE;
    char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    char *a = (char *)(((uintptr_t)m + AP__ARENA_SIZE - 1) & ~(AP__ARENA_SIZE - 1));
    if (a > m)
        munmap(m, (size_t)(a - m));
    if (m + len > a + AP__ARENA_SIZE)
        munmap(a + AP__ARENA_SIZE, (size_t)(m + len - (a + AP__ARENA_SIZE)));
    uintptr_t word = (uintptr_t)a >> (AP__ARENA_SHIFT + 6);
    if (word >= AP__ARENA_WORDS) {
        munmap(a, AP__ARENA_SIZE);
        return NULL;
    }
    /* Before any span of it is handed out: a free that is given one of its
     * blocks has seen this (the block reached it after the malloc). */
    atomic_fetch_or_explicit(&ap__arena_bits[word], (uint64_t)1 << ((uintptr_t)a >> AP__ARENA_SHIFT & 63),
                             memory_order_release);
    return a;
}

/* The arena's table bit is set before the arena is installed (release), and
 * a thread taking a span of it acquires, so that its own frees of the span's
 * blocks, and the frees of every thread it hands them to, see the bit. */
static ap__span *fresh_span(void) {
    uintptr_t cur = atomic_load_explicit(&arena_next, memory_order_acquire);
    if (cur) { /* never 0 again once an arena is installed */
        uintptr_t got = atomic_fetch_add_explicit(&arena_next, 1, memory_order_acquire);
        if ((got & (AP__ARENA_SIZE - 1)) < AP__SPANS_PER_ARENA)
            return (ap__span *)((got & ~(AP__ARENA_SIZE - 1)) +
                                (got & (AP__ARENA_SIZE - 1)) * AP__SPAN_SIZE);
        cur = got + 1;
    }
    char *a = map_arena();
    if (!a)
        return NULL;
    if (!atomic_compare_exchange_strong_explicit(&arena_next, &cur, (uintptr_t)a + 1,
                                                 memory_order_release, memory_order_relaxed)) {
        /* Another thread took a span meanwhile, or installed an arena: this
         * one's other spans go to the pool (its bit is set, so it is never
         * unmapped). */
        for (uintptr_t i = 1; i < AP__SPANS_PER_ARENA; i++) {
            atomic_fetch_add_explicit(&pooled, 1, memory_order_relaxed);
            pool_push((ap__span *)(a + i * AP__SPAN_SIZE));
        }
    }
    return (ap__span *)a;
}

/* Give the span its class: geometry, and a size table of zeros. A span never
 * used (capacity 0) is all zero already, and should stay untouched until
 * its blocks are. */
static void shape_span(ap__span *s, uint32_t cls) {
    uint32_t capacity = (cls + 1) << 4;
    if (s->capacity == capacity)
        return; /* its table is all zero: every block is free */
    uint32_t n = (uint32_t)((AP__SPAN_SIZE - AP__SPAN_HEADER - 15) / (capacity + 1u));
    uint32_t start = (AP__SPAN_HEADER + n + 15u) & ~15u;
    if (s->capacity)
        memset(ap__span_sizes(s), 0, n);
    s->capacity = capacity;
    s->nblocks = n;
    s->start = start;
    s->recip = (uint32_t)((((uint64_t)1 << 32) + capacity - 1) / capacity);
    s->base_size = (int32_t)(cls << 4) - 1;
}

/* A span of class `cls` for the thread, bound to its current instance. */
static ap__span *take_span(ap__tls_t *t, uint32_t cls) {
    ap__span *s = pool_pop();
    if (!s && !(s = fresh_span()))
        return NULL;
    if (!t->span_token)
        t->span_token = atomic_fetch_add_explicit(&next_token, 1, memory_order_relaxed) + 1;
    shape_span(s, cls);
    s->local = NULL;
    s->bump = 0;
    s->used = 0;
    atomic_store_explicit(&s->instance, t->cur, memory_order_relaxed);
    atomic_store_explicit(&s->token, t->span_token, memory_order_relaxed);
    return s;
}

/* The owner gives the span up. Its frees from now on take the remote path
 * too (the token no longer matches), so `used` is final here. */
static void detach(ap__span *s) {
    atomic_store_explicit(&s->token, AP__SPAN_UNOWNED, memory_order_relaxed);
    int64_t add = AP__SPAN_DETACHED + (int64_t)s->used;
    if (atomic_fetch_add_explicit(&s->remote_state, add, memory_order_acq_rel) + add ==
        AP__SPAN_DETACHED)
        release_span(s);
}

void ap__span_free_remote(ap__span *s, void *p) {
    /* Pushed before it is counted: once the count says the span is empty,
     * the span may be pooled and reshaped at once. */
    void *head = atomic_load_explicit(&s->remote, memory_order_relaxed);
    do {
        *(void **)p = head;
    } while (!atomic_compare_exchange_weak_explicit(&s->remote, &head, p, memory_order_release,
                                                    memory_order_relaxed));
    if (atomic_fetch_sub_explicit(&s->remote_state, 1, memory_order_acq_rel) - 1 ==
        AP__SPAN_DETACHED)
        release_span(s);
}

/* 1 if the span has a block to hand out, taking back what other threads
 * freed when its own lists are empty. */
static int has_room(ap__span *s) {
    if (s->local || s->bump < s->nblocks)
        return 1;
    s->local = atomic_exchange_explicit(&s->remote, NULL, memory_order_acquire);
    return s->local != NULL;
}

/* Blocks of the span not freed yet (an owned span: remote_state <= 0). */
static int64_t live_blocks(ap__span *s) {
    return (int64_t)s->used + atomic_load_explicit(&s->remote_state, memory_order_acquire);
}

void *ap__span_alloc_slow(ap__tls_t *t, uint32_t cls, uint64_t size) {
    /* Not before the thread-exit destructor is registered (it gives the
     * spans up), nor while the bootstrap pool serves this thread, nor over a
     * backend other than glibc. */
    if (!t->registered || t->owner_bits || !atomic_load_explicit(&spans_on, memory_order_relaxed))
        return NULL;
    ap__span **ways = t->spans[cls];
    uint32_t cur = t->cur;
    int pick = -1;
    for (int k = 0; k < AP__SPAN_WAYS && pick < 0; k++)
        if (ways[k] && atomic_load_explicit(&ways[k]->instance, memory_order_relaxed) == cur &&
            has_room(ways[k]))
            pick = k;
    /* A span with no live block can serve any instance. */
    for (int k = 0; k < AP__SPAN_WAYS && pick < 0; k++)
        if (ways[k] && live_blocks(ways[k]) == 0 && has_room(ways[k])) {
            atomic_store_explicit(&ways[k]->instance, cur, memory_order_relaxed);
            pick = k;
        }
    /* An empty way, or a full span to give up, for a fresh span. */
    for (int k = 0; k < AP__SPAN_WAYS && pick < 0; k++)
        if (!ways[k] || !has_room(ways[k])) {
            ap__span *s = take_span(t, cls);
            if (!s)
                return NULL;
            if (ways[k])
                detach(ways[k]);
            ways[k] = s;
            pick = k;
        }
    if (pick < 0)
        return NULL; /* every way holds another instance's blocks: a header block */
    if (pick) {
        ap__span *s = ways[pick];
        ways[pick] = ways[0];
        ways[0] = s;
    }
    return ap__span_alloc(t, size);
}

void ap__spans_detach(ap__tls_t *t) {
    for (uint32_t cls = 0; cls < AP__SPAN_CLASSES; cls++)
        for (int k = 0; k < AP__SPAN_WAYS; k++)
            if (t->spans[cls][k]) {
                detach(t->spans[cls][k]);
                t->spans[cls][k] = NULL;
            }
}

void ap__span_bad_free(const void *p) {
    /* A second free finds the block's size byte cleared; a pointer into the
     * middle of a block or into the span header is no block at all. Either
     * way nothing may be credited or reused. */
    ap__span *s = ap__span_of(p);
    uint32_t off = (uint32_t)((uintptr_t)p - (uintptr_t)s) - s->start;
    uint32_t idx = (uint32_t)(((uint64_t)off * s->recip) >> 32);
    if (idx < s->nblocks && idx * s->capacity == off)
        ap__abort_double_free(p);
    ap__abort_invalid_free(p);
}
