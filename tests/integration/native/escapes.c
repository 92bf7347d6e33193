/*
 * escapes.c - instances that end with memory still live, and stale ids.
 *
 *   escapes keep N     needs the table "v=1;process=raise:0;scope=server:raise:0:0;
 *                      scope=request:raise:1048576:0;scope=sub:raise:0:0"
 *       N instances of `request`, each keeping one 600-byte block past its
 *       end (a server caching one result per request): first at the process
 *       root, then inside one long-lived `server` instance. Every entry must
 *       succeed, and the counts must be exact: the scope's `escaped` grows by
 *       600 per instance, its live total stays 0 (no request is active), the
 *       server instance and the process hold every kept block. Then another
 *       thread frees all of them and every count is back at its baseline.
 *   escapes nested N [DEPTH [FANOUT]]
 *                      (the table also declares scope=sub:raise:0:0, and
 *                      scope=inner and scope=leaf for more levels) N
 *                      requests, each entering FANOUT chains (default 1) of
 *                      the DEPTH - 1 levels below it (sub, inner, leaf;
 *                      default DEPTH 2: sub alone), one after the other, and
 *                      keeping one 600-byte block made in the innermost past
 *                      every end (a sub-task's result kept in a cache): as
 *                      exact, and every entry must succeed. The blocks are
 *                      then freed from another thread while a new chain of
 *                      the same scopes is active, which must keep exactly
 *                      its own bytes.
 *   escapes zero       an instance whose only block is malloc(0) ends; its
 *                      slot then serves other instances. Its id must not be
 *                      taken for theirs (ap_get_instance_stats: AP_ENOENT),
 *                      and freeing the block must leave their counts alone.
 *
 * Prints "check ..." lines and "RESULT failures=N"; exit status 0 only when
 * everything matched.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "allocpolicy.h"

#define CHECKS_PROGRAM "escapes"
#include "checks.h"

#define KEPT_SIZE 600

static struct {
    ap_status (*scope_find)(const char *, uint32_t *);
    ap_status (*enter)(uint32_t, uint32_t *);
    ap_status (*exit)(void);
    void (*flush)(void);
    ap_status (*scope_stats)(uint32_t, ap_scope_stats *);
    ap_status (*instance_stats)(uint32_t, ap_instance_stats *);
    ap_status (*process_stats)(ap_process_stats *);
} ap;

static int bind_runtime(void) {
#define BIND(field, sym) CHECKS_BIND(ap.field, sym)
    BIND(scope_find, "ap_scope_find");
    BIND(enter, "ap_enter");
    BIND(exit, "ap_exit");
    BIND(flush, "ap_flush");
    BIND(scope_stats, "ap_get_scope_stats");
    BIND(instance_stats, "ap_get_instance_stats");
    BIND(process_stats, "ap_get_process_stats");
    return 1;
#undef BIND
}

static ap_scope_stats scope_stats(uint32_t scope) {
    ap_scope_stats s = {.size = sizeof s};
    if (ap.scope_stats(scope, &s) != AP_OK)
        failures++;
    return s;
}

static int64_t process_live(void) {
    ap_process_stats s = {.size = sizeof s};
    ap.flush();
    ap.process_stats(&s);
    return s.live;
}

/* N requests keeping one block each; 0 on an entry failure. */
static int keep_round(uint32_t request, void **blocks, long n, const char *where) {
    for (long i = 0; i < n; i++) {
        uint32_t id;
        ap_status st = ap.enter(request, &id);
        if (st != AP_OK) {
            printf("check %s entry %ld failed with status %d MISMATCH\n", where, i, st);
            failures++;
            return 0;
        }
        blocks[i] = malloc(KEPT_SIZE);
        memset(blocks[i], (int)i, KEPT_SIZE);
        ap.exit();
    }
    return 1;
}

