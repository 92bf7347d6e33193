/*
 * internal.h - shared state of the runtime. Nothing here is part of the ABI.
 *
 * Naming: `ap_` is public (allocpolicy.h), `ap__` internal functions, `AP__`
 * internal macros.
 */
#ifndef ALLOCPOLICY_INTERNAL_H
#define ALLOCPOLICY_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>

#include "allocpolicy.h"

#define AP__LIKELY(x) __builtin_expect(!!(x), 1)
#define AP__UNLIKELY(x) __builtin_expect(!!(x), 0)
#define AP__NOINLINE __attribute__((noinline))
#define AP__HIDDEN __attribute__((visibility("hidden")))
#define AP__CACHELINE 64

/*
 * Thread-local state lives in the static TLS block (initial-exec): the hooks
 * touch it on every allocation, and the general-dynamic model would call
 * __tls_get_addr, which may itself allocate the first time a thread touches a
 * dlopen()ed module's TLS.
 */
#ifdef AP_INPROCESS
/* The in-process copy is dlopen()ed late, when the static TLS block may have
 * no room left; its malloc family never interposes, so __tls_get_addr's own
 * allocations cannot come back into it. */
#define AP__TLS __thread
#else
#define AP__TLS __thread __attribute__((tls_model("initial-exec")))
#endif

/* ---- Block header ---------------------------------------------------------
 *
 * Every block the runtime takes from the backend is preceded by this header,
 * so a free knows its size and the instance to credit (semantics 2) without a
 * lookup table. (Blocks of up to 256 bytes come from spans instead, over
 * glibc, and carry none: spans.h.)
 * 16 bytes keep glibc's 16-byte alignment for plain malloc; aligned blocks put
 * the header in the padding in front of the aligned address. On glibc a
 * smaller header would cost the same memory: chunks grow in 16-byte steps,
 * and requests of 16k and 16k + 8 bytes leave no room in front (the choice
 * and its measurements: docs/internals.rst, "Block layout and resident
 * memory").
 */
typedef struct {
    uint64_t size_tag; /* low 48 bits: requested size; high 16: check tag */
    uint32_t instance; /* instance charged */
    uint32_t offset;   /* user pointer - backend pointer */
} ap__header;

#define AP__HEADER_SIZE 16u
#define AP__SIZE_MASK ((UINT64_C(1) << 48) - 1)

/* Marks a header as ours. Foreign pointers are rare to begin with (blocks
 * that bypassed the interposed functions); one whose preceding bytes happen
 * to hold this tag (a 2^-16 chance) would be misread as ours. */
#define AP__TAG 0xA11Cu

static inline ap__header *ap__header_of(void *user) {
    return (ap__header *)((char *)user - AP__HEADER_SIZE);
}

/* ---- Per-thread cache of small blocks (hooks_libc.c) ------------------------
 *
 * Freed blocks of up to AP__CACHE_MAX bytes are kept, a few per size class,
 * and handed out again by the same thread's next malloc of that class without
 * a round trip through the backend. Classes are 8 bytes apart up to 256 and
 * 64 bytes apart up to 1 KiB. The upper end matters: glibc's own per-thread
 * cache stops at 1032-byte requests, and the header would push requests of
 * 1009 to 1024 bytes past it, onto glibc's slow path, on every call.
 *
 * The 8-byte steps matter for memory: every block of up to 256 bytes is
 * allocated with its class's full capacity, and every backend rounds to 8
 * bytes or more itself, so there the class costs nothing beyond the header.
 * With 16-byte classes, a 24-byte block (32 with the header rounded up, 48
 * with it) took a 64-byte glibc chunk instead of 48 (docs/internals.rst,
 * "Block layout"). Above 256 bytes a class's full capacity would cost up to
 * 63 bytes a block (a 1000-byte block took a 1056-byte glibc chunk for 1024):
 * those blocks are allocated with their own size, a cached block keeps its
 * capacity in its header, and it serves a request of its class only if that
 * fits.
 *
 * Cached blocks carry AP__CACHED_TAG, so a second free of one is recognised.
 * At most AP__CACHE_DEPTH blocks per class (98 KiB in all) stay with a
 * thread; they go back to the backend when it exits. */
