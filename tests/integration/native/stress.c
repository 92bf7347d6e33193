/*
 * stress.c - exact accounting under many threads, checked against what the
 * program itself knows it still holds.
 *
 *   stress [ITERATIONS [SEED [churn]]]
 *                                  needs the runtime preloaded and the table
 *                                  "v=1;process=raise:0;grace=0;
 *                                   scope=work:raise:0:0;scope=nested:raise:0:0;
 *                                   scope=shared:raise:0:0;scope=tight:raise:262144:0"
 *
 * Eight threads allocate through every entry point with random sizes and
 * alignments, grow and shrink blocks through realloc chains, and hand blocks
 * to each other through a shared queue, so blocks are freed (and reallocated)
 * by threads other than the one that made them, in other instances, and after
 * the instance that made them ended. Threads work in their own instances, in
 * nested ones, in an instance shared by attaching (ap_hold/ap_attach), and at
 * the process root; one scope has a budget small enough to refuse.
 *
 * Each thread keeps some blocks at the end. After joining, the program works
 * out what every instance, scope and the process must hold (a block counts in
 * the instance that made it and in each enclosing one) and compares that with
 * ap_get_instance_stats / ap_get_scope_stats / ap_get_process_stats. Then it
 * frees everything and checks that every count is back where it started.
 *
 * Output: "check ..." lines, then "RESULT mismatches=N corrupt=N ..."; the
 * exit status is 0 only when everything matched. Iteration counts bound the
 * run; nothing depends on timing.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "allocpolicy.h"

#define NTHREADS 8
#define LOCAL_MAX 256  /* blocks a thread holds at once */
#define KEEP_MAX 24    /* blocks a thread still holds when it ends */
#define QUEUE_CAP 1024
#define PATTERN_MAX 32 /* bytes of a block that carry its pattern */
#define MAX_INST AP_MAX_INSTANCES

/* ---- The runtime's ABI, found at run time ----------------------------------- */

static struct {
    ap_status (*scope_find)(const char *, uint32_t *);
    ap_status (*enter)(uint32_t, uint32_t *);
    ap_status (*attach)(uint32_t);
    ap_status (*hold)(uint32_t);
    ap_status (*release)(uint32_t);
    ap_status (*exit)(void);
    ap_status (*current)(uint32_t *, uint32_t *);
    void (*flush)(void);
    ap_status (*scope_stats)(uint32_t, ap_scope_stats *);
    ap_status (*instance_stats)(uint32_t, ap_instance_stats *);
    ap_status (*process_stats)(ap_process_stats *);
    int (*is_preloaded)(void);
} ap;

static int bind_runtime(void) {
#define BIND(field, sym)                                                             \
    do {                                                                             \
        *(void **)&ap.field = dlsym(RTLD_DEFAULT, sym);                              \
        if (!ap.field) {                                                             \
            fprintf(stderr, "stress: %s not found; run with the runtime preloaded\n", \
                    sym);                                                            \
            return 0;                                                                \
        }                                                                            \
    } while (0)
    BIND(scope_find, "ap_scope_find");
    BIND(enter, "ap_enter");
    BIND(attach, "ap_attach");
    BIND(hold, "ap_hold");
    BIND(release, "ap_release");
    BIND(exit, "ap_exit");
    BIND(current, "ap_current");
    BIND(flush, "ap_flush");
    BIND(scope_stats, "ap_get_scope_stats");
    BIND(instance_stats, "ap_get_instance_stats");
    BIND(process_stats, "ap_get_process_stats");
    BIND(is_preloaded, "ap_is_preloaded");
#undef BIND
    return 1;
}

/* ---- Blocks ------------------------------------------------------------------ */

typedef struct {
    unsigned char *p;
    size_t size;   /* bytes the runtime charged: the request (pvalloc: rounded) */
    uint32_t inst; /* instance charged */
    uint32_t seed; /* content pattern */
} block;

static _Atomic long corrupt; /* blocks whose content changed under us */
static _Atomic long api_errors;

static void paint(block *b) {
    size_t n = b->size < PATTERN_MAX ? b->size : PATTERN_MAX;
    for (size_t i = 0; i < n; i++)
        b->p[i] = (unsigned char)(b->seed + i * 131u);
    /* The last byte too, so writes past a neighbour's end show. */
    if (b->size > PATTERN_MAX)
        b->p[b->size - 1] = (unsigned char)(b->seed ^ 0x5Au);
}

