/*
 * hooks_cxx.c - the C++ allocation functions, exported for LD_PRELOAD.
 *
 * Every replaceable operator new and delete of the C++ standard, under its
 * Itanium C++ ABI name: plain, array, nothrow, aligned (std::align_val_t),
 * sized delete and their combinations. libstdc++'s own operator new calls
 * malloc, so over glibc it was governed through our malloc already; but
 * jemalloc and mimalloc export their own, which come before libstdc++'s in
 * symbol lookup when preloaded behind us and take memory from the backend
 * directly, so every C++ allocation escaped the budgets there. Exporting
 * the whole family ourselves governs it the same way over every backend.
 *
 * new takes the caller's address (for library scopes) and goes to
 * ap__alloc_for, the malloc family's own path; delete goes to ap__release,
 * free's. The sizes and alignments delete is given are not needed: the block
 * header, or the span a small block is in, knows both.
 *
 * The library is C and links no C++ runtime: a C program under the preload
 * must not load one, and which one a program uses (libstdc++, libc++) is its
 * own choice. Only a refused allocation needs it: the standard's throwing new
 * calls the installed std::new_handler and retries while there is one, then
 * throws std::bad_alloc ([new.delete.single]). Both are functions of the C++
 * runtime that the calling code uses, looked up by name when a refusal
 * happens; nothing on the allocation path depends on them.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>

#include "internal.h"

/* ---- The C++ runtime, found on a refusal ------------------------------------ */

typedef void (*cxx_handler)(void);

/* Names in libstdc++ and in libc++ (its inline namespace std::__1). */
static const char *const get_new_handler_names[] = {"_ZSt15get_new_handlerv", NULL};
static const char *const throw_bad_alloc_names[] = {"_ZSt17__throw_bad_allocv",
                                                    "_ZNSt3__117__throw_bad_allocEv", NULL};

/* A failed dlsym or dlopen keeps its message on the heap, charged to the
 * scope that refused, until dlerror() has returned it and is called once
 * more. (The caller's own pending dlerror() message, if any, goes too.) */
static void forget_dl_error(void) {
    dlerror();
    dlerror();
}

static void *lookup_in(void *handle, const char *const *names) {
    void *f = NULL;
    int missed = 0;
    for (; *names && !f; names++)
        missed |= (f = dlsym(handle, *names)) == NULL;
    if (missed)
        forget_dl_error();
    return f;
}

/*
 * The runtime function named by `names`, for the code at `caller`: among the
 * dependencies of the calling object (dlsym on its handle searches them), or
 * else in the global scope. The calling object first, because a C++ runtime
 * loaded with RTLD_LOCAL, as the dependency of a Python extension module is,
 * is not in the global scope. Looked up on every refusal, not kept: the
 * calling code keeps its runtime loaded while it runs, but nothing would keep
 * a remembered one from being unloaded later, and pinning it with
 * RTLD_NODELETE allocates (charged to whatever scope refused). A lookup
 * leaves nothing allocated.
 */
static void *runtime_function(void *caller, const char *const *names) {
    Dl_info info;
    if (dladdr(caller, &info) && info.dli_fname && info.dli_fname[0]) {
        void *handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
        if (handle) {
            void *f = lookup_in(handle, names);
            dlclose(handle); /* drops the reference RTLD_NOLOAD took */
            if (f)
                return f;
        } else {
            forget_dl_error();
        }
    }
    /* The main program (dladdr names it ""), or code that is no C++. */
    return lookup_in(RTLD_DEFAULT, names);
}

static cxx_handler new_handler(void *caller) {
    cxx_handler (*get)(void) = (cxx_handler(*)(void))runtime_function(caller, get_new_handler_names);
    return get ? get() : NULL;
}

__attribute__((noreturn)) static void throw_bad_alloc(void *caller) {
    void (*thrower)(void) = (void (*)(void))runtime_function(caller, throw_bad_alloc_names);
    if (thrower)
        thrower();
    /* C++ code called operator new, yet no C++ runtime can be found to throw
     * (e.g. one linked statically and not exported). Returning NULL from a
     * throwing new would crash later, somewhere else. */
    ap__abort_noted(&ap__tls.last, "operator new was refused and no C++ runtime was found "
                                   "to throw std::bad_alloc, aborting");
}

