/*
 * libscope.c - scopes bound to shared objects (`libraries = ["libz.so*"]`),
 * raise_only_from, and the libraries report.
 *
 * What it does
 *   While the policy binds libraries (or lists raise_only_from, or the report
 *   is on), the malloc family's entry points hand their return address to
 *   ap__lib_call(). That address is mapped to the loaded object whose code
 *   contains it. An allocation whose immediate caller is in an object bound to
 *   scope L is governed by L as if the thread had entered an instance of L
 *   nested in its current instance: L's mode decides, L's budget applies and
 *   every enclosing budget still applies. Such instances are created lazily,
 *   one per (current instance, library scope) and thread, cached here, and end
 *   when the thread leaves the instance they are nested in (ap_exit, thread
 *   exit). Frees need no lookup: the block header (or the span) names the instance.
 *
 * Caller lookup
 *   Hit path: a per-thread direct-mapped cache of 64 code pages -> object
 *   index, valid for one `epoch`. No lock, no heap, one shared read of a line
 *   written only when objects are loaded or unloaded.
 *   Miss path: a scan of the object table, read under a sequence counter; when
 *   the address is in no known object, the table is refreshed from
 *   dl_iterate_phdr(), rebuilt only when its dlpi_adds/dlpi_subs counters say
 *   an object was loaded or unloaded since the last build.
 *
 * Locks and deadlocks
 *   dl_iterate_phdr() takes glibc's dl_load_write_lock, a recursive lock, and
 *   nothing else (elf/dl-iteratephdr.c). dlopen allocates while holding the
 *   separate dl_load_lock and takes dl_load_write_lock only to link an object
 *   into the list (_dl_add_to_namespace_list, no allocation inside);
 *   dlclose's _dl_close_worker calls free() with it held, and frees never
 *   look anything up. A thread that already holds it (a malloc from inside
 *   its own dl_iterate_phdr callback) takes it again. Our only lock is the
 *   table writer's flag, and allocations only ever try it, never wait for it:
 *   a thread that finds it taken (say, one allocating from inside another
 *   thread's dl_iterate_phdr callback while that thread's rebuild waits for
 *   the lock) uses the table as it is, so no allocating thread waits on us
 *   while we wait on glibc. Our own callback never allocates. The flag holds
 *   the writer's pid, so a child forked in the middle of a rebuild takes it
 *   over. dl_iterate_phdr() reports the caller's link-map namespace: objects
 *   loaded into another one with dlmopen() count as code in no object.
 *
 * Unloading
 *   Entries are never removed or reused for another object, so an index read
 *   from a stale cache still names valid static storage. A rebuild marks the
 *   objects gone (empty range) and bumps `epoch`, which empties every thread's
 *   cache on its next lookup. dlclose() is interposed to refresh right away,
 *   so the pages of an unloaded object are never attributed to it once
 *   another object is mapped there. An object loaded again (same file name
 *   and load address) gets its old entry back, with its counters.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <link.h>
#include <sched.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define AP__EXPORT __attribute__((visibility("default")))

#define MAX_LIBS 512
#define CACHE_SLOTS 64
#define MAX_CHILDREN 8

_Atomic uint32_t ap__libs_on;

typedef struct {
    _Atomic uintptr_t lo, hi; /* executable range [lo, hi); 0, 0 once unloaded */
    uintptr_t base;           /* load address: with the name, the identity */
    uint32_t seen;            /* build number that last saw it (writer only) */
    _Atomic uint32_t scope;   /* bound scope id, 0 = none */
    char name[AP_LIB_NAME_MAX];
    /* Written on every allocation while reporting: a line of their own. */
    _Alignas(AP__CACHELINE) _Atomic uint64_t bytes;
    _Atomic uint64_t allocations;
    _Atomic uint64_t failures;
} lib_entry;