static int run_keep(long n) {
    uint32_t server, request;
    if (ap.scope_find("server", &server) || ap.scope_find("request", &request)) {
        fprintf(stderr, "escapes: the table must declare server and request\n");
        return 2;
    }
    void **blocks = calloc((size_t)n, sizeof *blocks);
    int64_t base = process_live();
    char what[128];

    /* At the process root. */
    if (keep_round(request, blocks, n, "root")) {
        ap_scope_stats rs = scope_stats(request);
        expect("root request escaped", rs.escaped, (long long)n * KEPT_SIZE);
        expect("root request live", rs.live, 0);
        expect("root request active", (long long)rs.active, 0);
        expect("root process live", process_live() - base, (long long)n * KEPT_SIZE);
        free_on_thread(blocks, n);
        expect("root process live after free", process_live() - base, 0);
    }

    /* Inside one long-lived instance: the kept blocks are its memory. */
    uint32_t sid;
    if (ap.enter(server, &sid) != AP_OK) {
        failures++;
        return 1;
    }
    int64_t server_base;
    {
        ap.flush();
        ap_instance_stats is = {.size = sizeof is};
        ap.instance_stats(sid, &is);
        server_base = is.live;
    }
    ap_scope_stats before = scope_stats(request);
    if (keep_round(request, blocks, n, "server")) {
        ap.flush();
        ap_instance_stats is = {.size = sizeof is};
        ap.instance_stats(sid, &is);
        expect("server instance live", is.live - server_base, (long long)n * KEPT_SIZE);
        ap_scope_stats rs = scope_stats(request);
        expect("server request escaped", rs.escaped - before.escaped, (long long)n * KEPT_SIZE);
        expect("server request live", rs.live, 0);
        free_on_thread(blocks, n);
        ap.flush();
        ap.instance_stats(sid, &is);
        snprintf(what, sizeof what, "server instance live after free");
        expect(what, is.live - server_base, 0);
    }
    ap.exit();
    expect("process live at the end", process_live() - base, 0);
    free(blocks);
    return 0;
}

/* The scopes of `escapes nested`, outermost first. */
static const char *const levels[] = {"request", "sub", "inner", "leaf"};
#define MAX_LEVELS (int)(sizeof levels / sizeof *levels)

/* Enter levels[from..depth-1], keep one block in the innermost, leave them
 * again; 0 (and no block) when an entry failed. */
static int keep_nested(const uint32_t *scopes, int from, int depth, void **block, long i) {
    int entered = from;
    ap_status st = AP_OK;
    uint32_t id;
    while (entered < depth && (st = ap.enter(scopes[entered], &id)) == AP_OK)
        entered++;
    if (st == AP_OK) {
        *block = malloc(KEPT_SIZE);
        memset(*block, (int)i, KEPT_SIZE);
    } else {
        printf("check nested entry %ld of %s failed with status %d MISMATCH\n", i,
               levels[entered], st);
        failures++;
    }
    for (; entered > from; entered--)
        ap.exit();
    return st == AP_OK;
}

