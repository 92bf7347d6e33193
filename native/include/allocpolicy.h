/*
 * allocpolicy.h - the one C ABI of the allocpolicy runtime.
 *
 * Conventions
 *   - Every public symbol starts with `ap_`, every macro with `AP_`.
 *   - Functions return an `ap_status` (0 = success, negative = error) and pass
 *     results through out-parameters.
 *   - Structs handed across the ABI start with a `size` field that the caller
 *     fills with sizeof(struct) as it knows it; the library writes at most that
 *     many bytes, so an older caller keeps working against a newer library.
 *   - AP_ABI_VERSION changes whenever a function signature or a struct layout
 *     changes incompatibly; the Python side refuses to bind a library whose
 *     ap_abi_version() differs from the version it was written for.
 *
 * The allocator entry points (malloc, free, ...) are not declared here: they
 * are the standard ones, exported by the library for LD_PRELOAD.
 */
#ifndef ALLOCPOLICY_H
#define ALLOCPOLICY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AP_ABI_VERSION 5

#if defined(__GNUC__)
#define AP_API __attribute__((visibility("default")))
#else
#define AP_API
#endif

typedef int ap_status;
#define AP_OK 0
#define AP_EINVAL (-1)    /* an argument is out of range or malformed */
#define AP_ENOENT (-2)    /* no such scope / instance */
#define AP_EFULL (-3)     /* a fixed-size table is full */
#define AP_ESTATE (-4)    /* the call does not fit the current state */
#define AP_EPARSE (-5)    /* a policy table string could not be parsed */
#define AP_EREFUSED (-6)  /* a reservation does not fit a budget (details out) */

/* What a failed allocation does; decided by the innermost scope. */
typedef enum {
    AP_MODE_RAISE = 0,    /* return NULL, errno = ENOMEM, record a violation */
    AP_MODE_ABORT = 1,    /* write the diagnostic, then abort() */
    AP_MODE_FALLIBLE = 2, /* ordinary allocations never fail for budget reasons */
} ap_mode;

/* Why an allocation was refused. */
typedef enum {
    AP_REASON_NONE = 0,
    AP_REASON_BUDGET = 1,    /* an instance, scope total or process budget */
    AP_REASON_OOM = 2,       /* the backend allocator returned NULL */
    AP_REASON_INJECTED = 3,  /* fault injection chose this allocation */
    AP_REASON_FORBIDDEN = 4, /* the scope forbids allocation */
    AP_REASON_COUNT_ = 5
} ap_reason;

/* Which budget refused, for AP_REASON_BUDGET. */
typedef enum {
    AP_LIMIT_NONE = 0,
    AP_LIMIT_INSTANCE = 1, /* the scope's per-instance `budget` */
    AP_LIMIT_TOTAL = 2,    /* the scope's `total_budget` over live instances */
    AP_LIMIT_PROCESS = 3,  /* the process budget */
    AP_LIMIT_RESERVATION = 4, /* an overdraft of a reservation (overdraft = raise) */
    AP_LIMIT_MACHINE = 5,     /* a reservation the machine cannot spare (budget = room) */
} ap_limit;

/* What a forbidden allocation or a reservation overdraft does. */
typedef enum {
    AP_ACTION_RAISE = 0, /* refuse it (NULL, a violation); later ones are counted */
    AP_ACTION_ABORT = 1, /* write the diagnostic, then abort() */
    AP_ACTION_WARN = 2,  /* grant it; the region's record says what happened */
    AP_ACTION_COUNT = 3, /* grant it and count it */
} ap_action;

/* For ap_reserve: use the `overdraft` setting of the instance's scope. */
#define AP_ACTION_FROM_SCOPE UINT32_MAX

/* Where an allocation entered the runtime. */
typedef enum {
    AP_DOMAIN_LIBC = 0,      /* the malloc family */
    AP_DOMAIN_PY_ARENA = 1,  /* pymalloc arenas (Python's small objects) */
    AP_DOMAIN_PY_RAW = 2,    /* PyMem_RawMalloc and friends (in-process mode) */
    AP_DOMAIN_PY_MEM = 3,    /* PyMem_Malloc and friends */
    AP_DOMAIN_PY_OBJ = 4,    /* PyObject_Malloc and friends */
    AP_DOMAIN_NUMPY = 5,     /* NumPy's array data handler (in-process mode) */
    AP_DOMAIN_COUNT_ = 6
} ap_domain;

