/*
 * api.c - version and statistics entry points of the C ABI.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>

#include "internal.h"

uint64_t ap__foreign_frees(void);
uint64_t ap__arenas_live(void);
int ap__arena_hook_installed(void);
void *ap__malloc_here(size_t);

int ap_abi_version(void) { return AP_ABI_VERSION; }

/* Our own malloc is the process's malloc exactly when we were preloaded (or
 * linked first); dlopen()ed copies never win the lookup. */
int ap_is_preloaded(void) {
    return dlsym(RTLD_DEFAULT, "malloc") == (void *)&ap__malloc_here;
}

/*
 * The instance's budget is a plain field, read without atomics by the threads
 * inside it: only the thread that just entered it may change it, before
 * anything could hand the instance to another thread (ap_hold). Its batch is
 * published first, so that what it allocated so far counts against the new
 * budget, and the fast path's allowance is recomputed for it.
 */
ap_status ap_set_budget(uint32_t instance_id, int64_t budget) {
    ap__tls_t *t = &ap__tls;
    if (budget < 0)
        return AP_EINVAL;
    if (instance_id == AP_INSTANCE_PROCESS || instance_id != t->cur)
        return AP_ESTATE;
    ap__publish(t);
    ap__inst(instance_id)->budget = budget;
    ap__refill(t);
    return AP_OK;
}

/* ap_enter() that also gives the thread's violation number from before the
 * entry: a task boundary needs both, and from Python one call costs about
 * half of two. */
ap_status ap_enter_noting(uint32_t scope_id, uint32_t *instance_id, uint64_t *violation_seq) {
    *violation_seq = ap__tls.last.seq;
    return ap_enter(scope_id, instance_id);
}

/* ap_enter() whose result a caller can take without making anything: a
 * status in the small range every Python build keeps ready-made ints for
 * (-6..0), so ctypes converts it without allocating. A caller that
 * allocates after a successful entry (an out-parameter's value, a large
 * violation number) is inside the new instance then, and a refusal there
 * would leave it entered with nobody to exit it; the violation number is
 * read afterwards instead, with ap_entry_seq() or, after the exit,
 * ap_exited_seq(). */
ap_status ap_enter_plain(uint32_t scope_id) {
    uint32_t instance;
    return ap_enter(scope_id, &instance);
}

ap_status ap_enter_marked(uint32_t scope_id, uint32_t tag) {
    ap_status st = ap_enter_plain(scope_id);
    return st == AP_OK ? ap_mark_innermost(tag) : st;
}

/* 1 if level `d` (0-based) of the thread's stack is the marked entry `tag`. */
static inline int marked_as(const ap__tls_t *t, uint32_t d, uint32_t tag) {
    return (t->marked >> d & 1) && t->tags[d] == tag;
}

/* ap_exit(), then the levels whose exits came early, now that none is above
 * them; the violation number of the level asked for stays ap_exited_seq(). */
static ap_status exit_and_abandoned(ap__tls_t *t) {
    ap_status st = ap_exit();
    if (AP__UNLIKELY(t->abandoned)) {
        uint64_t seq = t->exited_seq;
        while (t->depth && (t->abandoned >> (t->depth - 1) & 1))
            ap_exit();
        t->exited_seq = seq;
    }
    return st;
}

ap_status ap_exit_tagged(uint32_t tag) {
    ap__tls_t *t = &ap__tls;
    if (t->depth == 0 || !marked_as(t, t->depth - 1, tag))
        return AP_EXIT_NOT_INNERMOST;
    return exit_and_abandoned(t);
}

ap_status ap_exit_marked(void) {
    ap__tls_t *t = &ap__tls;
    if (t->depth == 0 || !(t->marked >> (t->depth - 1) & 1))
        return AP_EXIT_NOT_INNERMOST;
    return exit_and_abandoned(t);
}

ap_status ap_mark_innermost(uint32_t tag) {
    ap__tls_t *t = &ap__tls;
    if (t->depth == 0)
        return AP_ESTATE;
    t->marked |= 1u << (t->depth - 1);
    t->tags[t->depth - 1] = tag;
    return AP_OK;
}

ap_status ap_exit_unmarked(void) {
    ap__tls_t *t = &ap__tls;
    if (t->depth && (t->marked >> (t->depth - 1) & 1))
        return AP_EXIT_NOT_INNERMOST;
    return exit_and_abandoned(t);
}

ap_status ap_abandon(uint32_t tag, uint32_t marked) {
    ap__tls_t *t = &ap__tls;
    for (uint32_t d = t->depth; d-- > 0;) {
        if (t->abandoned >> d & 1)
            continue;
        if (marked ? marked_as(t, d, tag) : !(t->marked >> d & 1)) {
            if (d + 1 == t->depth)
                return AP_ESTATE; /* innermost: to be left, not abandoned */
            t->abandoned |= 1u << d;
            return AP_OK;
        }
    }
    return AP_ENOENT;
}