static int painted(const block *b, size_t upto) {
    size_t n = upto < PATTERN_MAX ? upto : PATTERN_MAX;
    for (size_t i = 0; i < n; i++)
        if (b->p[i] != (unsigned char)(b->seed + i * 131u))
            return 0;
    return 1;
}

static void verify(const block *b) {
    int ok = painted(b, b->size);
    if (b->size > PATTERN_MAX && b->p[b->size - 1] != (unsigned char)(b->seed ^ 0x5Au))
        ok = 0;
    if (!ok)
        atomic_fetch_add(&corrupt, 1);
}

/* ---- Instances the program made, to work out what each must hold -------------- */

/* Indexed by slot (an id's low 16 bits): the latest instance of each slot. */
#define SLOT(id) ((id) & (MAX_INST - 1))
typedef struct {
    uint32_t known;
    uint32_t id;
    uint32_t scope;
    uint32_t parent;
} inst_info;

static inst_info instances[MAX_INST];

/* The parent of every instance made, by full id: a slot's later instance may
 * have a later occupant of the parent's slot as its parent (the runtime
 * switches the link once the earlier one ended), so the chain above a block
 * is the one recorded for its own instance. An id that comes back (after
 * 32767 reuses of its slot) belongs to the latest: the runtime never reuses
 * a generation while a block of the earlier one lives. */
#define PARENTS_CAP (1u << 21)
static struct {
    uint32_t id, parent;
} parents[PARENTS_CAP];

static uint32_t *parent_slot(uint32_t id) {
    for (uint32_t h = (id * 2654435761u) & (PARENTS_CAP - 1);; h = (h + 1) & (PARENTS_CAP - 1))
        if (parents[h].id == id || parents[h].id == 0) {
            parents[h].id = id;
            return &parents[h].parent;
        }
}
static _Atomic long entered; /* instances made; past MAX_INST, ids are reused */
static pthread_mutex_t instances_lock = PTHREAD_MUTEX_INITIALIZER;
static uint32_t scope_work, scope_nested, scope_shared, scope_tight;

static uint32_t current_instance(void) {
    uint32_t id = 0, depth = 0;
    ap.current(&id, &depth);
    return id;
}

static uint32_t enter(uint32_t scope) {
    uint32_t parent = current_instance();
    uint32_t id = 0;
    if (ap.enter(scope, &id) != AP_OK) {
        atomic_fetch_add(&api_errors, 1);
        return parent;
    }
    atomic_fetch_add(&entered, 1);
    pthread_mutex_lock(&instances_lock);
    instances[SLOT(id)] = (inst_info){.known = 1, .id = id, .scope = scope, .parent = parent};
    *parent_slot(id) = parent;
    pthread_mutex_unlock(&instances_lock);
    return id;
}

static void leave(void) {
    if (ap.exit() != AP_OK)
        atomic_fetch_add(&api_errors, 1);
}

static void attach(uint32_t id) {
    if (ap.attach(id) != AP_OK)
        atomic_fetch_add(&api_errors, 1);
}

/* ---- The hand-over queue ---------------------------------------------------------- */

static struct {
    pthread_mutex_t lock;
    block items[QUEUE_CAP];
    size_t head, count;
} queue = {.lock = PTHREAD_MUTEX_INITIALIZER};

static int queue_push(const block *b) {
    int ok = 0;
    pthread_mutex_lock(&queue.lock);
    if (queue.count < QUEUE_CAP) {
        queue.items[(queue.head + queue.count++) % QUEUE_CAP] = *b;
        ok = 1;
    }
    pthread_mutex_unlock(&queue.lock);
    return ok;
}

static int queue_pop(block *b) {
    int ok = 0;
    pthread_mutex_lock(&queue.lock);
    if (queue.count) {
        *b = queue.items[queue.head];
        queue.head = (queue.head + 1) % QUEUE_CAP;
        queue.count--;
        ok = 1;
    }
    pthread_mutex_unlock(&queue.lock);
    return ok;
}

/* ---- Threads ------------------------------------------------------------------------ */