#define AP_DOMAIN_BIT(d) (1u << (d))
#define AP_DOMAINS_ALL ((1u << AP_DOMAIN_COUNT_) - 1)

#define AP_MAX_SCOPES 256
/* Instances active at once (ended ones keep no slot). An instance id is
 * opaque: it names a slot and a generation, so an id kept after its instance
 * ended is never taken for a later instance (ap_get_instance_stats answers
 * AP_ENOENT for it once the slot serves another one). */
#define AP_MAX_INSTANCES 65536
#define AP_SCOPE_NAME_MAX 64 /* including the terminating NUL */
#define AP_MAX_DEPTH 32      /* scopes nested on one thread */

#define AP_SCOPE_PROCESS 0u   /* scope id of the process scope */
#define AP_INSTANCE_PROCESS 0u

/* The violation most recently recorded on the calling thread. */
typedef struct {
    uint32_t size;      /* sizeof(ap_violation) */
    uint32_t reason;    /* ap_reason */
    uint64_t seq;       /* per-thread violation counter, 1 for the first */
    uint32_t scope;     /* scope whose limit refused (or innermost scope) */
    uint32_t instance;  /* instance of that scope */
    uint32_t limit;     /* ap_limit */
    uint32_t domain;    /* ap_domain */
    uint64_t requested; /* bytes asked for */
    int64_t budget;     /* the refusing limit, 0 = none */
    int64_t live;       /* live bytes under that limit when refused */
    uint64_t index;     /* AP_REASON_INJECTED: the injection index (1-based) */
    /* Where the thread's Python code was when the request was refused (see
     * ap_set_frame_probe): the code object and the instruction address of
     * its current frame; 0 when not known. */
    uint64_t py_code;
    uint64_t py_instr;
} ap_violation;

/* Counters of one scope, summed over its instances. */
typedef struct {
    uint32_t size;          /* sizeof(ap_scope_stats) */
    uint32_t mode;          /* ap_mode */
    char name[AP_SCOPE_NAME_MAX];
    int64_t budget;         /* per-instance budget, 0 = none */
    int64_t total_budget;   /* 0 = none */
    int64_t live;           /* bytes live, over all instances, ended ones included */
    int64_t peak;           /* highest `live` seen */
    uint64_t allocations;   /* granted allocations */
    uint64_t violations;    /* refused allocations */
    uint64_t instances;     /* instances entered so far */
    uint64_t active;        /* instances not yet ended */
    int64_t escaped;        /* bytes still live when their instance ended */
    int64_t grace_bytes;    /* bytes granted from the unwind grace allowance */
    int64_t max_instance_peak; /* largest peak of a single instance */
    uint64_t reservations;  /* reservations granted in its instances */
    uint64_t refused_reservations;
    uint64_t overdrafts;    /* allocations that went beyond a reservation */
    int64_t overdraft_bytes; /* bytes beyond reservations */
    uint64_t forbidden;     /* allocations (and frees) seen in forbid regions */
    uint64_t injected;      /* failures injected in its instances */
    uint64_t refused[AP_REASON_COUNT_]; /* `violations` by ap_reason ([0] unused), counted
                                         * for the innermost scope, as `violations` is */
} ap_scope_stats;

/* Counters of one instance. */
typedef struct {
    uint32_t size;        /* sizeof(ap_instance_stats) */
    uint32_t scope;
    uint32_t parent;
    uint32_t ended;       /* 1 once every thread left it */
    int64_t budget;
    int64_t live;
    int64_t peak;
    uint64_t allocations;
    uint64_t violations;
    int64_t escaped;      /* live bytes at the moment it ended */
} ap_instance_stats;

/* Process-wide facts. */
typedef struct {
    uint32_t size;          /* sizeof(ap_process_stats) */
    uint32_t preloaded;     /* 1 if the malloc family is interposed */
    int64_t budget;         /* process budget, 0 = none */
    int64_t live;           /* bytes live through the runtime */
    int64_t peak;
    uint64_t allocations;
    uint64_t violations;
    uint64_t arenas_live;   /* pymalloc arenas currently charged */
    uint64_t foreign_frees; /* frees of blocks the runtime did not hand out */
    uint32_t scopes;        /* number of declared scopes, process included */
    uint32_t arena_hook;    /* 1 if the pymalloc arena hook is installed */
    int64_t grace;          /* unwind grace allowance per thread and instance */
    int32_t report_fd;      /* where diagnostics are written */
    uint32_t reserved;
    int64_t reserve_margin; /* memory reservations leave free on the machine */
} ap_process_stats;

