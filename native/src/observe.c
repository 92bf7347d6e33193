/*
 * observe.c - watching allocations: regions (forbid and count), the
 * process-wide census, and deterministic fault injection.
 *
 * None of this is on the ordinary fast path. A thread with a region sets its
 * own `watch`, which keeps its `allow` and `limit` at 0 (scope.c), so every
 * allocation and free of that thread reaches the slow path and this file. A
 * census or active injection raises the process-wide `ap__watch`, which the
 * inline fast paths read (a line written only when those start and stop).
 *
 * Everything here runs inside malloc: no heap, no locks, no Python; regions
 * live in the thread's TLS, the census and injection counters are atomics on
 * static storage.
 */
#define _GNU_SOURCE
#include <string.h>

#include "internal.h"

_Atomic uint32_t ap__watch;

/* ---- Regions ------------------------------------------------------------------ */

/* Domains an empty mask stands for: every domain but pymalloc's arenas, whose
 * refusals nobody sees (pymalloc falls back to malloc) and whose events
 * would double count the objects they hold. */
#define DEFAULT_DOMAINS (AP_DOMAINS_ALL & ~AP_DOMAIN_BIT(AP_DOMAIN_PY_ARENA))

static inline uint32_t domains_or_default(uint32_t domains) {
    return domains ? domains & AP_DOMAINS_ALL : DEFAULT_DOMAINS;
}

/* Strictness order of actions: ABORT > RAISE > WARN > COUNT. */
static inline int stricter(uint32_t a, uint32_t b) {
    static const int rank[] = {[AP_ACTION_RAISE] = 2, [AP_ACTION_ABORT] = 3,
                               [AP_ACTION_WARN] = 1, [AP_ACTION_COUNT] = 0};
    return rank[a] > rank[b];
}

/*
 * Whether region `r` sees an event of `domain`. Events of the observing
 * layers over Python's MEM and OBJ domains (hooks_pymem.c, `layered`) are
 * seen by the regions the API opened only: those layers exist once something
 * asked to watch Python's allocations by name, and a forbid scope must behave
 * the same whether or not some earlier region installed them (it watches what
 * reaches an allocator the runtime always sees).
 */
static inline int region_sees(const ap_region *r, ap_domain domain, int layered) {
    return (r->domains & AP_DOMAIN_BIT(domain)) && !(layered && r->instance);
}

/*
 * Let every region of the thread see one event. Returns the action that
 * applies to it (the strictest among the regions that count it as an
 * offence), or AP_ACTION_COUNT when nothing objects.
 */
static uint32_t regions_see(ap__tls_t *t, uint64_t size, ap_domain domain, int layered,
                            int is_free, int *first_offence) {
    uint32_t action = AP_ACTION_COUNT;
    *first_offence = 0;
    for (uint32_t i = 0; i < t->nregions; i++) {
        ap_region *r = &t->regions[i];
        if (!region_sees(r, domain, layered))
            continue;
        if (is_free) {
            r->frees_seen++;
            r->bytes_freed += size;
            if (!r->frees)
                continue;
        } else {
            r->allocations++;
            r->bytes += size;
        }
        if (!is_free && !r->first_size) {
            r->first_size = size ? size : 1;
            r->first_domain = domain;
        }
        /* RAISE refuses the region's first offending *allocation*, even when
         * a free offended before it (a free cannot be refused). */
        if (!is_free && r->action == AP_ACTION_RAISE && r->refused == 0)
            *first_offence = 1;
        if (r->instance) /* a forbid scope's region: its stats count every offence */
            atomic_fetch_add_explicit(&ap__scopes[ap__inst(r->instance)->scope].forbidden, 1,
                                      memory_order_relaxed);
        if (stricter(r->action, action))
            action = r->action;
    }
    return action;
}

/* Refuse only the first offence of a RAISE region: the code is then on its
 * way out (a MemoryError unwinding), and refusing every allocation of the
 * unwind would only turn one clear error into a cascade. */
