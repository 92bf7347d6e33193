/*
 * hooks_pymem.c - Python's allocator domains and NumPy's data handler,
 * wrapped from inside a running interpreter.
 *
 * Two uses:
 *   - In-process mode (allocpolicy.install() in a plain `python`, nothing
 *     preloaded): the malloc family is not interposed, so the wrappers of the
 *     PyMem domains and of NumPy's handler are where blocks get charged.
 *   - Observation (both modes): wrappers of the MEM and OBJ domains that only
 *     show pymalloc's allocations to regions, the census and fault injection.
 *
 * Wrappers are "layers": a static struct holding the allocator found below
 * (with its ctx) is passed to CPython as our ctx, so each installation has its
 * own `prev` and a layer that another tool still holds a copy of always calls
 * the allocator it was installed over. Layers are never freed; one is reused
 * only for the same allocator below and the same kind, where reusing it
 * cannot change what a stale copy does.
 *
 * Accounted blocks: a trailer, not a header
 *   uninstall() must give back the exact previous allocators, and blocks
 *   charged while installed are freed after that by those allocators. A
 *   header in front would hand them a pointer they never returned. So an
 *   accounted block is a plain block of the allocator below, asked for 16
 *   bytes larger, and its accounting record sits in the last 16 bytes of the
 *   block's usable size: malloc_usable_size() for plain malloc; under
 *   CPython's debug hooks, the requested size they record in front of the
 *   block (documented layout, see debug_size()). Any allocator can free it.
 *
 *   Blocks allocated before install() reach our free too, and their last
 *   bytes are user data. A constant tag would be misread 2^-16 of the time,
 *   too often over the millions of blocks of a long-running interpreter. The
 *   record is therefore 48 bits of a keyed hash of (block address, size,
 *   instance) under a secret drawn once per process (getrandom): random data
 *   passes with probability 2^-48, and no fixed byte pattern passes for two
 *   blocks at different addresses. Size and instance are range-checked too.
 *   A record is wiped before its block goes back to the allocator below, so
 *   a freed chunk never carries a valid one into its next life.
 *
 * What CPython requires of these wrappers (C API docs, "Customize Memory
 * Allocators"): RAW may be called without the GIL, from any thread; a request
 * of 0 bytes returns a distinct non-NULL pointer (we always ask for 16 more);
 * after initialisation a new allocator must wrap the existing one, never
 * replace it. Everything here is thread-safe without locks: layer fields are
 * written before the layer is published with PyMem_SetAllocator, and only
 * `active` and `probed` change afterwards (atomics).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* ---- The minimal Python ABI ------------------------------------------------
 *
 * From the CPython C API documentation, "Memory Management" > "Customize
 * Memory Allocators" (https://docs.python.org/3/c-api/memory.html), stable
 * since Python 3.5:
 *     typedef struct { void *ctx; void* (*malloc)(void *ctx, size_t size);
 *         void* (*calloc)(void *ctx, size_t nelem, size_t elsize);
 *         void* (*realloc)(void *ctx, void *ptr, size_t new_size);
 *         void (*free)(void *ctx, void *ptr); } PyMemAllocatorEx;
 *     enum PyMemAllocatorDomain { PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM,
 *         PYMEM_DOMAIN_OBJ };
 *     void PyMem_GetAllocator(PyMemAllocatorDomain, PyMemAllocatorEx *);
 *     void PyMem_SetAllocator(PyMemAllocatorDomain, PyMemAllocatorEx *);
 * The library must not include Python.h, so it declares them here; the
 * Python side passes the addresses of the two functions.
 */
typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr);
} py_allocator;

typedef void (*py_get_allocator)(int domain, py_allocator *out);
typedef void (*py_set_allocator)(int domain, py_allocator *in);

#define PY_DOMAINS 3

/* Same page, "Debug hooks on the Python memory allocators": with S =
 * sizeof(size_t), p[-2S:-S] holds the number of bytes asked for (big-endian),
 * p[-S] the API identifier ('r', 'm', 'o' for RAW, MEM, OBJ) and p[-S+1:0]
 * the byte 0xFD; new memory is filled with 0xCD. */