static lib_entry libs[MAX_LIBS];
static _Atomic uint32_t nlibs;
/* Odd while a writer changes ranges (a sequence lock for the scanners). */
static _Atomic uint32_t seq;
/* Thread caches are valid for one epoch; bumped when objects come or go. */
static _Atomic uint32_t epoch = 1;
/* pid of the process whose thread rebuilds the table, 0 when free. */
static _Atomic int writer;
/* A dlclose() could not refresh (the writer flag was taken): refresh on the
 * next miss before trusting the table. */
static _Atomic int stale;
/* Writer-only state. */
static unsigned long long seen_adds, seen_subs;
static uint32_t builds;
static char exe_name[AP_LIB_NAME_MAX];

/* Patterns in two slots and a pointer flipping between them, so a reader
 * (a refusal deciding raise_only_from) sees one whole set or the other. */
typedef struct {
    uint32_t n;
    ap__lib_pattern p[AP__MAX_LIB_PATTERNS];
} pattern_set;
static pattern_set sets[2];
static _Atomic(pattern_set *) active_set;
static _Atomic int report_fd = -1;
static _Atomic uint32_t counting;
/* Allocations from code that is in no loaded object (generated code). */
static _Atomic uint64_t unknown_bytes, unknown_allocations, unknown_failures;

typedef struct {
    uint32_t epoch;
    uint32_t busy;   /* inside ap__lib_call: nested entry points go straight */
    uint32_t known;  /* the caller below was looked up for this allocation */
    uint32_t caller; /* entry index + 1, 0 = code in no known object */
    uint32_t nchild;
    struct {
        uint32_t parent, scope, id;
    } child[MAX_CHILDREN];
    uint16_t obj[CACHE_SLOTS];
    uintptr_t page[CACHE_SLOTS];
    char note[AP_LIB_NAME_MAX + 96];
} lib_tls;

static AP__TLS lib_tls lt;

/* ---- Glob patterns ------------------------------------------------------------ */

/* `*` any run of characters, `?` one; no heap, no recursion. */
static int glob_match(const char *p, const char *s) {
    const char *star = NULL, *resume = NULL;
    while (*s) {
        if (*p == '?' || (*p && *p != '*' && *p == *s)) {
            p++;
            s++;
        } else if (*p == '*') {
            star = p++;
            resume = s;
        } else if (star) {
            p = star + 1;
            s = ++resume;
        } else {
            return 0;
        }
    }
    while (*p == '*')
        p++;
    return !*p;
}

static uint32_t bound_scope(const pattern_set *ps, const char *name) {
    if (!ps)
        return 0;
    for (uint32_t i = 0; i < ps->n; i++)
        if (ps->p[i].kind == AP__PAT_BIND && glob_match(ps->p[i].text, name))
            return ps->p[i].scope;
    return 0;
}

/* ---- The object table ------------------------------------------------------------ */

static const char *base_name(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static void copy_name(char *out, const char *name) {
    size_t n = strlen(name);
    if (n >= AP_LIB_NAME_MAX)
        n = AP_LIB_NAME_MAX - 1;
    memcpy(out, name, n);
    out[n] = '\0';
}

typedef struct {
    int first;
    int writing;
} build_state;

static void begin_write(build_state *b) {
    b->writing = 1;
    builds++;
    atomic_fetch_add_explicit(&seq, 1, memory_order_acq_rel);
}

/* dl_iterate_phdr callback; runs with dl_load_write_lock held: no malloc. */
static int on_object(struct dl_phdr_info *info, size_t size, void *data) {
    build_state *b = data;
    if (b->first) {
        b->first = 0;
        int counted = size >= offsetof(struct dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs;
        if (counted && builds && !atomic_load(&stale) && info->dlpi_adds == seen_adds &&
            info->dlpi_subs == seen_subs)
            return 1; /* nothing loaded or unloaded since the last build */
        if (counted) {
            seen_adds = info->dlpi_adds;
            seen_subs = info->dlpi_subs;
        }
        begin_write(b);
    }
    uintptr_t lo = UINTPTR_MAX, hi = 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_X))
            continue;
        uintptr_t s = info->dlpi_addr + ph->p_vaddr;
        if (s < lo)
            lo = s;
        if (s + ph->p_memsz > hi)
            hi = s + ph->p_memsz;
    }
    if (hi == 0)
        return 0;
    /* The main program comes first, with an empty name. */
    const char *name = info->dlpi_name && *info->dlpi_name ? base_name(info->dlpi_name) : exe_name;
    uint32_t n = atomic_load_explicit(&nlibs, memory_order_relaxed);
    lib_entry *e = NULL;
    for (uint32_t i = 0; i < n && !e; i++)
        if (libs[i].base == info->dlpi_addr && strncmp(libs[i].name, name, AP_LIB_NAME_MAX - 1) == 0)
            e = &libs[i];
    if (!e) {
        if (n >= MAX_LIBS)
            return 0; /* full: its code counts as unknown */
        e = &libs[n];
        copy_name(e->name, name);
        e->base = info->dlpi_addr;
        atomic_store_explicit(&e->scope,
                              bound_scope(atomic_load(&active_set), e->name), memory_order_relaxed);
        /* Name and identity before the entry becomes visible. */
        atomic_store_explicit(&nlibs, n + 1, memory_order_release);
    }
    e->seen = builds;
    atomic_store_explicit(&e->lo, lo, memory_order_relaxed);
    atomic_store_explicit(&e->hi, hi, memory_order_relaxed);
    return 0;
}