static int regions_alloc(ap__tls_t *t, uint64_t size, ap_domain domain, int layered) {
    int first;
    uint32_t action = regions_see(t, size, domain, layered, 0, &first);
    if (action == AP_ACTION_ABORT) {
        ap__record_forbidden(t, size, domain);
        ap__abort_noted(&t->last, "an allocation in a no-allocation region (action=abort), aborting");
    }
    if (action == AP_ACTION_RAISE && first) {
        ap__record_forbidden(t, size, domain);
        for (uint32_t i = 0; i < t->nregions; i++)
            if (t->regions[i].action == AP_ACTION_RAISE && region_sees(&t->regions[i], domain, layered))
                t->regions[i].refused++;
        return 0;
    }
    return 1;
}

static void regions_free(ap__tls_t *t, uint64_t size, ap_domain domain, int layered) {
    int first;
    uint32_t action = regions_see(t, size, domain, layered, 1, &first);
    if (action == AP_ACTION_ABORT) {
        ap__record_forbidden(t, size, domain);
        ap__abort_noted(&t->last, "a free in a no-allocation region (action=abort), aborting");
    }
}

static ap_status push_region(ap__tls_t *t, uint32_t action, uint32_t frees, uint32_t domains,
                             uint32_t instance) {
    if (action > AP_ACTION_COUNT || frees > 1 || (domains & ~AP_DOMAINS_ALL))
        return AP_EINVAL;
    if (t->nregions >= AP_MAX_REGIONS)
        return AP_EFULL;
    /* Publish the batch first: from now on every event must be seen. */
    ap__publish(t);
    ap_region *r = &t->regions[t->nregions++];
    memset(r, 0, sizeof *r);
    r->size = sizeof *r;
    r->action = action;
    r->frees = frees;
    r->domains = domains_or_default(domains);
    r->instance = instance;
    t->watch = 1;
    ap__refill(t);
    return AP_OK;
}

static void remove_region(ap__tls_t *t, uint32_t i) {
    t->last_region = t->regions[i];
    memmove(&t->regions[i], &t->regions[i + 1], (t->nregions - i - 1) * sizeof t->regions[0]);
    t->nregions--;
    if (!t->nregions) {
        t->watch = 0;
        ap__refill(t);
    }
}

ap_status ap_region_enter(uint32_t action, uint32_t frees, uint32_t domains) {
    return push_region(&ap__tls, action, frees, domains, 0);
}

ap_status ap_region_exit(ap_region *out) {
    ap__tls_t *t = &ap__tls;
    if (!t->nregions || t->regions[t->nregions - 1].instance != 0)
        return AP_ESTATE;
    remove_region(t, t->nregions - 1);
    if (out)
        memcpy(out, &t->last_region, out->size < sizeof *out ? out->size : sizeof *out);
    return AP_OK;
}

ap_status ap_region_last(ap_region *out) {
    if (!out || out->size < sizeof(uint32_t))
        return AP_EINVAL;
    uint32_t size = out->size;
    memcpy(out, &ap__tls.last_region, size < sizeof *out ? size : sizeof *out);
    out->size = size;
    return AP_OK;
}

/* Entering an instance of a forbid scope opens its region (scope.c). */
void ap__regions_enter_instance(ap__tls_t *t, uint32_t instance) {
    const ap__scope *sc = &ap__scopes[ap__inst(instance)->scope];
    uint32_t forbid = atomic_load_explicit(&sc->forbid, memory_order_relaxed);
    if (forbid)
        push_region(t, forbid - 1, atomic_load_explicit(&sc->forbid_frees, memory_order_relaxed),
                    0, instance);
}

/* ... and leaving it closes the region, wherever it sits in the stack (API
 * regions opened inside the scope and not closed stay open). */
int ap__regions_leave_instance(ap__tls_t *t, uint32_t instance) {
    for (uint32_t i = t->nregions; i-- > 0;)
        if (t->regions[i].instance == instance) {
            remove_region(t, i);
            return 1;
        }
    return 0;
}

/* ---- Census ---------------------------------------------------------------------- */

static struct {
    _Atomic uint32_t open;
    _Atomic uint64_t allocations, frees, bytes, bytes_freed;
} census;