#define DEBUG_CLEANBYTE 0xCD
#define DEBUG_FORBIDDENBYTE 0xFD
static const char debug_api_id[PY_DOMAINS] = {'r', 'm', 'o'};

/* ---- Layers ------------------------------------------------------------------ */

#define LAYERS_PER_DOMAIN 16
#define TRAILER_SIZE 16u

typedef struct {
    py_allocator prev;        /* the allocator below, called with its own ctx */
    uint32_t pydomain;        /* PYMEM_DOMAIN_* */
    uint32_t how;             /* ap_pyhook */
    ap_domain domain;         /* what the runtime calls these allocations */
    uint32_t used;
    _Atomic uint32_t active;  /* 0: pass through (frees still credit) */
    _Atomic uint32_t probed;  /* set when a probe request came through */
} layer;

static layer layers[PY_DOMAINS][LAYERS_PER_DOMAIN];
static const ap_domain domain_of[PY_DOMAINS] = {AP_DOMAIN_PY_RAW, AP_DOMAIN_PY_MEM,
                                                AP_DOMAIN_PY_OBJ};

/* The last top of each domain that a probe showed leads to an active layer of
 * ours (another tool hooked above it): not lost, no need to probe again. */
static py_allocator known_top[PY_DOMAINS];
static py_get_allocator saved_get;

/* A request no caller makes (8 EiB), below what CPython's debug hooks reject
 * (PY_SSIZE_T_MAX minus their overhead) so that it travels down through them
 * and through tracemalloc's hooks to ours, which answer NULL and note it. */
#define PROBE_SIZE ((size_t)PTRDIFF_MAX - 4095u)

static size_t (*usable_size)(void *);
static uint64_t secret;

static inline int is_active(const layer *l) {
    return (int)atomic_load_explicit(&l->active, memory_order_relaxed);
}

static AP__NOINLINE void *probe_seen(layer *l) {
    atomic_store_explicit(&l->probed, 1, memory_order_relaxed);
    return NULL;
}

/* ---- The record at the end of an accounted block ------------------------------ */

static inline uint64_t mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* size < 2^48, so (size, instance) enter the hash without collisions. */
static inline uint64_t keyed(const void *block, uint64_t size, uint32_t instance) {
    return mix(mix(secret ^ (uintptr_t)block) ^ size ^ ((uint64_t)instance << 48));
}

static inline size_t debug_size(const void *p) {
    const unsigned char *q = (const unsigned char *)p - 2 * sizeof(size_t);
    size_t n = 0;
    for (size_t i = 0; i < sizeof(size_t); i++)
        n = (n << 8) | q[i];
    return n;
}

/* Bytes of `p` the allocator below lets us use (where the record goes). */
static inline size_t room_of(const layer *l, void *p) {
    return l->how == AP_PYHOOK_ACCOUNT_DEBUG ? debug_size(p) : usable_size(p);
}

static inline void stamp(void *p, size_t room, uint64_t size, uint32_t instance) {
    uint64_t h = keyed(p, size, instance);
    uint64_t w[2] = {size | (h >> 48) << 48, (uint64_t)instance | (h & 0xFFFFFFFF0000ull) << 16};
    memcpy((char *)p + room - TRAILER_SIZE, w, sizeof w);
}

/* 1 if `p` carries a valid record; its size and instance then go out. */
static inline int record_of(const layer *l, void *p, size_t room, uint64_t *size,
                            uint32_t *instance) {
    if (room < TRAILER_SIZE)
        return 0;
    uint64_t w[2];
    memcpy(w, (char *)p + room - TRAILER_SIZE, sizeof w);
    uint64_t n = w[0] & AP__SIZE_MASK;
    uint32_t inst = (uint32_t)w[1];
    if (n > room - TRAILER_SIZE || inst >= AP__POOL_OWNER)
        return 0;
    uint64_t h = keyed(p, n, inst);
    if ((w[0] >> 48) != (h >> 48) || (w[1] >> 32) != ((h >> 16) & 0xFFFFFFFFu))
        return 0;
    *size = n;
    *instance = inst;
    return 1;
}