int64_t ap_entry_seq(void) {
    ap__tls_t *t = &ap__tls;
    if (t->depth == 0)
        return AP_ESTATE;
    return (int64_t)(t->entry_seq[t->depth - 1] & INT64_MAX);
}

int64_t ap_exited_seq(void) {
    return (int64_t)(ap__tls.exited_seq & INT64_MAX);
}

/* Copy `full` into the caller's struct, no further than the size it knows. */
static ap_status copy_out(void *out, const void *full, size_t full_size) {
    uint32_t size;
    memcpy(&size, out, sizeof size);
    if (size < sizeof(uint32_t))
        return AP_EINVAL;
    size_t n = size < full_size ? size : full_size;
    memcpy(out, full, n);
    memcpy(out, &size, sizeof size);
    return AP_OK;
}

ap_status ap_get_scope_stats(uint32_t id, ap_scope_stats *out) {
    if (!out)
        return AP_EINVAL;
    if (id >= atomic_load(&ap__nscopes))
        return AP_ENOENT;
    const ap__scope *sc = &ap__scopes[id];
    /* The process scope's counters are those of the root instance. */
    const ap__counters *c = id == AP_SCOPE_PROCESS ? &ap__inst(0)->c : &sc->total;
    ap_scope_stats s = {
        .size = sizeof s,
        .mode = atomic_load(&sc->mode),
        .budget = atomic_load(&sc->budget),
        .total_budget = atomic_load(&sc->total_budget),
        .live = atomic_load(&c->live),
        .peak = atomic_load(&c->peak),
        .allocations = atomic_load(&c->allocations),
        .violations = atomic_load(&c->violations),
        .instances = id == AP_SCOPE_PROCESS ? 1 : atomic_load(&sc->instances),
        .active = id == AP_SCOPE_PROCESS ? 1 : atomic_load(&sc->active),
        .escaped = atomic_load(&sc->escaped),
        .grace_bytes = atomic_load(&sc->grace_bytes),
        .max_instance_peak = id == AP_SCOPE_PROCESS ? atomic_load(&c->peak)
                                                    : atomic_load(&sc->max_instance_peak),
        .reservations = atomic_load(&sc->reservations),
        .refused_reservations = atomic_load(&sc->refused_reservations),
        .overdrafts = atomic_load(&sc->overdrafts),
        .overdraft_bytes = atomic_load(&sc->overdraft_bytes),
        .forbidden = atomic_load(&sc->forbidden),
        .injected = atomic_load(&sc->injected),
    };
    for (int reason = 0; reason < AP_REASON_COUNT_; reason++)
        s.refused[reason] = atomic_load(&sc->refused[reason]);
    memcpy(s.name, sc->name, sizeof s.name);
    return copy_out(out, &s, sizeof s);
}

ap_status ap_get_instance_stats(uint32_t id, ap_instance_stats *out) {
    if (!out)
        return AP_EINVAL;
    if (id >= AP__POOL_OWNER)
        return AP_ENOENT;
    const ap__instance *in = ap__inst(id);
    uint32_t state = atomic_load(&in->state);
    /* A stale id (its slot now serves a later instance) is not found. */
    if (id != AP_INSTANCE_PROCESS &&
        (state == AP__INST_FREE || state == AP__INST_OPENING || !ap__id_current(in, id)))
        return AP_ENOENT;
    ap_instance_stats s = {
        .size = sizeof s,
        .scope = in->scope,
        .parent = in->parent,
        .ended = id != AP_INSTANCE_PROCESS && state != AP__INST_ACTIVE,
        .budget = id == AP_INSTANCE_PROCESS ? atomic_load(&ap__scopes[0].budget) : in->budget,
        .live = atomic_load(&in->c.live),
        .peak = atomic_load(&in->c.peak),
        .allocations = atomic_load(&in->c.allocations),
        .violations = atomic_load(&in->c.violations),
        .escaped = atomic_load(&in->escaped),
    };
    return copy_out(out, &s, sizeof s);
}

ap_status ap_get_process_stats(ap_process_stats *out) {
    if (!out)
        return AP_EINVAL;
    const ap__counters *c = &ap__inst(0)->c;
    ap_process_stats s = {
        .size = sizeof s,
        .preloaded = (uint32_t)ap_is_preloaded(),
        .budget = atomic_load(&ap__scopes[0].budget),
        .live = atomic_load(&c->live),
        .peak = atomic_load(&c->peak),
        .allocations = atomic_load(&c->allocations),
        .violations = atomic_load(&c->violations),
        .arenas_live = ap__arenas_live(),
        .foreign_frees = ap__foreign_frees(),
        .scopes = atomic_load(&ap__nscopes),
        .arena_hook = (uint32_t)ap__arena_hook_installed(),
        .grace = atomic_load(&ap__settings.grace),
        .report_fd = atomic_load(&ap__settings.report_fd),
        .reserve_margin = atomic_load(&ap__settings.reserve_margin),
    };
    return copy_out(out, &s, sizeof s);
}