typedef enum {
    ROLE_OWN,      /* own `work` instance, `nested` instances inside it */
    ROLE_TIGHT,    /* own `work` instance, `tight` instances inside it (refusals) */
    ROLE_SHARED,   /* attached to the shared instance made by main */
    ROLE_SHARED_NEST, /* attached to it, with `shared` and `work` instances inside */
    ROLE_ROOT,     /* process root, now and then attached to thread 0's instance */
    ROLE_WANDER,   /* moves between the root, the shared instance and own instances */
} role;

static const role roles[NTHREADS] = {ROLE_OWN,         ROLE_OWN,  ROLE_TIGHT, ROLE_SHARED,
                                     ROLE_SHARED_NEST, ROLE_SHARED, ROLE_ROOT, ROLE_WANDER};

typedef struct {
    int index;
    uint64_t rng;
    long iterations;
    block local[LOCAL_MAX];
    size_t nlocal;
    long refused;       /* allocations refused (all in `tight`) */
    long refused_other; /* refusals anywhere else: must stay 0 */
    uint32_t depth;     /* scopes this thread entered/attached beyond its base */
    uint32_t base_depth;
} worker;

static worker workers[NTHREADS];
static uint32_t shared_instance, thread0_instance;
static pthread_barrier_t start_line;
static size_t page;

static uint64_t next(worker *w) {
    uint64_t x = w->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return w->rng = x;
}

static size_t below(worker *w, size_t n) { return (size_t)(next(w) % n); }

static size_t random_size(worker *w) {
    size_t r = below(w, 100);
    if (r < 70)
        return below(w, 513);
    if (r < 95)
        return 512 + below(w, 16 * 1024);
    return 16 * 1024 + below(w, 300 * 1024); /* crosses glibc's mmap threshold */
}

static int in_tight(void) {
    uint32_t cur = current_instance();
    return cur != AP_INSTANCE_PROCESS && instances[SLOT(cur)].id == cur &&
           instances[SLOT(cur)].scope == scope_tight;
}

static void note_refusal(worker *w) {
    if (in_tight())
        w->refused++;
    else
        w->refused_other++;
}

/* One allocation through a randomly chosen entry point. */
static void allocate(worker *w) {
    block b = {.inst = current_instance(), .seed = (uint32_t)next(w)};
    size_t n = random_size(w);
    int kind = (int)below(w, 100);
    int zeroed = 0;
    errno = 0;
    if (kind < 30) {
        b.p = malloc(n);
    } else if (kind < 45) {
        size_t k = 1 + below(w, 8);
        n = n / k * k;
        b.p = calloc(n / k, k);
        zeroed = 1;
    } else if (kind < 55) {
        b.p = realloc(NULL, n);
    } else if (kind < 62) {
        size_t k = 1 + below(w, 4);
        n = n / k * k;
        b.p = reallocarray(NULL, n / k, k);
    } else if (kind < 75) {
        void *p = NULL;
        size_t align = (size_t)8 << below(w, 14); /* 8 .. 64 KiB */
        int rc = posix_memalign(&p, align, n);
        if (rc == 0 && ((uintptr_t)p & (align - 1)))
            atomic_fetch_add(&corrupt, 1);
        if (rc != 0 && rc != ENOMEM)
            atomic_fetch_add(&api_errors, 1);
        b.p = rc == 0 ? p : NULL;
        if (rc == ENOMEM)
            errno = ENOMEM;
    } else if (kind < 85) {
        size_t align = (size_t)16 << below(w, 9); /* 16 .. 4 KiB */
        n = (n + align - 1) / align * align;
        b.p = aligned_alloc(align, n);
        if (b.p && ((uintptr_t)b.p & (align - 1)))
            atomic_fetch_add(&corrupt, 1);
    } else if (kind < 95) {
        size_t align = 1 + below(w, 5000); /* mostly not a power of two */
        b.p = memalign(align, n);
        size_t want = 1;
        while (want < align)
            want <<= 1;
        if (b.p && ((uintptr_t)b.p & (want - 1)))
            atomic_fetch_add(&corrupt, 1);
    } else if (kind < 98) {
        b.p = valloc(n);
    } else {
        b.p = pvalloc(n);
        n = (n + page - 1) & ~(page - 1); /* pvalloc charges the rounded size */
    }
    if (!b.p) {
        if (errno != ENOMEM)
            atomic_fetch_add(&api_errors, 1);
        note_refusal(w);
        return;
    }
    b.size = n;
    if (malloc_usable_size(b.p) < n)
        atomic_fetch_add(&corrupt, 1);
    if (zeroed)
        for (size_t i = 0; i < n; i++)
            if (b.p[i]) {
                atomic_fetch_add(&corrupt, 1);
                break;
            }
    paint(&b);
    w->local[w->nlocal++] = b;
}