/* --- Version and policy -------------------------------------------------- */

AP_API int ap_abi_version(void);

/* 1 when this copy of the library interposes the process's malloc family. */
AP_API int ap_is_preloaded(void);

/*
 * Replace the policy with a compiled table string (made by the Python side;
 * see docs/internals). Scopes are matched by name: existing ones keep their id
 * and get the new settings, new ones are appended. Nothing changes when the
 * string does not parse; then *error_offset (if not NULL) gets the offset of the
 * first bad character.
 */
AP_API ap_status ap_configure(const char *table, size_t *error_offset);

/* Scope id for a name, or AP_ENOENT. */
AP_API ap_status ap_scope_find(const char *name, uint32_t *scope_id);

/* --- Scope stack (per thread) ---------------------------------------------- */

/* Enter a new instance of `scope_id` on the calling thread. */
AP_API ap_status ap_enter(uint32_t scope_id, uint32_t *instance_id);

/*
 * Give the instance the calling thread just entered (its innermost, from
 * ap_enter()) a per-instance budget of its own, in place of the one copied
 * from its scope: 0 = none. Enclosing budgets still apply. For rerunning a
 * refused task with more room; AP_ESTATE unless `instance_id` is innermost.
 */
AP_API ap_status ap_set_budget(uint32_t instance_id, int64_t budget);

/* ap_enter(), with the calling thread's violation number (ap_violation.seq,
 * 0 before the first) from just before the entry in *violation_seq. */
AP_API ap_status ap_enter_noting(uint32_t scope_id, uint32_t *instance_id, uint64_t *violation_seq);

/*
 * ap_enter() with nothing to take but the status (AP_OK or a negative
 * ap_status), for callers that would allocate to take more (Python through
 * ctypes): whatever they allocate after the entry is the new instance's, and
 * may be refused. The level is marked as the entry of a block, `tag` (any
 * value its caller tells blocks apart by), which ap_exit_tagged() leaves.
 * The violation number from just before the entry is then ap_entry_seq()
 * while the instance is innermost, and ap_exited_seq() right after its exit
 * (the level this thread left most recently); both are 0 or more,
 * AP_ESTATE for ap_entry_seq() outside every instance.
 */
AP_API ap_status ap_enter_marked(uint32_t scope_id, uint32_t tag);
/* The same entry, not marked (left by ap_exit()). */
AP_API ap_status ap_enter_plain(uint32_t scope_id);
AP_API int64_t ap_entry_seq(void);
AP_API int64_t ap_exited_seq(void);

/*
 * Leave the calling thread's innermost level if it is block `tag`'s
 * (ap_enter_marked): as ap_exit(), else AP_EXIT_NOT_INNERMOST and nothing
 * changes (the level is some other entry's: a block entered after it, an
 * attached instance). Levels abandoned below it (ap_abandon) are left with
 * it. ap_exit_marked() leaves the innermost level if it is any block's (for
 * a caller that cannot pass an argument); ap_exit_unmarked() if it is not.
 */
#define AP_EXIT_NOT_INNERMOST 2
AP_API ap_status ap_exit_tagged(uint32_t tag);
AP_API ap_status ap_exit_marked(void);
AP_API ap_status ap_exit_unmarked(void);

/* Mark the innermost level, entered otherwise, as block `tag`'s (in-process
 * mode's checked entry). */
AP_API ap_status ap_mark_innermost(uint32_t tag);

/*
 * An exit that came out of order: the topmost level below the innermost that
 * is block `tag`'s (`marked` non-zero), or that is no block's (`marked` 0),
 * is left as soon as every level above it has been. AP_ENOENT if there is
 * none, AP_ESTATE if it is the innermost (leave it instead).
 */
AP_API ap_status ap_abandon(uint32_t tag, uint32_t marked);

/* Enter an existing, active instance on the calling thread (bind()). */
AP_API ap_status ap_attach(uint32_t instance_id);

/*
 * Keep an active instance alive without entering it, so another thread can
 * attach to it later even if every thread has left it meanwhile (bind()).
 * Every successful ap_hold() needs one ap_release().
 */
AP_API ap_status ap_hold(uint32_t instance_id);
AP_API ap_status ap_release(uint32_t instance_id);

/* Leave the innermost instance of the calling thread. Never allocates.
 * Returns AP_EXIT_REGION instead of AP_OK when the instance was of a forbid
 * scope: its region's record is then available from ap_region_last(). */
