/*
 * report.c - the abort diagnostic.
 *
 * Async-signal-safe and allocation-free: it runs inside malloc, possibly with
 * the allocator's own state half-updated or in a signal handler. It formats
 * into a stack buffer with hand-written integer conversion and writes it with
 * one write(2), preserving errno. Nothing here calls stdio, malloc or Python.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

typedef struct {
    char buf[640];
    size_t len;
} line;

static void put(line *l, const char *s) {
    while (*s && l->len < sizeof l->buf - 1)
        l->buf[l->len++] = *s++;
}

static void put_u64(line *l, uint64_t v) {
    char digits[24];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n && l->len < sizeof l->buf - 1)
        l->buf[l->len++] = digits[--n];
}

static void put_i64(line *l, int64_t v) {
    if (v < 0) {
        put(l, "-");
        put_u64(l, (uint64_t)0 - (uint64_t)v);
    } else {
        put_u64(l, (uint64_t)v);
    }
}

static const char *reason_word(uint32_t reason) {
    switch (reason) {
    case AP_REASON_BUDGET: return "budget";
    case AP_REASON_OOM: return "oom";
    case AP_REASON_INJECTED: return "injected";
    case AP_REASON_FORBIDDEN: return "forbidden";
    default: return "none";
    }
}

static const char *limit_word(uint32_t limit) {
    switch (limit) {
    case AP_LIMIT_INSTANCE: return "budget";
    case AP_LIMIT_TOTAL: return "total_budget";
    case AP_LIMIT_PROCESS: return "process budget";
    case AP_LIMIT_RESERVATION: return "reservation";
    case AP_LIMIT_MACHINE: return "machine";
    default: return "budget";
    }
}

/* write(2) all of it, resumed after EINTR or a short write; errno kept. */
void ap__write_all(int fd, const char *p, size_t left) {
    int saved = errno;
    while (left) {
        ssize_t w = write(fd, p, left);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        p += w;
        left -= (size_t)w;
    }
    errno = saved;
}

/* One write of the whole line. */
static void emit(const line *l) {
    ap__write_all(atomic_load_explicit(&ap__settings.report_fd, memory_order_relaxed), l->buf,
                  l->len);
}

static void report_denial(const ap_violation *v, const char *action) {
    line l = {.len = 0};
    const ap__instance *cur = ap__inst(ap__tls.cur);
    put(&l, "allocpolicy: allocation refused in scope '");
    put(&l, ap__scopes[cur->scope].name);
    put(&l, "' (instance ");
    put_u64(&l, ap__tls.cur);
    put(&l, "): reason=");
    put(&l, reason_word(v->reason));
    put(&l, " requested=");
    put_u64(&l, v->requested);
    put(&l, " bytes");
    if (v->reason == AP_REASON_BUDGET) {
        put(&l, "; ");
        put(&l, limit_word(v->limit));
        put(&l, " of scope '");
        put(&l, ap__scopes[v->scope].name);
        put(&l, "'=");
        put_i64(&l, v->budget);
        put(&l, " live=");
        put_i64(&l, v->live);
    } else if (v->reason == AP_REASON_INJECTED) {
        put(&l, "; injected failure #");
        put_u64(&l, v->index);
        put(&l, " live=");
        put_i64(&l, v->live);
    } else {
        put(&l, "; live=");
        put_i64(&l, v->live);
    }
    put(&l, "; ");
    put(&l, action);
    put(&l, "\n");
    emit(&l);
}

/* "<what><p in hex><why>", then abort; async-signal-safe like every report. */
__attribute__((noreturn)) static void abort_about_block(const char *what, const void *p,
                                                        const char *why) {
    line l = {.len = 0};
    put(&l, what);
    char hex[17];
    uintptr_t a = (uintptr_t)p;
    for (int i = 15; i >= 0; i--, a >>= 4)
        hex[i] = "0123456789abcdef"[a & 15];
    hex[16] = '\0';
    put(&l, hex);
    put(&l, why);
    emit(&l);
    abort();
}

void ap__abort_double_free(const void *p) {
    abort_about_block("allocpolicy: double free of the block at 0x", p,
                      " (it was freed already); aborting\n");
}

void ap__abort_invalid_free(const void *p) {
    abort_about_block("allocpolicy: free of 0x", p,
                      ", which is not the start of a block; aborting\n");
}

void ap__abort_with(const ap_violation *v) { ap__abort_noted(v, "mode=abort, aborting"); }

void ap__abort_noted(const ap_violation *v, const char *note) {
    ap__tls_t *t = &ap__tls;
    if (!t->in_report) {
        t->in_report = 1;
        report_denial(v, note);
    }
    /* SIGABRT: faulthandler (enabled by the Python package) prints the Python
     * traceback of every thread next. */
    abort();
}
