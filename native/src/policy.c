/*
 * policy.c - the compiled policy table: parsing and applying it.
 *
 * Python validates the TOML policy and compiles it into a flat string, which
 * reaches the library either through ap_configure() or, for a preloaded
 * library, through the ALLOCPOLICY_TABLE environment variable before any
 * Python code runs. The grammar is deliberately tiny so the parser needs no
 * heap and can run inside the first malloc call:
 *
 *   table   := "v=1" (";" entry)*
 *   entry   := "grace=" N | "fd=" N | "margin=" N     (reserve margin, bytes)
 *            | "process=" MODE ":" N [":overdraft=" ACTION] (":raise_only=" GLOB)*
 *            | "scope=" NAME ":" MODE ":" N ":" N (":" OPTION)*  (budget, total_budget)
 *            | "inject=" TRIGGER ("," TRIGGER)* | "inject=off"
 *            | "libreport=" N | "libreport=off"
 *   OPTION  := "forbid=" ACTION | "forbid=none" | "frees=" ("0"|"1") | "overdraft=" ACTION
 *            | "lib=" GLOB | "raise_only=" GLOB
 *   TRIGGER := ("nth" | "start" | "stop" | "every" | "p" | "seed" | "min" | "max"
 *               | "domains" | "persist") "=" N | "scope=" NAME
 *   MODE    := "raise" | "abort" | "fallible"
 *   ACTION  := "raise" | "abort" | "warn" | "count"
 *   N       := decimal, bytes for sizes, 0 meaning "no limit"
 *   NAME    := [A-Za-z0-9_.-]{1,63}
 *   GLOB    := [A-Za-z0-9_.+*?-]{1,63}   (matched against a shared object's file name)
 *
 * `p` is a probability out of 2^32; `domains` an AP_DOMAIN_BIT mask. A table
 * without an `inject` entry leaves injection as it is (it may have been set
 * through ap_inject_set); `inject=off` turns it off.
 *
 * `lib=` binds the shared objects whose file name matches to the scope;
 * `raise_only=` lists the objects whose refused allocations still get NULL in
 * raise mode (the others abort), for the scope or, on `process`, for every
 * scope without a list of its own (see libscope.c). Every table replaces all
 * of these. `libreport=N` turns the libraries report on, written to
 * descriptor N at exit; a table without it leaves the report as it is.
 *
 * The whole string is parsed into a staging copy first; the live policy is
 * changed only when every entry parsed (bad input changes nothing).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct {
    char name[AP_SCOPE_NAME_MAX];
    uint32_t mode;
    int64_t budget;
    int64_t total_budget;
    uint32_t forbid; /* 0, or 1 + ap_action */
    uint32_t frees;
    uint32_t overdraft;
} staged_scope;

/* A pattern's scope is a staged index + 1 (0 = process) until applied. */

typedef struct {
    int have_grace, have_fd, have_process, have_margin;
    int64_t margin;
    int have_inject, inject_on;
    ap_inject_config inject;
    char inject_scope[AP_SCOPE_NAME_MAX]; /* "" = any */
    int64_t grace;
    int fd;
    uint32_t process_mode;
    uint32_t process_overdraft;
    int64_t process_budget;
    int have_libreport, libreport_fd;
    uint32_t npats;
    ap__lib_pattern pats[AP__MAX_LIB_PATTERNS];
    uint32_t nscopes;
    staged_scope scopes[AP_MAX_SCOPES];
} staged;

typedef struct {
    const char *s;
    const char *pos;
} cursor;

static int take(cursor *c, const char *word) {
    size_t n = strlen(word);
    if (strncmp(c->pos, word, n) != 0)
        return 0;
    c->pos += n;
    return 1;
}

static int number(cursor *c, int64_t *out) {
    int64_t v = 0;
    const char *start = c->pos;
    while (*c->pos >= '0' && *c->pos <= '9') {
        if (v > (INT64_MAX - 9) / 10)
            return 0;
        v = v * 10 + (*c->pos++ - '0');
    }
    *out = v;
    return c->pos != start;
}

static int mode(cursor *c, uint32_t *out) {
    if (take(c, "raise"))
        *out = AP_MODE_RAISE;
    else if (take(c, "abort"))
        *out = AP_MODE_ABORT;
    else if (take(c, "fallible"))
        *out = AP_MODE_FALLIBLE;
    else
        return 0;
    return 1;
}

