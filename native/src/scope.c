/*
 * scope.c - scope instances, the per-thread scope stack, accounting and the
 * allocation decision.
 *
 * Accounting model
 *   Every instance has shared counters (live, peak, allocations, violations),
 *   and each allocation is charged to the thread's innermost instance and, by
 *   the parent links, to every enclosing instance up to the process root; an
 *   instance that is the outermost of its scope on the chain is also summed
 *   into the scope's total (for `total_budget`).
 *
 *   Writing those shared counters on every allocation would put one contended
 *   cache line on the hot path of every thread in a scope. Instead each thread
 *   batches: `allow` is how much more it may allocate in its innermost
 *   instance before one of the limits on its chain could be crossed, and the
 *   distance `allow` moved since the last publish is its unpublished net
 *   allocation. Only when a request does not fit `allow` (at most `slack`,
 *   or the headroom left, when computed) does the slow path publish and
 *   re-check with atomics. With one thread in an instance the check is exact; with N
 *   threads, live may pass a budget by at most (N-1) x slack, and slack is at
 *   most 1/32 of the tightest budget on the chain (and at most 256 KiB).
 *
 * Instances and their slots: see internal.h and "Instances" below. An ended
 * instance keeps no slot of its own; its escaped bytes stay in the enclosing
 * instances and move to its slot's dead ledger, found again through the
 * generation in the block header's id.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"
#include "spans.h"

#define AP__SLACK_MAX ((int64_t)256 * 1024)
#define AP__SLACK_MIN ((int64_t)4 * 1024)
#define AP__NO_INSTANCE UINT32_MAX

ap__scope ap__scopes[AP_MAX_SCOPES] = {[0] = {.name = "process", .overdraft = AP_ACTION_COUNT}};
_Atomic uint32_t ap__nscopes = 1;
/* Zero-initialised (so it costs no file size and only the pages touched):
 * instance 0 is the process root, whose fields are never read for its state,
 * owners or parent (every walk stops at it). */
ap__instance ap__instances[AP_MAX_INSTANCES];
ap__settings_t ap__settings = {
    .grace = (int64_t)4 << 20, .report_fd = 2, .reserve_margin = (int64_t)64 << 20};

AP__TLS ap__tls_t ap__tls = {.grace_inst = AP__NO_INSTANCE};

/* Slots never used yet start at `fresh`; slots back in the common pool go on
 * a lock-free stack whose head packs (ABA tag << 32 | id + 1). */
static _Atomic uint32_t fresh = 1;
static _Atomic uint64_t free_head;

static pthread_key_t thread_exit_key;

/* ---- Limits of one chain --------------------------------------------------- */

static inline int64_t instance_limit(uint32_t id) {
    if (id == AP_INSTANCE_PROCESS)
        return atomic_load_explicit(&ap__scopes[0].budget, memory_order_relaxed);
    return ap__inst(id)->budget;
}

static inline void raise_peak(_Atomic int64_t *peak, int64_t value) {
    int64_t seen = atomic_load_explicit(peak, memory_order_relaxed);
    while (value > seen &&
           !atomic_compare_exchange_weak_explicit(peak, &seen, value, memory_order_relaxed,
                                                  memory_order_relaxed)) {
    }
}

/* Add `delta` bytes and `count` allocations to one set of counters. */
static inline int64_t counters_add(ap__counters *c, int64_t delta, uint64_t count) {
    int64_t now = atomic_fetch_add_explicit(&c->live, delta, memory_order_relaxed) + delta;
    if (count)
        atomic_fetch_add_explicit(&c->allocations, count, memory_order_relaxed);
    if (delta > 0)
        raise_peak(&c->peak, now);
    return now;
}

/*
 * Apply `delta` bytes to every level of the chain starting at `id`, unchecked.
 * Used for publishing batches (already granted) and for frees. Every level is
 * an active instance: an instance ends only after every instance nested in it
 * did (each holds its parent's `inside`), and the caller keeps the first
 * level from ending meanwhile (it is the thread's own, or pinned).
 */
static void chain_apply(uint32_t id, int64_t delta, uint64_t count) {
    for (;;) {
        ap__instance *in = ap__inst(id);
        counters_add(&in->c, delta, count);
        if (in->counts_scope)
            counters_add(&ap__scopes[in->scope].total, delta, count);
        if (id == AP_INSTANCE_PROCESS)
            return;
        id = in->parent;
    }
}

typedef struct {
    uint32_t limit;     /* ap_limit that refused, AP_LIMIT_NONE if granted */
    uint32_t instance;  /* instance owning that limit */
    int64_t budget;
    int64_t live;       /* live before the refused request */
    int64_t headroom;   /* smallest remaining room over the chain */
    int64_t slack;      /* batch bound derived from the tightest budget */
} chain_result;

static inline void note_room(chain_result *r, int64_t limit, int64_t now) {
    if (!limit)
        return;
    int64_t room = limit - now;
    if (room < r->headroom)
        r->headroom = room;
    int64_t s = limit / 32;
    if (s < r->slack)
        r->slack = s;
}

/*
 * Try to charge `size` bytes to every level of the chain. Each level is added
 * optimistically and checked; on the first level over its limit, the levels
 * already added are taken back, so a refused request leaves no trace in the
 * counters (semantics 3) beyond a brief overshoot others may observe.
 */