static inline void wipe(void *p, size_t room) {
    memset((char *)p + room - TRAILER_SIZE, 0, TRAILER_SIZE);
}

/* ---- Accounting wrappers (in-process mode) ---------------------------------------
 *
 * The same four steps as the malloc hooks: decide (ap__charge), call the
 * allocator below, write the record, or undo the charge when it failed. Frees
 * read the record, wipe it and credit the instance named in it, before the
 * block goes back: after that another thread may get the same address.
 */

static AP__NOINLINE void foreign_free_seen(const layer *l) {
    ap__tls_t *t = &ap__tls;
    if (ap__watching(t))
        ap__observe_free(t, 0, l->domain);
}

static void *acct_alloc(layer *l, size_t size, int zero) {
    if (AP__UNLIKELY(size > AP__MAX_REQUEST) && size == PROBE_SIZE)
        return probe_seen(l);
    if (AP__UNLIKELY(!is_active(l)))
        return zero ? l->prev.calloc(l->prev.ctx, 1, size) : l->prev.malloc(l->prev.ctx, size);
    if (AP__UNLIKELY(!ap__charge(size, l->domain)))
        return NULL;
    /* size <= AP__MAX_REQUEST here: the slow path refuses anything larger. */
    void *p = zero ? l->prev.calloc(l->prev.ctx, 1, size + TRAILER_SIZE)
                   : l->prev.malloc(l->prev.ctx, size + TRAILER_SIZE);
    ap__tls_t *t = &ap__tls;
    if (AP__UNLIKELY(!p)) {
        ap__credit(t->cur, size, AP__UNDO);
        ap__backend_failed(size, l->domain);
        return NULL;
    }
    stamp(p, room_of(l, p), size, t->cur);
    return p;
}

static void *acct_malloc(void *ctx, size_t size) { return acct_alloc(ctx, size, 0); }

static void *acct_calloc(void *ctx, size_t n, size_t m) {
    size_t total;
    if (__builtin_mul_overflow(n, m, &total))
        return NULL;
    return acct_alloc(ctx, total, 1);
}

static void acct_free(void *ctx, void *p) {
    layer *l = ctx;
    if (AP__LIKELY(p != NULL)) {
        size_t room = room_of(l, p);
        uint64_t size;
        uint32_t instance;
        if (record_of(l, p, room, &size, &instance)) {
            wipe(p, room);
            ap__credit(instance, size, l->domain);
        } else {
            foreign_free_seen(l);
        }
    }
    l->prev.free(l->prev.ctx, p);
}

/* Inactive: give up the block's charge, then pass the call down. The record is
 * wiped first (an in-place realloc would keep it valid); if the allocator
 * below fails, the block stays live uncounted, which never credits twice. */
static AP__NOINLINE void *acct_realloc_inactive(layer *l, void *p, size_t size) {
    size_t room = room_of(l, p);
    uint64_t old;
    uint32_t owner;
    if (record_of(l, p, room, &old, &owner)) {
        wipe(p, room);
        ap__credit(owner, old, l->domain);
    }
    return l->prev.realloc(l->prev.ctx, p, size);
}

/*
 * Decide first, as realloc in hooks_libc.c: a block of the caller's own
 * instance is charged its growth; any other block (another instance's, or
 * one from before install(), which thereby becomes accounted) is charged in
 * full to the caller, and the old owner credited, as malloc + free would.
 * The record is wiped before the call and written again on failure, so the
 * old chunk, if the block moves, keeps no valid record.
 */
