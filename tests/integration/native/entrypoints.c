/*
 * entrypoints.c - checks every malloc-family entry point from the outside.
 *
 *   entrypoints MODE...      run the named checks, "all" for every portable one;
 *                            "enter:NAME" enters scope NAME for the checks after it
 *
 * Each check prints "ok MODE" or "FAIL MODE: why" lines and nothing that
 * depends on the allocator (no addresses, no usable sizes), so the output of
 * one run can be compared byte for byte with a run under another backend or
 * with no preload at all. The exit status is 1 when any check failed.
 *
 * Checks that need the runtime's C ABI (entering a scope) find it with
 * dlsym(RTLD_DEFAULT, ...) so the same binary also runs without the preload;
 * they report "skip MODE: ..." there.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "allocpolicy.h"

static int failures;

#define FAIL(...)                                                                  \
    do {                                                                           \
        printf("FAIL %s: ", mode_name);                                            \
        printf(__VA_ARGS__);                                                       \
        printf(" (line %d)\n", __LINE__);                                          \
        failures++;                                                                \
        return;                                                                    \
    } while (0)

#define CHECK(cond, ...)                                                           \
    do {                                                                           \
        if (!(cond))                                                               \
            FAIL(__VA_ARGS__);                                                     \
    } while (0)

static const char *mode_name;

/* Keep the compiler from proving anything about the allocator's results:
 * every pointer goes through here before it is used. */
static void *volatile sink;
static void *launder(void *p) {
    sink = p;
    return sink;
}

static void fill(void *p, size_t n, unsigned seed) {
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)(seed + i * 131u);
}

static int intact(const void *p, size_t n, unsigned seed) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i] != (unsigned char)(seed + i * 131u))
            return 0;
    return 1;
}

static int all_zero(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i])
            return 0;
    return 1;
}

static int aligned_to(const void *p, size_t align) { return ((uintptr_t)p & (align - 1)) == 0; }

static const size_t sizes[] = {0, 1, 7, 8, 15, 16, 17, 24, 100, 255, 256, 1000, 4095, 4096,
                               4097, 65536, 131072 + 3, (size_t)1 << 20, ((size_t)4 << 20) + 1};
#define NSIZES (sizeof sizes / sizeof sizes[0])

/* ---- The runtime's ABI, when preloaded ------------------------------------- */

static struct {
    ap_status (*scope_find)(const char *, uint32_t *);
    ap_status (*enter)(uint32_t, uint32_t *);
    ap_status (*exit)(void);
    ap_status (*last_violation)(ap_violation *);
    int (*is_preloaded)(void);
    ap_status (*current)(uint32_t *, uint32_t *);
    void (*flush)(void);
    ap_status (*instance_stats)(uint32_t, ap_instance_stats *);
} ap;

static int have_runtime(void) {
    ap.scope_find = (ap_status(*)(const char *, uint32_t *))dlsym(RTLD_DEFAULT, "ap_scope_find");
    ap.enter = (ap_status(*)(uint32_t, uint32_t *))dlsym(RTLD_DEFAULT, "ap_enter");
    ap.exit = (ap_status(*)(void))dlsym(RTLD_DEFAULT, "ap_exit");
    ap.last_violation = (ap_status(*)(ap_violation *))dlsym(RTLD_DEFAULT, "ap_last_violation");
    ap.is_preloaded = (int (*)(void))dlsym(RTLD_DEFAULT, "ap_is_preloaded");
    ap.current = (ap_status(*)(uint32_t *, uint32_t *))dlsym(RTLD_DEFAULT, "ap_current");
    ap.flush = (void (*)(void))dlsym(RTLD_DEFAULT, "ap_flush");
    ap.instance_stats =
        (ap_status(*)(uint32_t, ap_instance_stats *))dlsym(RTLD_DEFAULT, "ap_get_instance_stats");
    return ap.scope_find && ap.enter && ap.exit && ap.last_violation && ap.is_preloaded &&
           ap.current && ap.flush && ap.instance_stats;
}

/* Enter scope `name` (declared by the table in the environment). */
static int enter_scope(const char *name) {
    uint32_t id, inst;
    if (ap.scope_find(name, &id) != AP_OK) {
        printf("FAIL %s: scope %s is not declared\n", mode_name, name);
        failures++;
        return 0;
    }
    if (ap.enter(id, &inst) != AP_OK) {
        printf("FAIL %s: ap_enter(%s) failed\n", mode_name, name);
        failures++;
        return 0;
    }
    return 1;
}

/* Live bytes of the calling thread's innermost instance, published. */
static int64_t live_here(void) {
    uint32_t inst, depth;
    ap.flush();
    ap.current(&inst, &depth);
    ap_instance_stats st = {.size = sizeof st};
    if (ap.instance_stats(inst, &st) != AP_OK)
        return -1;
    return st.live;
}

/* ---- Checks --------------------------------------------------------------- */

