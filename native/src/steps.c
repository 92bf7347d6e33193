/*
 * steps.c - attaching a coroutine's scope instances for one step of its task.
 *
 * Python keeps the instances a coroutine entered in a context variable (see
 * allocpolicy/_steps.py); every step of its task that has any brackets the
 * step with these two calls. Two calls instead of one ap_attach/ap_exit per
 * level, because each crossing of ctypes costs more than the work done here.
 */
#include "internal.h"

ap_status ap_step_enter(const uint32_t *instances, uint32_t levels, uint64_t *seq) {
    ap__tls_t *t = &ap__tls;
    if (!instances || levels == 0 || levels > AP_MAX_DEPTH)
        return AP_EINVAL;
    if (t->depth + levels > AP_MAX_DEPTH)
        return AP_EFULL;
    if (seq)
        *seq = t->last.seq;
    for (uint32_t i = 0; i < levels; i++) {
        ap_status st = ap_attach(instances[i]);
        if (st != AP_OK) {
            while (i--)
                ap_exit();
            return st;
        }
    }
    return AP_OK;
}

ap_status ap_step_leave(uint32_t instance, uint32_t levels, uint64_t *seq) {
    ap__tls_t *t = &ap__tls;
    /* Checked before anything changes: a step that left the stack otherwise
     * than it found it (an entry without its exit) must not pop someone
     * else's instance. */
    if (t->cur != instance || t->depth < levels)
        return AP_ESTATE;
    while (levels--)
        ap_exit();
    if (seq && *seq != t->last.seq) {
        *seq = t->last.seq;
        return AP_STEP_REFUSED;
    }
    return AP_OK;
}