static void *acct_realloc(void *ctx, void *p, size_t size) {
    layer *l = ctx;
    if (!p)
        return acct_alloc(l, size, 0);
    if (AP__UNLIKELY(size > AP__MAX_REQUEST) && size == PROBE_SIZE)
        return probe_seen(l);
    if (AP__UNLIKELY(!is_active(l)))
        return acct_realloc_inactive(l, p, size);
    ap__tls_t *t = &ap__tls;
    size_t room = room_of(l, p);
    uint64_t old = 0;
    uint32_t owner = 0;
    int ours = record_of(l, p, room, &old, &owner);
    int same = ours && owner == t->cur;
    uint64_t charged = same ? (size > old ? size - old : 0) : size;
    if (charged && !ap__charge(charged, l->domain))
        return NULL;
    if (ours)
        wipe(p, room);
    void *q = l->prev.realloc(l->prev.ctx, p, size + TRAILER_SIZE);
    if (AP__UNLIKELY(!q)) {
        if (ours)
            stamp(p, room, old, owner);
        if (charged)
            ap__credit(t->cur, charged, AP__UNDO);
        ap__backend_failed(size, l->domain);
        return NULL;
    }
    if (same) {
        if (old > size)
            ap__credit(owner, old - size, l->domain);
    } else if (ours) {
        ap__credit(owner, old, l->domain);
    }
    stamp(q, room_of(l, q), size, t->cur);
    return q;
}

/* ---- Observing wrappers (MEM and OBJ over pymalloc) -------------------------------
 *
 * pymalloc's own blocks are charged by the arena hook (hooks_pyarena.c), and
 * its large requests go on to PyMem_RawMalloc; these wrappers only let the
 * watching machinery see each request, and cost one test otherwise.
 */

static AP__NOINLINE int observe(layer *l, size_t size) {
    ap__tls_t *t = &ap__tls;
    if (!ap__watching(t) || !is_active(l))
        return 1;
    return ap__observe_layered_alloc(t, size, l->domain);
}

static inline int watched(void) {
    return (int)(atomic_load_explicit(&ap__watch, memory_order_relaxed) | ap__tls.watch);
}

static void *obs_malloc(void *ctx, size_t size) {
    layer *l = ctx;
    if (AP__UNLIKELY(size > AP__MAX_REQUEST) && size == PROBE_SIZE)
        return probe_seen(l);
    if (AP__UNLIKELY(watched()) && !observe(l, size))
        return NULL;
    return l->prev.malloc(l->prev.ctx, size);
}

static void *obs_calloc(void *ctx, size_t n, size_t m) {
    layer *l = ctx;
    size_t total;
    if (__builtin_mul_overflow(n, m, &total))
        total = SIZE_MAX;
    if (AP__UNLIKELY(watched()) && !observe(l, total))
        return NULL;
    return l->prev.calloc(l->prev.ctx, n, m);
}

static void *obs_realloc(void *ctx, void *p, size_t size) {
    layer *l = ctx;
    if (AP__UNLIKELY(size > AP__MAX_REQUEST) && size == PROBE_SIZE)
        return probe_seen(l);
    if (AP__UNLIKELY(watched()) && !observe(l, size))
        return NULL;
    return l->prev.realloc(l->prev.ctx, p, size);
}

static void obs_free(void *ctx, void *p) {
    layer *l = ctx;
    if (AP__UNLIKELY(watched()) && p && is_active(l))
        ap__observe_layered_free(&ap__tls, 0, l->domain);
    l->prev.free(l->prev.ctx, p);
}

/* ---- Installing and removing layers --------------------------------------------- */

static void fill(py_allocator *out, layer *l) {
    out->ctx = l;
    if (l->how == AP_PYHOOK_OBSERVE) {
        out->malloc = obs_malloc;
        out->calloc = obs_calloc;
        out->realloc = obs_realloc;
        out->free = obs_free;
    } else {
        out->malloc = acct_malloc;
        out->calloc = acct_calloc;
        out->realloc = acct_realloc;
        out->free = acct_free;
    }
}

static int same_allocator(const py_allocator *a, const py_allocator *b) {
    return a->ctx == b->ctx && a->malloc == b->malloc && a->calloc == b->calloc &&
           a->realloc == b->realloc && a->free == b->free;
}

