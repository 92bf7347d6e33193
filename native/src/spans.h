/*
 * spans.h - small blocks without a header: the owner recorded per span.
 *
 * Blocks of up to AP__SPAN_MAX bytes (malloc's 16-byte alignment or less)
 * are carved by the runtime itself from 64 KiB spans it maps from the
 * kernel, not from the backend. Every block of a span is charged to the one
 * instance the span is bound to, so a free finds the instance to credit at
 * the start of the span (the pointer with its low 16 bits cleared), and the
 * requested size in one byte per block next to it: a 24-byte block takes 32
 * bytes and 1 byte, where glibc alone takes 32 and the header took 48.
 *
 * Spans come from 4 MiB arenas; one bit per 4 MiB of address space (a table
 * in the library's zero-filled data, touched only where arenas are) tells a
 * free that a pointer is in a span: one load, before any byte in front of
 * the block is read (foreign pointers and blocks with a header are not).
 *
 * Each thread holds AP__SPAN_WAYS spans per size class and allocates from
 * them without atomics; a free from the owning thread is as cheap, a free
 * from any other thread pushes the block on the span's remote list (one
 * compare-and-swap) for the owner to take back. When the instance a thread
 * allocates in is not the one its spans are bound to, a span with no live
 * block is bound anew, a full one is given up for a fresh one, and otherwise
 * the block is one with a header from the backend, as before: an instance
 * never takes a span from another one that still has blocks in it, so a
 * program whose instances change all the time costs at most what the header
 * cost it. A span given up (full, or its thread exited) goes back to the
 * process-wide pool when its last block is freed, by whichever thread frees
 * it; pooled spans beyond a few give their pages back (MADV_DONTNEED).
 *
 * The choice and its measurements: docs/internals.rst, "Block layout and
 * resident memory".
 */
#ifndef ALLOCPOLICY_SPANS_H
#define ALLOCPOLICY_SPANS_H

#include "internal.h"

#define AP__SPAN_SHIFT 16
#define AP__SPAN_SIZE ((uintptr_t)1 << AP__SPAN_SHIFT)
#define AP__ARENA_SHIFT 22
#define AP__ARENA_SIZE ((uintptr_t)1 << AP__ARENA_SHIFT)
/* User addresses the arena table covers (x86-64 and AArch64 with 4-level
 * page tables; an arena mapped above is given back and not used). */
#define AP__SPAN_ADDRESS_BITS 47
#define AP__ARENA_WORDS ((size_t)1 << (AP__SPAN_ADDRESS_BITS - AP__ARENA_SHIFT - 6))
/* The span header: the owner's line, then the line other threads write. */
#define AP__SPAN_HEADER 128u

typedef struct ap__span {
    /* Set when the span is given its class (before any block of it is
     * handed out), read by every free. */
    uint32_t start;      /* offset of block 0 from the span */
    uint32_t recip;      /* ceil(2^32 / capacity): block index by a multiply */
    uint32_t capacity;   /* bytes per block, a multiple of 16; 0: never used */
    uint32_t nblocks;
    int32_t base_size;   /* requested size = size code + base_size */
    _Atomic uint32_t instance; /* charged for every live block */
    _Atomic uint64_t token;    /* owning thread's token (AP__SPAN_UNOWNED: none) */
    /* The owning thread's alone. */
    void *local;         /* free blocks, linked through their first word */
    uint32_t bump;       /* blocks never handed out start here */
    uint32_t used;       /* handed out by the owner minus freed by it */
    /* Written by other threads. */
    _Alignas(AP__CACHELINE) _Atomic(void *) remote; /* blocks freed by them */
    /* Minus the frees by other threads; at detach, plus the owner's `used`
     * and AP__SPAN_DETACHED: so it is exactly AP__SPAN_DETACHED once a
     * given-up span's last block is freed. */
    _Atomic int64_t remote_state;
    _Atomic(struct ap__span *) pool_next;
    /* One byte per block from AP__SPAN_HEADER on: 0 free, else its size code. */
} ap__span;

#define AP__SPAN_DETACHED ((int64_t)1 << 40)
#define AP__SPAN_UNOWNED UINT64_MAX

extern _Atomic uint64_t ap__arena_bits[AP__ARENA_WORDS];

static inline uint8_t *ap__span_sizes(ap__span *s) { return (uint8_t *)s + AP__SPAN_HEADER; }

static inline uint32_t ap__span_class(uint64_t size) {
    return size ? (uint32_t)((size - 1) >> 4) : 0;
}