static void check_malloc(void) {
    for (size_t i = 0; i < NSIZES; i++) {
        size_t n = sizes[i];
        unsigned char *p = launder(malloc(n));
        CHECK(p != NULL, "malloc(%zu) returned NULL", n);
        CHECK(aligned_to(p, 16), "malloc(%zu) is not 16-byte aligned", n);
        fill(p, n, (unsigned)i);
        CHECK(intact(p, n, (unsigned)i), "malloc(%zu) content changed", n);
        CHECK(malloc_usable_size(p) >= n, "malloc_usable_size < %zu", n);
        free(p);
    }
    errno = 0;
    void *huge = launder(malloc(SIZE_MAX));
    CHECK(huge == NULL && errno == ENOMEM, "malloc(SIZE_MAX) gave %p errno %d", huge, errno);
    errno = 0;
    huge = launder(malloc(SIZE_MAX / 2));
    CHECK(huge == NULL && errno == ENOMEM, "malloc(SIZE_MAX/2) gave %p errno %d", huge, errno);
    printf("ok %s\n", mode_name);
}

static void check_free(void) {
    free(NULL); /* a no-op by the standard */
    /* Many blocks freed in an order unlike their allocation order. */
    enum { N = 512 };
    void *blocks[N];
    for (int i = 0; i < N; i++) {
        blocks[i] = launder(malloc((size_t)(i * 37 % 3000)));
        CHECK(blocks[i] != NULL, "malloc %d failed", i);
    }
    for (int i = 0; i < N; i += 2)
        free(blocks[i]);
    for (int i = N - 1; i > 0; i -= 2)
        free(blocks[i]);
    printf("ok %s\n", mode_name);
}

static void check_calloc(void) {
    for (size_t i = 0; i < NSIZES; i++) {
        size_t n = sizes[i];
        /* Dirty a block of the same size first so a reused one would show. */
        unsigned char *d = launder(malloc(n));
        CHECK(d != NULL, "malloc(%zu) returned NULL", n);
        memset(d, 0xA5, n);
        free(d);
        unsigned char *p = launder(calloc(1, n));
        CHECK(p != NULL, "calloc(1, %zu) returned NULL", n);
        CHECK(all_zero(p, n), "calloc(1, %zu) is not zeroed", n);
        CHECK(malloc_usable_size(p) >= n, "malloc_usable_size < %zu", n);
        free(p);
        p = launder(calloc(n, 3));
        CHECK(p != NULL, "calloc(%zu, 3) returned NULL", n);
        CHECK(all_zero(p, n * 3), "calloc(%zu, 3) is not zeroed", n);
        free(p);
    }
    void *z = launder(calloc(0, 0));
    CHECK(z != NULL, "calloc(0, 0) returned NULL");
    free(z);
    printf("ok %s\n", mode_name);
}

static void check_calloc_overflow(void) {
    static const size_t pairs[][2] = {
        {SIZE_MAX, 2}, {2, SIZE_MAX}, {SIZE_MAX / 2 + 1, 2}, {(size_t)1 << 32, (size_t)1 << 32},
        {SIZE_MAX, SIZE_MAX}};
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        errno = 0;
        void *p = launder(calloc(pairs[i][0], pairs[i][1]));
        CHECK(p == NULL, "calloc(%zu, %zu) did not fail", pairs[i][0], pairs[i][1]);
        CHECK(errno == ENOMEM, "calloc(%zu, %zu) errno %d", pairs[i][0], pairs[i][1], errno);
    }
    printf("ok %s\n", mode_name);
}

static void check_realloc_null(void) {
    for (size_t i = 0; i < NSIZES; i++) {
        size_t n = sizes[i];
        unsigned char *p = launder(realloc(NULL, n));
        CHECK(p != NULL, "realloc(NULL, %zu) returned NULL", n);
        fill(p, n, 3);
        CHECK(malloc_usable_size(p) >= n, "malloc_usable_size < %zu", n);
        free(p);
    }
    printf("ok %s\n", mode_name);
}

static void check_realloc_zero(void) {
    /* glibc frees the block and returns NULL (REALLOC_ZERO_BYTES_FREES). */
    for (size_t i = 0; i < NSIZES; i++) {
        void *p = launder(malloc(sizes[i]));
        CHECK(p != NULL, "malloc(%zu) returned NULL", sizes[i]);
        void *q = launder(realloc(p, 0));
        CHECK(q == NULL, "realloc(p, 0) returned a block");
    }
    void *a = NULL;
    CHECK(posix_memalign(&a, 256, 100) == 0, "posix_memalign failed");
    CHECK(launder(realloc(a, 0)) == NULL, "realloc(aligned, 0) returned a block");
    printf("ok %s\n", mode_name);
}