/* The layer `top` is, if it is one of ours for that domain. */
static layer *ours(uint32_t d, const py_allocator *top) {
    uintptr_t at = (uintptr_t)top->ctx;
    if (at < (uintptr_t)&layers[d][0] || at >= (uintptr_t)&layers[d][LAYERS_PER_DOMAIN])
        return NULL;
    layer *l = &layers[d][(at - (uintptr_t)&layers[d][0]) / sizeof(layer)];
    if ((uintptr_t)l != at || !l->used)
        return NULL;
    py_allocator expect;
    fill(&expect, l);
    return same_allocator(&expect, top) ? l : NULL;
}

/* Whether a request entering at `top` reaches any of our layers (of `d`) that
 * `want` selects: 1 active, 0 any. */
static int reaches(uint32_t d, const py_allocator *top, int want_active) {
    for (uint32_t i = 0; i < LAYERS_PER_DOMAIN; i++)
        atomic_store(&layers[d][i].probed, 0);
    int saved = errno;
    void *p = top->malloc(top->ctx, PROBE_SIZE);
    errno = saved;
    if (p) /* an allocator that granted 8 EiB: give it back */
        top->free(top->ctx, p);
    for (uint32_t i = 0; i < LAYERS_PER_DOMAIN; i++) {
        layer *l = &layers[d][i];
        if (l->used && atomic_load(&l->probed) && (!want_active || is_active(l)))
            return 1;
    }
    return 0;
}

/* Does the allocator below lay out blocks as `how` says? One probe block:
 * only bytes inside it are read, whatever the answer. */
static int layout_is(uint32_t d, const py_allocator *below, uint32_t how) {
    enum { N = 64 };
    unsigned char *p = below->malloc(below->ctx, N);
    if (!p)
        return 0;
    int filled = 1;
    for (int i = 0; i < N; i++)
        filled &= p[i] == DEBUG_CLEANBYTE;
    int ok;
    if (how == AP_PYHOOK_ACCOUNT_DEBUG) {
        ok = filled && debug_size(p) == N && p[-(int)sizeof(size_t)] == debug_api_id[d];
        for (int i = 1; ok && i < (int)sizeof(size_t); i++)
            ok = p[-i] == DEBUG_FORBIDDENBYTE;
    } else {
        /* Debug hooks fill new blocks with 0xCD; plain malloc does not (its
         * usable size of an interior pointer would be garbage). */
        size_t room = filled ? 0 : usable_size(p);
        ok = room >= N && room <= N + 4096;
    }
    below->free(below->ctx, p);
    return ok;
}

