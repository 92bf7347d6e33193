/*
 * span_blocks.c - small blocks served from the runtime's spans (no header):
 * the owner is recorded per span, and every free must still credit exactly
 * the instance, and the bytes, that were charged.
 *
 *   span_blocks alternate N   two instances used in turn on one thread, each
 *                             keeping N blocks of every size up to 256: each
 *                             holds exactly its own bytes, also when another
 *                             thread frees one instance's blocks
 *   span_blocks orphans N     rounds of a thread that allocates N blocks in
 *                             its instance and exits; the main thread frees
 *                             them after it: every count back to its baseline
 *                             each round (the spans go back to the pool and
 *                             serve the next round)
 *   span_blocks realloc       realloc within a class, across classes and from
 *                             another instance, charged as malloc/free would be
 *   span_blocks layout        alignment, usable size and packing of blocks
 *   span_blocks giveback N    N 24-byte blocks held, then freed: the pages of
 *                             the spans they emptied go back to the kernel
 *   span_blocks interior      free() of a pointer into the middle of a block
 *                             (expected to abort)
 *
 * Needs the runtime preloaded and the table
 * "v=1;process=raise:0;scope=work:raise:0:0". Prints "check ..." lines and
 * "RESULT failures=N"; exit status 0 only when everything matched.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "allocpolicy.h"

#define CHECKS_PROGRAM "span_blocks"
#include "checks.h"

static struct {
    ap_status (*scope_find)(const char *, uint32_t *);
    ap_status (*enter)(uint32_t, uint32_t *);
    ap_status (*exit)(void);
    ap_status (*hold)(uint32_t);
    ap_status (*attach)(uint32_t);
    ap_status (*release)(uint32_t);
    void (*flush)(void);
    ap_status (*instance_stats)(uint32_t, ap_instance_stats *);
    ap_status (*process_stats)(ap_process_stats *);
} ap;

static uint32_t work_scope;

static int bind_runtime(void) {
#define BIND(field, sym) CHECKS_BIND(ap.field, sym)
    BIND(scope_find, "ap_scope_find");
    BIND(enter, "ap_enter");
    BIND(exit, "ap_exit");
    BIND(hold, "ap_hold");
    BIND(attach, "ap_attach");
    BIND(release, "ap_release");
    BIND(flush, "ap_flush");
    BIND(instance_stats, "ap_get_instance_stats");
    BIND(process_stats, "ap_get_process_stats");
    return 1;
#undef BIND
}

static int64_t instance_live(uint32_t id) {
    ap_instance_stats s = {.size = sizeof s};
    ap.flush();
    if (ap.instance_stats(id, &s) != AP_OK)
        failures++;
    return s.live;
}

static int64_t process_live(void) {
    ap_process_stats s = {.size = sizeof s};
    ap.flush();
    ap.process_stats(&s);
    return s.live;
}

/* A held instance of `work`, not on the calling thread's stack. */
static uint32_t held_instance(void) {
    uint32_t id = 0;
    if (ap.enter(work_scope, &id) != AP_OK || ap.hold(id) != AP_OK)
        failures++;
    ap.exit();
    return id;
}

/* Sizes 0..256 in turn: every span class and both ends of each. */
static size_t size_of(long i) { return (size_t)(i % 257); }