static int try_lock_writer(void) {
    int pid = (int)getpid();
    int held = 0;
    if (atomic_compare_exchange_strong(&writer, &held, pid))
        return 1;
    /* Held by the process we were forked from: nobody here will release it. */
    return held != pid && atomic_compare_exchange_strong(&writer, &held, pid);
}

static void refresh(void) {
    if (!try_lock_writer()) {
        atomic_store(&stale, 1);
        return;
    }
    if (!exe_name[0]) {
        char path[4096];
        ssize_t n = readlink("/proc/self/exe", path, sizeof path - 1);
        path[n > 0 ? n : 0] = '\0';
        copy_name(exe_name, n > 0 ? base_name(path) : "(main program)");
    }
    build_state b = {.first = 1, .writing = 0};
    dl_iterate_phdr(on_object, &b);
    if (b.writing) {
        uint32_t n = atomic_load_explicit(&nlibs, memory_order_relaxed);
        for (uint32_t i = 0; i < n; i++)
            if (libs[i].seen != builds) {
                atomic_store_explicit(&libs[i].lo, 0, memory_order_relaxed);
                atomic_store_explicit(&libs[i].hi, 0, memory_order_relaxed);
            }
        atomic_store(&stale, 0);
        atomic_fetch_add_explicit(&seq, 1, memory_order_acq_rel);
        atomic_fetch_add_explicit(&epoch, 1, memory_order_release);
    }
    atomic_store(&writer, 0);
}

#define SCAN_BUSY UINT32_MAX

/* Entry index + 1 of the object whose code holds `pc`, 0 if none, SCAN_BUSY
 * if a writer kept changing the table. A writer does not wait for anything
 * while the sequence is odd (it already holds glibc's lock), so the wait is
 * short; it is bounded all the same, for a malloc from a signal handler that
 * interrupted the writer on its own thread. */
static uint32_t scan(uintptr_t pc) {
    for (int tries = 0; tries < 4096; tries++) {
        uint32_t s0 = atomic_load_explicit(&seq, memory_order_acquire);
        if (s0 & 1) {
            if (tries >= 64)
                sched_yield();
            continue;
        }
        uint32_t n = atomic_load_explicit(&nlibs, memory_order_acquire);
        uint32_t found = 0;
        for (uint32_t i = 0; i < n; i++) {
            uintptr_t lo = atomic_load_explicit(&libs[i].lo, memory_order_relaxed);
            uintptr_t hi = atomic_load_explicit(&libs[i].hi, memory_order_relaxed);
            if (pc >= lo && pc < hi) {
                found = i + 1;
                break;
            }
        }
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&seq, memory_order_relaxed) == s0)
            return found;
    }
    return SCAN_BUSY;
}