static void init_once(void) {
    if (!usable_size)
        usable_size = (size_t(*)(void *))dlsym(RTLD_DEFAULT, "malloc_usable_size");
    while (!secret) {
        uint64_t s = 0;
        if (getrandom(&s, sizeof s, GRND_NONBLOCK) != (ssize_t)sizeof s) {
            /* No entropy yet (early boot): the clock and addresses still make
             * the key differ between processes. */
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            s = mix((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ (uintptr_t)&s ^
                    ((uint64_t)getpid() << 40));
        }
        secret = s;
    }
}

static layer *take_layer(uint32_t d, const py_allocator *below, uint32_t how) {
    for (uint32_t i = 0; i < LAYERS_PER_DOMAIN; i++) {
        layer *l = &layers[d][i];
        if (l->used && l->how == how && same_allocator(&l->prev, below))
            return l;
    }
    for (uint32_t i = 0; i < LAYERS_PER_DOMAIN; i++) {
        layer *l = &layers[d][i];
        if (!l->used) {
            l->prev = *below;
            l->pydomain = d;
            l->how = how;
            l->domain = domain_of[d];
            l->used = 1;
            return l;
        }
    }
    return NULL;
}

static int covers(const layer *l, uint32_t how) {
    return how == AP_PYHOOK_OBSERVE || l->how == how;
}

static int active_layer(uint32_t d, uint32_t how) {
    for (uint32_t i = 0; i < LAYERS_PER_DOMAIN; i++)
        if (layers[d][i].used && is_active(&layers[d][i]) && covers(&layers[d][i], how))
            return 1;
    return 0;
}

ap_status ap_py_hook_domain(void *get, void *set, uint32_t d, uint32_t how) {
    if (!get || !set || d >= PY_DOMAINS || how < AP_PYHOOK_OBSERVE ||
        how > AP_PYHOOK_ACCOUNT_DEBUG)
        return AP_EINVAL;
    init_once();
    if (how == AP_PYHOOK_ACCOUNT && !usable_size)
        return AP_ESTATE;
    saved_get = (py_get_allocator)get;
    py_allocator top;
    ((py_get_allocator)get)((int)d, &top);
    layer *l = ours(d, &top);
    if (l && covers(l, how)) {
        atomic_store(&l->active, 1);
        return AP_OK; /* installing twice is harmless */
    }
    if (!l && active_layer(d, how) && reaches(d, &top, 1)) {
        /* Someone hooked above our active layer (tracemalloc started after
         * install()): calls still come through it. */
        known_top[d] = top;
        return AP_OK;
    }
    if (how != AP_PYHOOK_OBSERVE && !layout_is(d, &top, how))
        return AP_ESTATE;
    layer *fresh = take_layer(d, &top, how);
    if (!fresh)
        return AP_EFULL;
    /* No active layer of ours is reached any more (or the one on top is an
     * observing layer the new accounting one replaces): none may count. */
    for (uint32_t i = 0; i < LAYERS_PER_DOMAIN; i++)
        atomic_store(&layers[d][i].active, 0);
    atomic_store(&fresh->active, 1);
    py_allocator mine;
    fill(&mine, fresh);
    ((py_set_allocator)set)((int)d, &mine);
    return AP_OK;
}

ap_status ap_py_unhook_domain(void *get, void *set, uint32_t d) {
    if (!get || !set || d >= PY_DOMAINS)
        return AP_EINVAL;
    py_allocator top;
    ((py_get_allocator)get)((int)d, &top);
    /* Our layers on top come off, each giving back exactly what it found. */
    for (layer *l; (l = ours(d, &top)) != NULL;) {
        atomic_store(&l->active, 0);
        ((py_set_allocator)set)((int)d, &l->prev);
        ((py_get_allocator)get)((int)d, &top);
    }
    int below_someone = reaches(d, &top, 0);
    for (uint32_t i = 0; i < LAYERS_PER_DOMAIN; i++)
        atomic_store(&layers[d][i].active, 0);
    memset(&known_top[d], 0, sizeof known_top[d]);
    /* Still in another tool's chain: we pass calls through until that tool
     * gives the allocator back and a later unhook finds us on top. */
    return below_someone ? AP_ESTATE : AP_OK;
}

ap_status ap_py_install_domain_hooks(void *get, void *set, uint32_t domains) {
    if (!get || !set || (domains & ~((1u << PY_DOMAINS) - 1)))
        return AP_EINVAL;
    ap_status worst = AP_OK;
    for (uint32_t d = 0; d < PY_DOMAINS; d++) {
        if (!(domains & (1u << d)))
            continue;
        ap_status st = ap_py_hook_domain(get, set, d, AP_PYHOOK_OBSERVE);
        if (st != AP_OK)
            worst = st;
    }
    return worst;
}

uint32_t ap_py_hooks_lost(void) {
    py_get_allocator get = saved_get;
    if (!get)
        return 0;
    uint32_t lost = 0;
    for (uint32_t d = 0; d < PY_DOMAINS; d++) {
        if (!active_layer(d, AP_PYHOOK_OBSERVE))
            continue;
        py_allocator top;
        get((int)d, &top);
        layer *l = ours(d, &top);
        if ((l && is_active(l)) || same_allocator(&top, &known_top[d]))
            continue;
        lost |= 1u << d;
    }
    return lost;
}

/* Checked before entering: putting a layer back runs Python code, which must
 * not allocate inside the new scope (a forbid scope would see it). */
ap_status ap_py_enter(uint32_t scope_id, uint32_t *instance_id, uint32_t *lost) {
    uint32_t gone = ap_py_hooks_lost();
    if (lost)
        *lost = gone;
    if (gone)
        return AP_ESTATE;
    return ap_enter(scope_id, instance_id);
}

/* ---- NumPy's data handler ------------------------------------------------------------
 *
 * From NumPy's C API documentation, "Memory management in NumPy" (NEP 49,
 * NumPy >= 1.22; numpy/_core/include/numpy/ndarraytypes.h):
 *     typedef struct { void *ctx; void* (*malloc)(void *ctx, size_t size);
 *         void* (*calloc)(void *ctx, size_t nelem, size_t elsize);
 *         void* (*realloc)(void *ctx, void *ptr, size_t new_size);
 *         void (*free)(void *ctx, void *ptr, size_t size); } PyDataMemAllocator;
 *     typedef struct { char name[127]; uint8_t version;
 *         PyDataMemAllocator allocator; } PyDataMem_Handler;
 * installed with PyDataMem_SetHandler(capsule named "mem_handler").
 *
 * Every array keeps a reference to the handler that allocated its data and
 * frees it through that handler, so our free only ever sees our blocks: a
 * plain 16-byte header is safe here, and arrays from before install() never
 * reach it. An inactive handler (after uninstall(), in contexts that still
 * have it) keeps writing headers but charges nothing.
 */
typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} np_allocator;