static int chain_try_charge(uint32_t start, int64_t size, uint64_t count, chain_result *r) {
    _Atomic int64_t *undo[2 * (AP_MAX_DEPTH + 2)];
    int n = 0;
    r->limit = AP_LIMIT_NONE;
    r->headroom = INT64_MAX;
    r->slack = AP__SLACK_MAX;
    for (uint32_t id = start;;) {
        ap__instance *in = ap__inst(id);
        int64_t lim = instance_limit(id);
        int64_t now = atomic_fetch_add_explicit(&in->c.live, size, memory_order_relaxed) + size;
        undo[n++] = &in->c.live;
        if (lim && now > lim) {
            r->limit = id == AP_INSTANCE_PROCESS ? AP_LIMIT_PROCESS : AP_LIMIT_INSTANCE;
            r->instance = id;
            r->budget = lim;
            r->live = now - size;
            goto refused;
        }
        note_room(r, lim, now);
        if (in->counts_scope) {
            ap__scope *sc = &ap__scopes[in->scope];
            int64_t tot = atomic_load_explicit(&sc->total_budget, memory_order_relaxed);
            now = atomic_fetch_add_explicit(&sc->total.live, size, memory_order_relaxed) + size;
            undo[n++] = &sc->total.live;
            if (tot && now > tot) {
                r->limit = AP_LIMIT_TOTAL;
                r->instance = id;
                r->budget = tot;
                r->live = now - size;
                goto refused;
            }
            note_room(r, tot, now);
        }
        if (id == AP_INSTANCE_PROCESS)
            break;
        id = in->parent;
    }
    /* Granted: the bytes are in; now peaks and counts. */
    for (uint32_t id = start;;) {
        ap__instance *in = ap__inst(id);
        atomic_fetch_add_explicit(&in->c.allocations, count, memory_order_relaxed);
        raise_peak(&in->c.peak, atomic_load_explicit(&in->c.live, memory_order_relaxed));
        if (in->counts_scope) {
            ap__counters *tc = &ap__scopes[in->scope].total;
            atomic_fetch_add_explicit(&tc->allocations, count, memory_order_relaxed);
            raise_peak(&tc->peak, atomic_load_explicit(&tc->live, memory_order_relaxed));
        }
        if (id == AP_INSTANCE_PROCESS)
            break;
        id = in->parent;
    }
    return 1;
refused:
    while (n--)
        atomic_fetch_sub_explicit(undo[n], size, memory_order_relaxed);
    return 0;
}

/* ---- Per-thread batching ----------------------------------------------------- */

/* Only after a publish: anything not yet published would be lost. Frees may
 * run ahead of the last publish by as much as allocations may (the slack),
 * so other threads' view of live is off by at most the slack either way. A
 * watching thread (observe.c) gets nothing, so every event takes the slow
 * path. */
static inline void reset_allow(ap__tls_t *t, int64_t allow) {
    if (AP__UNLIKELY(t->watch)) {
        t->allow = t->mark = t->limit = 0;
        return;
    }
    t->allow = allow;
    t->mark = allow;
    t->limit = allow + (allow > AP__SLACK_MIN ? allow : AP__SLACK_MIN);
}

/* The innermost reservation, if it serves the thread's current instance. */
static inline ap_reservation *active_res(ap__tls_t *t) {
    if (AP__LIKELY(!t->nres))
        return NULL;
    ap_reservation *r = &t->res[t->nres - 1];
    return r->instance == t->cur ? r : NULL;
}

/*
 * After a publish: set what the fast path may do next. Inside a reservation
 * the fast path draws on it directly (`allow` is what is left of it) and
 * frees give room back up to its size (`limit`); see ap__publish.
 * Otherwise the next allocation takes the slow path and computes `allow`.
 */
void ap__refill(ap__tls_t *t) {
    ap_reservation *r = active_res(t);
    if (r && !t->watch) {
        t->allow = t->mark = r->left;
        t->limit = r->reserved;
        return;
    }
    reset_allow(t, 0);
}

static void release_reservation(ap__tls_t *t);

static void thread_exit(void *unused) {
    (void)unused;
    ap__tls_t *t = &ap__tls;
    /* A thread that ends inside scopes leaves them, or their instances would
     * never end; its reservations go back first, its
     * regions end with it. */
    while (t->nres)
        release_reservation(t);
    while (t->depth)
        ap_exit();
    ap__libs_leave(AP_INSTANCE_PROCESS);
    t->nregions = 0;
    t->watch = 0;
    ap__publish(t);
    /* Later destructors may allocate again; they run through the slow path,
     * which registers this destructor anew (glibc repeats destructor rounds).
     * Until then frees bypass the cache (it only fills while registered). */
    t->registered = 0;
    ap__cache_flush(t);
    ap__spans_detach(t);
    reset_allow(t, 0);
}

void ap__threads_init(void) {
    /* pthread_key_create allocates nothing; done at bootstrap so the key gets a
     * low index, whose pthread_setspecific storage is static. */
    pthread_key_create(&thread_exit_key, thread_exit);
}

static inline void register_thread(ap__tls_t *t) {
    /* The key exists once bootstrap resolved the backend; allocations made
     * while resolving are registered on a later slow path. */
    if (AP__UNLIKELY(!t->registered) && atomic_load_explicit(&ap__ready, memory_order_acquire) == 2) {
        t->registered = 1;
        pthread_setspecific(thread_exit_key, (void *)1);
    }
}

/* Settle the fast path's batch against a reservation: what was drawn comes
 * off it, what was freed goes back into it up to its size, and only the rest
 * reaches the shared counters (where the reservation already stands). */
static void publish_reserved(ap__tls_t *t, ap_reservation *r) {
    int64_t net = t->mark - t->allow;
    int64_t give = 0;
    if (net > 0) {
        r->left -= net;
        if (r->reserved - r->left > r->peak_used)
            r->peak_used = r->reserved - r->left;
    } else if (net < 0) {
        int64_t back = r->reserved - r->left;
        give = -net;
        if (back > give)
            back = give;
        r->left += back;
        give -= back;
    }
    uint64_t n = t->pend_n;
    t->mark = t->allow;
    t->pend_n = 0;
    if (give || n)
        chain_apply(t->cur, -give, n);
}

void ap__publish(ap__tls_t *t) {
    ap_reservation *r = active_res(t);
    if (AP__UNLIKELY(r != NULL)) {
        publish_reserved(t, r);
        return;
    }
    int64_t pend = t->mark - t->allow;
    if (pend || t->pend_n) {
        uint64_t n = t->pend_n;
        t->mark = t->allow;
        t->pend_n = 0;
        chain_apply(t->cur, pend, n);
    }
}

/* ---- The decision ---------------------------------------------------------- */