static void check_realloc_shrink(void) {
    for (size_t i = 1; i < NSIZES; i++) {
        size_t n = sizes[i];
        size_t m = n / 3;
        if (!m)
            m = 1;
        unsigned char *p = launder(malloc(n));
        CHECK(p != NULL, "malloc(%zu) returned NULL", n);
        fill(p, n, 11);
        unsigned char *q = launder(realloc(p, m));
        CHECK(q != NULL, "realloc(%zu -> %zu) returned NULL", n, m);
        CHECK(intact(q, m, 11), "realloc(%zu -> %zu) lost content", n, m);
        CHECK(malloc_usable_size(q) >= m, "malloc_usable_size < %zu", m);
        free(q);
    }
    printf("ok %s\n", mode_name);
}

static void check_realloc_grow(void) {
    /* A chain through every size class, small to mmap-sized and back. */
    size_t have = 1;
    unsigned char *p = launder(malloc(have));
    CHECK(p != NULL, "malloc(1) returned NULL");
    fill(p, have, 5);
    for (size_t i = 1; i < NSIZES; i++) {
        size_t n = sizes[i];
        if (n <= have)
            continue;
        unsigned char *q = launder(realloc(p, n));
        CHECK(q != NULL, "realloc(%zu -> %zu) returned NULL", have, n);
        CHECK(intact(q, have, 5), "realloc(%zu -> %zu) lost content", have, n);
        CHECK(malloc_usable_size(q) >= n, "malloc_usable_size < %zu", n);
        fill(q, n, 5);
        p = q;
        have = n;
    }
    free(p);
    /* Aligned blocks grow too; only the content is promised, not the alignment. */
    for (size_t align = 32; align <= 65536; align *= 4) {
        void *a = NULL;
        CHECK(posix_memalign(&a, align, 100) == 0, "posix_memalign(%zu) failed", align);
        fill(a, 100, 9);
        unsigned char *b = launder(realloc(a, 5000));
        CHECK(b != NULL, "realloc(aligned %zu) returned NULL", align);
        CHECK(intact(b, 100, 9), "realloc(aligned %zu) lost content", align);
        unsigned char *c = launder(realloc(b, 50));
        CHECK(c != NULL, "realloc(aligned %zu, shrink) returned NULL", align);
        CHECK(intact(c, 50, 9), "realloc(aligned %zu, shrink) lost content", align);
        free(c);
    }
    printf("ok %s\n", mode_name);
}

/* realloc of an aligned block keeps everything up to the old block's usable
 * size: malloc_usable_size() says the caller may write that much. */
static void check_realloc_aligned_usable(void) {
    static const size_t lens[] = {1, 100, 1000, 5000, 100000};
    for (size_t align = 32; align <= 65536; align *= 8) {
        for (size_t j = 0; j < sizeof lens / sizeof lens[0]; j++) {
            void *a = NULL;
            CHECK(posix_memalign(&a, align, lens[j]) == 0, "posix_memalign(%zu, %zu) failed",
                  align, lens[j]);
            size_t usable = malloc_usable_size(a);
            CHECK(usable >= lens[j], "usable %zu < %zu", usable, lens[j]);
            fill(a, usable, 13);
            unsigned char *b = launder(realloc(a, usable + 4096));
            CHECK(b != NULL, "realloc(aligned %zu, %zu) returned NULL", align, usable + 4096);
            CHECK(intact(b, usable, 13), "realloc(aligned %zu of %zu) lost bytes within the usable size",
                  align, lens[j]);
            CHECK(malloc_usable_size(b) >= usable + 4096, "usable after realloc too small");
            free(b);
        }
    }
    printf("ok %s\n", mode_name);
}

static void check_realloc_huge(void) {
    unsigned char *p = launder(malloc(100));
    CHECK(p != NULL, "malloc(100) returned NULL");
    fill(p, 100, 21);
    errno = 0;
    void *q = launder(realloc(p, SIZE_MAX - 4096));
    CHECK(q == NULL && errno == ENOMEM, "realloc(p, huge) gave %p errno %d", q, errno);
    CHECK(intact(p, 100, 21), "failed realloc changed the old block");
    free(p);
    printf("ok %s\n", mode_name);
}