static void release(block *b) {
    verify(b);
    free(b->p);
}

static void free_local(worker *w, size_t i) {
    release(&w->local[i]);
    w->local[i] = w->local[--w->nlocal];
}

/* One step of a realloc chain: the new block is the calling instance's. */
static void grow_or_shrink(worker *w, size_t i) {
    block *b = &w->local[i];
    verify(b);
    size_t n = below(w, 4) == 0 ? below(w, 64) : random_size(w);
    if (n == 0)
        n = 1; /* realloc(p, 0) frees: covered by free_local */
    uint32_t cur = current_instance();
    errno = 0;
    unsigned char *q = realloc(b->p, n);
    if (!q) {
        /* Refused: the old block is untouched and still charged where it was. */
        if (errno != ENOMEM)
            atomic_fetch_add(&api_errors, 1);
        note_refusal(w);
        verify(b);
        return;
    }
    block nb = {.p = q, .size = n, .inst = cur, .seed = b->seed};
    if (!painted(&nb, b->size < n ? b->size : n))
        atomic_fetch_add(&corrupt, 1);
    nb.seed = (uint32_t)next(w);
    paint(&nb);
    *b = nb;
}

/* Scope moves of each role, at random points of the loop. */
static void move(worker *w) {
    uint32_t d = w->depth;
    switch (roles[w->index]) {
    case ROLE_OWN:
        if (d == 0) {
            enter(scope_nested);
            w->depth++;
        } else if (d < 3 && below(w, 3) == 0) {
            enter(scope_nested); /* nested in nested: counts once for the scope */
            w->depth++;
        } else {
            leave();
            w->depth--;
        }
        break;
    case ROLE_TIGHT:
        if (d == 0) {
            enter(scope_tight);
            w->depth++;
        } else {
            leave();
            w->depth--;
        }
        break;
    case ROLE_SHARED:
        /* Leave and re-attach the shared instance now and then. */
        if (d == 0) {
            leave();
            attach(shared_instance);
        }
        break;
    case ROLE_SHARED_NEST:
        if (d == 0) {
            enter(below(w, 2) ? scope_shared : scope_work);
            w->depth++;
        } else {
            leave();
            w->depth--;
        }
        break;
    case ROLE_ROOT:
        if (d == 0) {
            attach(below(w, 2) ? thread0_instance : shared_instance);
            w->depth++;
        } else {
            leave();
            w->depth--;
        }
        break;
    case ROLE_WANDER:
        if (d == 0) {
            switch (below(w, 3)) {
            case 0: attach(shared_instance); break;
            case 1: enter(scope_work); break;
            default: enter(scope_nested); break;
            }
            w->depth++;
        } else if (d < 4 && below(w, 2) == 0) {
            enter(below(w, 2) ? scope_work : scope_nested);
            w->depth++;
        } else {
            leave();
            w->depth--;
        }
        break;
    }
}