static void record(ap__tls_t *t, uint32_t reason, uint32_t domain, uint64_t size,
                   const chain_result *r) {
    ap_violation *v = &t->last;
    ap__instance *cur = ap__inst(t->cur);
    v->size = sizeof *v;
    v->reason = reason;
    v->seq++;
    v->domain = domain;
    v->requested = size;
    if (r && r->limit != AP_LIMIT_NONE) {
        v->limit = r->limit;
        v->instance = r->instance;
        v->scope = ap__inst(r->instance)->scope;
        v->budget = r->budget;
        v->live = r->live;
    } else {
        v->limit = AP_LIMIT_NONE;
        v->instance = t->cur;
        v->scope = cur->scope;
        v->budget = 0; /* no budget refused it */
        v->live = atomic_load_explicit(&cur->c.live, memory_order_relaxed) + (t->mark - t->allow);
    }
    v->index = 0;
    ap__python_where(v);
    /* By reason, for the innermost scope (the process scope at the root), so
     * that the per-scope sums are the `violations` of the same scopes. */
    atomic_fetch_add_explicit(&ap__scopes[cur->scope].refused[reason], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&cur->c.violations, 1, memory_order_relaxed);
    if (t->cur != AP_INSTANCE_PROCESS) {
        atomic_fetch_add_explicit(&ap__scopes[cur->scope].total.violations, 1,
                                  memory_order_relaxed);
        atomic_fetch_add_explicit(&ap__inst(0)->c.violations, 1, memory_order_relaxed);
    }
}

void ap__record_forbidden(ap__tls_t *t, uint64_t size, ap_domain domain) {
    record(t, AP_REASON_FORBIDDEN, domain, size, NULL);
}

static inline uint32_t current_mode(const ap__tls_t *t) {
    return atomic_load_explicit(&ap__scopes[ap__inst(t->cur)->scope].mode,
                                memory_order_relaxed);
}

/* Recompute how much the fast path may take before the next check. */
static inline void set_allow(ap__tls_t *t, const chain_result *r) {
    int64_t a = r->slack < AP__SLACK_MIN ? AP__SLACK_MIN : r->slack;
    if (r->headroom < a)
        a = r->headroom;
    reset_allow(t, a > 0 ? a : 0);
}

/*
 * Grant without checking budgets: fallible scopes, the unwind grace and
 * overdrafts. The bytes still go to every level so the books stay exact.
 */
static void charge_unchecked(ap__tls_t *t, int64_t size) {
    chain_apply(t->cur, size, 1);
}

/* The unwind grace: the scope already refused once on this thread, so it is
 * unwinding (or its code caught the MemoryError). Let the unwind, the scope
 * exit and the AllocError construction allocate, within a bounded allowance. */
static int take_grace(ap__tls_t *t, uint64_t size) {
    if (t->grace_inst != t->cur || t->grace_left < (int64_t)size)
        return 0;
    t->grace_left -= (int64_t)size;
    atomic_fetch_add_explicit(&ap__scopes[ap__inst(t->cur)->scope].grace_bytes,
                              (int64_t)size, memory_order_relaxed);
    return 1;
}

static void open_grace(ap__tls_t *t) {
    if (t->grace_inst != t->cur) {
        t->grace_inst = t->cur;
        t->grace_left = atomic_load_explicit(&ap__settings.grace, memory_order_relaxed);
    }
}

/*
 * After a refusal has been recorded: abort mode aborts. In raise mode the
 * allocating code gets NULL, unless the policy lists the libraries that check
 * for NULL (raise_only_from) and the code that called malloc is not among
 * them: then an abort with a clear diagnostic is safer than a crash later.
 */
static void abort_if_required(ap__tls_t *t, uint32_t mode, ap_domain domain) {
    if (mode == AP_MODE_ABORT)
        ap__abort_with(&t->last);
    const char *note;
    if (mode == AP_MODE_RAISE && domain == AP_DOMAIN_LIBC &&
        AP__UNLIKELY(atomic_load_explicit(&ap__libs_on, memory_order_relaxed)) &&
        ap__lib_refusal_aborts(ap__inst(t->cur)->scope, &note))
        ap__abort_noted(&t->last, note);
}

/*
 * An ordinary decision for `size` bytes against the chain of the current
 * instance, after the batch was published. On a grant the bytes are
 * accounted and `r->slack`/`r->headroom` say how far the fast path may go.
 */
static int decide(ap__tls_t *t, uint64_t size, ap_domain domain, chain_result *r) {
    if (AP__LIKELY(chain_try_charge(t->cur, (int64_t)size, 1, r)))
        return 1;
    uint32_t mode = current_mode(t);
    if (domain == AP_DOMAIN_PY_ARENA && mode != AP_MODE_FALLIBLE) {
        /* A refused arena is not a failure anyone sees: pymalloc falls back to
         * PyMem_RawMalloc for the object, which reaches malloc and is charged
         * (exactly) there. So no violation, no grace, no abort here. */
        return 0;
    }
    if (mode == AP_MODE_FALLIBLE || (mode == AP_MODE_RAISE && take_grace(t, size))) {
        /* Budgets bind fallible scopes only at explicit fallible call sites. */
        charge_unchecked(t, (int64_t)size);
        return 1;
    }
    record(t, AP_REASON_BUDGET, domain, size, r);
    abort_if_required(t, mode, domain);
    open_grace(t);
    return 0;
}

/* An allocation that does not fit what is left of the reservation. */
static int overdraw(ap__tls_t *t, ap_reservation *res, uint64_t size, ap_domain domain) {
    int64_t excess = (int64_t)size - res->left;
    ap__scope *sc = &ap__scopes[ap__inst(t->cur)->scope];
    res->overdrafts++;
    res->overdraft_bytes += excess;
    if (!res->first_overdraft)
        res->first_overdraft = size;
    atomic_fetch_add_explicit(&sc->overdrafts, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&sc->overdraft_bytes, excess, memory_order_relaxed);
    int granted;
    if (res->action == AP_ACTION_RAISE || res->action == AP_ACTION_ABORT) {
        granted = res->action == AP_ACTION_RAISE && take_grace(t, (uint64_t)excess);
        if (granted) {
            charge_unchecked(t, excess);
        } else {
            chain_result r = {.limit = AP_LIMIT_RESERVATION, .instance = t->cur,
                              .budget = res->reserved, .live = res->reserved - res->left};
            record(t, AP_REASON_BUDGET, domain, size, &r);
            if (res->action == AP_ACTION_ABORT)
                ap__abort_noted(&t->last, "an overdraft of the reservation (overdraft=abort), aborting");
            res->refused++;
            open_grace(t);
        }
    } else {
        /* WARN and COUNT: beyond the reservation the allocation is an
         * ordinary one of the scope's mode. */
        chain_result r;
        granted = decide(t, (uint64_t)excess, domain, &r);
    }
    if (granted) {
        res->left = 0;
        res->peak_used = res->reserved;
    }
    return granted;
}

