/*
 * malloc_pairs.c - time malloc/free pairs of small blocks.
 *
 *   malloc_pairs PATTERN THREADS SCOPE PAIRS
 *
 *   PATTERN  fixedN   malloc(N) then free it, PAIRS times (fixed64: a block
 *                     the runtime's small-block cache serves; fixed4096: one
 *                     it does not, and glibc's own cache does not either)
 *            mix      sizes 16..256 from a fixed table; each step frees the
 *                     block allocated RING steps earlier and allocates a new
 *                     one, so frees do not simply undo the last malloc
 *   THREADS  1 or 2; every thread does PAIRS pairs, all start together
 *   SCOPE    none     no scope calls (plain program, or preload outside scopes)
 *            own      each thread enters its own instance of scope "work"
 *            shared   thread 0 enters one instance of "work", the others
 *                     ap_attach() to it
 *   PAIRS    pairs per thread
 *
 * Prints one line:
 *   "ns_per_pair=<wall ns / PAIRS> cpu_ns_per_pair=<thread CPU ns / PAIRS,
 *    averaged over the threads> wall_s=<seconds>"
 * The CPU figure counts only time the timed loops were on a CPU, so it is not
 * inflated when other processes take the machine for a while; the wall
 * figure is.
 * The scope functions are looked up with dlsym(RTLD_DEFAULT), so the program
 * does not link against the runtime and the same binary runs with and
 * without LD_PRELOAD.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RING 256
#define NSIZES 4096

typedef int (*scope_find_fn)(const char *, uint32_t *);
typedef int (*enter_fn)(uint32_t, uint32_t *);
typedef int (*attach_fn)(uint32_t);
typedef int (*exit_fn)(void);

static scope_find_fn ap_scope_find_p;
static enter_fn ap_enter_p;
static attach_fn ap_attach_p;
static exit_fn ap_exit_p;

static int pattern_mix;
static size_t fixed_size = 64;
static int scope_mode; /* 0 none, 1 own, 2 shared */
static long pairs;
static uint32_t scope_id;
static uint32_t sizes[NSIZES];

static pthread_barrier_t ready, go, done;
static double thread_cpu[64];
static _Atomic uint32_t shared_instance;
static _Atomic int shared_set;
static volatile uint64_t sink;

static void die(const char *what) {
    fprintf(stderr, "malloc_pairs: %s\n", what);
    exit(2);
}

static void enter_scope(int index) {
    uint32_t inst;
    if (scope_mode == 1 || (scope_mode == 2 && index == 0)) {
        if (ap_enter_p(scope_id, &inst) != 0)
            die("ap_enter failed");
        if (scope_mode == 2) {
            atomic_store(&shared_instance, inst);
            atomic_store(&shared_set, 1);
        }
    } else if (scope_mode == 2) {
        while (!atomic_load(&shared_set)) {
        }
        if (ap_attach_p(atomic_load(&shared_instance)) != 0)
            die("ap_attach failed");
    }
}

static __attribute__((noinline)) uint64_t run_fixed(long n) {
    uint64_t acc = 0;
    for (long i = 0; i < n; i++) {
        char *p = malloc(fixed_size);
        if (!p)
            die("malloc returned NULL");
        p[0] = (char)i;
        acc += (uintptr_t)p[0];
        free(p);
    }
    return acc;
}

static __attribute__((noinline)) uint64_t run_mix(long n) {
    char *ring[RING] = {0};
    uint64_t acc = 0;
    for (long i = 0; i < n; i++) {
        unsigned slot = (unsigned)i & (RING - 1);
        free(ring[slot]);
        char *p = malloc(sizes[(unsigned)i & (NSIZES - 1)]);
        if (!p)
            die("malloc returned NULL");
        p[0] = (char)i;
        acc += (uintptr_t)p[0];
        ring[slot] = p;
    }
    for (unsigned s = 0; s < RING; s++)
        free(ring[s]);
    return acc;
}

static double thread_cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void *worker(void *arg) {
    int index = (int)(intptr_t)arg;
    if (scope_mode)
        enter_scope(index);
    /* Warm the allocator's caches for this thread outside the timed region. */
    if (pattern_mix)
        sink += run_mix(RING * 4);
    else
        sink += run_fixed(1000);
    pthread_barrier_wait(&ready);
    pthread_barrier_wait(&go);
    double c0 = thread_cpu_now();
    sink += pattern_mix ? run_mix(pairs) : run_fixed(pairs);
    thread_cpu[index] = thread_cpu_now() - c0;
    pthread_barrier_wait(&done);
    if (scope_mode)
        ap_exit_p();
    return NULL;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 5)
        die("usage: malloc_pairs fixedN|mix THREADS none|own|shared PAIRS");
    if (strcmp(argv[1], "mix") == 0)
        pattern_mix = 1;
    else if (sscanf(argv[1], "fixed%zu", &fixed_size) != 1 || fixed_size == 0)
        die("pattern must be fixedN (N > 0) or mix");
    int threads = atoi(argv[2]);
    if (threads < 1 || threads > 64)
        die("bad thread count");
    if (strcmp(argv[3], "none") == 0)
        scope_mode = 0;
    else if (strcmp(argv[3], "own") == 0)
        scope_mode = 1;
    else if (strcmp(argv[3], "shared") == 0)
        scope_mode = 2;
    else
        die("scope must be none, own or shared");
    pairs = atol(argv[4]);
    if (pairs <= 0)
        die("bad pair count");

    /* Sizes 16..256 in steps of 8, from a fixed-seed generator. */
    uint64_t x = 0x9E3779B97F4A7C15u;
    for (int i = 0; i < NSIZES; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sizes[i] = 16 + 8 * (uint32_t)(x % 31);
    }

    if (scope_mode) {
        ap_scope_find_p = (scope_find_fn)dlsym(RTLD_DEFAULT, "ap_scope_find");
        ap_enter_p = (enter_fn)dlsym(RTLD_DEFAULT, "ap_enter");
        ap_attach_p = (attach_fn)dlsym(RTLD_DEFAULT, "ap_attach");
        ap_exit_p = (exit_fn)dlsym(RTLD_DEFAULT, "ap_exit");
        if (!ap_scope_find_p || !ap_enter_p || !ap_attach_p || !ap_exit_p)
            die("scope functions not found (run with LD_PRELOAD=liballocpolicy.so)");
        if (ap_scope_find_p("work", &scope_id) != 0)
            die("scope \"work\" not declared (set ALLOCPOLICY_TABLE)");
    }

    pthread_barrier_init(&ready, NULL, (unsigned)threads + 1);
    pthread_barrier_init(&go, NULL, (unsigned)threads + 1);
    pthread_barrier_init(&done, NULL, (unsigned)threads + 1);
    pthread_t tid[64];
    for (int i = 0; i < threads; i++)
        if (pthread_create(&tid[i], NULL, worker, (void *)(intptr_t)i) != 0)
            die("pthread_create failed");
    pthread_barrier_wait(&ready);
    double t0 = now();
    pthread_barrier_wait(&go);
    pthread_barrier_wait(&done);
    double t1 = now();
    for (int i = 0; i < threads; i++)
        pthread_join(tid[i], NULL);
    double cpu = 0;
    for (int i = 0; i < threads; i++)
        cpu += thread_cpu[i];
    printf("ns_per_pair=%.3f cpu_ns_per_pair=%.3f wall_s=%.6f\n", (t1 - t0) * 1e9 / (double)pairs,
           cpu * 1e9 / ((double)pairs * threads), t1 - t0);
    return 0;
}