static AP__NOINLINE uint32_t lookup_miss(lib_tls *c, uintptr_t pc) {
    uint32_t e = atomic_load_explicit(&epoch, memory_order_acquire);
    if (c->epoch != e) {
        memset(c->page, 0, sizeof c->page);
        c->epoch = e;
    }
    uint32_t obj = atomic_load(&stale) ? 0 : scan(pc);
    if (!obj || obj == SCAN_BUSY) {
        /* In no object we know: maybe one loaded since the last build. */
        refresh();
        obj = scan(pc);
        uint32_t now = atomic_load_explicit(&epoch, memory_order_acquire);
        if (c->epoch != now) {
            memset(c->page, 0, sizeof c->page);
            c->epoch = now;
        }
        if (obj == SCAN_BUSY)
            return 0; /* unknown this time; not remembered */
    }
    uintptr_t pg = pc >> 12;
    uint32_t h = (uint32_t)(pg ^ (pg >> 6)) & (CACHE_SLOTS - 1);
    c->page[h] = pg;
    c->obj[h] = (uint16_t)obj;
    return obj;
}

/* The hit path: one page compare and one shared read (`epoch`). */
static inline uint32_t lookup(lib_tls *c, uintptr_t pc) {
    uintptr_t pg = pc >> 12;
    uint32_t h = (uint32_t)(pg ^ (pg >> 6)) & (CACHE_SLOTS - 1);
    if (AP__LIKELY(c->page[h] == pg &&
                   c->epoch == atomic_load_explicit(&epoch, memory_order_acquire)))
        return c->obj[h];
    return lookup_miss(c, pc);
}

/* ---- Library instances ---------------------------------------------------------- */

static void drop_child(lib_tls *c, uint32_t i) {
    uint32_t id = c->child[i].id;
    c->child[i] = c->child[--c->nchild];
    ap__close_instance(id);
}

/* The thread's instance of `scope` nested in `parent`, created on first use;
 * AP_INSTANCE_PROCESS when none can be had (instance table full). */
static uint32_t child_for(lib_tls *c, uint32_t parent, uint32_t scope) {
    for (uint32_t i = 0; i < c->nchild; i++)
        if (c->child[i].parent == parent && c->child[i].scope == scope)
            return c->child[i].id;
    uint32_t id = ap__open_instance(scope, parent);
    if (id == AP_INSTANCE_PROCESS)
        return id;
    if (c->nchild == MAX_CHILDREN)
        drop_child(c, 0);
    c->child[c->nchild].parent = parent;
    c->child[c->nchild].scope = scope;
    c->child[c->nchild].id = id;
    c->nchild++;
    return id;
}

void ap__libs_leave(uint32_t instance) {
    lib_tls *c = &lt;
    for (uint32_t i = c->nchild; i-- > 0;)
        if (instance == AP_INSTANCE_PROCESS || c->child[i].parent == instance)
            drop_child(c, i);
}

/*
 * Run one allocation in the library instance `child`. The current instance's
 * batch (allow/mark/limit/pend_n, see internal.h) is set aside, not
 * published: the child starts with `allow` 0, so its allocation takes the
 * exact slow path and is accounted on the spot; what its fast paths leave
 * unpublished (a charge undone after a backend failure) is published to the
 * child's chain before the batch of the current instance comes back.
 */
static void *run_in(ap__tls_t *t, uint32_t child, void *(*fn)(void *), void *arg) {
    uint32_t parent = t->cur;
    int64_t allow = t->allow, mark = t->mark, limit = t->limit;
    uint64_t pend = t->pend_n;
    /* No unwind grace in a library instance: the grace lets Python build and
     * raise its error after a refusal, which happens in the current
     * instance, while a library that checks for NULL and goes on must keep
     * getting NULL. */
    uint32_t grace_inst = t->grace_inst;
    int64_t grace_left = t->grace_left;
    t->cur = child;
    t->allow = t->mark = t->limit = 0;
    t->pend_n = 0;
    void *p = fn(arg);
    if (t->mark != t->allow || t->pend_n)
        ap__publish(t);
    t->cur = parent;
    t->grace_inst = grace_inst;
    t->grace_left = grace_left;
    t->allow = allow;
    t->mark = mark;
    t->limit = limit;
    t->pend_n = pend;
    return p;
}