#define AP__CACHE_CLASSES 44
#define AP__CACHE_DEPTH 8
#define AP__CACHE_MAX 1024
#define AP__CACHED_TAG 0xF4EEu

static inline uint32_t ap__cache_class(uint64_t size) {
    if (size <= 256)
        return size ? (uint32_t)((size - 1) >> 3) : 0;
    return 32 + (uint32_t)((size - 257) >> 6);
}

static inline uint64_t ap__class_capacity(uint32_t cls) {
    return cls < 32 ? ((uint64_t)cls + 1) << 3 : 256 + (((uint64_t)cls - 31) << 6);
}

/* What a block of `size` user bytes is allocated with: blocks of up to 256
 * bytes get the full capacity of their class, so any block of the class can
 * serve them; larger ones their own size (see above). */
static inline uint64_t ap__capacity(uint64_t size) {
    return size <= 256 ? ap__class_capacity(ap__cache_class(size)) : size;
}

/* Blocks of up to 256 bytes come from spans, without a header (spans.h):
 * classes 16 bytes apart, two spans per class and thread. */
#define AP__SPAN_MAX 256
#define AP__SPAN_CLASSES 16
#define AP__SPAN_WAYS 2
struct ap__span;

/* ---- Scopes and instances -------------------------------------------------- */

typedef struct {
    _Atomic int64_t live;
    _Atomic int64_t peak;
    _Atomic uint64_t allocations;
    _Atomic uint64_t violations;
} ap__counters;

typedef struct {
    char name[AP_SCOPE_NAME_MAX];
    _Atomic uint32_t mode;          /* ap_mode */
    _Atomic int64_t budget;         /* per instance, 0 = none */
    _Atomic int64_t total_budget;   /* across live instances, 0 = none */
    _Atomic uint32_t forbid;        /* 0, or 1 + the ap_action of a forbid scope */
    _Atomic uint32_t forbid_frees;  /* frees in it are violations too */
    _Atomic uint32_t overdraft;     /* ap_action for reservation overdrafts */
    /* Written on slow paths only; own cache line so readers of the settings
     * above are not disturbed. */
    _Alignas(AP__CACHELINE) ap__counters total;
    _Atomic uint64_t instances;
    _Atomic uint64_t active;
    _Atomic int64_t escaped;
    _Atomic int64_t grace_bytes;
    _Atomic int64_t max_instance_peak;
    _Atomic uint64_t reservations;
    _Atomic uint64_t refused_reservations;
    _Atomic uint64_t overdrafts;
    _Atomic int64_t overdraft_bytes;
    _Atomic uint64_t forbidden;
    _Atomic uint64_t injected;
    _Atomic uint64_t refused[AP_REASON_COUNT_]; /* violations by ap_reason */
    /* Ended slots of this scope kept for its next instances (scope.c);
     * `ended_lock` holds the pid of the process whose thread holds it. */
    _Atomic int32_t ended_lock;
    _Atomic uint32_t ended_head;
} ap__scope;

/*
 * Instance slots and ids (scope.c).
 *
 * An id names a slot of the table (low 16 bits) and the generation of the
 * slot's occupant (the next 15 bits; bit 31 is AP__POOL_OWNER in headers).
 * Ended instances give their slot up at once, while block headers, pymalloc
 * arenas and child links may still name them: the generation tells such a
 * stale id from the slot's current occupant. The bytes an instance still had
 * when it ended (escaped) stay counted in its enclosing instances and the
 * process, and in the slot's `dead` ledger, which a free of a block from an
 * earlier generation draws on before crediting the first live level above.
 * So that the links of those generations stay valid, a slot with dead bytes
 * (or with slots bound below it) is reused only by a new instance of the same
 * scope under the same parent, or under a later occupant of the parent's slot
 * once the earlier one ended (the slot's link switches; see can_switch), and
 * goes back to the common pool once nothing names it.
 */
enum {
    AP__INST_FREE = 0,    /* in the common pool, or never used */
    AP__INST_ACTIVE = 1,  /* entered, not ended */
    AP__INST_ENDED = 2,   /* ended; bound to its scope and parent, reusable there */
    AP__INST_ENDING = 3,  /* ending: its live bytes move to `dead` */
    AP__INST_OPENING = 4, /* being reused by a new instance */
    AP__INST_RETIRED = 5, /* ended; no new generation can be told from its dead ones */
};