AP__NOINLINE int ap__charge_slow(uint64_t size, ap_domain domain) {
    ap__tls_t *t = &ap__tls;
    register_thread(t);
    ap__publish(t);
    if (size > AP__MAX_REQUEST) {
        /* No backend can satisfy it (and it would not fit the header): the
         * same outcome as the backend returning NULL, in every mode. */
        ap__refill(t);
        return ap__backend_failed(size, domain);
    }
    if (AP__UNLIKELY(ap__watching(t)) && !ap__observe_alloc(t, size, domain)) {
        ap__refill(t);
        return 0;
    }
    ap_reservation *res = active_res(t);
    if (AP__UNLIKELY(res != NULL)) {
        int granted = 1;
        if ((int64_t)size <= res->left) {
            res->left -= (int64_t)size;
            if (res->reserved - res->left > res->peak_used)
                res->peak_used = res->reserved - res->left;
            t->pend_n++;
        } else {
            granted = overdraw(t, res, size, domain);
        }
        ap__refill(t);
        return granted;
    }
    chain_result r;
    if (AP__LIKELY(decide(t, size, domain, &r))) {
        if (r.limit == AP_LIMIT_NONE) /* granted within every budget */
            set_allow(t, &r);
        else
            reset_allow(t, 0);
        return 1;
    }
    reset_allow(t, 0);
    return 0;
}

/* Called from the hooks and observe.c for an injected failure: it follows the
 * scope's mode, as a budget refusal does. */
int ap__inject_refuse(ap__tls_t *t, uint64_t size, ap_domain domain, uint64_t index) {
    record(t, AP_REASON_INJECTED, domain, size, NULL);
    t->last.index = index;
    atomic_fetch_add_explicit(&ap__scopes[ap__inst(t->cur)->scope].injected, 1,
                              memory_order_relaxed);
    if (domain == AP_DOMAIN_PY_ARENA)
        return 0; /* pymalloc falls back to malloc; nobody sees it */
    abort_if_required(t, current_mode(t), domain);
    open_grace(t);
    return 0;
}

int ap__backend_failed(uint64_t size, ap_domain domain) {
    ap__tls_t *t = &ap__tls;
    record(t, AP_REASON_OOM, domain, size, NULL);
    /* The backend returned NULL, or no backend could serve the request: a
     * failure the caller sees in every mode but abort. Fallible scopes too:
     * their promise is about budgets, and this is what Python itself turns
     * into a MemoryError (bytearray(2**50)) without the runtime. */
    abort_if_required(t, current_mode(t), domain);
    return 0;
}

static void release_slot(uint32_t slot);

/* The serial of the generation `id` names (a slot's ledger holds bytes of
 * its last AP__GEN_MASK generations at most; see reuse_slot). */
static inline uint32_t serial_of(const ap__instance *in, uint32_t id) {
    uint32_t now = atomic_load(&in->serial);
    return now - ((now - (id >> AP__GEN_SHIFT)) & AP__GEN_MASK);
}

/*
 * Credit `size` bytes of a block named `id` (semantics 2). While `id` is the
 * slot's active occupant, its chain takes them. Once it ended, its bytes are
 * in the slot's `dead` ledger and still in the enclosing instances: take them
 * from the ledger, then go on with its parent, until an active level. The
 * pin keeps the slot's occupant from ending, and the slot from being reused
 * by a new occupant, while the credit is under way. A dead slot's parent link
 * changes only when the slot goes back to the common pool, which needs its
 * ledger empty: so it is read before this credit's bytes leave the ledger.
 * The ledgers are inclusive (an instance that ends moves what it and its
 * nested instances still hold), so every dead slot above still holds them
 * too when the walk gets there.
 */
static void credit_block(uint32_t id, int64_t size) {
    /* Set when the level is known to have ended for these bytes, whatever
     * its current generation (the parent of a generation older than the
     * slot's switch). */
    int ended = 0;
    for (;;) {
        if ((id & AP__SLOT_MASK) == AP_INSTANCE_PROCESS) {
            chain_apply(AP_INSTANCE_PROCESS, -size, 0);
            return;
        }
        ap__instance *in = ap__inst(id);
        atomic_fetch_add(&in->pins, 1);
        if (!ended && atomic_load(&in->state) == AP__INST_ACTIVE && ap__id_current(in, id)) {
            chain_apply(id, -size, 0);
            atomic_fetch_sub_explicit(&in->pins, 1, memory_order_release);
            return;
        }
        /* The link is read before the switch point: a new link is written
         * after its switch point (reuse_slot). */
        uint32_t parent = atomic_load(&in->parent);
        uint32_t switched = atomic_load(&in->switched);
        /* The parent level has ended for these bytes when they are older
         * than the slot's switch point: of an earlier generation than the
         * switch (the block's own), or arriving here already known to be of
         * an ended occupant, whose generation is then below the switch point
         * (can_switch made sure of it when the slot below switched). Without
         * a switch, every generation has the link as its parent. */
        int next_ended = switched && (ended || serial_of(in, id) - switched >= (1u << 31));
        int64_t left = atomic_fetch_sub(&in->dead, size) - size;
        atomic_fetch_sub_explicit(&in->pins, 1, memory_order_release);
        if (left == 0)
            release_slot(id & AP__SLOT_MASK);
        id = parent;
        ended = next_ended;
    }
}

AP__NOINLINE void ap__credit_slow(uint32_t instance, uint64_t size, ap_domain domain) {
    ap__tls_t *t = &ap__tls;
    if (AP__UNLIKELY(ap__watching(t)) && domain != AP__UNDO)
        ap__observe_free(t, size, domain);
    if (instance == t->cur) {
        /* Own instance, but the batch of frees grew large (or the thread is
         * watched): publish it, and have the next allocation recompute
         * `allow` from the shared counters, so the room freed here is shared
         * with other threads rather than kept for this one. */
        t->allow += (int64_t)size;
        register_thread(t);
        ap__publish(t);
        ap__refill(t);
        return;
    }
    /* A block of no bytes credits nothing; its id may be long stale (an id
     * keeps its slot only through bytes), so it must not be followed. */
    if (size)
        credit_block(instance, (int64_t)size);
}