/* Needs the preload and a table declaring `work` with a small raise budget. */
static void check_realloc_fail(void) {
    if (!have_runtime()) {
        printf("skip %s: runtime not preloaded\n", mode_name);
        return;
    }
    if (!enter_scope("work"))
        return;
    unsigned char *p = launder(malloc(1000));
    CHECK(p != NULL, "malloc(1000) in scope returned NULL");
    fill(p, 1000, 17);
    errno = 0;
    void *q = launder(realloc(p, (size_t)8 << 20));
    CHECK(q == NULL, "realloc over the budget succeeded");
    CHECK(errno == ENOMEM, "realloc over the budget: errno %d", errno);
    CHECK(intact(p, 1000, 17), "refused realloc changed the old block");
    ap_violation v = {.size = sizeof v};
    CHECK(ap.last_violation(&v) == AP_OK, "ap_last_violation failed");
    CHECK(v.reason == AP_REASON_BUDGET && v.requested >= ((size_t)8 << 20) - 1000,
          "violation reason %u requested %llu", v.reason, (unsigned long long)v.requested);
    /* The old block is still usable and still reallocatable within budget. */
    unsigned char *r = launder(realloc(p, 2000));
    CHECK(r != NULL, "realloc within the budget failed after a refusal");
    CHECK(intact(r, 1000, 17), "realloc after a refusal lost content");
    free(r);
    /* reallocarray goes through the same decision. */
    p = launder(malloc(64));
    CHECK(p != NULL, "malloc(64) in scope returned NULL");
    fill(p, 64, 19);
    errno = 0;
    q = launder(reallocarray(p, (size_t)1 << 20, 16));
    CHECK(q == NULL && errno == ENOMEM, "reallocarray over the budget gave %p errno %d", q, errno);
    CHECK(intact(p, 64, 19), "refused reallocarray changed the old block");
    free(p);
    CHECK(ap.exit() == AP_OK, "ap_exit failed");
    printf("ok %s\n", mode_name);
}

static void check_reallocarray(void) {
    unsigned char *p = launder(reallocarray(NULL, 10, 10));
    CHECK(p != NULL, "reallocarray(NULL, 10, 10) returned NULL");
    fill(p, 100, 23);
    unsigned char *q = launder(reallocarray(p, 100, 10));
    CHECK(q != NULL, "reallocarray(p, 100, 10) returned NULL");
    CHECK(intact(q, 100, 23), "reallocarray lost content");
    p = q;
    static const size_t pairs[][2] = {
        {SIZE_MAX, 2}, {SIZE_MAX / 2 + 1, 2}, {(size_t)1 << 33, (size_t)1 << 33}};
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        errno = 0;
        q = launder(reallocarray(p, pairs[i][0], pairs[i][1]));
        CHECK(q == NULL, "reallocarray(%zu, %zu) did not fail", pairs[i][0], pairs[i][1]);
        CHECK(errno == ENOMEM, "reallocarray overflow errno %d", errno);
        CHECK(intact(p, 100, 23), "failed reallocarray changed the old block");
    }
    free(p);
    printf("ok %s\n", mode_name);
}

static void check_posix_memalign_einval(void) {
    static const size_t bad[] = {0, 1, 2, 3, 4, 12, 24, 48, 100, 4095, 4097, ((size_t)1 << 20) + 8,
                                 SIZE_MAX};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        void *p = (void *)&bad; /* must stay untouched on failure */
        int rc = posix_memalign(&p, bad[i], 64);
        CHECK(rc == EINVAL, "posix_memalign(align=%zu) returned %d", bad[i], rc);
        CHECK(p == (void *)&bad, "posix_memalign(align=%zu) wrote the out-param", bad[i]);
    }
    printf("ok %s\n", mode_name);
}

static void check_posix_memalign(void) {
    static const size_t lens[] = {0, 1, 64, 1000, 4096, 70000};
    for (size_t align = 8; align <= ((size_t)1 << 20); align *= 2) {
        for (size_t j = 0; j < sizeof lens / sizeof lens[0]; j++) {
            size_t n = lens[j];
            void *p = NULL;
            int saved = 1234;
            errno = saved;
            int rc = posix_memalign(&p, align, n);
            CHECK(rc == 0, "posix_memalign(%zu, %zu) returned %d", align, n, rc);
            CHECK(errno == saved, "posix_memalign(%zu, %zu) changed errno", align, n);
            CHECK(p && aligned_to(p, align), "posix_memalign(%zu, %zu) misaligned", align, n);
            fill(p, n, (unsigned)align);
            CHECK(intact(p, n, (unsigned)align), "posix_memalign(%zu, %zu) content", align, n);
            CHECK(malloc_usable_size(p) >= n, "malloc_usable_size < %zu (align %zu)", n, align);
            free(p);
        }
        /* Sizes that are the alignment or a small multiple of it: backends
         * have got these wrong (mimalloc 2.0.9 for 256..1024 bytes). */
        for (size_t n = align / 2; n <= 4 * align; n += align / 2) {
            void *p = NULL;
            CHECK(posix_memalign(&p, align, n) == 0, "posix_memalign(%zu, %zu) failed", align, n);
            CHECK(aligned_to(p, align), "posix_memalign(%zu, %zu) misaligned", align, n);
            free(p);
            p = launder(aligned_alloc(align, n));
            CHECK(p && aligned_to(p, align), "aligned_alloc(%zu, %zu) misaligned", align, n);
            free(p);
        }
    }
    printf("ok %s\n", mode_name);
}

/* Alignments of 2^32 and more: every backend serves these (glibc up to what
 * the address space overcommit allows), so must the runtime. */
