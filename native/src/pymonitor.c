/*
 * pymonitor.c - scopes bound to Python modules, on Python 3.12+.
 *
 * The package registers these functions as its sys.monitoring callbacks
 * (allocpolicy/_modules.py). As Python functions they cost more than the call
 * they watch many times over: two Python frames per call of bound code, a
 * thread-local lookup, a dict lookup by id(), a tuple per activation. Here a
 * call into a bound module costs two C calls, a table lookup, one
 * ap_enter_plain and one ap_exit.
 *
 * What runs here, and what the package keeps:
 *   - The first event of a code object this table does not know asks the
 *     package's `classify` (a Python function), which decides from the
 *     module's name, adds a bound code object with ap_mon_bind() and returns
 *     its scope id, or None: the callback returns DISABLE and CPython stops
 *     calling it for that code.
 *   - Each thread keeps a stack of its activations of bound code (nested:
 *     frames on one thread start and end in LIFO order; a generator's yield
 *     ends an activation, its resumption starts one). Only the outermost
 *     activation of a scope enters an instance; the others stay in it.
 *   - An exception leaving the frame that entered an instance is handed to
 *     the package's `leave_raising`, which leaves the instance and converts a
 *     refusal to AllocError, as a task boundary does.
 *
 * Everything runs with the GIL held (sys.monitoring calls its callbacks with
 * it): the code table is written by `classify` and read by callbacks of one
 * thread at a time, and the counter of activations on all threads is a plain
 * integer for the same reason. Nothing here allocates: the table and the
 * stacks are static, and the results returned (None, DISABLE) exist already.
 */
#define _GNU_SOURCE /* MAP_ANONYMOUS, MAP_NORESERVE, madvise */
#include <string.h>
#include <sys/mman.h>

#include "internal.h"

static ap_mon_hooks hooks;

/* ---- Code objects of bound modules, by address ---------------------------
 *
 * Open addressing with linear probing, never deleted from (a new policy
 * clears it whole). The package keeps every code object added alive, so an
 * address names one code object until the table is cleared. At most half
 * full, so that probes stay short. Mapped on the first binding (2 MiB of
 * address space, resident as it fills), and emptied by giving its pages
 * back, so that a process that binds nothing never has it. */
#define CODE_SLOTS (1u << 17)
#define CODE_MAX (CODE_SLOTS / 2)

typedef struct {
    const void *code;
    uint32_t scope; /* scope id + 1; 0 in an empty slot */
} code_slot;

static code_slot *codes;
static uint32_t ncodes;

static inline uint32_t code_hash(const void *code) {
    uint64_t h = (uint64_t)(uintptr_t)code >> 4; /* objects are 16-byte aligned */
    return (uint32_t)((h * 0x9E3779B97F4A7C15ull) >> 47) & (CODE_SLOTS - 1);
}

/* The scope id + 1 of a bound code object, 0 if the table does not know it. */
static inline uint32_t code_scope(const void *code) {
    if (!codes)
        return 0;
    for (uint32_t i = code_hash(code);; i = (i + 1) & (CODE_SLOTS - 1)) {
        if (codes[i].code == code)
            return codes[i].scope;
        if (!codes[i].code)
            return 0;
    }
}

ap_status ap_mon_bind(const void *code, uint32_t scope_id) {
    if (!code || scope_id >= AP_MAX_SCOPES)
        return AP_EINVAL;
    if (!codes) {
        void *m = mmap(NULL, CODE_SLOTS * sizeof *codes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED)
            return AP_EFULL;
        codes = m;
    }
    uint32_t i = code_hash(code);
    for (; codes[i].code; i = (i + 1) & (CODE_SLOTS - 1))
        if (codes[i].code == code) {
            codes[i].scope = scope_id + 1;
            return AP_OK;
        }
    if (ncodes >= CODE_MAX)
        return AP_EFULL;
    codes[i].code = code;
    codes[i].scope = scope_id + 1;
    ncodes++;
    return AP_OK;
}

void ap_mon_clear(void) {
    /* Anonymous private pages read as zeros again after MADV_DONTNEED. */
    if (codes && ncodes && madvise(codes, CODE_SLOTS * sizeof *codes, MADV_DONTNEED) != 0)
        memset(codes, 0, CODE_SLOTS * sizeof *codes);
    ncodes = 0;
}