static int action(cursor *c, uint32_t *out) {
    if (take(c, "raise"))
        *out = AP_ACTION_RAISE;
    else if (take(c, "abort"))
        *out = AP_ACTION_ABORT;
    else if (take(c, "warn"))
        *out = AP_ACTION_WARN;
    else if (take(c, "count"))
        *out = AP_ACTION_COUNT;
    else
        return 0;
    return 1;
}

static int flag(cursor *c, uint32_t *out) {
    int64_t v;
    if (!number(c, &v) || v > 1)
        return 0;
    *out = (uint32_t)v;
    return 1;
}

static int name_char(char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '_' || ch == '.' || ch == '-';
}

static int name(cursor *c, char *out) {
    size_t n = 0;
    while (name_char(*c->pos)) {
        if (n + 1 >= AP_SCOPE_NAME_MAX)
            return 0;
        out[n++] = *c->pos++;
    }
    out[n] = '\0';
    return n > 0 && strcmp(out, "process") != 0;
}

static int glob_char(char ch) {
    return name_char(ch) || ch == '+' || ch == '*' || ch == '?';
}

static int pattern(cursor *c, staged *st, uint32_t scope, uint32_t kind) {
    if (st->npats >= AP__MAX_LIB_PATTERNS)
        return 0;
    ap__lib_pattern *p = &st->pats[st->npats];
    size_t n = 0;
    while (glob_char(*c->pos)) {
        if (n + 1 >= AP__LIB_PATTERN_MAX)
            return 0;
        p->text[n++] = *c->pos++;
    }
    p->text[n] = '\0';
    p->scope = scope;
    p->kind = kind;
    st->npats++;
    return n > 0;
}

static int inject(cursor *c, staged *st) {
    ap_inject_config *ic = &st->inject;
    memset(ic, 0, sizeof *ic);
    ic->size = sizeof *ic;
    ic->scope = AP_INJECT_ANY_SCOPE;
    st->inject_scope[0] = '\0';
    st->have_inject = 1;
    if (take(c, "off")) {
        st->inject_on = 0;
        return 1;
    }
    st->inject_on = 1;
    do {
        static const struct {
            const char *key;
            size_t offset;
        } fields[] = {
            {"nth=", offsetof(ap_inject_config, nth)},
            {"start=", offsetof(ap_inject_config, start)},
            {"stop=", offsetof(ap_inject_config, stop)},
            {"every=", offsetof(ap_inject_config, every)},
            {"p=", offsetof(ap_inject_config, probability)},
            {"seed=", offsetof(ap_inject_config, seed)},
            {"min=", offsetof(ap_inject_config, min_size)},
            {"max=", offsetof(ap_inject_config, max_size)},
        };
        int matched = 0;
        int64_t v;
        for (size_t i = 0; i < sizeof fields / sizeof fields[0] && !matched; i++) {
            if (take(c, fields[i].key)) {
                if (!number(c, &v))
                    return 0;
                *(uint64_t *)((char *)ic + fields[i].offset) = (uint64_t)v;
                matched = 1;
            }
        }
        if (matched)
            continue;
        if (take(c, "domains=")) {
            if (!number(c, &v) || v > AP_DOMAINS_ALL)
                return 0;
            ic->domains = (uint32_t)v;
        } else if (take(c, "persist=")) {
            uint32_t f;
            if (!flag(c, &f))
                return 0;
            ic->flags = f ? AP_INJECT_PERSISTENT : 0;
        } else if (take(c, "scope=")) {
            /* "process" is a valid target here, unlike in scope entries. */
            size_t n = 0;
            while (name_char(*c->pos)) {
                if (n + 1 >= AP_SCOPE_NAME_MAX)
                    return 0;
                st->inject_scope[n++] = *c->pos++;
            }
            st->inject_scope[n] = '\0';
            if (!n)
                return 0;
        } else {
            return 0;
        }
    } while (take(c, ","));
    return ic->probability <= (UINT64_C(1) << 32) && (!ic->stop || ic->stop >= ic->start) &&
           (!ic->max_size || ic->max_size >= ic->min_size);
}