#define AP__SLOT_MASK ((uint32_t)AP_MAX_INSTANCES - 1)
#define AP__GEN_SHIFT 16
#define AP__GEN_MASK 0x7FFFu

typedef struct {
    _Alignas(AP__CACHELINE) ap__counters c; /* the current occupant's (inclusive) */
    _Atomic uint32_t state;   /* AP__INST_* */
    _Atomic uint32_t inside;  /* threads that have it on their stack, holds, and
                                 active nested instances */
    _Atomic uint32_t children; /* slots bound below this one (see above) */
    _Atomic uint32_t scope;   /* atomic: a stale reader may look while it changes */
    _Atomic uint32_t parent;  /* enclosing instance's id, AP_INSTANCE_PROCESS at the root */
    uint32_t counts_scope;    /* 0 when an ancestor is of the same scope */
    int64_t budget;           /* copied from the scope when entered */
    _Atomic int64_t escaped;  /* the occupant's live bytes when it ended */
    _Atomic uint32_t serial;  /* occupants so far; the id's generation is its low bits */
    _Atomic uint32_t pins;    /* credits in progress against this slot */
    _Atomic int64_t dead;     /* bytes of ended generations (and their nested ones) */
    uint32_t dead_since;      /* serial of the oldest generation `dead` may hold */
    _Atomic uint32_t switched; /* serial from which `parent` holds (0: always);
                                  older generations had an ended occupant of the
                                  same parent slot as their parent */
    _Atomic uint32_t next_free; /* common pool link */
    uint32_t list_prev, list_next; /* the scope's list of ENDED slots (under its lock) */
} ap__instance;

extern ap__scope ap__scopes[AP_MAX_SCOPES];
extern _Atomic uint32_t ap__nscopes;
extern ap__instance ap__instances[AP_MAX_INSTANCES];

static inline ap__instance *ap__inst(uint32_t id) { return &ap__instances[id & AP__SLOT_MASK]; }

/* 1 if `id` names the slot's current occupant (or the process root). */
static inline int ap__id_current(const ap__instance *in, uint32_t id) {
    return (id & AP__SLOT_MASK) == AP_INSTANCE_PROCESS ||
           (atomic_load(&in->serial) & AP__GEN_MASK) == (id >> AP__GEN_SHIFT & AP__GEN_MASK);
}

/* Process-level settings, from the policy. */
typedef struct {
    _Atomic int64_t grace;   /* unwind grace, bytes per thread and instance */
    _Atomic int report_fd;
    _Atomic int64_t reserve_margin; /* bytes reservations leave on the machine */
} ap__settings_t;
extern ap__settings_t ap__settings;

/* ---- Per-thread state ----------------------------------------------------------
 *
 * The thread's unpublished net allocation against its innermost instance (and
 * so the whole chain above it) is `mark - allow`. The fast path only touches
 * this structure; it is published to the shared counters when a budget could
 * be crossed, when frees run a batch ahead, when the thread changes instance
 * and when the thread exits.
 */
typedef struct {
    uint32_t cur;            /* innermost instance */
    uint32_t depth;
    /* Bytes the fast path may still allocate before the next check (>= 0).
     * Allocations take from it and frees of `cur`'s blocks give back, so the
     * unpublished net allocation is simply `mark - allow`, where `mark` is
     * its value at the last publish; frees publish once allow reaches
     * `limit`. One counter to update per call instead of two. */
    int64_t allow;
    int64_t mark;
    int64_t limit;
    uint64_t pend_n;         /* unpublished allocation count */
    uint32_t stack[AP_MAX_DEPTH];
    uint32_t grace_inst;     /* instance whose grace is in use, or UINT32_MAX */
    int64_t grace_left;
    uint32_t owner_bits;     /* AP__POOL_OWNER while this thread bootstraps */
    uint32_t registered;     /* thread-exit destructor registered */
    uint32_t in_report;
    uint32_t watch;          /* regions active on this thread (see observe.c) */
    uint32_t nregions;
    uint32_t nres;           /* reservations active on this thread */
    uint64_t res_serial;
    uint8_t cached[AP__CACHE_CLASSES];   /* blocks in each class's list */
    void *cache[AP__CACHE_CLASSES];      /* backend pointers, linked through
                                            the first word of the user area */
    /* The thread's spans (way 0 is tried first) and the token that marks
     * them as its own (0 until it takes one). */
    struct ap__span *spans[AP__SPAN_CLASSES][AP__SPAN_WAYS];
    uint64_t span_token;
    ap_violation last;       /* last violation on this thread */
    /* The thread's violation number (last.seq) before each level's entry,
     * and that of the level left most recently: a boundary reads them
     * after its native call instead of receiving them from it (see
     * ap_enter_marked). */
    uint64_t entry_seq[AP_MAX_DEPTH];
    uint64_t exited_seq;
    /* Bit d: level d+1 of the stack was entered by ap_enter_marked (a
     * Python `with` block, left by ap_exit_tagged), and, in `abandoned`,
     * its exit came while levels above it were active: it is left with
     * the last of them. */
    uint32_t marked;
    uint32_t abandoned;
    uint32_t tags[AP_MAX_DEPTH]; /* of each marked level: which block entered it */
    /* Rarely touched: after the fast-path fields so those share lines. */
    ap_reservation res[AP_MAX_RESERVATIONS]; /* innermost last */
    ap_region regions[AP_MAX_REGIONS];        /* innermost last */
    ap_region last_region;                    /* the region left most recently */
} ap__tls_t;

