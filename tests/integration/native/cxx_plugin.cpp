/*
 * cxx_plugin.cpp - C++ code loaded with dlopen(RTLD_LOCAL) into a program that
 * has no C++ runtime of its own (Python loading it with ctypes): its
 * libstdc++ is then outside the global symbol scope.
 *
 *   int cxx_plugin_refusal(void)   1 when, inside scope `work` (raise mode, at
 *                                  most 4 MiB), new char[8 MiB] threw
 *                                  std::bad_alloc, the nothrow form returned
 *                                  NULL, nothing was charged, and 1 MiB
 *                                  still fits; else 0, with the reason on
 *                                  stdout
 *   int cxx_plugin_try_new(size_t n)  1 when new char[n] succeeded, 0 when it
 *                                  threw std::bad_alloc
 */
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <new>

#include "allocpolicy.h"

static void *volatile sink;

template <typename F> static F bind(const char *name) {
    return reinterpret_cast<F>(dlsym(RTLD_DEFAULT, name));
}

static int64_t live(uint32_t instance) {
    bind<void (*)(void)>("ap_flush")();
    ap_instance_stats st = {};
    st.size = sizeof st;
    bind<ap_status (*)(uint32_t, ap_instance_stats *)>("ap_get_instance_stats")(instance, &st);
    return st.live;
}

extern "C" __attribute__((visibility("default"))) int cxx_plugin_refusal(void) {
    auto find = bind<ap_status (*)(const char *, uint32_t *)>("ap_scope_find");
    auto enter = bind<ap_status (*)(uint32_t, uint32_t *)>("ap_enter");
    auto leave = bind<ap_status (*)(void)>("ap_exit");
    /* The first exception of a thread sets up libstdc++'s thread-local state,
     * which for a library loaded this late is allocated (and kept). Outside
     * the scope, so that the scope's books show only the refusals. */
    try {
        throw std::bad_alloc();
    } catch (const std::bad_alloc &) {
    }
    uint32_t scope, instance;
    if (!find || find("work", &scope) != AP_OK || enter(scope, &instance) != AP_OK) {
        std::printf("cannot enter scope work\n");
        return 0;
    }
    int64_t before = live(instance);
    const std::size_t big = std::size_t(8) << 20;
    bool thrown = false;
    try {
        sink = new char[big];
    } catch (const std::bad_alloc &) {
        thrown = true;
    }
    void *q = ::operator new[](big, std::nothrow);
    sink = q;
    int64_t after = live(instance);
    char *fits = new char[std::size_t(1) << 20];
    sink = fits;
    delete[] fits;
    leave();
    if (!thrown || q || after != before) {
        std::printf("thrown=%d nothrow=%p live %lld -> %lld\n", thrown, q, (long long)before,
                    (long long)after);
        return 0;
    }
    return 1;
}

extern "C" __attribute__((visibility("default"))) int cxx_plugin_try_new(std::size_t n) {
    try {
        char *p = new char[n];
        sink = p;
        delete[] p;
        return 1;
    } catch (const std::bad_alloc &) {
        return 0;
    }
}