/* ---- Each thread's activations -------------------------------------------
 *
 * A recursion of one function is one record with a count. Past STACK_MAX
 * records that cannot be merged, further activations are counted in
 * `overflow` and stay in the instances already entered (they enter none; an
 * end event of bound code while it is non-zero ends one of them). */
#define STACK_MAX 64

typedef struct {
    const void *code;
    uint32_t count;   /* activations of `code` in a row, the first included */
    uint16_t scope;   /* scope id */
    uint16_t entered; /* the first of them entered the instance */
} activation;

typedef struct {
    uint32_t n;
    uint32_t overflow;
    uint64_t active[AP_MAX_SCOPES / 64]; /* scopes an activation here entered */
    activation stack[STACK_MAX];
} activations;

static AP__TLS activations mine;
static uint64_t inflight;       /* activations on every thread */
static uint32_t release_pending; /* call `released` when inflight gets to 0 */

uint64_t ap_mon_inflight(void) { return inflight; }

void ap_mon_release_pending(uint32_t pending) { release_pending = pending; }

ap_status ap_mon_set(const ap_mon_hooks *h) {
    if (!h || h->size < sizeof *h || !h->classify || !h->entry_failed || !h->leave_raising ||
        !h->released || !h->disable) /* enter may be NULL */
        return AP_EINVAL;
    hooks = *h;
    hooks.size = sizeof hooks;
    return AP_OK;
}

static inline void *none(void) {
    ap__py.incref(ap__py.none);
    return ap__py.none;
}

static inline void *disable(void) {
    ap__py.incref(hooks.disable);
    return hooks.disable;
}

/* The scope id + 1 of `code`, asking the package about code the table does
 * not know; 0 when not bound, -1 when `classify` raised. */
static int64_t scope_of(void *code) {
    uint32_t scope = code_scope(code);
    if (scope)
        return scope;
    void *res = ap__py.call_objargs(hooks.classify, code, NULL);
    if (!res)
        return -1;
    int64_t found = 0;
    if (res != ap__py.none) {
        unsigned long sid = ap__py.long_as_mask(res);
        found = (sid == (unsigned long)-1 && ap__py.err_occurred()) ? -1 : (int64_t)sid + 1;
    }
    ap__py.decref(res);
    return found;
}

static inline int is_active(const activations *a, uint32_t scope) {
    return a->active[scope / 64] >> (scope % 64) & 1;
}

/* An entry the runtime refused (ScopeCapacityError, ...): the package raises. */
static void *entry_failed(ap_status st, uint32_t scope) {
    void *status = ap__py.long_from_long(st);
    void *sid = status ? ap__py.long_from_long((long)scope) : NULL;
    if (sid) {
        void *res = ap__py.call_objargs(hooks.entry_failed, status, sid, NULL);
        if (res) /* it must raise; if it did not, say so */
            ap__py.decref(res);
        ap__py.decref(sid);
    }
    if (status)
        ap__py.decref(status);
    if (!ap__py.err_occurred())
        ap__py.err_set_string(ap__py.type_error, "allocpolicy: a module-bound scope could not be entered");
    return NULL;
}

/* Start an activation of `code`, bound to `scope`: NULL with an exception
 * set if the instance could not be entered (nothing is recorded then). */
static void *start(void *code, uint32_t scope) {
    activations *a = &mine;
    if (is_active(a, scope)) {
        /* In an instance of the scope that bound code entered: stay in it. */
        activation *top = a->n ? &a->stack[a->n - 1] : NULL;
        if (a->overflow == 0 && top && top->code == code && !top->entered)
            top->count++;
        else if (a->overflow == 0 && a->n < STACK_MAX)
            a->stack[a->n++] = (activation){code, 1, (uint16_t)scope, 0};
        else
            a->overflow++;
        inflight++;
        return none();
    }
    if (a->overflow || a->n == STACK_MAX) {
        /* No record left to note the entry in: stay where the thread is. */
        a->overflow++;
        inflight++;
        return none();
    }
    if (hooks.enter) {
        /* The in-process library: the package's entry, with its checks. */
        void *sid = ap__py.long_from_long((long)scope);
        void *res = sid ? ap__py.call_objargs(hooks.enter, sid, NULL) : NULL;
        if (sid)
            ap__py.decref(sid);
        if (!res)
            return NULL;
        ap__py.decref(res);
    } else {
        ap_status st = ap_enter_plain(scope);
        if (st != AP_OK)
            return entry_failed(st, scope);
    }
    a->active[scope / 64] |= 1ull << (scope % 64);
    a->stack[a->n++] = (activation){code, 1, (uint16_t)scope, 1};
    inflight++;
    return none();
}

