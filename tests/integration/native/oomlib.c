/*
 * oomlib.c - a small C library that Python calls through ctypes, for the
 * fault-injection tests: its malloc calls come from native code, where
 * Python's own allocator hooks (_testcapi.set_nomemory) cannot reach.
 *
 * Built as a shared library by the build_c fixture (shared=True).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Make `rounds` allocations of `size` bytes, each freed at once; returns a
 * bit mask of the rounds (up to 64) whose malloc returned NULL, so a test can
 * see exactly which call failed. */
uint64_t oomlib_failures(int rounds, size_t size) {
    uint64_t failed = 0;
    for (int i = 0; i < rounds && i < 64; i++) {
        char *p = malloc(size);
        if (p == NULL) {
            failed |= UINT64_C(1) << i;
            continue;
        }
        p[0] = (char)i; /* touch it: the allocation must really happen */
        free(p);
    }
    return failed;
}

/* Sum of the bytes of `s`, computed over a private copy. Like much C code in
 * the wild, it does not check what malloc returned: when the allocation
 * fails, the copy writes through a NULL pointer and the process dies of
 * SIGSEGV. The sweep tests use it as the extension that crashes. */
long oomlib_copy_sum(const char *s, size_t n) {
    unsigned char *copy = malloc(n);
    memcpy(copy, s, n);
    long sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += copy[i];
    free(copy);
    return sum;
}