#define AP_EXIT_REGION 1
AP_API ap_status ap_exit(void);

/* The calling thread's innermost instance and its nesting depth. */
AP_API ap_status ap_current(uint32_t *instance_id, uint32_t *depth);

/*
 * Coroutine steps (asyncio). A coroutine's scope instances live in its
 * context, not on a thread: each step of its task attaches them to the
 * thread that runs the step and detaches them when the step ends, so the
 * interleaved steps of other tasks, and the event loop between steps, are
 * never charged to them.
 *
 * ap_step_enter attaches `levels` instances, outermost first, as that many
 * ap_attach calls would (the coroutine's own nesting: an instance bound with
 * bind() may have another parent than the one entered before it); *seq gets
 * the thread's violation counter before the step, so a violation recorded
 * later in it is known to be the step's. Each instance must be held
 * (ap_hold) by whoever keeps the coroutine's context. Nothing is attached
 * when one of them cannot be (AP_ESTATE, AP_EFULL).
 *
 * ap_step_leave leaves `levels` instances, innermost first, after checking
 * that the innermost is `instance` and that many are attached: otherwise
 * AP_ESTATE and nothing changes (the step left the stack as it did not find
 * it). With `seq` (what ap_step_enter wrote), it returns AP_STEP_REFUSED
 * instead of AP_OK when the thread recorded a violation during the step, and
 * updates *seq: the step's refusal can then be read with ap_last_violation
 * and kept for the boundary that its MemoryError may reach in a later step
 * of another task (a task spawned in a scope fails; the scope's task sees
 * the error when it next runs). Allocation-free, as ap_exit.
 */
#define AP_STEP_REFUSED 1
AP_API ap_status ap_step_enter(const uint32_t *instances, uint32_t levels, uint64_t *seq);
AP_API ap_status ap_step_leave(uint32_t instance, uint32_t levels, uint64_t *seq);

/* Publish the calling thread's batched counters, so stats are exact for it. */
AP_API void ap_flush(void);

/* --- Violations and statistics ------------------------------------------- */

AP_API ap_status ap_last_violation(ap_violation *out);

/*
 * Where a refusal was made in Python code. The library has no Python.h: the
 * Python package describes how to find a thread's current Python frame in the
 * interpreter it runs on, and every violation then records that frame's code
 * object and instruction (ap_violation.py_code, py_instr), which the frame's
 * traceback entry names when the refusal's exception leaves it. The reads are
 * plain loads of the calling thread's own structures, after `thread_state`
 * (PyGILState_GetThisThreadState, a thread-local read), on the refusal path
 * only.
 */
typedef struct {
    uint32_t size;          /* sizeof(ap_frame_probe) */
    int32_t cframe;         /* offset in the thread state of the pointer to the
                               structure that holds the current frame; -1: the
                               thread state holds it itself */
    int32_t current;        /* offset of the current frame pointer in that structure */
    int32_t code;           /* offset of the code object pointer in a frame */
    int32_t instr;          /* offset of the instruction pointer in a frame */
    void *(*thread_state)(void); /* the calling thread's thread state, or NULL */
} ap_frame_probe;

/* Record where refusals are made from now on, as `probe` says (NULL: stop).
 * Once set, only the same description may be set again (AP_ESTATE). */
AP_API ap_status ap_set_frame_probe(const ap_frame_probe *probe);

/* Read the calling thread's current Python frame as `probe` says, as a
 * refusal would (*code, *instr; 0 when there is none): for checking a
 * description against a frame the caller knows before setting it. */
AP_API ap_status ap_frame_here(const ap_frame_probe *probe, uint64_t *code, uint64_t *instr);

/*
 * Python built-in functions for the calls made on every scope entry and exit.
 *
 * A ctypes call costs about 1,400 instructions whatever the C function does
 * (an argument tuple, libffi's call description made again on each call, the
 * result's conversion); a built-in function with CPython's "fast call"
 * convention costs a tenth of that. The Python package makes such functions
 * (PyCFunction_NewEx, through ctypes) whose C function is one of the adapters
 * below and whose `self` is a Python int holding the address of the ap_
 * function to call. An adapter's name gives that function's signature: after
 * ap_pycall_, its result (s: an ap_status, q: an int64_t), then one letter per
 * argument (u: a uint32_t from a Python int, its low 32 bits; o: any object,
 * passed as the low 32 bits of its address, as Python's id() gives it, a block
 * tag; p: a pointer from a Python int). An adapter converts with the
 * functions of `ap_pyapi`, the only Python it calls: its arguments never
 * allocate, and a status is a small int, which CPython never allocates either.
 * The library still has no Python.h: a Python object is an opaque pointer.
 */
