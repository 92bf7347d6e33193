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

#define AP_ABI_VERSION 1

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
} ap_reason;

/* Which budget refused, for AP_REASON_BUDGET. */
typedef enum {
    AP_LIMIT_NONE = 0,
    AP_LIMIT_INSTANCE = 1, /* the scope's per-instance `budget` */
    AP_LIMIT_TOTAL = 2,    /* the scope's `total_budget` over live instances */
    AP_LIMIT_PROCESS = 3,  /* the process budget */
} ap_limit;

/* Where an allocation entered the runtime. */
typedef enum {
    AP_DOMAIN_LIBC = 0,      /* the malloc family */
    AP_DOMAIN_PY_ARENA = 1,  /* pymalloc arenas (Python's small objects) */
} ap_domain;

#define AP_MAX_SCOPES 256
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

/* Enter an existing, active instance on the calling thread (bind()). */
AP_API ap_status ap_attach(uint32_t instance_id);

/*
 * Keep an active instance alive without entering it, so another thread can
 * attach to it later even if every thread has left it meanwhile (bind()).
 * Every successful ap_hold() needs one ap_release().
 */
AP_API ap_status ap_hold(uint32_t instance_id);
AP_API ap_status ap_release(uint32_t instance_id);

/* Leave the innermost instance of the calling thread. Never allocates. */
AP_API ap_status ap_exit(void);

/* The calling thread's innermost instance and its nesting depth. */
AP_API ap_status ap_current(uint32_t *instance_id, uint32_t *depth);

/* Publish the calling thread's batched counters, so stats are exact for it. */
AP_API void ap_flush(void);

/* --- Violations and statistics ------------------------------------------- */

AP_API ap_status ap_last_violation(ap_violation *out);
AP_API ap_status ap_get_scope_stats(uint32_t scope_id, ap_scope_stats *out);
AP_API ap_status ap_get_instance_stats(uint32_t instance_id, ap_instance_stats *out);
AP_API ap_status ap_get_process_stats(ap_process_stats *out);

/* --- Python's small-object allocator ---------------------------------------- */

/*
 * Install the pymalloc arena hook. `get_arena` and `set_arena` are the addresses
 * of PyObject_GetArenaAllocator and PyObject_SetArenaAllocator; the library
 * calls them and nothing else of Python. Must be called with the GIL held.
 */
AP_API ap_status ap_py_install_arena_hook(void *get_arena, void *set_arena);

#ifdef __cplusplus
}
#endif
#endif /* ALLOCPOLICY_H */