static void check_huge_alignment(void) {
    for (int shift = 32; shift <= 33; shift++) {
        size_t align = (size_t)1 << shift;
        void *p = (void *)&align;
        int rc = posix_memalign(&p, align, 64);
        CHECK(rc == 0, "posix_memalign(2^%d, 64) returned %d", shift, rc);
        CHECK(aligned_to(p, align), "posix_memalign(2^%d) misaligned", shift);
        CHECK(malloc_usable_size(p) >= 64, "posix_memalign(2^%d): usable < 64", shift);
        fill(p, 64, 47);
        unsigned char *q = launder(realloc(p, 200));
        CHECK(q != NULL && intact(q, 64, 47), "realloc(2^%d-aligned) lost content", shift);
        free(q);
        q = launder(aligned_alloc(align, 100));
        CHECK(q != NULL && aligned_to(q, align), "aligned_alloc(2^%d, 100) gave %p", shift,
              (void *)q);
        fill(q, 100, 53);
        free(q);
        q = launder(memalign(align, 100));
        CHECK(q != NULL && aligned_to(q, align), "memalign(2^%d, 100) gave %p", shift, (void *)q);
        free(q);
    }
    printf("ok %s\n", mode_name);
}

static void check_aligned_alloc(void) {
    /* Powers of two only: glibc >= 2.38 rejects other alignments here, older
     * ones round them up, and the runtime follows the older behaviour. */
    for (size_t align = 1; align <= ((size_t)1 << 20); align *= 2) {
        size_t n = align * 3; /* C11 wanted a multiple of the alignment */
        unsigned char *p = launder(aligned_alloc(align, n));
        CHECK(p != NULL, "aligned_alloc(%zu, %zu) returned NULL", align, n);
        CHECK(aligned_to(p, align), "aligned_alloc(%zu) misaligned", align);
        fill(p, n, 29);
        CHECK(malloc_usable_size(p) >= n, "malloc_usable_size < %zu", n);
        free(p);
    }
    printf("ok %s\n", mode_name);
}

static void check_memalign(void) {
    for (size_t align = 1; align <= ((size_t)1 << 20); align *= 2) {
        unsigned char *p = launder(memalign(align, 333));
        CHECK(p != NULL, "memalign(%zu) returned NULL", align);
        CHECK(aligned_to(p, align), "memalign(%zu) misaligned", align);
        fill(p, 333, 31);
        CHECK(malloc_usable_size(p) >= 333, "malloc_usable_size < 333");
        free(p);
    }
    /* Not a power of two: rounded up to the next one, as glibc does. */
    static const size_t odd[][2] = {{3, 4}, {24, 32}, {48, 64}, {100, 128}, {1000, 1024},
                                    {4097, 8192}, {65535, 65536}, {300000, 524288}};
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) {
        unsigned char *p = launder(memalign(odd[i][0], 77));
        CHECK(p != NULL, "memalign(%zu) returned NULL", odd[i][0]);
        CHECK(aligned_to(p, odd[i][1]), "memalign(%zu) not aligned to %zu", odd[i][0],
              odd[i][1]);
        fill(p, 77, 37);
        free(p);
    }
    errno = 0;
    void *p = launder(memalign(64, SIZE_MAX - 100));
    CHECK(p == NULL && errno == ENOMEM, "memalign(64, huge) gave %p errno %d", p, errno);
    printf("ok %s\n", mode_name);
}

static void check_valloc(void) {
    size_t ps = (size_t)sysconf(_SC_PAGESIZE);
    static const size_t lens[] = {1, 100, 4096, 5000, 100000};
    for (size_t j = 0; j < sizeof lens / sizeof lens[0]; j++) {
        unsigned char *p = launder(valloc(lens[j]));
        CHECK(p != NULL, "valloc(%zu) returned NULL", lens[j]);
        CHECK(aligned_to(p, ps), "valloc(%zu) not page aligned", lens[j]);
        fill(p, lens[j], 41);
        CHECK(malloc_usable_size(p) >= lens[j], "malloc_usable_size < %zu", lens[j]);
        free(p);
    }
    printf("ok %s\n", mode_name);
}

static void check_pvalloc(void) {
    size_t ps = (size_t)sysconf(_SC_PAGESIZE);
    static const size_t lens[] = {1, 100, 4095, 4096, 4097, 100000};
    for (size_t j = 0; j < sizeof lens / sizeof lens[0]; j++) {
        size_t rounded = (lens[j] + ps - 1) & ~(ps - 1);
        unsigned char *p = launder(pvalloc(lens[j]));
        CHECK(p != NULL, "pvalloc(%zu) returned NULL", lens[j]);
        CHECK(aligned_to(p, ps), "pvalloc(%zu) not page aligned", lens[j]);
        /* The whole rounded-up size is the caller's. */
        CHECK(malloc_usable_size(p) >= rounded, "pvalloc(%zu): usable < %zu", lens[j], rounded);
        fill(p, rounded, 43);
        free(p);
    }
    errno = 0;
    void *p = launder(pvalloc(SIZE_MAX - 10));
    CHECK(p == NULL && errno == ENOMEM, "pvalloc(huge) gave %p errno %d", p, errno);
    printf("ok %s\n", mode_name);
}