/* ---- Instances ------------------------------------------------------------------- */

static void push_free(uint32_t slot) {
    uint64_t head = atomic_load_explicit(&free_head, memory_order_relaxed);
    uint64_t next;
    do {
        atomic_store_explicit(&ap__instances[slot].next_free, (uint32_t)head,
                              memory_order_relaxed);
        next = ((head >> 32) + 1) << 32 | (uint64_t)(slot + 1);
    } while (!atomic_compare_exchange_weak_explicit(&free_head, &head, next, memory_order_release,
                                                    memory_order_relaxed));
}

static uint32_t pop_free(void) {
    uint64_t head = atomic_load_explicit(&free_head, memory_order_acquire);
    for (;;) {
        uint32_t top = (uint32_t)head;
        if (!top)
            return AP__NO_INSTANCE;
        uint32_t below = atomic_load_explicit(&ap__instances[top - 1].next_free,
                                              memory_order_relaxed);
        uint64_t next = ((head >> 32) + 1) << 32 | below;
        if (atomic_compare_exchange_weak_explicit(&free_head, &head, next, memory_order_acquire,
                                                  memory_order_acquire))
            return top - 1;
    }
}

/* A slot from the common pool (never used ones first). */
static uint32_t new_slot(void) {
    uint32_t slot = atomic_load_explicit(&fresh, memory_order_relaxed);
    while (slot < AP_MAX_INSTANCES) {
        if (atomic_compare_exchange_weak_explicit(&fresh, &slot, slot + 1, memory_order_relaxed,
                                                  memory_order_relaxed))
            return slot;
    }
    return pop_free();
}

/* ---- A scope's ended slots ----------------------------------------------------------
 *
 * Slots that ended with bytes still live (or with slots bound below them) are
 * kept on their scope's list, for the scope's next instance under the same
 * parent. The list changes on scope entry and exit and when such a slot's
 * last byte comes back, never on the allocation path. Its lock word holds
 * the pid of the holder: a child forked while another thread held it finds
 * the parent's pid there and takes the lock over (that thread does not exist
 * in the child) instead of waiting forever. */

/* This process's pid, for the lock words: read once at load and again in
 * every forked child before it runs anything, so that taking a lock writes
 * the holder's pid in its one atomic step (a word meaning "held, holder not
 * yet known" would be a window in which a fork leaves the child waiting for
 * ever). 0 until the constructor ran (an allocation made before it). */
static _Atomic int32_t lock_pid;

static void lock_pid_in_child(void) {
    atomic_store_explicit(&lock_pid, (int32_t)getpid(), memory_order_relaxed);
}

/* From a constructor, not from the bootstrap inside the first malloc:
 * pthread_atfork may allocate. */
__attribute__((constructor)) static void lock_pid_at_load(void) {
    lock_pid_in_child();
    pthread_atfork(NULL, NULL, lock_pid_in_child);
}

static void scope_lock(ap__scope *sc) {
    int32_t me = atomic_load_explicit(&lock_pid, memory_order_relaxed);
    if (!me)
        me = (int32_t)getpid();
    int32_t expect = 0;
    while (!atomic_compare_exchange_weak_explicit(&sc->ended_lock, &expect, me,
                                                  memory_order_acquire, memory_order_relaxed)) {
        if (expect != 0 && expect != me) {
            /* Held by a thread of the process we were forked from. */
            if (atomic_compare_exchange_strong(&sc->ended_lock, &expect, me))
                return;
        } else {
            sched_yield();
        }
        expect = 0;
    }
}

static void scope_unlock(ap__scope *sc) {
    atomic_store_explicit(&sc->ended_lock, 0, memory_order_release);
}

/* Under the scope's lock. Links are slot numbers + 1, 0 ends the list. */
static void list_push(ap__scope *sc, uint32_t slot) {
    ap__instance *in = &ap__instances[slot];
    in->list_prev = 0;
    in->list_next = sc->ended_head;
    if (sc->ended_head)
        ap__instances[sc->ended_head - 1].list_prev = slot + 1;
    sc->ended_head = slot + 1;
}

static void list_unlink(ap__scope *sc, uint32_t slot) {
    ap__instance *in = &ap__instances[slot];
    if (in->list_prev)
        ap__instances[in->list_prev - 1].list_next = in->list_next;
    else
        sc->ended_head = in->list_next;
    if (in->list_next)
        ap__instances[in->list_next - 1].list_prev = in->list_prev;
    in->list_prev = in->list_next = 0;
}

/*
 * Give an ended slot back to the common pool once nothing can name it any
 * more: no dead bytes and no slot bound below it. Whoever brings the last
 * condition about calls this; the scope's lock decides between it and a new
 * instance taking the slot over. The slot's parent then has one bound child
 * less, which may free it in turn.
 */
static void release_slot(uint32_t slot) {
    while (slot != AP_INSTANCE_PROCESS) {
        ap__instance *in = &ap__instances[slot];
        uint32_t scope = atomic_load(&in->scope);
        ap__scope *sc = &ap__scopes[scope];
        scope_lock(sc);
        /* Meanwhile the slot may have gone to the pool and on to another
         * scope (its scope changes only there); then that scope's lock. */
        if (atomic_load(&in->scope) != scope) {
            scope_unlock(sc);
            continue;
        }
        uint32_t state = atomic_load(&in->state);
        if ((state != AP__INST_ENDED && state != AP__INST_RETIRED) ||
            atomic_load(&in->dead) != 0 || atomic_load(&in->children) != 0) {
            scope_unlock(sc);
            return;
        }
        if (state == AP__INST_ENDED)
            list_unlink(sc, slot);
        /* Read before the slot is free: a new instance may take it at once. */
        uint32_t parent = in->parent & AP__SLOT_MASK;
        atomic_store(&in->state, AP__INST_FREE);
        scope_unlock(sc);
        push_free(slot);
        if (parent == AP_INSTANCE_PROCESS ||
            atomic_fetch_sub(&ap__instances[parent].children, 1) != 1)
            return;
        slot = parent;
    }
}