static void *work(void *arg) {
    worker *w = arg;
    switch (roles[w->index]) {
    case ROLE_OWN:
    case ROLE_TIGHT:
        enter(scope_work);
        w->base_depth = 1;
        if (w->index == 0) {
            thread0_instance = current_instance();
            /* Keep it attachable for thread 6 after this thread leaves it;
             * main releases the hold at the end. */
            if (ap.hold(thread0_instance) != AP_OK)
                atomic_fetch_add(&api_errors, 1);
        }
        break;
    case ROLE_SHARED:
    case ROLE_SHARED_NEST:
        attach(shared_instance);
        w->base_depth = 1;
        break;
    default:
        break;
    }
    pthread_barrier_wait(&start_line);

    for (long it = 0; it < w->iterations; it++) {
        size_t r = below(w, 100);
        if (r < 38) {
            if (w->nlocal < LOCAL_MAX)
                allocate(w);
            else
                free_local(w, below(w, w->nlocal));
        } else if (r < 56) {
            if (w->nlocal)
                free_local(w, below(w, w->nlocal));
        } else if (r < 66) {
            if (w->nlocal)
                grow_or_shrink(w, below(w, w->nlocal));
        } else if (r < 75) {
            if (w->nlocal) {
                size_t i = below(w, w->nlocal);
                if (queue_push(&w->local[i]))
                    w->local[i] = w->local[--w->nlocal];
            }
        } else if (r < 85) {
            block b;
            if (queue_pop(&b)) {
                /* Someone else's block: free it here, or keep it (and maybe
                 * realloc it later, which moves it to this thread's instance). */
                if (below(w, 2) || w->nlocal >= LOCAL_MAX)
                    release(&b);
                else
                    w->local[w->nlocal++] = b;
            }
        } else if (r < 97) {
            move(w);
        } else {
            /* Publish mid-run too: the counts must not depend on when. */
            if (below(w, 4) == 0)
                ap.flush();
        }
    }

    /* Threads 1 and 7 end inside their scopes: thread exit must leave them
     * (and publish), or their instances would never end. */
    int ends_inside = w->index == 1 || w->index == 7;
    while (w->depth && !ends_inside) {
        leave();
        w->depth--;
    }
    while (w->base_depth && !ends_inside) {
        leave();
        w->base_depth--;
    }
    /* Keep a few blocks (possibly made in instances that ended long ago). */
    size_t keep = below(w, KEEP_MAX + 1);
    while (w->nlocal > keep)
        free_local(w, below(w, w->nlocal));
    /* Half the threads publish explicitly; the others rely on the
     * thread-exit path publishing for them. */
    if (w->index % 2 == 0)
        ap.flush();
    return NULL;
}

/*
 * Churn: every instance lives for one allocation. Its block goes to the queue
 * and is freed by some other thread after the instance ended, which reclaims
 * the instance; ids are reused as soon as the table has been used once, so
 * frees of old instances race with new instances taking over their ids.
 */
static void *churn(void *arg) {
    worker *w = arg;
    static uint32_t *const scopes[] = {&scope_work, &scope_nested, &scope_shared};
    pthread_barrier_wait(&start_line);
    for (long it = 0; it < w->iterations; it++) {
        uint32_t depth = 1 + (uint32_t)below(w, 2);
        for (uint32_t d = 0; d < depth; d++)
            enter(*scopes[below(w, 3)]);
        allocate(w);
        for (uint32_t d = 0; d < depth; d++)
            leave();
        if (w->nlocal && !queue_push(&w->local[w->nlocal - 1]))
            free_local(w, w->nlocal - 1);
        else if (w->nlocal)
            w->nlocal--;
        block b;
        if (queue_pop(&b))
            release(&b);
    }
    size_t keep = below(w, KEEP_MAX + 1);
    while (w->nlocal > keep)
        free_local(w, below(w, w->nlocal));
    if (w->index % 2 == 0)
        ap.flush();
    return NULL;
}

/* ---- Checking ------------------------------------------------------------------------ */

static int64_t expect_inst[MAX_INST];
static long mismatches;

/* A block counts in the instance that made it and in every enclosing one;
 * only the live ones among them (the latest of their slot, not ended) report
 * live bytes, which the check compares. */
static void add_block(const block *b, int64_t *total) {
    *total += (int64_t)b->size;
    for (uint32_t id = b->inst; id != AP_INSTANCE_PROCESS; id = *parent_slot(id))
        if (instances[SLOT(id)].id == id)
            expect_inst[SLOT(id)] += (int64_t)b->size;
}

/* An instance counts in its scope's total unless an enclosing one is of the
 * same scope (scope.c: counts_scope). */
static int counts_for_scope(uint32_t id) {
    for (uint32_t a = instances[id].parent; a != AP_INSTANCE_PROCESS;
         a = instances[SLOT(a)].parent)
        if (instances[SLOT(a)].scope == instances[id].scope)
            return 0;
    return 1;
}

typedef struct {
    uint32_t id;
    const char *name;
} named_scope;

/*
 * Compare every instance, scope and the process with what the program holds.
 * All stats are read before anything is printed: printing could allocate,
 * and the process count must see only the blocks accounted for.
 */