typedef struct {
    uint32_t size;                                  /* sizeof(ap_pyapi) */
    void *(*long_from_long)(long);                  /* PyLong_FromLong */
    void *(*long_from_long_long)(long long);        /* PyLong_FromLongLong */
    unsigned long (*long_as_mask)(void *);          /* PyLong_AsUnsignedLongMask */
    void *(*err_occurred)(void);                    /* PyErr_Occurred */
    void (*err_set_string)(void *, const char *);   /* PyErr_SetString */
    void *type_error;                               /* PyExc_TypeError */
    void (*incref)(void *);                         /* Py_IncRef */
    void (*decref)(void *);                         /* Py_DecRef */
    void *(*call_objargs)(void *, ...);             /* PyObject_CallFunctionObjArgs */
    void *none;                                     /* Py_None */
} ap_pyapi;

/* Set the functions the adapters convert with (before any adapter is called;
 * once set, only the same functions may be set again: AP_ESTATE). */
AP_API ap_status ap_set_pyapi(const ap_pyapi *api);

/* The adapters, as METH_FASTCALL functions (PyObject *self, PyObject *const
 * *args, Py_ssize_t nargs); a wrong number of arguments raises TypeError. */
typedef void *(*ap_pyfastcall)(void *self, void *const *args, ptrdiff_t nargs);
AP_API void *ap_pycall_s(void *self, void *const *args, ptrdiff_t nargs);
AP_API void *ap_pycall_q(void *self, void *const *args, ptrdiff_t nargs);
AP_API void *ap_pycall_s_u(void *self, void *const *args, ptrdiff_t nargs);
AP_API void *ap_pycall_s_o(void *self, void *const *args, ptrdiff_t nargs);
AP_API void *ap_pycall_s_uo(void *self, void *const *args, ptrdiff_t nargs);
AP_API void *ap_pycall_s_uup(void *self, void *const *args, ptrdiff_t nargs);
AP_API void *ap_pycall_s_pup(void *self, void *const *args, ptrdiff_t nargs);

/*
 * Scopes bound to Python modules on Python 3.12+: the sys.monitoring
 * callbacks themselves, as METH_FASTCALL functions (pymonitor.c). Each thread
 * keeps its activations of bound code here, and the code objects of bound
 * modules are found in a table of their addresses that the package fills
 * (ap_mon_bind) when `classify` has matched one. All of it runs with the GIL
 * held, which is what orders the table's writes before its reads.
 */
typedef struct {
    uint32_t size;          /* sizeof(ap_mon_hooks) */
    void *classify;         /* classify(code) -> scope id, or None: not bound */
    void *entry_failed;     /* entry_failed(status, scope id): raises */
    void *leave_raising;    /* leave_raising(scope id, exc): leaves the instance */
    void *released;         /* released(): the last activation ended after ap_mon_release() */
    void *disable;          /* sys.monitoring.DISABLE */
    void *enter;            /* NULL, or enter(scope id): enters the instance
                               instead of ap_enter_plain (raises on failure) */
} ap_mon_hooks;

/* Set the package's functions (a reference to each is the caller's to keep). */
AP_API ap_status ap_mon_set(const ap_mon_hooks *hooks);
/* The code object at `code` belongs to scope `scope_id` (AP_EFULL: the table
 * is full; the code stays unbound). */
AP_API ap_status ap_mon_bind(const void *code, uint32_t scope_id);
/* Forget every bound code object (a new policy is applied). */
AP_API void ap_mon_clear(void);
/* Activations of bound code on every thread. */
AP_API uint64_t ap_mon_inflight(void);
/* Call `released` when the last activation ends (1), or not (0). */
AP_API void ap_mon_release_pending(uint32_t pending);
/* PY_START and PY_RESUME; PY_THROW; PY_RETURN and PY_YIELD; PY_UNWIND. */
AP_API void *ap_mon_start(void *self, void *const *args, ptrdiff_t nargs);
AP_API void *ap_mon_throw(void *self, void *const *args, ptrdiff_t nargs);
AP_API void *ap_mon_leave(void *self, void *const *args, ptrdiff_t nargs);
AP_API void *ap_mon_unwind(void *self, void *const *args, ptrdiff_t nargs);