void *ap__lib_call(void *caller, uint64_t size, void *(*fn)(void *), void *arg) {
    lib_tls *c = &lt;
    /* Nested entry points (realloc calling malloc) belong to the outer call;
     * while bootstrapping, dl_iterate_phdr may not be usable yet. */
    if (c->busy || atomic_load_explicit(&ap__ready, memory_order_acquire) != 2)
        return fn(arg);
    c->busy = 1;
    ap__tls_t *t = &ap__tls;
    uint32_t obj = lookup(c, (uintptr_t)caller);
    c->caller = obj;
    c->known = 1;
    uint32_t scope = obj ? atomic_load_explicit(&libs[obj - 1].scope, memory_order_relaxed) : 0;
    void *p;
    if (scope && scope < atomic_load_explicit(&ap__nscopes, memory_order_relaxed) &&
        ap__inst(t->cur)->scope != scope) {
        uint32_t child = child_for(c, t->cur, scope);
        p = child != AP_INSTANCE_PROCESS ? run_in(t, child, fn, arg) : fn(arg);
    } else {
        p = fn(arg);
    }
    if (AP__UNLIKELY(atomic_load_explicit(&counting, memory_order_relaxed))) {
        _Atomic uint64_t *bytes = obj ? &libs[obj - 1].bytes : &unknown_bytes;
        _Atomic uint64_t *allocs = obj ? &libs[obj - 1].allocations : &unknown_allocations;
        _Atomic uint64_t *fails = obj ? &libs[obj - 1].failures : &unknown_failures;
        if (p) {
            atomic_fetch_add_explicit(bytes, size, memory_order_relaxed);
            atomic_fetch_add_explicit(allocs, 1, memory_order_relaxed);
        } else {
            atomic_fetch_add_explicit(fails, 1, memory_order_relaxed);
        }
    }
    c->known = 0;
    c->caller = 0;
    c->busy = 0;
    return p;
}

/* ---- raise_only_from -------------------------------------------------------------- */

static void note_put(char *buf, size_t *len, size_t cap, const char *s) {
    while (*s && *len + 1 < cap)
        buf[(*len)++] = *s++;
    buf[*len] = '\0';
}

int ap__lib_refusal_aborts(uint32_t scope, const char **note) {
    lib_tls *c = &lt;
    const pattern_set *ps = atomic_load_explicit(&active_set, memory_order_acquire);
    if (!c->known || !ps)
        return 0; /* not a malloc-family call looked up in ap__lib_call */
    int own = 0, process = 0;
    for (uint32_t i = 0; i < ps->n; i++)
        if (ps->p[i].kind == AP__PAT_RAISE_ONLY) {
            own |= ps->p[i].scope == scope;
            process |= ps->p[i].scope == 0;
        }
    if (!own && !process)
        return 0;
    uint32_t list = own ? scope : 0;
    const char *name = c->caller ? libs[c->caller - 1].name : NULL;
    if (name)
        for (uint32_t i = 0; i < ps->n; i++)
            if (ps->p[i].kind == AP__PAT_RAISE_ONLY && ps->p[i].scope == list &&
                glob_match(ps->p[i].text, name))
                return 0;
    size_t len = 0;
    note_put(c->note, &len, sizeof c->note, "mode=raise, but the caller ");
    note_put(c->note, &len, sizeof c->note, name ? name : "(code in no loaded object)");
    note_put(c->note, &len, sizeof c->note, " is not in raise_only_from, aborting");
    *note = c->note;
    return 1;
}

/* ---- Configuration ------------------------------------------------------------------ */

static void update_on(void) {
    const pattern_set *ps = atomic_load(&active_set);
    uint32_t on = (ps && ps->n) || atomic_load(&counting);
    /* While off, dlclose() does not refresh the table: it may name objects
     * that are gone, so it is rebuilt before it is trusted again. */
    if (on && !atomic_exchange(&ap__libs_on, on))
        atomic_store(&stale, 1);
    atomic_store(&ap__libs_on, on);
}