static void check(const char *phase, int64_t process_baseline, int expect_ended) {
    static ap_instance_stats got_inst[MAX_INST];
    static ap_status got_inst_rc[MAX_INST];
    const named_scope scopes[] = {{AP_SCOPE_PROCESS, "process"}, {scope_work, "work"},
                                  {scope_nested, "nested"},      {scope_shared, "shared"},
                                  {scope_tight, "tight"}};
    enum { NS = sizeof scopes / sizeof scopes[0] };
    ap_scope_stats got_scope[NS];
    ap_process_stats proc = {.size = sizeof proc};

    ap.flush();
    for (uint32_t id = 1; id < MAX_INST; id++) {
        if (!instances[id].known)
            continue;
        got_inst[id] = (ap_instance_stats){.size = sizeof got_inst[id]};
        got_inst_rc[id] = ap.instance_stats(instances[id].id, &got_inst[id]);
    }
    for (int s = 0; s < NS; s++) {
        got_scope[s] = (ap_scope_stats){.size = sizeof got_scope[s]};
        if (ap.scope_stats(scopes[s].id, &got_scope[s]) != AP_OK)
            mismatches++;
    }
    if (ap.process_stats(&proc) != AP_OK)
        mismatches++;

    int64_t kept = 0;
    memset(expect_inst, 0, sizeof expect_inst);
    for (int t = 0; t < NTHREADS; t++)
        for (size_t i = 0; i < workers[t].nlocal; i++)
            add_block(&workers[t].local[i], &kept);
    for (size_t i = 0; i < queue.count; i++)
        add_block(&queue.items[(queue.head + i) % QUEUE_CAP], &kept);

    int64_t expect_scope[NS] = {0};
    long ninst = 0, nended = 0;
    for (uint32_t id = 1; id < MAX_INST; id++) {
        if (!instances[id].known)
            continue;
        ninst++;
        /* A scope's total sums its live instances (escaped bytes of ended
         * ones are not in it). */
        if (got_inst_rc[id] == AP_OK && !got_inst[id].ended && counts_for_scope(id))
            for (int s = 1; s < NS; s++)
                if (scopes[s].id == instances[id].scope)
                    expect_scope[s] += expect_inst[id];
        if (got_inst_rc[id] == AP_ENOENT) {
            /* Back in the common pool: only possible once it ended with
             * nothing left. */
            nended++;
            if (expect_inst[id] != 0) {
                printf("check %s instance %u: reclaimed but expected live %lld\n", phase, id,
                       (long long)expect_inst[id]);
                mismatches++;
            }
            continue;
        }
        if (got_inst_rc[id] != AP_OK) {
            printf("check %s instance %u: stats failed (%d)\n", phase, id, got_inst_rc[id]);
            mismatches++;
            continue;
        }
        const ap_instance_stats *g = &got_inst[id];
        nended += g->ended;
        /* An ended instance's bytes are counted in its enclosing ones. */
        if ((!g->ended && g->live != expect_inst[id]) || g->scope != instances[id].scope ||
            g->parent != instances[id].parent || (expect_ended && !g->ended)) {
            printf("check %s instance %u scope %u parent %u: live %lld expected %lld ended %u\n",
                   phase, id, g->scope, g->parent, (long long)g->live,
                   (long long)expect_inst[id], g->ended);
            mismatches++;
        }
    }
    expect_scope[0] = process_baseline + kept;
    for (int s = 0; s < NS; s++) {
        int ok = got_scope[s].live == expect_scope[s];
        printf("check %s scope %s live %lld expected %lld %s\n", phase, scopes[s].name,
               (long long)got_scope[s].live, (long long)expect_scope[s], ok ? "ok" : "MISMATCH");
        if (!ok)
            mismatches++;
    }
    int ok = proc.live == process_baseline + kept;
    printf("check %s process live %lld expected %lld (baseline %lld + kept %lld) %s\n", phase,
           (long long)proc.live, (long long)(process_baseline + kept),
           (long long)process_baseline, (long long)kept, ok ? "ok" : "MISMATCH");
    if (!ok)
        mismatches++;
    printf("check %s instances %ld ended %ld\n", phase, ninst, nended);
}

/* Refusals are counted exactly where they happened. */
static void check_violations(uint64_t violations_before) {
    long refused = 0, refused_other = 0;
    for (int t = 0; t < NTHREADS; t++) {
        refused += workers[t].refused;
        refused_other += workers[t].refused_other;
    }
    ap_scope_stats tight = {.size = sizeof tight};
    ap_process_stats proc = {.size = sizeof proc};
    ap.scope_stats(scope_tight, &tight);
    ap.process_stats(&proc);
    int ok = (long)tight.violations == refused && refused_other == 0 &&
             (long)(proc.violations - violations_before) == refused;
    printf("check violations refused %ld elsewhere %ld tight %llu process %llu %s\n", refused,
           refused_other, (unsigned long long)tight.violations,
           (unsigned long long)(proc.violations - violations_before), ok ? "ok" : "MISMATCH");
    if (!ok)
        mismatches++;
}