/* ---- Watching: regions, census, injection (observe.c) ----------------------
 *
 * `ap__watch` is non-zero while a census is open or injection is active
 * anywhere in the process; the thread's own `watch` while it has a region. A
 * watching thread takes the slow path for every allocation and free (the
 * fast paths test both), where ap__observe_alloc/free see each event.
 *
 * Hooks that do no accounting of their own (the observing layers over the
 * PyMem MEM and OBJ domains) call the `layered` variants directly when
 * ap__watching() says so:
 *     if (AP__UNLIKELY(ap__watching(t)) && !ap__observe_layered_alloc(t, size, dom))
 *         return NULL;
 * Their events are seen by API regions only, never by a forbid scope's region
 * (see region_sees in observe.c).
 */
extern _Atomic uint32_t ap__watch;

/* 1 to go on, 0 to refuse (the violation is recorded; ABORT actions abort). */
AP__HIDDEN int ap__observe_alloc(ap__tls_t *t, uint64_t size, ap_domain domain);
/* `size` 0 when the hook does not know it. */
AP__HIDDEN void ap__observe_free(ap__tls_t *t, uint64_t size, ap_domain domain);
AP__HIDDEN int ap__observe_layered_alloc(ap__tls_t *t, uint64_t size, ap_domain domain);
AP__HIDDEN void ap__observe_layered_free(ap__tls_t *t, uint64_t size, ap_domain domain);

/* Give every cached block back to the backend (thread exit). */
AP__HIDDEN void ap__cache_flush(ap__tls_t *t);

extern AP__TLS ap__tls_t ap__tls;

static inline int ap__watching(const ap__tls_t *t) {
    return (int)(atomic_load_explicit(&ap__watch, memory_order_relaxed) | t->watch);
}

/* ---- Accounting (scope.c) -------------------------------------------------- */

/* Decision for `size` bytes in the calling thread's innermost instance.
 * Returns 1 to grant (already accounted), 0 to refuse (violation recorded, or
 * the process aborted in abort mode). */
AP__HIDDEN int ap__charge_slow(uint64_t size, ap_domain domain);

/* Requests above this are refused outright (the header keeps 48 bits). */
#define AP__MAX_REQUEST (AP__SIZE_MASK - (UINT64_C(1) << 32))

/* The fast path of the decision, inlined into every hook. The unsigned
 * comparison also sends every oversized request to the slow path; a watching
 * thread has `allow` 0, and the process-wide switch is one read of a line
 * that is written only when a census or injection starts or stops. */
static inline int ap__charge(uint64_t size, ap_domain domain) {
    ap__tls_t *t = &ap__tls;
    if (AP__LIKELY(size <= (uint64_t)t->allow &&
                   !atomic_load_explicit(&ap__watch, memory_order_relaxed))) {
        t->allow -= (int64_t)size;
        t->pend_n++;
        return 1;
    }
    return ap__charge_slow(size, domain);
}

/* As the domain of a credit: it undoes a charge whose block never existed
 * (the backend failed), so observers must not see a free. */
