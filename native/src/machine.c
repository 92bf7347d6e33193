/*
 * machine.c - how much memory the machine can still give this process, for
 * reservations ("the machine can afford it").
 *
 * The tightest of: the room under each cgroup memory limit on the path up
 * from the process's own cgroup (the limit minus that level's usage), and
 * MemAvailable from /proc/meminfo. The cgroups are those /proc/self/cgroup
 * names: cgroup v2 (`0::/path`, the tree at /sys/fs/cgroup, or at
 * /sys/fs/cgroup/unified on a hybrid system; memory.max, memory.current) and
 * the cgroup v1 memory controller (/sys/fs/cgroup/memory;
 * memory.limit_in_bytes, memory.usage_in_bytes, 2^62 and up meaning no
 * limit). Levels missing under the mount (no cgroup namespace) are skipped.
 * allocpolicy/_machine.py reads the same files the same way, for percentage
 * budgets and machine_headroom(); tests/data/machine holds the trees both are
 * tested on, through ALLOCPOLICY_MACHINE_ROOT, a directory standing for /.
 *
 * Read with open/read into stack buffers: reservations are made by code that
 * may be close to its budget, and a reading that allocated could itself be
 * refused. A reading is reused for 50 ms (memory does not change that fast,
 * and the files cost tens of microseconds), unless the request is a large
 * share of what it said was free.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define CACHE_NS (50 * 1000 * 1000LL)

static _Atomic int64_t cached_room = -1;
static _Atomic int64_t cached_at;

/* Read a small file into `buf` (NUL-terminated); -1 if it cannot be read. */
static ssize_t read_small(const char *path, char *buf, size_t size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t got = 0;
    while (got < size - 1) {
        ssize_t n = read(fd, buf + got, size - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    return (ssize_t)got;
}

static int parse_u64(const char *s, int64_t *out) {
    int64_t v = 0;
    const char *start = s;
    while (*s >= '0' && *s <= '9') {
        if (v > (INT64_MAX - 9) / 10)
            return 0;
        v = v * 10 + (*s++ - '0');
    }
    *out = v;
    return s != start;
}

#define V1_UNLIMITED (INT64_C(1) << 62)
#define PATH_MAX_HERE 1280

/* out = a + b; 0 if it does not fit. */
static int join(char *out, size_t size, const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la + lb + 1 > size)
        return 0;
    memcpy(out, a, la);
    memcpy(out + la, b, lb + 1);
    return 1;
}

static int64_t mem_available(const char *root) {
    char path[PATH_MAX_HERE], buf[4096];
    if (!join(path, sizeof path, root, "/proc/meminfo") || read_small(path, buf, sizeof buf) < 0)
        return -1;
    const char *p = strstr(buf, "MemAvailable:");
    if (!p)
        return -1;
    p += strlen("MemAvailable:");
    while (*p == ' ')
        p++;
    int64_t kb;
    return parse_u64(p, &kb) ? kb * 1024 : -1;
}

static int is_dir(const char *path) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    close(fd);
    return 1;
}

/* Least room under a limit at `cg` in the hierarchy at `mount` or any level
 * above it; -1 if no level sets a limit. */
static int64_t walk_up(const char *mount, const char *cg, const char *limit_file, const char *usage_file) {
    char path[PATH_MAX_HERE];
    size_t base = strlen(mount);
    if (!join(path, sizeof path - 64, mount, cg))
        return -1;
    size_t here = strlen(path);
    while (here > base && path[here - 1] == '/')
        path[--here] = '\0';
    int64_t best = -1;
    for (;;) {
        char buf[64];
        int64_t limit, usage;
        here = strlen(path);
        path[here] = '/';
        strcpy(path + here + 1, limit_file);
        int have = read_small(path, buf, sizeof buf) > 0 && parse_u64(buf, &limit) && limit < V1_UNLIMITED;
        if (have) {
            strcpy(path + here + 1, usage_file);
            have = read_small(path, buf, sizeof buf) > 0 && parse_u64(buf, &usage);
        }
        path[here] = '\0';
        if (have) {
            int64_t room = limit > usage ? limit - usage : 0;
            if (best < 0 || room < best)
                best = room;
        }
        /* Up one level, stopping at the mount itself. */
        char *slash = strrchr(path + base, '/');
        if (!slash)
            break;
        *slash = '\0';
    }
    return best;
}

/* Does the comma-separated list `list` (ending at ':') hold `word`? */
static int has_controller(const char *list, const char *end, const char *word) {
    size_t n = strlen(word);
    for (const char *p = list; p < end;) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *stop = comma ? comma : end;
        if ((size_t)(stop - p) == n && memcmp(p, word, n) == 0)
            return 1;
        p = stop + 1;
    }
    return 0;
}

/* Room under the tightest cgroup limit, v2 and v1 alike; -1 if none is set. */
static int64_t cgroup_room(const char *root) {
    char path[PATH_MAX_HERE], cg[4096];
    if (!join(path, sizeof path, root, "/proc/self/cgroup") || read_small(path, cg, sizeof cg) < 0)
        return -1;
    char v2[PATH_MAX_HERE], v1[PATH_MAX_HERE];
    if (!join(v2, sizeof v2, root, "/sys/fs/cgroup/unified") || !join(v1, sizeof v1, root, "/sys/fs/cgroup/memory"))
        return -1;
    if (!is_dir(v2))
        v2[strlen(v2) - strlen("/unified")] = '\0'; /* unified mode: the tree is the mount */
    int64_t best = -1;
    for (char *line = cg; *line;) {
        char *eol = strchr(line, '\n');
        if (eol)
            *eol = '\0';
        /* hierarchy-id:controllers:path */
        char *c1 = strchr(line, ':');
        char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (c2) {
            const char *cgpath = c2 + 1;
            int64_t room = -1;
            if (c1 - line == 1 && line[0] == '0' && c2 == c1 + 1)
                room = walk_up(v2, cgpath, "memory.max", "memory.current");
            else if (has_controller(c1 + 1, c2, "memory"))
                room = walk_up(v1, cgpath, "memory.limit_in_bytes", "memory.usage_in_bytes");
            if (room >= 0 && (best < 0 || room < best))
                best = room;
        }
        if (!eol)
            break;
        line = eol + 1;
    }
    return best;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int64_t ap__machine_room(int64_t request) {
    int64_t room = atomic_load_explicit(&cached_room, memory_order_relaxed);
    int64_t at = atomic_load_explicit(&cached_at, memory_order_relaxed);
    int64_t now = now_ns();
    if (room >= 0 && now - at < CACHE_NS && request <= room / 2)
        return room;
    /* A directory standing for / (tests); getenv allocates nothing. */
    const char *root = getenv("ALLOCPOLICY_MACHINE_ROOT");
    if (!root)
        root = "";
    int64_t avail = mem_available(root);
    int64_t cg = cgroup_room(root);
    room = avail;
    if (cg >= 0 && (room < 0 || cg < room))
        room = cg;
    if (room < 0)
        room = INT64_MAX; /* nothing readable: the machine check cannot refuse */
    atomic_store_explicit(&cached_room, room, memory_order_relaxed);
    atomic_store_explicit(&cached_at, now, memory_order_relaxed);
    return room;
}