static int run_nested(long n, int depth, int fanout) {
    uint32_t scopes[MAX_LEVELS];
    if (depth < 2 || depth > MAX_LEVELS || fanout < 1) {
        fprintf(stderr, "escapes: nested takes 2 to %d levels and a fan-out of 1 or more\n",
                MAX_LEVELS);
        return 2;
    }
    for (int l = 0; l < depth; l++)
        if (ap.scope_find(levels[l], &scopes[l])) {
            fprintf(stderr, "escapes: the table must declare %s\n", levels[l]);
            return 2;
        }
    long kept = n * fanout;
    void **blocks = calloc((size_t)kept, sizeof *blocks);
    int64_t base = process_live();
    ap_scope_stats before[MAX_LEVELS];
    for (int l = 0; l < depth; l++)
        before[l] = scope_stats(scopes[l]);
    /* Each request enters `fanout` chains of the levels below it, one after
     * the other, each keeping one block from its innermost level. */
    long made = 0;
    for (long i = 0; i < n && made == i * fanout; i++) {
        uint32_t rid;
        ap_status st = ap.enter(scopes[0], &rid);
        if (st != AP_OK) {
            printf("check nested entry %ld of request failed with status %d MISMATCH\n", i, st);
            failures++;
            break;
        }
        for (int f = 0; f < fanout && keep_nested(scopes, 1, depth, &blocks[made], i); f++)
            made++;
        ap.exit();
    }
    char what[96];
    for (int l = 0; l < depth; l++) {
        ap_scope_stats now = scope_stats(scopes[l]);
        snprintf(what, sizeof what, "nested %s escaped", levels[l]);
        expect(what, now.escaped - before[l].escaped, (long long)made * KEPT_SIZE);
        snprintf(what, sizeof what, "nested %s live", levels[l]);
        expect(what, now.live, 0);
    }
    expect("nested process live", process_live() - base, (long long)made * KEPT_SIZE);
    /* The kept blocks come back, from another thread, while a new chain of
     * the same scopes is active (in the slots the ended ones used): each of
     * its levels keeps exactly what it holds itself. */
    uint32_t ids[MAX_LEVELS];
    int entered = 0;
    while (entered < depth && ap.enter(scopes[entered], &ids[entered]) == AP_OK)
        entered++;
    expect("nested active chain entered", entered, depth);
    void *own = malloc(KEPT_SIZE);
    memset(own, 1, KEPT_SIZE);
    __asm__ volatile("" : : "r"(own) : "memory"); /* kept: the compiler may not drop it */
    ap.flush();
    free_on_thread(blocks, made);
    ap.flush();
    for (int l = 0; l < entered; l++) {
        ap_instance_stats is = {.size = sizeof is};
        ap.instance_stats(ids[l], &is);
        snprintf(what, sizeof what, "nested active %s live after free", levels[l]);
        expect(what, is.live, KEPT_SIZE);
    }
    expect("nested process live after free", process_live() - base, KEPT_SIZE);
    free(own);
    for (; entered > 0; entered--)
        ap.exit();
    expect("nested process live at the end", process_live() - base, 0);
    free(blocks);
    return 0;
}

static int run_zero(void) {
    uint32_t request, server;
    if (ap.scope_find("server", &server) || ap.scope_find("request", &request))
        return 2;
    /* Use up the never used slots first: from then on, an instance that
     * ends with nothing left hands its slot to the next one. */
    uint32_t prev = 1, next = 2;
    for (long i = 0; i < 2L * AP_MAX_INSTANCES && (prev & 0xFFFF) != (next & 0xFFFF); i++) {
        prev = next;
        ap.enter(server, &next);
        ap.exit();
    }
    uint32_t stale, later;
    ap.enter(request, &stale);
    void *zero = malloc(0);
    ap.exit();
    ap.enter(server, &later);
    void *held = malloc(4096);
    ap.flush();
    printf("check zero slot reused %s\n",
           (later & 0xFFFF) == (stale & 0xFFFF) ? "yes" : "no");
    ap_instance_stats is = {.size = sizeof is};
    expect("zero stale id not found", ap.instance_stats(stale, &is), AP_ENOENT);
    ap_instance_stats before = {.size = sizeof before};
    ap.instance_stats(later, &before);
    free(zero);
    ap.flush();
    ap_instance_stats after = {.size = sizeof after};
    ap.instance_stats(later, &after);
    expect("zero later instance live", after.live, before.live);
    expect("zero later instance scope", after.scope, server);
    free(held);
    ap.exit();
    return 0;
}

static void *nothing(void *arg) { return arg; }

int main(int argc, char **argv) {
    if (!bind_runtime())
        return 2;
    /* What the C library keeps after a first printf and a first thread is
     * not part of any count compared below. */
    printf("escapes %s\n", argc > 1 ? argv[1] : "");
    pthread_t th;
    pthread_create(&th, NULL, nothing, NULL);
    pthread_join(th, NULL);
    int rc;
    if (argc > 2 && strcmp(argv[1], "keep") == 0)
        rc = run_keep(atol(argv[2]));
    else if (argc > 2 && strcmp(argv[1], "nested") == 0)
        rc = run_nested(atol(argv[2]), argc > 3 ? atoi(argv[3]) : 2, argc > 4 ? atoi(argv[4]) : 1);
    else if (argc > 1 && strcmp(argv[1], "zero") == 0)
        rc = run_zero();
    else {
        fprintf(stderr, "usage: escapes keep N | escapes nested N [DEPTH [FANOUT]] | escapes zero\n");
        return 2;
    }
    if (rc)
        return rc;
    printf("RESULT failures=%d\n", failures);
    return failures ? 1 : 0;
}
