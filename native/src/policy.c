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
 *   entry   := "grace=" N | "fd=" N | "process=" MODE ":" N
 *            | "scope=" NAME ":" MODE ":" N ":" N      (budget, total_budget)
 *   MODE    := "raise" | "abort" | "fallible"
 *   N       := decimal bytes, 0 meaning "no limit"
 *   NAME    := [A-Za-z0-9_.-]{1,63}
 *
 * The whole string is parsed into a staging copy first; the live policy is
 * changed only when every entry parsed (bad input changes nothing).
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct {
    char name[AP_SCOPE_NAME_MAX];
    uint32_t mode;
    int64_t budget;
    int64_t total_budget;
} staged_scope;

typedef struct {
    int have_grace, have_fd, have_process;
    int64_t grace;
    int fd;
    uint32_t process_mode;
    int64_t process_budget;
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

static int parse(const char *table, staged *st, size_t *error_offset) {
    cursor c = {table, table};
    memset(st, 0, offsetof(staged, scopes));
    if (!take(&c, "v=1"))
        goto bad;
    while (*c.pos) {
        if (!take(&c, ";"))
            goto bad;
        if (take(&c, "grace=")) {
            if (!number(&c, &st->grace))
                goto bad;
            st->have_grace = 1;
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
            st->have_process = 1;
        } else if (take(&c, "scope=")) {
            if (st->nscopes >= AP_MAX_SCOPES - 1)
                goto bad;
            staged_scope *sc = &st->scopes[st->nscopes];
            if (!name(&c, sc->name) || !take(&c, ":") || !mode(&c, &sc->mode) ||
                !take(&c, ":") || !number(&c, &sc->budget) || !take(&c, ":") ||
                !number(&c, &sc->total_budget))
                goto bad;
            st->nscopes++;
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
    if (st->have_grace)
        atomic_store(&ap__settings.grace, st->grace);
    if (st->have_fd)
        atomic_store(&ap__settings.report_fd, st->fd);
    if (st->have_process) {
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
        /* Publish the new scope only once it is complete. */
        if (fresh)
            atomic_store(&ap__nscopes, id + 1);
    }
    return AP_OK;
}

ap_status ap_configure(const char *table, size_t *error_offset) {
    /* The staging copy is large; static storage keeps it off small thread
     * stacks, and the `configuring` flag serialises callers. */
    static staged st;
    if (!table)
        return AP_EINVAL;
    int expect = 0;
    while (!atomic_compare_exchange_weak(&configuring, &expect, 1))
        expect = 0;
    ap_status rc = parse(table, &st, error_offset) ? apply(&st) : AP_EPARSE;
    atomic_store(&configuring, 0);
    return rc;
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