AP_API ap_status ap_get_scope_stats(uint32_t scope_id, ap_scope_stats *out);
AP_API ap_status ap_get_instance_stats(uint32_t instance_id, ap_instance_stats *out);
AP_API ap_status ap_get_process_stats(ap_process_stats *out);

/* --- Reservations (fallible API) --------------------------------------------
 *
 * A reservation claims `nbytes` of budget up front in the calling thread's
 * innermost instance: it is granted only if the instance, every enclosing
 * instance, their scope totals and the process budget can all take it, and
 * the machine can spare it (cgroup v2 memory.max - memory.current, else
 * MemAvailable, minus the policy's reserve margin: AP_LIMIT_MACHINE), and
 * the bytes are then counted as live at every level. Allocations the thread
 * makes directly in that instance draw on the reservation and are never
 * refused for budget reasons while it lasts; frees of that instance's blocks
 * give room back to it up to its size. Going beyond it is an overdraft,
 * handled by `overdraft` (an ap_action): RAISE refuses the allocation
 * (limit AP_LIMIT_RESERVATION), ABORT aborts, WARN and COUNT decide the excess
 * as an ordinary allocation of the scope's mode and count it. Reservations
 * nest (at most AP_MAX_RESERVATIONS per thread): an inner one draws on the
 * outer one first, and gives its unused bytes back to it. Leaving the
 * instance (ap_exit) releases the reservations made in it.
 */
#define AP_MAX_RESERVATIONS 16

typedef struct {
    uint32_t size;            /* sizeof(ap_reservation) */
    uint32_t instance;        /* instance it was made in */
    int64_t reserved;         /* bytes claimed */
    int64_t left;             /* bytes unused (returned when released) */
    int64_t peak_used;        /* largest amount drawn at once */
    uint64_t overdrafts;      /* allocations beyond it */
    int64_t overdraft_bytes;
    uint64_t first_overdraft; /* size of the first allocation beyond it, 0 = none */
    uint32_t action;          /* ap_action for overdrafts */
    uint32_t refused;         /* overdrafts refused (RAISE) */
    uint64_t serial;          /* per-thread number, 1 for the first */
} ap_reservation;

/*
 * Make a reservation. AP_EREFUSED when a budget cannot take it: then
 * `refusal` (if not NULL) says which, nothing is charged, and nothing is
 * recorded as a violation. A size no allocation could have (more than
 * 2^48 - 2^32 bytes) is refused the same way, as one the machine cannot spare
 * (AP_REASON_OOM, AP_LIMIT_MACHINE). AP_EFULL when AP_MAX_RESERVATIONS are
 * active; AP_EINVAL for a negative size or an unknown overdraft action.
 */
AP_API ap_status ap_reserve(int64_t nbytes, uint32_t overdraft, ap_violation *refusal);

/* Release the innermost reservation; its unused bytes go back. */
AP_API ap_status ap_unreserve(ap_reservation *out);

/* Read the innermost reservation's record without releasing it. */
AP_API ap_status ap_reservation_get(ap_reservation *out);

/* --- Regions: forbid and count allocations (per thread) ---------------------
 *
 * A region watches the allocations (and, with `frees`, the frees) that the
 * calling thread makes through the given domains (AP_DOMAIN_BIT mask, 0 =
 * all). ap_region_enter(AP_ACTION_COUNT, ...) is a plain counter; RAISE
 * refuses the first allocation of the region (reason AP_REASON_FORBIDDEN) and
 * counts the rest, ABORT aborts at the first, WARN counts. Regions nest (at most
 * AP_MAX_REGIONS per thread); every active region sees every event, and
 * the strictest action decides. Entering an instance of a scope declared
 * with `forbid` pushes a region too, popped when that instance is left.
 */
#define AP_MAX_REGIONS 16

typedef struct {
    uint32_t size;          /* sizeof(ap_region) */
    uint32_t action;        /* ap_action */
    uint32_t frees;         /* 1 if frees count as violations too */
    uint32_t domains;       /* AP_DOMAIN_BIT mask watched */
    uint32_t instance;      /* the forbid scope's instance, 0 for API regions */
    uint32_t first_domain;  /* domain of the first allocation */
    uint64_t allocations;   /* allocation requests seen */
    uint64_t frees_seen;    /* frees seen */
    uint64_t bytes;         /* bytes requested by those allocations */
    uint64_t bytes_freed;   /* bytes freed, where the size is known */
    uint64_t first_size;    /* size of the first allocation, 0 = none */
    uint64_t refused;       /* allocations refused by this region */
} ap_region;