/* Wait out the credits under way against a slot (they are a few atomic
 * additions long). */
static void wait_unpinned(ap__instance *in) {
    while (atomic_load(&in->pins))
        sched_yield();
}

static void leave(uint32_t id);

/*
 * The instance's last thread left it, no bind wrapper holds it and every
 * instance nested in it has ended. What is still live escaped: it stays
 * counted in the enclosing instances and the process, moves from the
 * instance into the slot's dead ledger, and leaves the scope's total, which
 * counts live instances only. Then the slot is free for the scope's next
 * instance (or the common pool), and the parent loses this child's hold.
 */
static void end_instance(uint32_t id) {
    ap__instance *in = ap__inst(id);
    ap__scope *sc = &ap__scopes[in->scope];
    /* Credits arriving from now on see it ended and draw on `dead`; the
     * ones under way finish against the live counters first. */
    atomic_store(&in->state, AP__INST_ENDING);
    wait_unpinned(in);
    int64_t live = atomic_load(&in->c.live);
    atomic_store(&in->escaped, live);
    if (live) {
        atomic_fetch_add(&sc->escaped, live);
        if (in->counts_scope)
            atomic_fetch_sub(&sc->total.live, live);
        atomic_fetch_add(&in->dead, live);
    }
    raise_peak(&sc->max_instance_peak, atomic_load(&in->c.peak));
    atomic_fetch_sub(&sc->active, 1);
    uint32_t parent = in->parent;
    uint32_t slot = id & AP__SLOT_MASK;
    if (atomic_load(&in->dead) == 0 && atomic_load(&in->children) == 0) {
        /* Nothing left that names the slot (the usual case): straight back
         * to the common pool, without the scope's lock. Nothing can add to
         * `dead` or `children` any more: they grow only through an active
         * occupant. */
        atomic_store(&in->state, AP__INST_FREE);
        push_free(slot);
        uint32_t up = parent & AP__SLOT_MASK;
        if (up != AP_INSTANCE_PROCESS && atomic_fetch_sub(&ap__instances[up].children, 1) == 1)
            release_slot(up);
    } else {
        scope_lock(sc);
        atomic_store(&in->state, AP__INST_ENDED);
        list_push(sc, slot);
        scope_unlock(sc);
        /* Its last byte may have come back meanwhile. */
        release_slot(slot);
    }
    leave(parent);
}

/* Leaving an instance: publish the batch (it belongs to the instance being
 * left), switch, and force the next allocation through the slow path so
 * `allow` is recomputed for the new chain. */
static inline void switch_to(ap__tls_t *t, uint32_t id) {
    ap__publish(t);
    t->cur = id;
    ap__refill(t);
}

/*
 * May slot `in`, bound below an earlier occupant of `parent`'s slot, switch
 * its link to `parent`? The earlier occupant has ended (a slot has one
 * occupant at a time), so the blocks of the slot's generations so far have an
 * ended parent there: a free of one takes its bytes from that slot's ledger
 * and goes on above it, knowing only that they are older than this switch.
 * That is enough to go on exactly when the parent slot never switched itself
 * (every generation of it has the same link), or when the earlier occupant is
 * older than the parent slot's own switch point (its parent ended as well, and
 * so on up: the parent slot was allowed its switch by the same rule). The
 * parent slot's switch point only grows while slots are bound below it, so
 * what holds here holds for every later free. When it does not hold (the
 * parent slot had more than one occupant with bytes kept here under the same
 * occupant of its own parent), the new instance takes another slot: as many
 * as such occupants, never one per request, since the next occupant of the
 * grandparent's slot switches the parent slot past all of them. The process
 * root never changes, so neither slot is the root's.
 */
static int can_switch(ap__instance *in, uint32_t parent) {
    uint32_t up = parent & AP__SLOT_MASK;
    uint32_t link = atomic_load(&in->parent);
    if (up == AP_INSTANCE_PROCESS || (link & AP__SLOT_MASK) != up)
        return 0;
    /* `parent` is active (the entering thread is in it), so its slot's
     * switch point, set when it opened, stays as read. */
    ap__instance *above = &ap__instances[up];
    uint32_t since = atomic_load(&above->switched);
    return !since || serial_of(above, link) - since >= (1u << 31);
}

/*
 * An ended slot of the scope bound to `parent`, taken over for a new
 * instance; AP__NO_INSTANCE if there is none. A slot whose dead bytes may be
 * as old as AP__GEN_MASK generations is retired instead: one more generation
 * could no longer be told from theirs. It goes to the common pool when its
 * last byte comes back.
 */
static uint32_t reuse_slot(ap__scope *sc, uint32_t parent) {
    if (!atomic_load_explicit(&sc->ended_head, memory_order_relaxed)) /* nothing to look at */
        return AP__NO_INSTANCE;
    uint32_t found = AP__NO_INSTANCE;
    int switch_link = 0;
    scope_lock(sc);
    for (uint32_t link = sc->ended_head; link;) {
        uint32_t slot = link - 1;
        ap__instance *in = &ap__instances[slot];
        link = in->list_next;
        int switching = 0;
        if (atomic_load(&in->parent) != parent) {
            if (!can_switch(in, parent))
                continue;
            switching = 1;
        }
        list_unlink(sc, slot);
        if (atomic_load(&in->dead) != 0 &&
            atomic_load(&in->serial) + 1 - in->dead_since >= AP__GEN_MASK) {
            atomic_store(&in->state, AP__INST_RETIRED);
            continue;
        }
        atomic_store(&in->state, AP__INST_OPENING);
        found = slot;
        switch_link = switching;
        break;
    }
    scope_unlock(sc);
    if (found != AP__NO_INSTANCE) {
        ap__instance *in = &ap__instances[found];
        wait_unpinned(in);
        uint32_t serial = atomic_load(&in->serial) + 1;
        if (atomic_load(&in->dead) == 0)
            in->dead_since = serial;
        if (switch_link) {
            /* The switch point first, then the link (credit_block reads
             * them the other way round). */
            atomic_store(&in->switched, serial);
            atomic_store(&in->parent, parent);
        }
    }
    return found;
}

/* A new active instance of `scope_id` nested in `parent`, with one `inside`
 * reference; AP__NO_INSTANCE when no slot is left. */
