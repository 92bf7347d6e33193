/*
 * pycall.c - scope entry and exit as Python built-in functions.
 *
 * Every `with allocpolicy.task()` makes two calls into this library, and every
 * step of a task in a scope two more. Through ctypes each costs about 1,400
 * instructions (an argument tuple, libffi's call description prepared again,
 * the result's conversion), more than the block's Python code and the C
 * function together. These adapters have CPython's METH_FASTCALL signature
 * instead: the Python package wraps each in a built-in function object
 * (PyCFunction_NewEx, reached through ctypes) whose `self` is a Python int
 * holding the address of the ap_ function to call, and CPython calls it with
 * its arguments in an array, at about a tenth of the cost.
 *
 * Without Python.h: a Python object is an opaque pointer here, and the only
 * Python functions called are the conversions of `ap_pyapi`, which the
 * package hands over once. None of them allocates for what passes here:
 * arguments are read, not made, and a status is a small int, which CPython
 * keeps made (the entry's result must not allocate: that would be the new
 * instance's first allocation, and could be refused with the instance
 * entered and nobody to leave it). Only q (an int64 result) may allocate, as
 * its ctypes call did.
 */
#include <string.h>

#include "internal.h"

ap_pyapi ap__py;
/* Set once `ap__py` is written; adapters are only reachable after that (the
 * package makes the function objects once ap_set_pyapi returned). */
static _Atomic int py_set;

ap_status ap_set_pyapi(const ap_pyapi *api) {
    if (!api || api->size < sizeof *api || !api->long_from_long || !api->long_from_long_long ||
        !api->long_as_mask || !api->err_occurred || !api->err_set_string || !api->type_error ||
        !api->incref || !api->decref || !api->call_objargs || !api->none)
        return AP_EINVAL;
    int expect = 0;
    if (atomic_compare_exchange_strong(&py_set, &expect, 1)) {
        ap__py = *api;
        ap__py.size = sizeof ap__py;
        return AP_OK;
    }
    /* A second interpreter's package (or a reload) may only confirm it. */
    return memcmp(&ap__py.long_from_long, &api->long_from_long,
                  sizeof ap__py - offsetof(ap_pyapi, long_from_long))
               ? AP_ESTATE
               : AP_OK;
}

/* Python's (unsigned long)-1 with an exception set is a failed conversion. */
static int to_ulong(void *obj, unsigned long *out) {
    unsigned long v = ap__py.long_as_mask(obj);
    if (v == (unsigned long)-1 && ap__py.err_occurred())
        return 0;
    *out = v;
    return 1;
}

/* 1 if a call of `what` has the `expected` number of arguments, else 0
 * with TypeError set. */
int ap__py_arity(ptrdiff_t nargs, ptrdiff_t expected, const char *what) {
    if (nargs == expected)
        return 1;
    ap__py.err_set_string(ap__py.type_error, what);
    return 0;
}

static int arity(ptrdiff_t nargs, ptrdiff_t expected) {
    return ap__py_arity(nargs, expected, "wrong number of arguments to an allocpolicy runtime call");
}

/* The signatures of the ap_ functions called (the pointer arguments of
 * ap_step_enter and ap_step_leave are passed as void *, the same in the
 * calling convention). */
typedef ap_status (*fn_s)(void);
typedef int64_t (*fn_q)(void);
typedef ap_status (*fn_s_u)(uint32_t);
typedef ap_status (*fn_s_uu)(uint32_t, uint32_t);
typedef ap_status (*fn_s_uup)(uint32_t, uint32_t, void *);
typedef ap_status (*fn_s_pup)(void *, uint32_t, void *);

/* The ap_ function `self` holds the address of, as `var`. */
#define TARGET(type, self, var)              \
    unsigned long var##_addr;                \
    if (!to_ulong((self), &var##_addr))      \
        return NULL;                         \
    type var = (type)(uintptr_t)var##_addr

#define TAG(obj) ((uint32_t)(uintptr_t)(obj))

void *ap_pycall_s(void *self, void *const *args, ptrdiff_t nargs) {
    TARGET(fn_s, self, fn);
    if (!arity(nargs, 0))
        return NULL;
    return ap__py.long_from_long(fn());
}

void *ap_pycall_q(void *self, void *const *args, ptrdiff_t nargs) {
    TARGET(fn_q, self, fn);
    if (!arity(nargs, 0))
        return NULL;
    return ap__py.long_from_long_long(fn());
}

void *ap_pycall_s_u(void *self, void *const *args, ptrdiff_t nargs) {
    TARGET(fn_s_u, self, fn);
    unsigned long a;
    if (!arity(nargs, 1) || !to_ulong(args[0], &a))
        return NULL;
    return ap__py.long_from_long(fn((uint32_t)a));
}

void *ap_pycall_s_o(void *self, void *const *args, ptrdiff_t nargs) {
    TARGET(fn_s_u, self, fn);
    if (!arity(nargs, 1))
        return NULL;
    return ap__py.long_from_long(fn(TAG(args[0])));
}

void *ap_pycall_s_uo(void *self, void *const *args, ptrdiff_t nargs) {
    TARGET(fn_s_uu, self, fn);
    unsigned long a;
    if (!arity(nargs, 2) || !to_ulong(args[0], &a))
        return NULL;
    return ap__py.long_from_long(fn((uint32_t)a, TAG(args[1])));
}

void *ap_pycall_s_uup(void *self, void *const *args, ptrdiff_t nargs) {
    TARGET(fn_s_uup, self, fn);
    unsigned long a, b, c;
    if (!arity(nargs, 3) || !to_ulong(args[0], &a) || !to_ulong(args[1], &b) ||
        !to_ulong(args[2], &c))
        return NULL;
    return ap__py.long_from_long(fn((uint32_t)a, (uint32_t)b, (void *)(uintptr_t)c));
}

void *ap_pycall_s_pup(void *self, void *const *args, ptrdiff_t nargs) {
    TARGET(fn_s_pup, self, fn);
    unsigned long a, b, c;
    if (!arity(nargs, 3) || !to_ulong(args[0], &a) || !to_ulong(args[1], &b) ||
        !to_ulong(args[2], &c))
        return NULL;
    return ap__py.long_from_long(fn((void *)(uintptr_t)a, (uint32_t)b, (void *)(uintptr_t)c));
}