AP_API ap_status ap_region_enter(uint32_t action, uint32_t frees, uint32_t domains);

/* Leave the innermost API region (AP_ESTATE if the innermost is a scope's). */
AP_API ap_status ap_region_exit(ap_region *out);

/* The record of the region most recently left on this thread (also forbid
 * scopes' regions, which end in ap_exit). */
AP_API ap_status ap_region_last(ap_region *out);

/* Process-wide census: while at least one census is open, every thread's
 * allocations and frees are counted (at an atomic increment each). */
typedef struct {
    uint32_t size;        /* sizeof(ap_census) */
    uint32_t open;        /* censuses open */
    uint64_t allocations;
    uint64_t frees;
    uint64_t bytes;       /* bytes requested */
    uint64_t bytes_freed;
} ap_census;

AP_API ap_status ap_census_open(void);
AP_API ap_status ap_census_close(void);
/* Monotonic totals since the library loaded (only counted while open). */
AP_API ap_status ap_census_read(ap_census *out);

/* --- Fault injection ---------------------------------------------------------
 *
 * Allocations matching the filters (scope on the chain, domain, size range)
 * are numbered 1, 2, 3, ... in the order they reach the runtime. Index i
 * fails if any trigger picks it: i == nth; start <= i < stop; i % every == 0;
 * or a hash of (seed, i) falls under `probability` (out of 2^32). With
 * AP_INJECT_PERSISTENT, every matching allocation after the first injected
 * one fails too. Injected failures follow the scope's mode, as a budget
 * refusal does (AP_REASON_INJECTED, with the index in the violation).
 */
#define AP_INJECT_PERSISTENT 1u
#define AP_INJECT_ANY_SCOPE UINT32_MAX

typedef struct {
    uint32_t size;        /* sizeof(ap_inject_config) */
    uint32_t flags;       /* AP_INJECT_* */
    uint64_t nth;         /* 0 = off */
    uint64_t start, stop; /* stop == 0: off */
    uint64_t every;       /* 0 = off */
    uint64_t probability; /* out of 2^32, 0 = off */
    uint64_t seed;
    uint64_t min_size;    /* 0 = no lower bound */
    uint64_t max_size;    /* 0 = no upper bound */
    uint32_t scope;       /* scope id, or AP_INJECT_ANY_SCOPE */
    uint32_t domains;     /* AP_DOMAIN_BIT mask, 0 = all */
} ap_inject_config;

typedef struct {
    uint32_t size;        /* sizeof(ap_inject_stats) */
    uint32_t active;
    uint64_t seen;        /* matching allocations so far (the last index) */
    uint64_t injected;    /* failures injected */
    uint64_t first_index; /* 0 = none yet */
    uint64_t last_index;
} ap_inject_stats;

/* Replace the injection settings (NULL turns injection off); counters restart. */
AP_API ap_status ap_inject_set(const ap_inject_config *cfg);
AP_API ap_status ap_inject_get(ap_inject_stats *out);

/* --- Shared objects: library scopes and the libraries report ------------------
 *
 * Every loaded object the runtime has seen calling the malloc family (only
 * while the policy binds libraries, lists raise_only_from, or the report is
 * on) has an entry, numbered from 0 in the order it was first seen; entries
 * stay when the object is unloaded (loaded = 0) and are reused when the same
 * file is loaded again at the same address. While reporting, every
 * allocation is counted to the object whose code called the allocator.
 */
#define AP_LIB_NAME_MAX 96         /* file name (no directory), NUL included */
#define AP_LIB_UNKNOWN UINT32_MAX  /* index of code in no loaded object */

typedef struct {
    uint32_t size;         /* sizeof(ap_lib_stats) */
    uint32_t index;
    char name[AP_LIB_NAME_MAX];
    uint32_t scope;        /* scope bound by `libraries`, 0 = none */
    uint32_t loaded;       /* 0 once unloaded */
    uint64_t bytes;        /* bytes granted while reporting */
    uint64_t allocations;  /* granted allocations while reporting */
    uint64_t failures;     /* allocations that returned NULL while reporting */
} ap_lib_stats;