#define AP__UNDO ((ap_domain)AP_DOMAIN_COUNT_)

AP__HIDDEN void ap__credit_slow(uint32_t instance, uint64_t size, ap_domain domain);

/* The free fast path: 1 if the bytes of a block of the thread's own
 * instance went back into `allow`. They may only while `allow` stays within
 * `limit` *after* the add: the test is on the sum, so a single large free
 * cannot slip past the bound and stay unpublished (other threads would be
 * refused against memory nobody holds). `size` < 2^48, so the sum cannot
 * overflow. A watching thread has `limit` 0, so only the process-wide switch
 * needs its own test here. */
static inline int ap__credit_fast(ap__tls_t *t, uint32_t instance, uint64_t size) {
    int64_t allow = t->allow + (int64_t)size;
    if (AP__LIKELY(instance == t->cur && allow <= t->limit &&
                   !atomic_load_explicit(&ap__watch, memory_order_relaxed))) {
        t->allow = allow;
        return 1;
    }
    return 0;
}

/* Credit a freed block to the instance that made it (semantics 2). */
static inline void ap__credit(uint32_t instance, uint64_t size, ap_domain domain) {
    if (AP__LIKELY(ap__credit_fast(&ap__tls, instance, size)))
        return;
    ap__credit_slow(instance, size, domain);
}

/* Undo a charge that the backend could not satisfy; records an OOM violation. */
AP__HIDDEN int ap__backend_failed(uint64_t size, ap_domain domain);

AP__HIDDEN void ap__publish(ap__tls_t *t);
/* After a publish: what the fast path may take next (reservation-aware). */
AP__HIDDEN void ap__refill(ap__tls_t *t);
/* An injected failure, decided in observe.c; follows the scope's mode. */
AP__HIDDEN int ap__inject_refuse(ap__tls_t *t, uint64_t size, ap_domain domain, uint64_t index);
/* Number a reservation for injection: 0, or the injected index. */
AP__HIDDEN uint64_t ap__inject_reservation(ap__tls_t *t, uint64_t size);
/* Record a forbidden allocation (or free: size 0) as the thread's violation. */
AP__HIDDEN void ap__record_forbidden(ap__tls_t *t, uint64_t size, ap_domain domain);
/* Note where the thread's Python code is in `v` (pyframe.c). */
AP__HIDDEN void ap__python_where(ap_violation *v);
/* Forbid scopes open a region on entry and close it on exit. */
AP__HIDDEN void ap__regions_enter_instance(ap__tls_t *t, uint32_t instance);
/* 1 if the instance had a region (its record is then the thread's last). */
AP__HIDDEN int ap__regions_leave_instance(ap__tls_t *t, uint32_t instance);
AP__HIDDEN void ap__threads_init(void);
/* Python's functions, as the package handed them over (pycall.c). */
AP__HIDDEN extern ap_pyapi ap__py;
AP__HIDDEN int ap__py_arity(ptrdiff_t nargs, ptrdiff_t expected, const char *what);

/* ---- Library scopes and the libraries report (libscope.c) -------------------
 *
 * Non-zero while the policy binds scopes to shared objects, names the
 * libraries that check for NULL (raise_only_from), or the libraries report is
 * on. Only then do the malloc family's entry points look at their caller; a
 * line written only when the policy changes. */
extern _Atomic uint32_t ap__libs_on;

#define AP__LIB_PATTERN_MAX 64 /* a glob on a file name, NUL included */
#define AP__MAX_LIB_PATTERNS 64
enum { AP__PAT_BIND = 0, AP__PAT_RAISE_ONLY = 1 };
typedef struct {
    char text[AP__LIB_PATTERN_MAX];
    uint32_t scope; /* scope id (AP__PAT_RAISE_ONLY: 0 = the process list) */
    uint32_t kind;  /* AP__PAT_* */
} ap__lib_pattern;

/* Replace the patterns (policy.c, under its `configuring` flag); report_fd:
 * -1 off, -2 leave as it is, else the descriptor the report goes to. */
AP__HIDDEN void ap__libs_configure(const ap__lib_pattern *pats, uint32_t n, int report_fd);
/* Allocate through `fn(arg)` on behalf of the code at `caller` (see
 * libscope.c); returns what fn returned. */