static void check_usable_size(void) {
    CHECK(malloc_usable_size(NULL) == 0, "malloc_usable_size(NULL) != 0");
    for (size_t i = 0; i < NSIZES; i++) {
        size_t n = sizes[i];
        void *p[5];
        p[0] = launder(malloc(n));
        p[1] = launder(calloc(1, n));
        p[2] = launder(realloc(NULL, n));
        p[3] = launder(memalign(128, n));
        p[4] = NULL;
        CHECK(posix_memalign(&p[4], 4096, n) == 0, "posix_memalign failed");
        for (int k = 0; k < 5; k++) {
            CHECK(p[k] != NULL, "allocation %d of %zu failed", k, n);
            size_t u = malloc_usable_size(p[k]);
            CHECK(u >= n, "entry %d: usable %zu < requested %zu", k, u, n);
            /* The usable size is really usable. */
            memset(p[k], 0x5A, u);
        }
        for (int k = 0; k < 5; k++)
            free(p[k]);
    }
    printf("ok %s\n", mode_name);
}

/* ---- Budget refusals (need the preload and a table) ---------------------------- */

/* Scope `work` in raise mode: a refused allocation is NULL/ENOMEM and the
 * program goes on, inside and after the scope. */
static void check_budget_raise(void) {
    if (!have_runtime()) {
        printf("skip %s: runtime not preloaded\n", mode_name);
        return;
    }
    if (!enter_scope("work"))
        return;
    void *small = launder(malloc(1000));
    CHECK(small != NULL, "small allocation in scope refused");
    static const char *const names[] = {"malloc", "calloc", "realloc", "posix_memalign",
                                        "aligned_alloc", "memalign", "valloc", "pvalloc"};
    size_t big = (size_t)8 << 20;
    for (int k = 0; k < 8; k++) {
        void *p = NULL;
        int rc = 0;
        errno = 0;
        switch (k) {
        case 0: p = malloc(big); break;
        case 1: p = calloc(big / 8, 8); break;
        case 2: p = realloc(NULL, big); break;
        case 3: rc = posix_memalign(&p, 64, big); break;
        case 4: p = aligned_alloc(64, big); break;
        case 5: p = memalign(64, big); break;
        case 6: p = valloc(big); break;
        case 7: p = pvalloc(big); break;
        }
        launder(p);
        if (k == 3) {
            CHECK(rc == ENOMEM && p == NULL, "%s over budget: rc %d", names[k], rc);
        } else {
            CHECK(p == NULL, "%s over budget succeeded", names[k]);
            CHECK(errno == ENOMEM, "%s over budget: errno %d", names[k], errno);
        }
        ap_violation v = {.size = sizeof v};
        CHECK(ap.last_violation(&v) == AP_OK, "ap_last_violation failed");
        CHECK(v.reason == AP_REASON_BUDGET && v.limit == AP_LIMIT_INSTANCE,
              "%s: reason %u limit %u", names[k], v.reason, v.limit);
        CHECK(v.requested >= big, "%s: requested %llu", names[k],
              (unsigned long long)v.requested);
    }
    /* Small allocations still work inside the scope after refusals. */
    void *again = launder(malloc(2000));
    CHECK(again != NULL, "allocation within budget refused after a refusal");
    free(again);
    free(small);
    CHECK(ap.exit() == AP_OK, "ap_exit failed");
    /* Outside the scope the same request is fine. */
    void *outside = launder(malloc(big));
    CHECK(outside != NULL, "allocation outside the scope refused");
    memset(outside, 1, big);
    free(outside);
    printf("ok %s\n", mode_name);
}

/* Scope `loose` in fallible mode: ordinary allocations never fail for budget
 * reasons there, they are granted and accounted past the budget. */
static void check_fallible(void) {
    if (!have_runtime()) {
        printf("skip %s: runtime not preloaded\n", mode_name);
        return;
    }
    if (!enter_scope("loose"))
        return;
    size_t big = (size_t)8 << 20;
    void *p = launder(malloc(big));
    CHECK(p != NULL, "malloc over the budget failed in a fallible scope");
    memset(p, 3, big);
    void *q = NULL;
    CHECK(posix_memalign(&q, 4096, big) == 0, "posix_memalign failed in a fallible scope");
    unsigned char *r = launder(realloc(p, 2 * big));
    CHECK(r != NULL && r[big - 1] == 3, "realloc failed in a fallible scope");
    free(r);
    free(q);
    /* A size no backend can serve is no budget matter: it fails, it does not
     * abort (a fallible scope's promise is about budgets). */
    errno = 0;
    void *impossible = launder(malloc((size_t)1 << 50));
    CHECK(impossible == NULL && errno == ENOMEM, "malloc(2^50) gave %p errno %d", impossible,
          errno);
    ap_violation v = {.size = sizeof v};
    CHECK(ap.last_violation(&v) == AP_OK && v.reason == AP_REASON_OOM,
          "malloc(2^50): violation reason %u", v.reason);
    CHECK(ap.exit() == AP_OK, "ap_exit failed");
    printf("ok %s\n", mode_name);
}