static uint32_t open_instance(uint32_t scope_id, uint32_t parent) {
    ap__scope *sc = &ap__scopes[scope_id];
    uint32_t slot = reuse_slot(sc, parent);
    int reused = slot != AP__NO_INSTANCE;
    if (!reused) {
        slot = new_slot();
        if (slot == AP__NO_INSTANCE)
            return slot;
    }
    ap__instance *in = &ap__instances[slot];
    if (!reused)
        wait_unpinned(in); /* a credit that emptied it may still hold a pin */
    uint32_t serial = atomic_load(&in->serial) + 1;
    /* Zero the counters before the instance becomes visible as active. */
    memset(&in->c, 0, sizeof in->c);
    atomic_store(&in->escaped, 0);
    in->budget = atomic_load(&sc->budget);
    if (!reused) {
        in->scope = scope_id;
        in->parent = parent;
        in->dead_since = serial;
        atomic_store(&in->switched, 0);
        in->counts_scope = 1;
        for (uint32_t a = parent; a != AP_INSTANCE_PROCESS; a = ap__inst(a)->parent)
            if (ap__inst(a)->scope == scope_id)
                in->counts_scope = 0;
        atomic_store(&in->children, 0);
        /* Bound below its parent: frees of this slot's dead bytes go on
         * through the parent's slot, which must keep its links until this
         * one is back in the common pool (release_slot). */
        if (parent != AP_INSTANCE_PROCESS)
            atomic_fetch_add(&ap__inst(parent)->children, 1);
    }
    atomic_store(&in->inside, 1);
    /* An active nested instance keeps its parent from ending: so every level
     * of an active instance's chain is active too. */
    if (parent != AP_INSTANCE_PROCESS)
        atomic_fetch_add(&ap__inst(parent)->inside, 1);
    atomic_store(&in->serial, serial);
    atomic_store(&in->state, AP__INST_ACTIVE);
    atomic_fetch_add(&sc->instances, 1);
    atomic_fetch_add(&sc->active, 1);
    return slot | (serial & AP__GEN_MASK) << AP__GEN_SHIFT;
}

ap_status ap_enter(uint32_t scope_id, uint32_t *instance_id) {
    ap__tls_t *t = &ap__tls;
    if (scope_id == AP_SCOPE_PROCESS || scope_id >= atomic_load(&ap__nscopes))
        return AP_ENOENT;
    if (t->depth >= AP_MAX_DEPTH)
        return AP_EFULL;
    uint32_t parent = t->cur;
    uint32_t id = open_instance(scope_id, parent);
    if (id == AP__NO_INSTANCE)
        return AP_EFULL;
    ap__scope *sc = &ap__scopes[scope_id];
    register_thread(t);
    t->entry_seq[t->depth] = t->last.seq;
    t->marked &= ~(1u << t->depth);
    t->stack[t->depth++] = parent;
    switch_to(t, id);
    if (AP__UNLIKELY(atomic_load_explicit(&sc->forbid, memory_order_relaxed)))
        ap__regions_enter_instance(t, id);
    *instance_id = id;
    return AP_OK;
}

/* 1 if `id` names a live instance (not one that ended or a stale id). */
static int id_valid(uint32_t id) {
    return id < (1u << 31) && ap__id_current(ap__inst(id), id);
}

ap_status ap_hold(uint32_t id) {
    if (id == AP_INSTANCE_PROCESS)
        return AP_OK;
    if (id >= (1u << 31))
        return AP_ENOENT;
    ap__instance *in = ap__inst(id);
    uint32_t n = atomic_load(&in->inside);
    do {
        if (n == 0 || atomic_load(&in->state) != AP__INST_ACTIVE || !ap__id_current(in, id))
            return AP_ESTATE;
    } while (!atomic_compare_exchange_weak(&in->inside, &n, n + 1));
    return AP_OK;
}

static void leave(uint32_t id) {
    if (id == AP_INSTANCE_PROCESS)
        return;
    ap__instance *in = ap__inst(id);
    if (atomic_load(&in->state) == AP__INST_ACTIVE && atomic_fetch_sub(&in->inside, 1) == 1)
        end_instance(id);
}

/* For library scopes (libscope.c): instances no thread has on its stack. */
uint32_t ap__open_instance(uint32_t scope, uint32_t parent) {
    uint32_t id = open_instance(scope, parent);
    return id == AP__NO_INSTANCE ? AP_INSTANCE_PROCESS : id;
}

void ap__close_instance(uint32_t id) { leave(id); }

ap_status ap_release(uint32_t id) {
    if (!id_valid(id))
        return AP_ENOENT;
    leave(id);
    return AP_OK;
}

ap_status ap_attach(uint32_t id) {
    ap__tls_t *t = &ap__tls;
    if (t->depth >= AP_MAX_DEPTH)
        return AP_EFULL;
    ap_status st = ap_hold(id);
    if (st != AP_OK)
        return st;
    register_thread(t);
    t->entry_seq[t->depth] = t->last.seq;
    t->marked &= ~(1u << t->depth);
    t->stack[t->depth++] = t->cur;
    switch_to(t, id);
    if (AP__UNLIKELY(atomic_load_explicit(&ap__scopes[ap__inst(id)->scope].forbid,
                                          memory_order_relaxed)))
        ap__regions_enter_instance(t, id);
    return AP_OK;
}

/* Allocation-free: only this thread's TLS and atomics on static storage. */
ap_status ap_exit(void) {
    ap__tls_t *t = &ap__tls;
    if (t->depth == 0)
        return AP_ESTATE;
    uint32_t left = t->cur;
    /* Reservations made in the instance go back with it (ap_unreserve after
     * this finds them gone), and its forbid region ends. */
    while (t->nres && t->res[t->nres - 1].instance == left)
        release_reservation(t);
    int had_region = t->nregions && ap__regions_leave_instance(t, left);
    t->exited_seq = t->entry_seq[t->depth - 1];
    t->abandoned &= ~(1u << (t->depth - 1));
    switch_to(t, t->stack[--t->depth]);
    if (t->grace_inst == left)
        t->grace_inst = AP__NO_INSTANCE;
    /* Library instances nested in the one left end with it (they hold its
     * `inside` count, so ending them first lets it end). */
    if (AP__UNLIKELY(atomic_load_explicit(&ap__libs_on, memory_order_relaxed)))
        ap__libs_leave(left);
    leave(left);
    return had_region ? AP_EXIT_REGION : AP_OK;
}

