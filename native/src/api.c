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

/* The same, in the shape that is cheapest to call from ctypes: no
 * out-parameters (each costs the caller an object and a conversion), the
 * violation number or the status in the return value. */
int64_t ap_enter_seq(uint32_t scope_id) {
    uint64_t seq = ap__tls.last.seq;
    uint32_t instance;
    ap_status st = ap_enter(scope_id, &instance);
    return st == AP_OK ? (int64_t)(seq & INT64_MAX) : (int64_t)st;
}

/* ap_enter() whose result a caller can take without making anything: a
 * status in the small range every Python build keeps ready-made ints for
 * (-6..0), so ctypes converts it without allocating. A caller that
 * allocates after a successful entry (an out-parameter's value, a large
 * violation number) is inside the new instance then, and a refusal there
 * would leave it entered with nobody to exit it; the violation number is
 * read afterwards instead, with ap_entry_seq() or, after the exit,
 * ap_exited_seq(). */
ap_status ap_enter_marked(uint32_t scope_id) {
    uint32_t instance;
    return ap_enter(scope_id, &instance);
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