/* Number of entries (indices 0 .. n-1; AP_LIB_UNKNOWN is always valid). */
AP_API ap_status ap_libs_count(uint32_t *n);
AP_API ap_status ap_lib_get(uint32_t index, ap_lib_stats *out);
/* Count allocations per object (on = 1) and, if fd >= 0, write the table to
 * fd at exit; on = 0 stops counting (the counts stay). */
AP_API ap_status ap_libs_report(uint32_t on, int32_t fd);
/* Index of the loaded object whose code contains `address` (AP_ENOENT: none). */
AP_API ap_status ap_lib_find(const void *address, uint32_t *index);

/* --- Python's small-object allocator ---------------------------------------- */

/*
 * Install the pymalloc arena hook. `get_arena` and `set_arena` are the addresses
 * of PyObject_GetArenaAllocator and PyObject_SetArenaAllocator; the library
 * calls them and nothing else of Python. Must be called with the GIL held.
 */
AP_API ap_status ap_py_install_arena_hook(void *get_arena, void *set_arena);

/* --- Python's allocator domains and NumPy's data handler (hooks_pymem.c) -----
 *
 * `get` and `set` are the addresses of PyMem_GetAllocator and
 * PyMem_SetAllocator; `domain` is CPython's PyMemAllocatorDomain. Every
 * function of this section that takes them must be called with the GIL held.
 * Our wrappers ("layers") wrap the allocator they find and call it with its
 * own ctx; see docs/inprocess.rst for what each mode sees.
 */
#define AP_PYMEM_RAW 0u
#define AP_PYMEM_MEM 1u
#define AP_PYMEM_OBJ 2u
#define AP_PYMEM_BIT(d) (1u << (d))

/* What a domain's layer does. */
typedef enum {
    AP_PYHOOK_OBSERVE = 1,       /* show requests to regions, census, injection */
    AP_PYHOOK_ACCOUNT = 2,       /* charge every block; below it: plain malloc */
    AP_PYHOOK_ACCOUNT_DEBUG = 3, /* the same, below CPython's debug hooks */
} ap_pyhook;

/*
 * Make sure a layer of kind `how` sees the domain's requests (an accounting
 * layer also observes). Harmless when one already does, also below another
 * tool's hook. AP_ESTATE (nothing changed) when the allocator below does not
 * lay out blocks as `how` says; AP_EFULL when the layer table is full.
 */
AP_API ap_status ap_py_hook_domain(void *get, void *set, uint32_t domain, uint32_t how);

/*
 * Take our layers off the top of the domain, each giving back exactly the
 * allocator it found, and stop every layer of the domain from counting.
 * AP_ESTATE when a layer of ours is still called from under another tool's
 * hook: it passes calls through until that tool restores it and a later call
 * finds it on top. Blocks charged by a layer stay valid blocks of the
 * allocator below it, whoever frees them.
 */
AP_API ap_status ap_py_unhook_domain(void *get, void *set, uint32_t domain);

/* Observing layers for the domains in the AP_PYMEM_BIT mask, installed once,
 * the first time something watches Python's allocations. */
AP_API ap_status ap_py_install_domain_hooks(void *get, void *set, uint32_t domains);

/*
 * AP_PYMEM_BIT mask of the domains whose active layer no longer sees requests
 * as far as a cheap check can tell (the allocator in force is neither ours nor
 * one a probe showed leads to ours): e.g. tracemalloc.stop() restored the
 * allocator it found below our layer. ap_py_hook_domain() settles it.
 */
AP_API uint32_t ap_py_hooks_lost(void);

/* ap_py_hooks_lost() into *lost; if it is 0, ap_enter(), else AP_ESTATE
 * without entering (settle the domains, then enter). */
AP_API ap_status ap_py_enter(uint32_t scope_id, uint32_t *instance_id, uint32_t *lost);

/*
 * NumPy's data memory (NEP 49). `previous` is the PyDataMem_Handler of the
 * handler in force; out comes a PyDataMem_Handler that charges array data
 * (AP_DOMAIN_NUMPY) and allocates through `previous`, and the name its capsule
 * must have ("mem_handler", static storage). The same handler is returned for
 * the same `previous`. AP_EFULL after 8 different previous handlers.
 */
AP_API ap_status ap_numpy_handler(const void *previous, void **handler,
                                  const char **capsule_name);

/* Charge (1) or only pass through (0); arrays keep the handler that made them. */
AP_API ap_status ap_numpy_set_active(const void *handler, uint32_t active);

#ifdef __cplusplus
}
#endif
#endif /* ALLOCPOLICY_H */