ap_status ap_current(uint32_t *instance_id, uint32_t *depth) {
    ap__tls_t *t = &ap__tls;
    if (instance_id)
        *instance_id = t->cur;
    if (depth)
        *depth = t->depth;
    return AP_OK;
}

void ap_flush(void) {
    ap__tls_t *t = &ap__tls;
    ap__publish(t);
    ap__refill(t);
}

ap_status ap_last_violation(ap_violation *out) {
    if (!out || out->size < sizeof(uint32_t))
        return AP_EINVAL;
    size_t n = out->size < sizeof(ap_violation) ? out->size : sizeof(ap_violation);
    ap_violation v = ap__tls.last;
    v.size = (uint32_t)n;
    memcpy(out, &v, n);
    return AP_OK;
}

/* ---- Reservations (see allocpolicy.h) ----------------------------------------------- */

ap_status ap_reserve(int64_t nbytes, uint32_t overdraft, ap_violation *refusal) {
    ap__tls_t *t = &ap__tls;
    if (overdraft == AP_ACTION_FROM_SCOPE)
        overdraft = atomic_load_explicit(&ap__scopes[ap__inst(t->cur)->scope].overdraft,
                                         memory_order_relaxed);
    if (nbytes < 0 || overdraft > AP_ACTION_COUNT)
        return AP_EINVAL;
    if (t->nres >= AP_MAX_RESERVATIONS)
        return AP_EFULL;
    register_thread(t);
    ap__publish(t);
    ap__scope *sc = &ap__scopes[ap__inst(t->cur)->scope];
    ap_violation v = {.size = sizeof v};
    int refused = 0;
    uint64_t index = ap__inject_reservation(t, (uint64_t)nbytes);
    ap_reservation *outer = active_res(t);
    int64_t from_outer = outer ? (outer->left < nbytes ? outer->left : nbytes) : 0;
    /* What the outer reservation cannot cover is claimed from the chain (and
     * the machine). */
    int64_t claim = nbytes - from_outer;
    int64_t margin = atomic_load_explicit(&ap__settings.reserve_margin, memory_order_relaxed);
    int64_t room = claim ? ap__machine_room(claim) - margin : 0;
    if (index) {
        refused = 1;
        v.reason = AP_REASON_INJECTED;
        v.index = index;
        v.scope = ap__inst(t->cur)->scope;
        v.instance = t->cur;
        atomic_fetch_add_explicit(&sc->injected, 1, memory_order_relaxed);
    } else if (claim > room || (uint64_t)nbytes > AP__MAX_REQUEST) {
        /* Whatever the budgets say, the machine cannot spare it; nor can
         * any machine spare what no allocation could ask for (the header
         * keeps 48 bits of size), whatever the files say. */
        refused = 1;
        v.reason = AP_REASON_OOM;
        v.limit = AP_LIMIT_MACHINE;
        v.scope = ap__inst(t->cur)->scope;
        v.instance = t->cur;
        v.budget = room > 0 ? room : 0;
    } else if (claim) {
        /* Checked and counted like an allocation, but not numbered as one. */
        chain_result r;
        if (!chain_try_charge(t->cur, claim, 0, &r)) {
            refused = 1;
            v.reason = AP_REASON_BUDGET;
            v.limit = r.limit;
            v.instance = r.instance;
            v.scope = ap__inst(r.instance)->scope;
            v.budget = r.budget;
            v.live = r.live;
        }
    }
    if (refused) {
        v.requested = (uint64_t)nbytes;
        v.domain = AP_DOMAIN_LIBC;
        atomic_fetch_add_explicit(&sc->refused_reservations, 1, memory_order_relaxed);
        if (refusal && refusal->size >= sizeof(uint32_t)) {
            uint32_t size = refusal->size;
            memcpy(refusal, &v, size < sizeof v ? size : sizeof v);
            refusal->size = size;
        }
        ap__refill(t);
        return AP_EREFUSED;
    }
    if (outer)
        outer->left -= from_outer;
    ap_reservation *res = &t->res[t->nres++];
    memset(res, 0, sizeof *res);
    res->size = sizeof *res;
    res->instance = t->cur;
    res->reserved = nbytes;
    res->left = nbytes;
    res->action = overdraft;
    res->serial = ++t->res_serial;
    atomic_fetch_add_explicit(&sc->reservations, 1, memory_order_relaxed);
    ap__refill(t);
    return AP_OK;
}

/* Pop the innermost reservation: its unused bytes go back into the outer
 * reservation of the same instance (up to that one's size), the rest off the
 * chain. The record stays readable in the popped slot. */
static void release_reservation(ap__tls_t *t) {
    ap__publish(t);
    ap_reservation *res = &t->res[--t->nres];
    int64_t give = res->left;
    ap_reservation *outer = t->nres ? &t->res[t->nres - 1] : NULL;
    if (outer && outer->instance == res->instance) {
        int64_t back = outer->reserved - outer->left;
        if (back > give)
            back = give;
        outer->left += back;
        give -= back;
    }
    if (give)
        chain_apply(res->instance, -give, 0);
    ap__refill(t);
}

static ap_status copy_reservation(const ap_reservation *res, ap_reservation *out) {
    if (!out)
        return AP_OK;
    if (out->size < sizeof(uint32_t))
        return AP_EINVAL;
    uint32_t size = out->size;
    memcpy(out, res, size < sizeof *res ? size : sizeof *res);
    out->size = size;
    return AP_OK;
}

ap_status ap_unreserve(ap_reservation *out) {
    ap__tls_t *t = &ap__tls;
    if (!t->nres)
        return AP_ESTATE;
    release_reservation(t);
    return copy_reservation(&t->res[t->nres], out);
}

ap_status ap_reservation_get(ap_reservation *out) {
    ap__tls_t *t = &ap__tls;
    if (!t->nres)
        return AP_ESTATE;
    /* Settle the batch so `left` is exact. */
    ap__publish(t);
    return copy_reservation(&t->res[t->nres - 1], out);
}
