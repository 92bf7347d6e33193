/*
 * small_blocks.c - resident memory of a program holding many small blocks.
 *
 *   small_blocks PATTERN COUNT SCOPE
 *
 * Allocates COUNT blocks with malloc, writes every byte of each (so the
 * pages are really resident, whatever the allocator does with fresh
 * memory), holds them all, and prints the process's resident set size
 * before and after:
 *
 *   rss_before=N rss_after=N blocks=N bytes=N
 *
 * PATTERN: fixed24, fixed64, fixed200, fixed1000, or rand8-128 (sizes drawn
 * uniformly from 8 to 128 bytes by a fixed-seed generator, the same sizes in
 * every run). SCOPE: none, or "own": the blocks are allocated inside an
 * instance of the scope "work" (the runtime must be preloaded).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static long rss_bytes(void) {
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f)
        return -1;
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2)
        resident = -1;
    fclose(f);
    return resident * sysconf(_SC_PAGESIZE);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15u;

static uint32_t next_random(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Du) >> 32);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PATTERN COUNT none|own\n", argv[0]);
        return 2;
    }
    const char *pattern = argv[1];
    size_t count = strtoull(argv[2], NULL, 10);
    size_t fixed = 0;
    int random_sizes = 0;
    if (strncmp(pattern, "fixed", 5) == 0)
        fixed = strtoull(pattern + 5, NULL, 10);
    else if (strcmp(pattern, "rand8-128") == 0)
        random_sizes = 1;
    if (!fixed && !random_sizes) {
        fprintf(stderr, "unknown pattern %s\n", pattern);
        return 2;
    }
    if (strcmp(argv[3], "own") == 0) {
        /* The runtime's C ABI, looked up so that this program runs without it
         * too. */
        int (*find)(const char *, uint32_t *) =
            (int (*)(const char *, uint32_t *))dlsym(RTLD_DEFAULT, "ap_scope_find");
        int (*enter)(uint32_t, uint32_t *) = (int (*)(uint32_t, uint32_t *))dlsym(RTLD_DEFAULT, "ap_enter");
        uint32_t scope, instance;
        if (!find || !enter) {
            fprintf(stderr, "scope 'own' needs the runtime preloaded\n");
            return 2;
        }
        if (find("work", &scope) != 0 || enter(scope, &instance) != 0) {
            fprintf(stderr, "could not enter scope 'work' (set ALLOCPOLICY_TABLE)\n");
            return 2;
        }
    }
    char **blocks = malloc(count * sizeof *blocks);
    if (!blocks)
        return 1;
    memset(blocks, 0, count * sizeof *blocks);
    long before = rss_bytes();
    uint64_t bytes = 0;
    for (size_t i = 0; i < count; i++) {
        size_t n = random_sizes ? 8 + next_random() % 121 : fixed;
        blocks[i] = malloc(n);
        if (!blocks[i]) {
            fprintf(stderr, "malloc(%zu) failed after %zu blocks\n", n, i);
            return 1;
        }
        memset(blocks[i], (int)(i & 0xFF), n);
        bytes += n;
    }
    long after = rss_bytes();
    /* Use the blocks, so that no compiler can drop them. */
    unsigned sum = 0;
    for (size_t i = 0; i < count; i += 4096)
        sum += (unsigned char)blocks[i][0];
    printf("rss_before=%ld rss_after=%ld blocks=%zu bytes=%llu check=%u\n", before, after, count,
           (unsigned long long)bytes, sum);
    return 0;
}