typedef struct {
    char name[127];
    uint8_t version;
    np_allocator allocator;
} np_handler;

typedef struct {
    np_handler handler;      /* what our capsule points to; allocator.ctx = this */
    np_allocator prev;
    const void *prev_handler;
    uint32_t used;
    _Atomic uint32_t active;
} np_layer;

typedef struct {
    uint64_t size;
    uint32_t instance;       /* NP_UNCHARGED: allocated while inactive */
    uint32_t tag;
} np_header;

#define NP_LAYERS 8
#define NP_TAG 0xA11C0DA7u
#define NP_UNCHARGED UINT32_MAX
static np_layer np_layers[NP_LAYERS];
static const char np_capsule_name[] = "mem_handler";

static inline void *np_finish(char *base, uint64_t size, uint32_t instance) {
    np_header *h = (np_header *)base;
    h->size = size;
    h->instance = instance;
    h->tag = NP_TAG;
    return base + sizeof(np_header);
}

/* The charge for a new block: its instance, 0 to refuse. */
static inline int np_charge(np_layer *l, uint64_t size, uint32_t *instance) {
    if (!atomic_load_explicit(&l->active, memory_order_relaxed)) {
        *instance = NP_UNCHARGED;
        return size <= AP__MAX_REQUEST;
    }
    if (!ap__charge(size, AP_DOMAIN_NUMPY))
        return 0;
    *instance = ap__tls.cur;
    return 1;
}

static AP__NOINLINE void np_failed(uint64_t size, uint32_t instance) {
    if (instance != NP_UNCHARGED) {
        ap__credit(instance, size, AP__UNDO);
        ap__backend_failed(size, AP_DOMAIN_NUMPY);
    }
}

static void *np_alloc(np_layer *l, size_t size, int zero) {
    uint32_t instance;
    if (!np_charge(l, size, &instance))
        return NULL;
    size_t full = size + sizeof(np_header);
    char *base = zero ? l->prev.calloc(l->prev.ctx, full, 1) : l->prev.malloc(l->prev.ctx, full);
    if (AP__UNLIKELY(!base)) {
        np_failed(size, instance);
        return NULL;
    }
    return np_finish(base, size, instance);
}

static void *np_malloc(void *ctx, size_t size) { return np_alloc(ctx, size, 0); }

static void *np_calloc(void *ctx, size_t n, size_t m) {
    size_t total;
    if (__builtin_mul_overflow(n, m, &total))
        return NULL;
    return np_alloc(ctx, total, 1);
}