static int parse(const char *table, staged *st, size_t *error_offset) {
    cursor c = {table, table};
    /* Everything but the pattern and scope arrays, which are filled up to
     * their counts. */
    memset(st, 0, offsetof(staged, pats));
    st->npats = 0;
    st->nscopes = 0;
    st->inject.size = sizeof st->inject;
    if (!take(&c, "v=1"))
        goto bad;
    while (*c.pos) {
        if (!take(&c, ";"))
            goto bad;
        if (take(&c, "grace=")) {
            if (!number(&c, &st->grace))
                goto bad;
            st->have_grace = 1;
        } else if (take(&c, "margin=")) {
            if (!number(&c, &st->margin))
                goto bad;
            st->have_margin = 1;
        } else if (take(&c, "fd=")) {
            int64_t fd;
            if (!number(&c, &fd) || fd > 1 << 20)
                goto bad;
            st->fd = (int)fd;
            st->have_fd = 1;
        } else if (take(&c, "process=")) {
            if (!mode(&c, &st->process_mode) || !take(&c, ":") ||
                !number(&c, &st->process_budget))
                goto bad;
            st->process_overdraft = AP_ACTION_COUNT;
            if (take(&c, ":overdraft=") && !action(&c, &st->process_overdraft))
                goto bad;
            while (take(&c, ":raise_only="))
                if (!pattern(&c, st, 0, AP__PAT_RAISE_ONLY))
                    goto bad;
            st->have_process = 1;
        } else if (take(&c, "scope=")) {
            if (st->nscopes >= AP_MAX_SCOPES - 1)
                goto bad;
            staged_scope *sc = &st->scopes[st->nscopes];
            memset(sc, 0, sizeof *sc);
            if (!name(&c, sc->name) || !take(&c, ":") || !mode(&c, &sc->mode) ||
                !take(&c, ":") || !number(&c, &sc->budget) || !take(&c, ":") ||
                !number(&c, &sc->total_budget))
                goto bad;
            sc->overdraft = AP_ACTION_COUNT;
            while (take(&c, ":")) {
                if (take(&c, "forbid=")) {
                    if (take(&c, "none"))
                        sc->forbid = 0;
                    else if (action(&c, &sc->forbid))
                        sc->forbid += 1;
                    else
                        goto bad;
                } else if (take(&c, "frees=")) {
                    if (!flag(&c, &sc->frees))
                        goto bad;
                } else if (take(&c, "overdraft=")) {
                    if (!action(&c, &sc->overdraft))
                        goto bad;
                } else if (take(&c, "lib=")) {
                    if (!pattern(&c, st, st->nscopes + 1, AP__PAT_BIND))
                        goto bad;
                } else if (take(&c, "raise_only=")) {
                    if (!pattern(&c, st, st->nscopes + 1, AP__PAT_RAISE_ONLY))
                        goto bad;
                } else {
                    goto bad;
                }
            }
            st->nscopes++;
        } else if (take(&c, "inject=")) {
            if (!inject(&c, st))
                goto bad;
        } else if (take(&c, "libreport=")) {
            int64_t fd;
            if (take(&c, "off"))
                fd = -1;
            else if (!number(&c, &fd) || fd > 1 << 20)
                goto bad;
            st->libreport_fd = (int)fd;
            st->have_libreport = 1;
        } else {
            goto bad;
        }
    }
    return 1;
bad:
    if (error_offset)
        *error_offset = (size_t)(c.pos - c.s);
    return 0;
}

static _Atomic int configuring;

static uint32_t find(const char *nm) {
    uint32_t n = atomic_load(&ap__nscopes);
    for (uint32_t i = 0; i < n; i++)
        if (strcmp(ap__scopes[i].name, nm) == 0)
            return i;
    return UINT32_MAX;
}