static void *warm(void *arg) {
    (void)arg;
    free(malloc(100));
    ap.flush();
    return NULL;
}

int main(int argc, char **argv) {
    long iterations = argc > 1 ? atol(argv[1]) : 20000;
    uint64_t seed = argc > 2 ? strtoull(argv[2], NULL, 10) : 12345;
    int churning = argc > 3 && strcmp(argv[3], "churn") == 0;
    if (!bind_runtime())
        return 2;
    /* The sanitizer builds (noxfile.py, `sanitize`) link the runtime into
     * the program with its malloc family renamed, so that the sanitizer's
     * allocator is the backend: nothing interposes malloc there. */
#ifndef AP_STRESS_RENAMED
    if (!ap.is_preloaded()) {
        fprintf(stderr, "stress: the runtime is loaded but not interposing malloc\n");
        return 2;
    }
#endif
    if (ap.scope_find("work", &scope_work) || ap.scope_find("nested", &scope_nested) ||
        ap.scope_find("shared", &scope_shared) || ap.scope_find("tight", &scope_tight)) {
        fprintf(stderr, "stress: the table must declare work, nested, shared and tight\n");
        return 2;
    }
    page = (size_t)sysconf(_SC_PAGESIZE);
    printf("stress threads=%d iterations=%ld seed=%llu%s\n", NTHREADS, iterations,
           (unsigned long long)seed, churning ? " churn" : "");
    fflush(stdout);

    /* Small stacks, so glibc's stack cache keeps all of them: creating the
     * workers then reuses the warm-up threads' stacks (and what glibc
     * allocated for them) instead of allocating anew after the baseline. */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_t tids[NTHREADS];
    for (int round = 0; round < 2; round++) {
        for (int t = 0; t < NTHREADS; t++)
            pthread_create(&tids[t], &attr, warm, NULL);
        for (int t = 0; t < NTHREADS; t++)
            pthread_join(tids[t], NULL);
    }
    ap.flush();
    ap_process_stats before = {.size = sizeof before};
    ap.process_stats(&before);
    int64_t baseline = before.live;

    /* The shared instance: made by main, held, and left, so the workers
     * attach to an instance no thread is in at first. */
    shared_instance = enter(scope_shared);
    if (ap.hold(shared_instance) != AP_OK)
        atomic_fetch_add(&api_errors, 1);
    leave();

    pthread_barrier_init(&start_line, NULL, NTHREADS);
    for (int t = 0; t < NTHREADS; t++) {
        workers[t].index = t;
        workers[t].iterations = iterations;
        workers[t].rng = seed * 0x9E3779B97F4A7C15ull + (uint64_t)t * 0xBF58476D1CE4E5B9ull + 1;
        if (pthread_create(&tids[t], &attr, churning ? churn : work, &workers[t]) != 0) {
            fprintf(stderr, "stress: pthread_create failed\n");
            return 2;
        }
    }
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(tids[t], NULL);

    /* Blocks kept: the shared and thread 0's instances are still held. */
    check("kept", baseline, 0);
    check_violations(before.violations);

    /* The last holds go: every instance has ended, the counts stay. */
    ap.release(shared_instance);
    ap.release(thread0_instance);
    check("ended", baseline, 1);

    /* Everything freed (most of it after its instance ended): back to zero. */
    for (int t = 0; t < NTHREADS; t++) {
        while (workers[t].nlocal)
            free_local(&workers[t], workers[t].nlocal - 1);
    }
    block b;
    while (queue_pop(&b))
        release(&b);
    check("freed", baseline, 1);

    printf("RESULT mismatches=%ld corrupt=%ld api_errors=%ld entered=%ld\n", mismatches,
           (long)atomic_load(&corrupt), (long)atomic_load(&api_errors),
           (long)atomic_load(&entered));
    fflush(stdout);
    return mismatches || atomic_load(&corrupt) || atomic_load(&api_errors) ? 1 : 0;
}