static void np_free(void *ctx, void *p, size_t size) {
    np_layer *l = ctx;
    if (!p) {
        l->prev.free(l->prev.ctx, p, size);
        return;
    }
    np_header *h = (np_header *)p - 1;
    if (AP__UNLIKELY(h->tag != NP_TAG)) {
        /* Not from this handler (a NumPy bug or a double free): the
         * allocator below gets it as is, and reports it if it can. */
        l->prev.free(l->prev.ctx, p, size);
        return;
    }
    uint64_t n = h->size;
    uint32_t instance = h->instance;
    h->tag = 0; /* a second free of the block is not credited again */
    if (instance != NP_UNCHARGED)
        ap__credit(instance, n, AP_DOMAIN_NUMPY);
    l->prev.free(l->prev.ctx, h, n + sizeof(np_header));
}

static void *np_realloc(void *ctx, void *p, size_t size) {
    np_layer *l = ctx;
    if (!p)
        return np_alloc(l, size, 0);
    np_header *h = (np_header *)p - 1;
    if (AP__UNLIKELY(h->tag != NP_TAG))
        return l->prev.realloc(l->prev.ctx, p, size);
    uint64_t old = h->size;
    uint32_t owner = h->instance;
    uint32_t instance = NP_UNCHARGED;
    uint64_t charged = 0;
    int same = 0;
    if (atomic_load_explicit(&l->active, memory_order_relaxed)) {
        if (size > AP__MAX_REQUEST) {
            np_charge(l, size, &instance); /* refused as out of memory */
            return NULL;
        }
        instance = ap__tls.cur;
        same = owner == instance;
        charged = same ? (size > old ? size - old : 0) : size;
        if (charged && !ap__charge(charged, AP_DOMAIN_NUMPY))
            return NULL;
    } else if (size > AP__MAX_REQUEST) {
        return NULL;
    }
    char *nb = l->prev.realloc(l->prev.ctx, h, size + sizeof(np_header));
    if (AP__UNLIKELY(!nb)) {
        if (charged)
            ap__credit(instance, charged, AP__UNDO);
        if (instance != NP_UNCHARGED)
            ap__backend_failed(size, AP_DOMAIN_NUMPY);
        return NULL;
    }
    if (owner != NP_UNCHARGED) {
        if (same) {
            if (old > size)
                ap__credit(owner, old - size, AP_DOMAIN_NUMPY);
        } else {
            ap__credit(owner, old, AP_DOMAIN_NUMPY);
        }
    }
    return np_finish(nb, size, instance);
}

ap_status ap_numpy_handler(const void *previous, void **handler, const char **capsule_name) {
    if (!previous || !handler)
        return AP_EINVAL;
    const np_handler *prev = previous;
    if (prev->version < 1)
        return AP_EINVAL;
    np_layer *l = NULL;
    for (uint32_t i = 0; i < NP_LAYERS && !l; i++)
        if (np_layers[i].used && np_layers[i].prev_handler == previous &&
            memcmp(&np_layers[i].prev, &prev->allocator, sizeof(np_allocator)) == 0)
            l = &np_layers[i];
    for (uint32_t i = 0; i < NP_LAYERS && !l; i++) {
        if (!np_layers[i].used) {
            l = &np_layers[i];
            l->prev = prev->allocator;
            l->prev_handler = previous;
            strcpy(l->handler.name, "allocpolicy");
            l->handler.version = 1;
            l->handler.allocator = (np_allocator){l, np_malloc, np_calloc, np_realloc, np_free};
            l->used = 1;
        }
    }
    if (!l)
        return AP_EFULL;
    atomic_store(&l->active, 1);
    *handler = &l->handler;
    if (capsule_name)
        *capsule_name = np_capsule_name;
    return AP_OK;
}

ap_status ap_numpy_set_active(const void *handler, uint32_t active) {
    for (uint32_t i = 0; i < NP_LAYERS; i++) {
        if (np_layers[i].used && &np_layers[i].handler == handler) {
            atomic_store(&np_layers[i].active, active ? 1u : 0u);
            return AP_OK;
        }
    }
    return AP_ENOENT;
}