static ap_status apply(const staged *st) {
    /* Count the scopes that would be new before changing anything. */
    uint32_t n = atomic_load(&ap__nscopes), added = 0;
    for (uint32_t i = 0; i < st->nscopes; i++)
        if (find(st->scopes[i].name) == UINT32_MAX)
            added++;
    if (n + added > AP_MAX_SCOPES)
        return AP_EFULL;
    /* The injection target must be a scope of the process once applied. */
    int inject_scope_new = 0;
    if (st->have_inject && st->inject_on && st->inject_scope[0]) {
        if (find(st->inject_scope) == UINT32_MAX) {
            inject_scope_new = 1;
            for (uint32_t i = 0; i < st->nscopes; i++)
                if (strcmp(st->scopes[i].name, st->inject_scope) == 0)
                    inject_scope_new = 0;
            if (inject_scope_new)
                return AP_ENOENT;
        }
    }
    if (st->have_grace)
        atomic_store(&ap__settings.grace, st->grace);
    if (st->have_fd)
        atomic_store(&ap__settings.report_fd, st->fd);
    if (st->have_margin)
        atomic_store(&ap__settings.reserve_margin, st->margin);
    if (st->have_process) {
        atomic_store(&ap__scopes[0].overdraft, st->process_overdraft);
        atomic_store(&ap__scopes[0].mode, st->process_mode);
        atomic_store(&ap__scopes[0].budget, st->process_budget);
    }
    for (uint32_t i = 0; i < st->nscopes; i++) {
        const staged_scope *in = &st->scopes[i];
        uint32_t id = find(in->name);
        int fresh = id == UINT32_MAX;
        if (fresh)
            id = atomic_load(&ap__nscopes);
        ap__scope *sc = &ap__scopes[id];
        if (fresh)
            memcpy(sc->name, in->name, AP_SCOPE_NAME_MAX);
        atomic_store(&sc->mode, in->mode);
        atomic_store(&sc->budget, in->budget);
        atomic_store(&sc->total_budget, in->total_budget);
        atomic_store(&sc->forbid, in->forbid);
        atomic_store(&sc->forbid_frees, in->frees);
        atomic_store(&sc->overdraft, in->overdraft);
        /* Publish the new scope only once it is complete. */
        if (fresh)
            atomic_store(&ap__nscopes, id + 1);
    }
    /* Library patterns name scopes by staged index; they exist now. */
    static ap__lib_pattern pats[AP__MAX_LIB_PATTERNS];
    for (uint32_t i = 0; i < st->npats; i++) {
        pats[i] = st->pats[i];
        if (pats[i].scope)
            pats[i].scope = find(st->scopes[pats[i].scope - 1].name);
    }
    ap__libs_configure(pats, st->npats, st->have_libreport ? st->libreport_fd : -2);
    if (st->have_inject) {
        if (st->inject_on) {
            ap_inject_config ic = st->inject;
            if (st->inject_scope[0])
                ic.scope = find(st->inject_scope);
            ap_inject_set(&ic);
        } else {
            ap_inject_set(NULL);
        }
    }
    return AP_OK;
}

static void lock_configuring(void) {
    int expect = 0;
    while (!atomic_compare_exchange_weak(&configuring, &expect, 1))
        expect = 0;
}

static void unlock_configuring(void) { atomic_store(&configuring, 0); }

ap_status ap_configure(const char *table, size_t *error_offset) {
    /* The staging copy is large; static storage keeps it off small thread
     * stacks, and the `configuring` flag serialises callers. */
    static staged st;
    if (!table)
        return AP_EINVAL;
    lock_configuring();
    ap_status rc = parse(table, &st, error_offset) ? apply(&st) : AP_EPARSE;
    unlock_configuring();
    return rc;
}

/* fork() while another thread is inside ap_configure() would copy the flag
 * set, with nobody in the child to clear it: the child's first configure
 * would spin for ever. The fork waits for the configure in progress instead
 * (it holds no lock that configuring needs), so the child also gets a whole
 * policy, never half of one. Registered from a constructor, not from the
 * bootstrap inside the first malloc: pthread_atfork may allocate. */
__attribute__((constructor)) static void configuring_at_fork(void) {
    pthread_atfork(lock_configuring, unlock_configuring, unlock_configuring);
}

ap_status ap_scope_find(const char *nm, uint32_t *scope_id) {
    if (!nm || !scope_id)
        return AP_EINVAL;
    uint32_t id = find(nm);
    if (id == UINT32_MAX)
        return AP_ENOENT;
    *scope_id = id;
    return AP_OK;
}

void ap__policy_from_environment(void) {
    /* getenv allocates nothing. A malformed table leaves the defaults; the
     * Python side validated it, so this only happens when set by hand, and the
     * `allocpolicy` package re-applies it when it loads and warns. */
    const char *table = getenv("ALLOCPOLICY_TABLE");
    if (table && *table)
        ap_configure(table, NULL);
}