/* 1 if `p` is in one of the runtime's spans. */
static inline int ap__span_owns(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uintptr_t word = a >> (AP__ARENA_SHIFT + 6);
    if (word >= AP__ARENA_WORDS)
        return 0;
    return (int)(atomic_load_explicit(&ap__arena_bits[word], memory_order_relaxed) >>
                     (a >> AP__ARENA_SHIFT & 63) & 1);
}

static inline ap__span *ap__span_of(const void *p) {
    return (ap__span *)((uintptr_t)p & ~(AP__SPAN_SIZE - 1));
}

/* The block index of `p` in `s`; AP__SPAN_BAD unless `p` is the start of a
 * live block (a second free finds its byte 0). */
#define AP__SPAN_BAD UINT32_MAX
static inline uint32_t ap__span_index(ap__span *s, const void *p) {
    /* Below block 0 the offset wraps round to 2^32 - 128 or more, whose
     * quotient is far beyond nblocks. The quotient by multiplication is
     * exact for every offset within a span (offset x error < 2^24). */
    uint32_t off = (uint32_t)((uintptr_t)p - (uintptr_t)s) - s->start;
    uint32_t idx = (uint32_t)(((uint64_t)off * s->recip) >> 32);
    if (AP__UNLIKELY(idx >= s->nblocks || idx * s->capacity != off ||
                     !ap__span_sizes(s)[idx]))
        return AP__SPAN_BAD;
    return idx;
}

/* Slow paths (spans.c). */
AP__HIDDEN void *ap__span_alloc_slow(ap__tls_t *t, uint32_t cls, uint64_t size);
AP__HIDDEN void ap__span_free_remote(ap__span *s, void *p);
/* Give up every span of the thread (thread exit). */
AP__HIDDEN void ap__spans_detach(ap__tls_t *t);
/* A free of a pointer into a span that is no live block's start. */
__attribute__((noreturn)) AP__HIDDEN void ap__span_bad_free(const void *p);

/* The index of the live block `p` in its span `s`, for free, realloc and
 * malloc_usable_size: anything else aborts, nothing credited or reused. */
static inline uint32_t ap__span_block(ap__span *s, const void *p) {
    uint32_t idx = ap__span_index(s, p);
    if (AP__UNLIKELY(idx == AP__SPAN_BAD))
        ap__span_bad_free(p);
    return idx;
}

static inline uint64_t ap__span_block_size(ap__span *s, uint32_t idx) {
    return (uint64_t)((int64_t)ap__span_sizes(s)[idx] + s->base_size);
}

/* The next block of the thread's first span of `cls`, if that span is bound
 * to the thread's instance and has one; else the slow path, which may
 * return NULL (the caller then makes a block with a header). */
static inline __attribute__((always_inline)) void *ap__span_alloc(ap__tls_t *t, uint64_t size) {
    uint32_t cls = ap__span_class(size);
    ap__span *s = t->spans[cls][0];
    if (AP__LIKELY(s != NULL &&
                   atomic_load_explicit(&s->instance, memory_order_relaxed) == t->cur)) {
        char *b = s->local;
        uint32_t idx;
        if (AP__LIKELY(b != NULL)) {
            s->local = *(void **)b;
            idx = (uint32_t)(((uint64_t)((uint32_t)(b - (char *)s) - s->start) * s->recip) >> 32);
        } else if (s->bump < s->nblocks) {
            idx = s->bump++;
            b = (char *)s + s->start + (uint64_t)idx * s->capacity;
        } else {
            return ap__span_alloc_slow(t, cls, size);
        }
        ap__span_sizes(s)[idx] = (uint8_t)((int64_t)size - s->base_size);
        s->used++;
        return b;
    }
    return ap__span_alloc_slow(t, cls, size);
}

/* Free a block of a span: credit the span's instance with the block's
 * size, then give the block back to the span. */
static inline __attribute__((always_inline)) void ap__span_free(ap__tls_t *t, void *p) {
    ap__span *s = ap__span_of(p);
    uint32_t idx = ap__span_block(s, p);
    uint64_t size = ap__span_block_size(s, idx);
    uint32_t instance = atomic_load_explicit(&s->instance, memory_order_relaxed);
    ap__span_sizes(s)[idx] = 0;
    if (AP__UNLIKELY(!ap__credit_fast(t, instance, size)))
        ap__credit_slow(instance, size, AP_DOMAIN_LIBC);
    if (AP__LIKELY(atomic_load_explicit(&s->token, memory_order_relaxed) == t->span_token)) {
        *(void **)p = s->local;
        s->local = p;
        s->used--;
    } else {
        ap__span_free_remote(s, p);
    }
}

#endif /* ALLOCPOLICY_SPANS_H */