/* The process budget applies outside any scope. */
static void check_process_budget(void) {
    if (!have_runtime()) {
        printf("skip %s: runtime not preloaded\n", mode_name);
        return;
    }
    errno = 0;
    void *p = launder(malloc((size_t)128 << 20));
    CHECK(p == NULL && errno == ENOMEM, "allocation over the process budget gave %p", p);
    ap_violation v = {.size = sizeof v};
    CHECK(ap.last_violation(&v) == AP_OK, "ap_last_violation failed");
    CHECK(v.reason == AP_REASON_BUDGET && v.limit == AP_LIMIT_PROCESS, "reason %u limit %u",
          v.reason, v.limit);
    p = launder(malloc(1 << 20));
    CHECK(p != NULL, "allocation within the process budget refused");
    free(p);
    printf("ok %s\n", mode_name);
}

/* Aligned blocks are charged their requested size and credited exactly,
 * whatever their alignment (2^32 and more keep their offset outside the
 * header). Needs the preload and a table declaring `work` without a budget. */
static void check_aligned_accounting(void) {
    if (!have_runtime()) {
        printf("skip %s: runtime not preloaded\n", mode_name);
        return;
    }
    if (!enter_scope("work"))
        return;
    int64_t before = live_here();
    static const size_t aligns[] = {64, 4096, (size_t)1 << 20, (size_t)1 << 32, (size_t)1 << 33};
    for (size_t i = 0; i < sizeof aligns / sizeof aligns[0]; i++) {
        void *p = NULL;
        CHECK(posix_memalign(&p, aligns[i], 1000) == 0, "posix_memalign(%zu) failed", aligns[i]);
        int64_t live = live_here();
        CHECK(live == before + 1000, "align %zu: live %lld, expected %lld", aligns[i],
              (long long)live, (long long)before + 1000);
        unsigned char *q = launder(realloc(p, 3000));
        CHECK(q != NULL, "realloc(align %zu) failed", aligns[i]);
        live = live_here();
        CHECK(live == before + 3000, "align %zu after realloc: live %lld", aligns[i],
              (long long)live);
        free(q);
        CHECK(live_here() == before, "align %zu after free: live %lld, expected %lld",
              aligns[i], (long long)live_here(), (long long)before);
        p = launder(aligned_alloc(aligns[i], 500));
        CHECK(p != NULL && live_here() == before + 500, "aligned_alloc(%zu) not charged 500",
              aligns[i]);
        free(p);
        CHECK(live_here() == before, "aligned_alloc(%zu) not credited", aligns[i]);
    }
    CHECK(ap.exit() == AP_OK, "ap_exit failed");
    printf("ok %s\n", mode_name);
}

/* Scope `strict` in abort mode: the first refused allocation ends the process. */
static void check_budget_abort(void) {
    if (!have_runtime()) {
        printf("skip %s: runtime not preloaded\n", mode_name);
        return;
    }
    if (!enter_scope("strict"))
        return;
    void *small = launder(malloc(100));
    CHECK(small != NULL, "small allocation in scope refused");
    printf("before refusal\n");
    fflush(stdout);
    void *p = launder(malloc((size_t)8 << 20));
    /* Not reached in abort mode. */
    printf("FAIL %s: survived a refusal in abort mode (%p)\n", mode_name, p);
    failures++;
}

/* ---- Backend identification ---------------------------------------------- */

/* Which allocator serves our blocks; printed, not compared. */
static void report_backend(void) {
    void *mallctl = dlsym(RTLD_DEFAULT, "mallctl");
    void *mi_version = dlsym(RTLD_DEFAULT, "mi_version");
    printf("backend jemalloc=%d mimalloc=%d preloaded=%d\n", mallctl != NULL,
           mi_version != NULL, have_runtime() ? ap.is_preloaded() : 0);
}