void ap__libs_configure(const ap__lib_pattern *pats, uint32_t n, int fd) {
    static _Atomic uint32_t next_slot;
    pattern_set *ps = &sets[atomic_fetch_add(&next_slot, 1) & 1];
    if (n > AP__MAX_LIB_PATTERNS)
        n = AP__MAX_LIB_PATTERNS;
    memcpy(ps->p, pats, n * sizeof *pats);
    ps->n = n;
    atomic_store_explicit(&active_set, ps, memory_order_release);
    /* Objects already known take their new scope. The writer flag keeps a
     * rebuild from appending meanwhile; it is held only briefly and its
     * holder waits for nothing of ours, so waiting here is safe. */
    while (!try_lock_writer())
        ;
    uint32_t count = atomic_load(&nlibs);
    for (uint32_t i = 0; i < count; i++)
        atomic_store_explicit(&libs[i].scope, bound_scope(ps, libs[i].name), memory_order_relaxed);
    atomic_store(&writer, 0);
    if (fd != -2) {
        atomic_store(&report_fd, fd);
        atomic_store(&counting, fd != -1);
    }
    update_on();
}

/* ---- Statistics and the report -------------------------------------------------------- */

ap_status ap_libs_count(uint32_t *n) {
    if (!n)
        return AP_EINVAL;
    *n = atomic_load(&nlibs);
    return AP_OK;
}

ap_status ap_lib_get(uint32_t index, ap_lib_stats *out) {
    if (!out || out->size < sizeof(uint32_t))
        return AP_EINVAL;
    ap_lib_stats s;
    memset(&s, 0, sizeof s);
    s.size = out->size;
    s.index = index;
    if (index == AP_LIB_UNKNOWN) {
        copy_name(s.name, "(code in no loaded object)");
        s.bytes = atomic_load(&unknown_bytes);
        s.allocations = atomic_load(&unknown_allocations);
        s.failures = atomic_load(&unknown_failures);
    } else {
        if (index >= atomic_load(&nlibs))
            return AP_ENOENT;
        const lib_entry *e = &libs[index];
        memcpy(s.name, e->name, sizeof s.name);
        s.scope = atomic_load(&e->scope);
        s.loaded = atomic_load(&e->hi) != 0;
        s.bytes = atomic_load(&e->bytes);
        s.allocations = atomic_load(&e->allocations);
        s.failures = atomic_load(&e->failures);
    }
    memcpy(out, &s, out->size < sizeof s ? out->size : sizeof s);
    return AP_OK;
}

ap_status ap_libs_report(uint32_t on, int32_t fd) {
    if (on > 1 || fd < -1)
        return AP_EINVAL;
    atomic_store(&report_fd, on ? fd : -1);
    atomic_store(&counting, on);
    update_on();
    return AP_OK;
}

ap_status ap_lib_find(const void *address, uint32_t *index) {
    if (!index)
        return AP_EINVAL;
    refresh();
    uint32_t obj = scan((uintptr_t)address);
    if (!obj || obj == SCAN_BUSY)
        return AP_ENOENT;
    *index = obj - 1;
    return AP_OK;
}

typedef struct {
    char buf[256];
    size_t len;
} row;

static void row_put(row *r, const char *s) { note_put(r->buf, &r->len, sizeof r->buf, s); }

static void row_num(row *r, uint64_t v, size_t width) {
    char digits[24];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t pad = (size_t)n; pad < width; pad++)
        row_put(r, " ");
    char one[2] = {0, 0};
    while (n) {
        one[0] = digits[--n];
        row_put(r, one);
    }
}

static void row_pad(row *r, size_t column) {
    while (r->len < column && r->len + 1 < sizeof r->buf)
        row_put(r, " ");
}

static void row_emit(int fd, const row *r) { ap__write_all(fd, r->buf, r->len); }