static void alternate(long n) {
    uint32_t a = held_instance(), b = held_instance();
    long count = n * 257;
    void **kept[2] = {calloc((size_t)count, sizeof(void *)), calloc((size_t)count, sizeof(void *))};
    int64_t want[2] = {0, 0};
    uint32_t ids[2] = {a, b};
    for (long i = 0; i < count; i++) {
        for (int k = 0; k < 2; k++) {
            ap.attach(ids[k]);
            kept[k][i] = malloc(size_of(i));
            if (!kept[k][i])
                failures++;
            memset(kept[k][i], 0x40 + k, size_of(i));
            want[k] += (int64_t)size_of(i);
            ap.exit();
        }
    }
    expect("alternate a live", instance_live(a), want[0]);
    expect("alternate b live", instance_live(b), want[1]);
    long damaged = 0;
    for (int k = 0; k < 2; k++)
        for (long i = 0; i < count; i++)
            for (size_t j = 0; j < size_of(i); j++)
                damaged += ((unsigned char *)kept[k][i])[j] != 0x40 + k;
    expect("alternate damaged bytes", damaged, 0);
    free_on_thread(kept[0], count);
    expect("alternate a after another thread freed it", instance_live(a), 0);
    expect("alternate b untouched", instance_live(b), want[1]);
    for (long i = 0; i < count; i++)
        free(kept[1][i]);
    expect("alternate b after its frees", instance_live(b), 0);
    ap.release(a);
    ap.release(b);
    free(kept[0]);
    free(kept[1]);
}

typedef struct {
    uint32_t id;
    void **blocks;
    long n;
    int64_t bytes;
} orphan_job;

static void *orphan_worker(void *arg) {
    orphan_job *job = arg;
    ap.attach(job->id);
    for (long i = 0; i < job->n; i++) {
        job->blocks[i] = malloc(size_of(i));
        job->bytes += (int64_t)size_of(i);
    }
    ap.exit();
    return NULL;
}

static void *nothing(void *arg) { return arg; }

static void orphans(long n) {
    /* What the first thread keeps for good is in the baseline. */
    pthread_t warm;
    pthread_create(&warm, NULL, nothing, NULL);
    pthread_join(warm, NULL);
    void **blocks = calloc((size_t)n, sizeof(void *));
    int64_t base = process_live();
    for (int round = 0; round < 40; round++) {
        orphan_job job = {held_instance(), blocks, n, 0};
        pthread_t t;
        pthread_create(&t, NULL, orphan_worker, &job);
        pthread_join(t, NULL);
        int64_t live = instance_live(job.id);
        for (long i = 0; i < n; i++)
            free(blocks[i]);
        int64_t after = instance_live(job.id);
        ap.release(job.id);
        if (round == 0 || round == 39 || live != job.bytes || after != 0) {
            char what[64];
            snprintf(what, sizeof what, "orphans round %d live", round);
            expect(what, live, job.bytes);
            snprintf(what, sizeof what, "orphans round %d after frees", round);
            expect(what, after, 0);
        }
    }
    expect("orphans process live back to baseline", process_live(), base);
    free(blocks);
}

static void realloc_checks(void) {
    uint32_t a = held_instance(), b = held_instance();
    ap.attach(a);
    char *p = malloc(20);
    memset(p, 7, 20);
    char *q = realloc(p, 30); /* the same 32-byte class */
    expect("realloc in class keeps the block", q == p, 1);
    expect("realloc in class charges the difference", instance_live(a), 30);
    q = realloc(q, 17);
    expect("realloc shrink in class", instance_live(a), 17);
    char *r = realloc(q, 100); /* another class */
    expect("realloc across classes moves", r != q, 1);
    expect("realloc across classes keeps content", r[0] == 7 && r[16] == 7, 1);
    expect("realloc across classes live", instance_live(a), 100);
    ap.exit();
    ap.attach(b);
    char *s = realloc(r, 101); /* same class, another instance */
    expect("realloc from another instance moves", s != r, 1);
    expect("realloc from another instance credits the owner", instance_live(a), 0);
    expect("realloc from another instance charges the caller", instance_live(b), 101);
    char *big = realloc(s, 5000);
    expect("realloc out of the spans", instance_live(b), 5000);
    char *back = realloc(big, 40);
    expect("realloc back into a small size", instance_live(b), 40);
    free(back);
    expect("realloc chain freed", instance_live(b), 0);
    ap.exit();
    ap.release(a);
    ap.release(b);
}