ap_status ap_census_open(void) {
    atomic_fetch_add(&census.open, 1);
    atomic_fetch_add(&ap__watch, 1);
    return AP_OK;
}

ap_status ap_census_close(void) {
    uint32_t n = atomic_load(&census.open);
    do {
        if (!n)
            return AP_ESTATE;
    } while (!atomic_compare_exchange_weak(&census.open, &n, n - 1));
    atomic_fetch_sub(&ap__watch, 1);
    return AP_OK;
}

ap_status ap_census_read(ap_census *out) {
    if (!out || out->size < sizeof(uint32_t))
        return AP_EINVAL;
    ap_census c = {
        .size = out->size,
        .open = atomic_load(&census.open),
        .allocations = atomic_load(&census.allocations),
        .frees = atomic_load(&census.frees),
        .bytes = atomic_load(&census.bytes),
        .bytes_freed = atomic_load(&census.bytes_freed),
    };
    memcpy(out, &c, out->size < sizeof c ? out->size : sizeof c);
    return AP_OK;
}

/* ---- Fault injection ----------------------------------------------------------------
 *
 * The settings are read on every watched allocation while other threads may
 * replace them, so they live in two slots and a pointer flips between them:
 * a reader sees one whole setting or the other. ap_inject_set is serialised
 * by the caller (the Python side holds a lock; the policy applies it once).
 */
static ap_inject_config slots[2];
static _Atomic(ap_inject_config *) active_cfg;
static _Atomic uint32_t slot_next;
static _Atomic int inject_on;
static struct {
    _Atomic uint64_t seen, injected, first, last;
} inj;

/* splitmix64: a fixed, well-mixed function of (seed, index), so a
 * probability run fails the same indices wherever it runs. */
static inline uint64_t mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static int on_chain(uint32_t instance, uint32_t scope) {
    for (uint32_t id = instance, n = 0; n <= AP_MAX_DEPTH + 1; n++) {
        if (ap__inst(id)->scope == scope && (id != AP_INSTANCE_PROCESS || scope == 0))
            return 1;
        if (id == AP_INSTANCE_PROCESS)
            return 0;
        id = ap__inst(id)->parent;
    }
    return 0;
}

/* 0 if not injected, else the index of the injected failure. */
static uint64_t inject_pick(const ap__tls_t *t, uint64_t size, ap_domain domain) {
    const ap_inject_config *c = atomic_load_explicit(&active_cfg, memory_order_acquire);
    if (!c || !atomic_load_explicit(&inject_on, memory_order_relaxed))
        return 0;
    if (!(domains_or_default(c->domains) & AP_DOMAIN_BIT(domain)))
        return 0;
    if (size < c->min_size || (c->max_size && size > c->max_size))
        return 0;
    if (c->scope != AP_INJECT_ANY_SCOPE && !on_chain(t->cur, c->scope))
        return 0;
    uint64_t i = atomic_fetch_add_explicit(&inj.seen, 1, memory_order_relaxed) + 1;
    int fail = (c->nth && i == c->nth) || (c->stop && i >= c->start && i < c->stop) ||
               (c->every && i % c->every == 0) ||
               (c->probability && (mix(c->seed ^ mix(i)) >> 32) < c->probability) ||
               ((c->flags & AP_INJECT_PERSISTENT) &&
                atomic_load_explicit(&inj.first, memory_order_relaxed) != 0);
    if (!fail)
        return 0;
    uint64_t zero = 0;
    atomic_compare_exchange_strong(&inj.first, &zero, i);
    atomic_fetch_add_explicit(&inj.injected, 1, memory_order_relaxed);
    atomic_store_explicit(&inj.last, i, memory_order_relaxed);
    return i;
}