/*
 * A refused operator new. The throwing forms call the new_handler and retry
 * while one is installed, then throw std::bad_alloc; the handler may itself
 * throw, which unwinds through these C frames (the library is built with
 * unwind tables for that, see the Makefile).
 *
 * The nothrow forms return NULL without calling the handler. The standard
 * has them call the throwing form and turn its exception into NULL, but C
 * cannot catch: a handler that throws (as many do, once they have nothing
 * left to free) would carry the exception out of a function its callers know
 * cannot throw, into std::terminate. Returning NULL is what those callers
 * are written for; a handler that could have freed memory is not asked.
 */
static AP__NOINLINE void *new_refused(void *caller, size_t size, size_t align, int nothrow) {
    if (nothrow)
        return NULL;
    for (;;) {
        cxx_handler handler = new_handler(caller);
        if (!handler)
            throw_bad_alloc(caller);
        handler();
        void *p = ap__alloc_for(caller, size, align);
        if (p)
            return p;
    }
}

/* ---- The entry points, generated ------------------------------------------- */

/* Mangled name, parameters, the alignment argument (0: none), nothrow. */
#define AP__CXX_NEW_FUNCTIONS(X)                                                           \
    X(_Znwm, (size_t size), 0, 0)                                                          \
    X(_Znam, (size_t size), 0, 0)                                                          \
    X(_ZnwmRKSt9nothrow_t, (size_t size, const void *tag), 0, 1)                           \
    X(_ZnamRKSt9nothrow_t, (size_t size, const void *tag), 0, 1)                           \
    X(_ZnwmSt11align_val_t, (size_t size, size_t align), align, 0)                         \
    X(_ZnamSt11align_val_t, (size_t size, size_t align), align, 0)                         \
    X(_ZnwmSt11align_val_tRKSt9nothrow_t, (size_t size, size_t align, const void *tag),    \
      align, 1)                                                                            \
    X(_ZnamSt11align_val_tRKSt9nothrow_t, (size_t size, size_t align, const void *tag),    \
      align, 1)

/* Mangled name, parameters. */
#define AP__CXX_DELETE_FUNCTIONS(X)                                                        \
    X(_ZdlPv, (void *p))                                                                   \
    X(_ZdaPv, (void *p))                                                                   \
    X(_ZdlPvRKSt9nothrow_t, (void *p, const void *tag))                                    \
    X(_ZdaPvRKSt9nothrow_t, (void *p, const void *tag))                                    \
    X(_ZdlPvm, (void *p, size_t size))                                                     \
    X(_ZdaPvm, (void *p, size_t size))                                                     \
    X(_ZdlPvSt11align_val_t, (void *p, size_t align))                                      \
    X(_ZdaPvSt11align_val_t, (void *p, size_t align))                                      \
    X(_ZdlPvSt11align_val_tRKSt9nothrow_t, (void *p, size_t align, const void *tag))       \
    X(_ZdaPvSt11align_val_tRKSt9nothrow_t, (void *p, size_t align, const void *tag))       \
    X(_ZdlPvmSt11align_val_t, (void *p, size_t size, size_t align))                        \
    X(_ZdaPvmSt11align_val_t, (void *p, size_t size, size_t align))

/* Declared with their visibility, then defined, from the same lists. */
#define AP__X(name, params, align, nothrow) AP__EXPORT void *name params;
AP__CXX_NEW_FUNCTIONS(AP__X)
#undef AP__X
#define AP__X(name, params) AP__EXPORT void name params;
AP__CXX_DELETE_FUNCTIONS(AP__X)
#undef AP__X

#define AP__X(name, params, align, nothrow)                                                \
    void *name params {                                                                    \
        void *p = ap__alloc_for(AP__CALLER(), size, align);                                \
        if (AP__UNLIKELY(!p))                                                              \
            p = new_refused(AP__CALLER(), size, align, nothrow);                           \
        return p;                                                                          \
    }
AP__CXX_NEW_FUNCTIONS(AP__X)
#undef AP__X

#define AP__X(name, params)                                                                \
    void name params { ap__release(p); }
AP__CXX_DELETE_FUNCTIONS(AP__X)
#undef AP__X