AP__HIDDEN void *ap__lib_call(void *caller, uint64_t size, void *(*fn)(void *), void *arg);
/* The thread leaves `instance` (AP_INSTANCE_PROCESS: every instance, at
 * thread exit): the library instances nested in it end. */
AP__HIDDEN void ap__libs_leave(uint32_t instance);
/* 1 if a refusal in raise mode must abort: the allocating code is not in the
 * raise_only_from list that applies to `scope`. Sets *note to its name. */
AP__HIDDEN int ap__lib_refusal_aborts(uint32_t scope, const char **note);
/* An instance of `scope` nested in `parent`, not on any thread's stack (one
 * `inside` reference, dropped by ap__close_instance); AP_INSTANCE_PROCESS
 * when the instance table is full. */
AP__HIDDEN uint32_t ap__open_instance(uint32_t scope, uint32_t parent);
AP__HIDDEN void ap__close_instance(uint32_t id);

/* ---- Entry points (hooks_libc.c, hooks_cxx.c) ---------------------------------- */

#define AP__EXPORT __attribute__((visibility("default")))
/* The code that called the entry point; taken in the exported function. */
#define AP__CALLER() __builtin_extract_return_addr(__builtin_return_address(0))

/* Allocate as malloc (align 0) or memalign would, on behalf of the code at
 * `caller` (for library scopes); NULL with errno ENOMEM when refused. */
AP__HIDDEN void *ap__alloc_for(void *caller, size_t size, size_t align);
/* free() of a block from any entry point. */
AP__HIDDEN void ap__release(void *p);

/* ---- Reports (report.c) ------------------------------------------------------ */

__attribute__((noreturn)) AP__HIDDEN void ap__abort_with(const ap_violation *v);
/* write(2) all of `len` bytes (EINTR and short writes resumed), errno kept;
 * async-signal-safe. */
AP__HIDDEN void ap__write_all(int fd, const char *p, size_t len);
/* The same, with `note` (e.g. why a raise-mode refusal aborts) in the line. */
__attribute__((noreturn)) AP__HIDDEN void ap__abort_noted(const ap_violation *v, const char *note);
__attribute__((noreturn)) AP__HIDDEN void ap__abort_double_free(const void *p);
__attribute__((noreturn)) AP__HIDDEN void ap__abort_invalid_free(const void *p);

/* ---- Policy (policy.c) ----------------------------------------------------------- */

AP__HIDDEN void ap__policy_from_environment(void);

/* ---- The machine (machine.c) ---------------------------------------------------- */

/* Bytes the machine can still give the process (no heap; may read files). */
AP__HIDDEN int64_t ap__machine_room(int64_t request);

/* ---- Backend (bootstrap.c) --------------------------------------------------------- */

/* The next allocator in the chain, generated from one list. */
#define AP__BACKEND_FUNCTIONS(X)                                      \
    X(malloc, void *, (size_t))                                       \
    X(free, void, (void *))                                           \
    X(calloc, void *, (size_t, size_t))                               \
    X(realloc, void *, (void *, size_t))                              \
    X(malloc_usable_size, size_t, (void *))

typedef struct {
#define AP__X(name, ret, args) ret(*name) args;
    AP__BACKEND_FUNCTIONS(AP__X)
#undef AP__X
} ap__backend_t;

extern ap__backend_t ap__next;
extern _Atomic int ap__ready;

AP__HIDDEN void ap__bootstrap(void);
/* Spans serve small blocks only over glibc (spans.c): over another backend
 * the blocks stay that allocator's, as whoever preloaded it asked. */
AP__HIDDEN void ap__spans_configure(void *backend_malloc);
AP__HIDDEN void *ap__pool_alloc(size_t size, size_t align);

/* The bootstrap pool (see bootstrap.c). Blocks carved from it carry this bit
 * in their header's instance, so the free fast path (instance == current)
 * never matches them and only the slow path has to look at the pool. */
#define AP__POOL_SIZE (64 * 1024)
#define AP__POOL_OWNER 0x80000000u
extern char ap__pool[AP__POOL_SIZE];

static inline int ap__pool_owns(const void *p) {
    return (const char *)p >= ap__pool && (const char *)p < ap__pool + AP__POOL_SIZE;
}

#endif /* ALLOCPOLICY_INTERNAL_H */