ap_status ap_inject_set(const ap_inject_config *cfg) {
    int was_on = atomic_load(&inject_on);
    if (cfg) {
        if (cfg->size < sizeof(uint32_t) * 2 || (cfg->flags & ~AP_INJECT_PERSISTENT) ||
            (cfg->stop && cfg->stop < cfg->start) ||
            (cfg->max_size && cfg->max_size < cfg->min_size) ||
            (cfg->domains & ~AP_DOMAINS_ALL) || cfg->probability > (UINT64_C(1) << 32) ||
            (cfg->scope != AP_INJECT_ANY_SCOPE && cfg->scope >= atomic_load(&ap__nscopes)))
            return AP_EINVAL;
        uint32_t k = atomic_fetch_add(&slot_next, 1) & 1;
        ap_inject_config *slot = &slots[k];
        memset(slot, 0, sizeof *slot);
        memcpy(slot, cfg, cfg->size < sizeof *slot ? cfg->size : sizeof *slot);
        slot->size = sizeof *slot;
        atomic_store(&inj.seen, 0);
        atomic_store(&inj.injected, 0);
        atomic_store(&inj.first, 0);
        atomic_store(&inj.last, 0);
        atomic_store_explicit(&active_cfg, slot, memory_order_release);
        atomic_store(&inject_on, 1);
        if (!was_on)
            atomic_fetch_add(&ap__watch, 1);
    } else {
        atomic_store(&inject_on, 0);
        if (was_on)
            atomic_fetch_sub(&ap__watch, 1);
    }
    return AP_OK;
}

ap_status ap_inject_get(ap_inject_stats *out) {
    if (!out || out->size < sizeof(uint32_t))
        return AP_EINVAL;
    ap_inject_stats s = {
        .size = out->size,
        .active = (uint32_t)atomic_load(&inject_on),
        .seen = atomic_load(&inj.seen),
        .injected = atomic_load(&inj.injected),
        .first_index = atomic_load(&inj.first),
        .last_index = atomic_load(&inj.last),
    };
    memcpy(out, &s, out->size < sizeof s ? out->size : sizeof s);
    return AP_OK;
}

/* ---- The observers ------------------------------------------------------------------ */

static int observe_alloc(ap__tls_t *t, uint64_t size, ap_domain domain, int layered) {
    if (atomic_load_explicit(&census.open, memory_order_relaxed)) {
        atomic_fetch_add_explicit(&census.allocations, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&census.bytes, size, memory_order_relaxed);
    }
    if (t->nregions && !regions_alloc(t, size, domain, layered))
        return 0;
    if (atomic_load_explicit(&inject_on, memory_order_relaxed)) {
        /* Fallible scopes fail only where code asked for it (reservations),
         * so ordinary allocations there are not numbered. */
        uint32_t mode = atomic_load_explicit(
            &ap__scopes[ap__inst(t->cur)->scope].mode, memory_order_relaxed);
        if (mode != AP_MODE_FALLIBLE) {
            uint64_t index = inject_pick(t, size, domain);
            if (index)
                return ap__inject_refuse(t, size, domain, index);
        }
    }
    return 1;
}

/* A reservation is a fallible call site: numbered like an allocation. */
uint64_t ap__inject_reservation(ap__tls_t *t, uint64_t size) {
    if (!atomic_load_explicit(&inject_on, memory_order_relaxed))
        return 0;
    return inject_pick(t, size, AP_DOMAIN_LIBC);
}

static void observe_free(ap__tls_t *t, uint64_t size, ap_domain domain, int layered) {
    if (atomic_load_explicit(&census.open, memory_order_relaxed)) {
        atomic_fetch_add_explicit(&census.frees, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&census.bytes_freed, size, memory_order_relaxed);
    }
    if (t->nregions)
        regions_free(t, size, domain, layered);
}

int ap__observe_alloc(ap__tls_t *t, uint64_t size, ap_domain domain) {
    return observe_alloc(t, size, domain, 0);
}

void ap__observe_free(ap__tls_t *t, uint64_t size, ap_domain domain) {
    observe_free(t, size, domain, 0);
}

int ap__observe_layered_alloc(ap__tls_t *t, uint64_t size, ap_domain domain) {
    return observe_alloc(t, size, domain, 1);
}

void ap__observe_layered_free(ap__tls_t *t, uint64_t size, ap_domain domain) {
    observe_free(t, size, domain, 1);
}