static void *layout_thread(void *arg) {
    (void)arg;
    long misaligned = 0, usable_bad = 0;
    for (size_t n = 0; n <= 256; n++) {
        void *p = malloc(n);
        size_t usable = malloc_usable_size(p);
        misaligned += ((uintptr_t)p & 15) != 0;
        usable_bad += usable < n || usable >= n + 16 + (n == 0 ? 1 : 0);
        free(p);
    }
    expect("layout misaligned blocks", misaligned, 0);
    expect("layout usable sizes off", usable_bad, 0);
    /* A fresh thread's 24-byte blocks lie 32 bytes apart: no header, the
     * size rounded to 16 as glibc rounds its chunks. */
    enum { N = 1000 };
    static char *b[N];
    long packed = 0;
    for (int i = 0; i < N; i++)
        b[i] = malloc(24);
    for (int i = 1; i < N; i++)
        packed += b[i] - b[i - 1] == 32;
    for (int i = 0; i < N; i++)
        free(b[i]);
    printf("layout packed pairs %ld of %d\n", packed, N - 1);
    expect("layout most 24-byte neighbours 32 bytes apart", packed >= N - 1 - N / 50, 1);
    return NULL;
}

static void layout(void) {
    uint32_t a = held_instance();
    ap.attach(a);
    pthread_t t;
    pthread_create(&t, NULL, layout_thread, NULL);
    pthread_join(t, NULL);
    ap.exit();
    ap.release(a);
}

static long resident_bytes(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &pages, &resident) != 2)
        failures++;
    if (f)
        fclose(f);
    return resident * sysconf(_SC_PAGESIZE);
}

static void giveback(long n) {
    void **blocks = calloc((size_t)n, sizeof(void *));
    memset(blocks, 0, (size_t)n * sizeof(void *));
    long before = resident_bytes();
    for (long i = 0; i < n; i++) {
        blocks[i] = malloc(24);
        memset(blocks[i], 0x5A, 24);
    }
    long held = resident_bytes();
    for (long i = 0; i < n; i++)
        free(blocks[i]);
    long after = resident_bytes();
    printf("giveback before=%ld held=%ld after=%ld\n", before, held, after);
    /* The blocks took 32 bytes each. What stays is the first page of each
     * emptied span (its header: 4 KiB of 64), the pool's 16 spans that keep
     * their pages and the thread's own span: well under an eighth. (glibc
     * alone keeps all of it, in its free lists.) */
    expect("giveback blocks were resident", held - before >= n * 32, 1);
    expect("giveback seven eighths came back", (after - before) * 8 <= held - before, 1);
    free(blocks);
}

static void interior(void) {
    char *p = malloc(64);
    free(p); /* the span is this thread's now */
    p = malloc(64);
    char *inside = p + 16; /* computed apart, so that compilers do not object */
    free(inside);
    puts("survived");
}

int main(int argc, char **argv) {
    if (!bind_runtime())
        return 2;
    if (ap.scope_find("work", &work_scope) != AP_OK) {
        fprintf(stderr, "span_blocks: no scope 'work' (set ALLOCPOLICY_TABLE)\n");
        return 2;
    }
    const char *mode = argc > 1 ? argv[1] : "";
    long n = argc > 2 ? strtol(argv[2], NULL, 10) : 0;
    /* stdout's buffer is allocated by the first line, at the process root:
     * before any instance whose bytes are counted. */
    printf("span_blocks %s\n", mode);
    if (!strcmp(mode, "alternate"))
        alternate(n);
    else if (!strcmp(mode, "orphans"))
        orphans(n);
    else if (!strcmp(mode, "realloc"))
        realloc_checks();
    else if (!strcmp(mode, "layout"))
        layout();
    else if (!strcmp(mode, "giveback"))
        giveback(n);
    else if (!strcmp(mode, "interior"))
        interior();
    else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    printf("RESULT failures=%d\n", failures);
    return failures != 0;
}
