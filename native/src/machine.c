/*
 * machine.c - how much memory the machine can still give this process, for
 * reservations ("the machine can afford it").
 *
 * The tightest of: the cgroup v2 limit minus current usage, at the process's
 * own cgroup and each ancestor that sets `memory.max`; and MemAvailable from
 * /proc/meminfo. Read with open/read into stack buffers: reservations are
 * made by code that may be close to its budget, and a reading that allocated
 * could itself be refused. A reading is reused for 50 ms (memory does not
 * change that fast, and the files cost tens of microseconds), unless the
 * request is a large share of what it said was free.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
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

static int64_t mem_available(void) {
    char buf[4096];
    if (read_small("/proc/meminfo", buf, sizeof buf) < 0)
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

/* Room under the tightest cgroup v2 limit on the path up from our cgroup. */
static int64_t cgroup_room(void) {
    char cg[1024];
    if (read_small("/proc/self/cgroup", cg, sizeof cg) < 0)
        return -1;
    char *line = strstr(cg, "0::");
    if (!line)
        return -1;
    line += 3;
    char *end = strchr(line, '\n');
    if (end)
        *end = '\0';
    /* /sys/fs/cgroup + the path, shortened one component at a time. */
    char path[1200];
    size_t base = strlen("/sys/fs/cgroup");
    memcpy(path, "/sys/fs/cgroup", base);
    size_t len = strlen(line);
    if (base + len + 32 > sizeof path)
        return -1;
    memcpy(path + base, line, len);
    path[base + len] = '\0';
    int64_t best = -1;
    for (;;) {
        size_t here = strlen(path);
        char buf[64];
        int64_t limit, current;
        memcpy(path + here, "/memory.max", sizeof "/memory.max");
        int have = read_small(path, buf, sizeof buf) > 0 && parse_u64(buf, &limit);
        if (have) {
            memcpy(path + here, "/memory.current", sizeof "/memory.current");
            have = read_small(path, buf, sizeof buf) > 0 && parse_u64(buf, &current);
        }
        path[here] = '\0';
        if (have) {
            int64_t room = limit > current ? limit - current : 0;
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
    int64_t avail = mem_available();
    int64_t cg = cgroup_room();
    room = avail;
    if (cg >= 0 && (room < 0 || cg < room))
        room = cg;
    if (room < 0)
        room = INT64_MAX; /* nothing readable: the machine check cannot refuse */
    atomic_store_explicit(&cached_room, room, memory_order_relaxed);
    atomic_store_explicit(&cached_at, now, memory_order_relaxed);
    return room;
}