/* jemalloc: its own statistics grow by what we allocate through malloc. */
static void check_jemalloc_serves(void) {
    int (*mallctl)(const char *, void *, size_t *, void *, size_t) =
        (int (*)(const char *, void *, size_t *, void *, size_t))dlsym(RTLD_DEFAULT, "mallctl");
    CHECK(mallctl != NULL, "mallctl is not resolvable");
    uint64_t epoch = 1;
    size_t before = 0, after = 0, len = sizeof before;
    size_t big = (size_t)32 << 20;
    CHECK(mallctl("epoch", NULL, NULL, &epoch, sizeof epoch) == 0, "mallctl(epoch) failed");
    CHECK(mallctl("stats.allocated", &before, &len, NULL, 0) == 0,
          "mallctl(stats.allocated) failed");
    void *p = launder(malloc(big));
    CHECK(p != NULL, "malloc failed");
    memset(p, 1, big);
    CHECK(mallctl("epoch", NULL, NULL, &epoch, sizeof epoch) == 0, "mallctl(epoch) failed");
    len = sizeof after;
    CHECK(mallctl("stats.allocated", &after, &len, NULL, 0) == 0,
          "mallctl(stats.allocated) failed");
    CHECK(after >= before + big, "jemalloc did not see the block (%zu -> %zu)", before, after);
    free(p);
    printf("ok %s\n", mode_name);
}

/* mimalloc: the memory behind our blocks is in mimalloc's heap. */
static void check_mimalloc_serves(void) {
    int (*in_heap)(const void *) =
        (int (*)(const void *))dlsym(RTLD_DEFAULT, "mi_is_in_heap_region");
    int (*version)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "mi_version");
    CHECK(in_heap != NULL && version != NULL, "mimalloc symbols are not resolvable");
    CHECK(version() > 0, "mi_version() = %d", version());
    static const size_t lens[] = {1, 100, 5000, (size_t)4 << 20};
    for (size_t j = 0; j < sizeof lens / sizeof lens[0]; j++) {
        void *p = launder(malloc(lens[j]));
        void *a = NULL;
        CHECK(p != NULL, "malloc failed");
        CHECK(posix_memalign(&a, 4096, lens[j]) == 0, "posix_memalign failed");
        CHECK(in_heap(p) && in_heap(a), "block of %zu is not in mimalloc's heap", lens[j]);
        free(p);
        free(a);
    }
    printf("ok %s\n", mode_name);
}

/* ---- Driver ------------------------------------------------------------------- */

typedef struct {
    const char *name;
    void (*run)(void);
    int portable; /* part of "all": meaningful with or without the preload */
} check;

static const check checks[] = {
    {"malloc", check_malloc, 1},
    {"free", check_free, 1},
    {"calloc", check_calloc, 1},
    {"calloc_overflow", check_calloc_overflow, 1},
    {"realloc_null", check_realloc_null, 1},
    {"realloc_zero", check_realloc_zero, 1},
    {"realloc_shrink", check_realloc_shrink, 1},
    {"realloc_grow", check_realloc_grow, 1},
    {"realloc_aligned_usable", check_realloc_aligned_usable, 1},
    {"realloc_huge", check_realloc_huge, 1},
    {"reallocarray", check_reallocarray, 1},
    {"posix_memalign_einval", check_posix_memalign_einval, 1},
    {"posix_memalign", check_posix_memalign, 1},
    {"huge_alignment", check_huge_alignment, 1},
    {"aligned_alloc", check_aligned_alloc, 1},
    {"memalign", check_memalign, 1},
    {"valloc", check_valloc, 1},
    {"pvalloc", check_pvalloc, 1},
    {"malloc_usable_size", check_usable_size, 1},
    {"realloc_fail", check_realloc_fail, 0},
    {"budget_raise", check_budget_raise, 0},
    {"process_budget", check_process_budget, 0},
    {"fallible", check_fallible, 0},
    {"aligned_accounting", check_aligned_accounting, 0},
    {"budget_abort", check_budget_abort, 0},
    {"jemalloc_serves", check_jemalloc_serves, 0},
    {"mimalloc_serves", check_mimalloc_serves, 0},
};
#define NCHECKS (sizeof checks / sizeof checks[0])

static int run_named(const char *name) {
    if (strcmp(name, "backend") == 0) {
        report_backend();
        return 1;
    }
    if (strncmp(name, "enter:", 6) == 0) {
        /* Run the checks that follow inside an instance of this scope. */
        mode_name = name;
        if (!have_runtime()) {
            printf("FAIL %s: runtime not preloaded\n", name);
            failures++;
            return 1;
        }
        enter_scope(name + 6);
        return 1;
    }
    if (strcmp(name, "list") == 0) {
        for (size_t i = 0; i < NCHECKS; i++)
            if (checks[i].portable)
                printf("%s\n", checks[i].name);
        return 1;
    }
    for (size_t i = 0; i < NCHECKS; i++) {
        if (strcmp(name, "all") == 0 ? checks[i].portable : strcmp(name, checks[i].name) == 0) {
            mode_name = checks[i].name;
            checks[i].run();
            if (strcmp(name, "all") != 0)
                return 1;
        }
    }
    return strcmp(name, "all") == 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODE...\n", argv[0]);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        if (!run_named(argv[i])) {
            fprintf(stderr, "unknown mode %s\n", argv[i]);
            return 2;
        }
    }
    fflush(stdout);
    return failures ? 1 : 0;
}