/* After the last activation ended on every thread, the package may drop its
 * tool (a policy without bound modules was applied meanwhile). */
static int ended(void) {
    inflight--;
    if (release_pending && !inflight) {
        release_pending = 0;
        void *res = ap__py.call_objargs(hooks.released, NULL);
        if (!res)
            return 0;
        ap__py.decref(res);
    }
    return 1;
}

/* End the innermost activation if it is one of `code`'s: 1 (and *entered,
 * *scope if it was the one that entered an instance), 0 if the thread has
 * none of `code` innermost (it started before its module was bound). */
static int end(void *code, int *entered, uint32_t *scope) {
    activations *a = &mine;
    *entered = 0;
    if (a->overflow) {
        a->overflow--;
        return 1;
    }
    if (!a->n || a->stack[a->n - 1].code != code)
        return 0;
    activation *top = &a->stack[a->n - 1];
    if (top->count > 1) {
        top->count--;
        return 1;
    }
    a->n--;
    if (top->entered) {
        *entered = 1;
        *scope = top->scope;
        a->active[top->scope / 64] &= ~(1ull << (top->scope % 64));
    }
    return 1;
}

static int callback_args(ptrdiff_t nargs, ptrdiff_t expected) {
    return ap__py_arity(nargs, expected, "wrong number of arguments to an allocpolicy monitoring callback");
}

/* PY_START, PY_RESUME (code, offset). */
void *ap_mon_start(void *self, void *const *args, ptrdiff_t nargs) {
    if (!callback_args(nargs, 2))
        return NULL;
    int64_t scope = scope_of(args[0]);
    if (scope < 0)
        return NULL;
    if (scope == 0)
        return disable();
    return start(args[0], (uint32_t)scope - 1);
}

/* PY_THROW (code, offset, exc): cannot be disabled. */
void *ap_mon_throw(void *self, void *const *args, ptrdiff_t nargs) {
    if (!callback_args(nargs, 3))
        return NULL;
    int64_t scope = scope_of(args[0]);
    if (scope < 0)
        return NULL;
    if (scope == 0)
        return none();
    return start(args[0], (uint32_t)scope - 1);
}

/* PY_RETURN, PY_YIELD (code, offset, value). */
void *ap_mon_leave(void *self, void *const *args, ptrdiff_t nargs) {
    if (!callback_args(nargs, 3))
        return NULL;
    int entered;
    uint32_t scope;
    if (!end(args[0], &entered, &scope)) {
        /* Not innermost: code that started before it was bound, or code of
         * no bound module, which is disabled here. */
        int64_t known = scope_of(args[0]);
        if (known < 0)
            return NULL;
        return known ? none() : disable();
    }
    if (entered)
        ap_exit();
    return ended() ? none() : NULL;
}

/* PY_UNWIND (code, offset, exc): cannot be disabled. */
void *ap_mon_unwind(void *self, void *const *args, ptrdiff_t nargs) {
    if (!callback_args(nargs, 3))
        return NULL;
    int entered;
    uint32_t scope;
    if (!end(args[0], &entered, &scope))
        return none();
    if (entered) {
        /* The package leaves the instance, and turns a refusal made in it
         * into AllocError (by raising, which replaces the exception). */
        void *sid = ap__py.long_from_long((long)scope);
        if (!sid) {
            ap_exit();
            ended();
            return NULL;
        }
        void *res = ap__py.call_objargs(hooks.leave_raising, sid, args[2], NULL);
        ap__py.decref(sid);
        if (!ended() || !res) {
            if (res)
                ap__py.decref(res);
            return NULL;
        }
        ap__py.decref(res);
        return none();
    }
    return ended() ? none() : NULL;
}