static void report_row(int fd, const char *name, uint64_t bytes, uint64_t allocs, uint64_t fails,
                       uint32_t scope) {
    row r = {.len = 0};
    row_put(&r, "  ");
    row_put(&r, name);
    row_pad(&r, 40);
    row_num(&r, bytes, 16);
    row_num(&r, allocs, 13);
    row_num(&r, fails, 10);
    row_put(&r, "  ");
    row_put(&r, scope ? ap__scopes[scope].name : "-");
    row_put(&r, "\n");
    row_emit(fd, &r);
}

/* "PID (COMMAND)" of this process: every process of a command's tree writes
 * its report to the same descriptor, and each must say whose it is. Read with
 * open/read only (the report runs at exit, without heap or stdio); the
 * command is truncated to what the row holds. */
static void put_process(row *r) {
    row_num(r, (uint64_t)getpid(), 0);
    char cmd[128];
    ssize_t n = -1;
    int fd = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        do
            n = read(fd, cmd, sizeof cmd - 1);
        while (n < 0 && errno == EINTR);
        close(fd);
    }
    if (n <= 0)
        return;
    while (n > 0 && cmd[n - 1] == '\0')
        n--; /* the NUL that ends the last argument */
    for (ssize_t i = 0; i < n; i++)
        if (cmd[i] == '\0' || cmd[i] == '\n')
            cmd[i] = ' '; /* arguments are NUL-separated; one row is one line */
    cmd[n] = '\0';
    row_put(r, " (");
    row_put(r, cmd);
    row_put(r, n == (ssize_t)sizeof cmd - 1 ? "...)" : ")");
}

/* At exit: the objects that allocated, most bytes first. Uses no heap (the
 * allocator may be half torn down by now) and no stdio. */
__attribute__((destructor)) static void write_report(void) {
    int fd = atomic_load(&report_fd);
    if (fd < 0 || !atomic_load(&counting))
        return;
    int saved = errno;
    row title = {.len = 0};
    row_put(&title, "allocpolicy: allocations by shared object (the caller of malloc) in process ");
    put_process(&title);
    row_put(&title, "\n");
    row_emit(fd, &title);
    row head = {.len = 0};
    row_put(&head, "  library");
    row_pad(&head, 40);
    row_put(&head, "           bytes  allocations  failures  scope\n");
    row_emit(fd, &head);
    uint32_t n = atomic_load(&nlibs);
    static uint8_t done[MAX_LIBS];
    for (;;) {
        uint32_t best = UINT32_MAX;
        uint64_t most = 0;
        for (uint32_t i = 0; i < n; i++) {
            uint64_t b = atomic_load(&libs[i].bytes);
            uint64_t a = atomic_load(&libs[i].allocations) + atomic_load(&libs[i].failures);
            if (!done[i] && a && (best == UINT32_MAX || b > most)) {
                best = i;
                most = b;
            }
        }
        if (best == UINT32_MAX)
            break;
        done[best] = 1;
        const lib_entry *e = &libs[best];
        report_row(fd, e->name, atomic_load(&e->bytes), atomic_load(&e->allocations),
                   atomic_load(&e->failures), atomic_load(&e->scope));
    }
    if (atomic_load(&unknown_allocations) || atomic_load(&unknown_failures))
        report_row(fd, "(code in no loaded object)", atomic_load(&unknown_bytes),
                   atomic_load(&unknown_allocations), atomic_load(&unknown_failures), 0);
    errno = saved;
}

/* ---- dlclose ------------------------------------------------------------------------ */

/* Refresh as soon as an object may be gone, so its code pages, if another
 * object is mapped there, are never attributed to it from a thread's cache. */
AP__EXPORT int dlclose(void *handle) {
    static int (*_Atomic next)(void *);
    int (*fn)(void *) = atomic_load(&next);
    if (!fn) {
        fn = (int (*)(void *))dlsym(RTLD_NEXT, "dlclose");
        atomic_store(&next, fn);
    }
    int rc = fn(handle);
    if (atomic_load_explicit(&ap__libs_on, memory_order_relaxed))
        refresh();
    return rc;
}
