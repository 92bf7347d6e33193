/*
 * pyframe.c - where in Python code a refusal was made.
 *
 * A task boundary must report as AllocError only the exception that a refusal
 * caused, not a later one that C code raised for another reason after the
 * program caught the refusal and went on. CPython raises the refusal's
 * exception at the instruction that was running when the allocation was
 * refused, and the innermost entry of its traceback names that frame's code
 * and instruction. So record() notes both, read from the calling thread's own
 * interpreter structures as the Python package described them
 * (ap_set_frame_probe, checked with ap_frame_here against a frame it knows).
 *
 * What the refusal path does here: one call that reads a thread-local
 * (PyGILState_GetThisThreadState), and three or four loads of the thread's
 * own structures, which only this thread changes (also while it runs without
 * the GIL: its frames stay as they are). No allocation, no lock, nothing else
 * of the interpreter's.
 */
#include "internal.h"

static ap_frame_probe probe;
/* Set once `probe` is written (release), read before it (acquire). */
static _Atomic int probing;

/* With `checking` (a description not yet trusted), the structure that holds
 * the current frame must be where CPython keeps it: in the thread state, or on
 * this thread's stack, in the frame of the interpreter's loop a little above
 * this call. Otherwise nothing is read through it. */
static int plausible_holder(const char *ts, const char *holder) {
    const char *here = __builtin_frame_address(0);
    return (holder >= ts && holder < ts + 4096) ||
           (holder > here && holder - here < ((ptrdiff_t)1 << 20));
}

static int read_frame(const ap_frame_probe *p, uint64_t *code, uint64_t *instr, int checking) {
    *code = *instr = 0;
    const char *ts = p->thread_state ? p->thread_state() : NULL;
    if (!ts)
        return 0;
    const char *holder = ts;
    if (p->cframe >= 0) {
        holder = *(const char *const *)(ts + p->cframe);
        if (!holder || (checking && !plausible_holder(ts, holder)))
            return 0;
    }
    const char *frame = *(const char *const *)(holder + p->current);
    if (!frame)
        return 0;
    *code = (uint64_t)(uintptr_t) * (void *const *)(frame + p->code);
    *instr = (uint64_t)(uintptr_t) * (void *const *)(frame + p->instr);
    return 1;
}

static int valid(const ap_frame_probe *p) {
    return p && p->size >= sizeof *p && p->thread_state && p->cframe >= -1 && p->current >= 0 &&
           p->code >= 0 && p->instr >= 0;
}

ap_status ap_set_frame_probe(const ap_frame_probe *p) {
    if (!p) {
        atomic_store_explicit(&probing, 0, memory_order_relaxed);
        return AP_OK;
    }
    if (!valid(p))
        return AP_EINVAL;
    static _Atomic int written;
    int expect = 0;
    if (atomic_compare_exchange_strong(&written, &expect, 1)) {
        probe = *p;
        probe.size = sizeof probe;
    } else if (probe.cframe != p->cframe || probe.current != p->current ||
               probe.code != p->code || probe.instr != p->instr ||
               probe.thread_state != p->thread_state) {
        /* Readers may be using the first description: it never changes. */
        return AP_ESTATE;
    }
    atomic_store_explicit(&probing, 1, memory_order_release);
    return AP_OK;
}

ap_status ap_frame_here(const ap_frame_probe *p, uint64_t *code, uint64_t *instr) {
    if (!valid(p) || !code || !instr)
        return AP_EINVAL;
    read_frame(p, code, instr, 1);
    return AP_OK;
}

void ap__python_where(ap_violation *v) {
    if (!atomic_load_explicit(&probing, memory_order_acquire) ||
        !read_frame(&probe, &v->py_code, &v->py_instr, 0))
        v->py_code = v->py_instr = 0;
}
