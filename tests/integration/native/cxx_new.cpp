/*
 * cxx_new.cpp - C++ operator new and delete under the runtime, from the outside.
 *
 *   cxx_new MODE...   run the named checks; the table must declare scope
 *                     `work` in raise mode with a 4 MiB budget and no grace
 *
 *   accounting   every form of new is charged exactly its size to the
 *                instance and every form of delete credits it back
 *   refusal      over the budget: the throwing forms throw std::bad_alloc
 *                (caught here), the nothrow forms return NULL, nothing is
 *                charged, and the program goes on
 *   handler      a std::new_handler that frees memory is called and the
 *                allocation retried; one that throws bad_alloc propagates
 *                from the throwing forms; the nothrow forms do not call it
 *   impossible   2^50 bytes, more than any backend serves: bad_alloc and
 *                NULL too, in whatever mode `work` has (but abort)
 *   double-free  (alone, outside any scope) deletes a small block twice: the
 *                runtime's small-block cache must see it (expected to abort),
 *                as in a C program
 *
 * Prints "ok MODE" or "FAIL MODE: why" lines; exit status 1 if any failed.
 * The runtime's C ABI is found with dlsym, so the program links only
 * against the C++ runtime it was built with.
 */
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <new>

#include "allocpolicy.h"

static int failures;
static const char *mode_name;

#define CHECK(cond, ...)                                                           \
    do {                                                                           \
        if (!(cond)) {                                                             \
            std::printf("FAIL %s: ", mode_name);                                   \
            std::printf(__VA_ARGS__);                                              \
            std::printf(" (line %d)\n", __LINE__);                                 \
            failures++;                                                            \
            return;                                                                \
        }                                                                          \
    } while (0)

/* Keep the compiler from eliding or folding the allocations. */
static void *volatile sink;
static void *launder(void *p) {
    sink = p;
    return sink;
}

static struct {
    ap_status (*scope_find)(const char *, uint32_t *);
    ap_status (*enter)(uint32_t, uint32_t *);
    ap_status (*exit)(void);
    ap_status (*last_violation)(ap_violation *);
    ap_status (*instance_stats)(uint32_t, ap_instance_stats *);
    void (*flush)(void);
} ap;

template <typename F> static void bind(F &f, const char *name) {
    f = reinterpret_cast<F>(dlsym(RTLD_DEFAULT, name));
}

static bool have_runtime() {
    bind(ap.scope_find, "ap_scope_find");
    bind(ap.enter, "ap_enter");
    bind(ap.exit, "ap_exit");
    bind(ap.last_violation, "ap_last_violation");
    bind(ap.instance_stats, "ap_get_instance_stats");
    bind(ap.flush, "ap_flush");
    return ap.scope_find && ap.enter && ap.exit && ap.last_violation && ap.instance_stats &&
           ap.flush;
}

static uint32_t instance;

static int64_t live() {
    ap.flush();
    ap_instance_stats st = {};
    st.size = sizeof st;
    if (ap.instance_stats(instance, &st) != AP_OK)
        return -1;
    return st.live;
}

static uint64_t violations() {
    ap_violation v = {};
    v.size = sizeof v;
    ap.last_violation(&v);
    return v.seq;
}

static const std::size_t MiB = std::size_t(1) << 20;
static const std::align_val_t A256 = std::align_val_t(256);
static const std::align_val_t A8 = std::align_val_t(8);

struct alignas(512) Page {
    unsigned char bytes[4096];
};

/* One allocation through each form of new, freed through a matching form of
 * delete (every form of delete is used once or more). */
struct form {
    const char *name;
    void *(*alloc)(std::size_t);
    void (*release)(void *, std::size_t);
};

static const form forms[] = {
    {"new", [](std::size_t n) { return ::operator new(n); },
     [](void *p, std::size_t) { ::operator delete(p); }},
    {"new/sized delete", [](std::size_t n) { return ::operator new(n); },
     [](void *p, std::size_t n) { ::operator delete(p, n); }},
    {"new/nothrow delete", [](std::size_t n) { return ::operator new(n); },
     [](void *p, std::size_t) { ::operator delete(p, std::nothrow); }},
    {"new[]", [](std::size_t n) { return ::operator new[](n); },
     [](void *p, std::size_t) { ::operator delete[](p); }},
    {"new[]/sized delete[]", [](std::size_t n) { return ::operator new[](n); },
     [](void *p, std::size_t n) { ::operator delete[](p, n); }},
    {"new[]/nothrow delete[]", [](std::size_t n) { return ::operator new[](n); },
     [](void *p, std::size_t) { ::operator delete[](p, std::nothrow); }},
    {"nothrow new", [](std::size_t n) { return ::operator new(n, std::nothrow); },
     [](void *p, std::size_t) { ::operator delete(p); }},
    {"nothrow new[]", [](std::size_t n) { return ::operator new[](n, std::nothrow); },
     [](void *p, std::size_t) { ::operator delete[](p); }},
    {"aligned new", [](std::size_t n) { return ::operator new(n, A256); },
     [](void *p, std::size_t) { ::operator delete(p, A256); }},
    {"aligned new/sized delete", [](std::size_t n) { return ::operator new(n, A256); },
     [](void *p, std::size_t n) { ::operator delete(p, n, A256); }},
    {"aligned new/nothrow delete", [](std::size_t n) { return ::operator new(n, A256); },
     [](void *p, std::size_t) { ::operator delete(p, A256, std::nothrow); }},
    {"aligned new[]", [](std::size_t n) { return ::operator new[](n, A256); },
     [](void *p, std::size_t) { ::operator delete[](p, A256); }},
    {"aligned new[]/sized delete[]", [](std::size_t n) { return ::operator new[](n, A256); },
     [](void *p, std::size_t n) { ::operator delete[](p, n, A256); }},
    {"aligned new[]/nothrow delete[]", [](std::size_t n) { return ::operator new[](n, A256); },
     [](void *p, std::size_t) { ::operator delete[](p, A256, std::nothrow); }},
    {"aligned nothrow new", [](std::size_t n) { return ::operator new(n, A256, std::nothrow); },
     [](void *p, std::size_t) { ::operator delete(p, A256); }},
    {"aligned nothrow new[]",
     [](std::size_t n) { return ::operator new[](n, A256, std::nothrow); },
     [](void *p, std::size_t) { ::operator delete[](p, A256); }},
    {"small alignment new", [](std::size_t n) { return ::operator new(n, A8); },
     [](void *p, std::size_t) { ::operator delete(p, A8); }},
};

static void check_accounting() {
    int64_t before = live();
    for (const form &f : forms) {
        for (std::size_t n : {std::size_t(1), std::size_t(100), std::size_t(4096), MiB + 3}) {
            unsigned char *p = static_cast<unsigned char *>(launder(f.alloc(n)));
            CHECK(p != nullptr, "%s(%zu) returned NULL", f.name, n);
            std::memset(p, 0x5A, n);
            int64_t now = live();
            CHECK(now == before + int64_t(n), "%s(%zu): live %lld, expected %lld", f.name, n,
                  (long long)now, (long long)before + int64_t(n));
            f.release(p, n);
            now = live();
            CHECK(now == before, "%s(%zu) freed: live %lld, expected %lld", f.name, n,
                  (long long)now, (long long)before);
        }
    }
    /* new-expressions: a class with extended alignment takes the aligned forms. */
    Page *page = static_cast<Page *>(launder(new Page));
    CHECK((reinterpret_cast<std::uintptr_t>(page) & 511) == 0, "new Page is not 512-aligned");
    CHECK(live() == before + int64_t(sizeof(Page)), "new Page: live %lld", (long long)live());
    delete page;
    char *text = static_cast<char *>(launder(new char[3 * MiB]));
    CHECK(live() == before + int64_t(3 * MiB), "new char[3 MiB]: live %lld", (long long)live());
    delete[] text;
    CHECK(live() == before, "delete[]: live %lld, expected %lld", (long long)live(),
          (long long)before);
    std::printf("ok %s\n", mode_name);
}

static void check_refusal() {
    int64_t before = live();
    const std::size_t big = 8 * MiB;
    static const char *const throwing[] = {"new", "new[]", "aligned new", "aligned new[]",
                                           "new char[]", "new Page[]"};
    for (int k = 0; k < 6; k++) {
        uint64_t seen = violations();
        bool thrown = false;
        try {
            switch (k) {
            case 0: launder(::operator new(big)); break;
            case 1: launder(::operator new[](big)); break;
            case 2: launder(::operator new(big, A256)); break;
            case 3: launder(::operator new[](big, A256)); break;
            case 4: launder(new char[big]); break;
            case 5: launder(new Page[big / sizeof(Page)]); break;
            }
        } catch (const std::bad_alloc &) {
            thrown = true;
        }
        CHECK(thrown, "%s over the budget did not throw std::bad_alloc", throwing[k]);
        CHECK(violations() == seen + 1, "%s: %llu violations recorded, expected 1", throwing[k],
              (unsigned long long)(violations() - seen));
        ap_violation v = {};
        v.size = sizeof v;
        ap.last_violation(&v);
        CHECK(v.reason == AP_REASON_BUDGET && v.limit == AP_LIMIT_INSTANCE && v.requested >= big,
              "%s: reason %u limit %u requested %llu", throwing[k], v.reason, v.limit,
              (unsigned long long)v.requested);
        CHECK(live() == before, "%s refused, yet live %lld", throwing[k], (long long)live());
    }
    static const char *const nothrow[] = {"nothrow new", "nothrow new[]", "aligned nothrow new",
                                          "aligned nothrow new[]", "new (nothrow) char[]"};
    for (int k = 0; k < 5; k++) {
        void *p = &instance;
        switch (k) {
        case 0: p = ::operator new(big, std::nothrow); break;
        case 1: p = ::operator new[](big, std::nothrow); break;
        case 2: p = ::operator new(big, A256, std::nothrow); break;
        case 3: p = ::operator new[](big, A256, std::nothrow); break;
        case 4: p = new (std::nothrow) char[big]; break;
        }
        CHECK(launder(p) == nullptr, "%s over the budget returned %p", nothrow[k], p);
        CHECK(live() == before, "%s refused, yet live %lld", nothrow[k], (long long)live());
    }
    /* The scope still serves what fits. */
    char *fits = static_cast<char *>(launder(new char[MiB]));
    std::memset(fits, 1, MiB);
    delete[] fits;
    CHECK(live() == before, "live %lld after the refusals", (long long)live());
    std::printf("ok %s\n", mode_name);
}

static char *reserve_block;
static int handler_calls;

/* Frees the reserve, then uninstalls itself (Effective C++'s pattern). */
static void release_reserve() {
    handler_calls++;
    delete[] reserve_block;
    reserve_block = nullptr;
    std::set_new_handler(nullptr);
}

static void give_up() {
    handler_calls++;
    throw std::bad_alloc();
}

static void check_handler() {
    int64_t before = live();
    reserve_block = static_cast<char *>(launder(new char[3 * MiB]));
    /* nothrow forms do not call the handler (it could throw out of them). */
    std::set_new_handler(release_reserve);
    void *p = ::operator new(2 * MiB, std::nothrow);
    CHECK(launder(p) == nullptr && handler_calls == 0,
          "nothrow new: %p, handler called %d times", p, handler_calls);
    /* The throwing form calls it, and the retry fits once the reserve is gone. */
    char *q = static_cast<char *>(launder(new char[2 * MiB]));
    CHECK(q != nullptr && handler_calls == 1, "handler called %d times", handler_calls);
    CHECK(reserve_block == nullptr && std::get_new_handler() == nullptr,
          "the handler did not run to its end");
    CHECK(live() == before + int64_t(2 * MiB), "live %lld after the retry", (long long)live());
    delete[] q;
    /* A handler that throws: its exception is what new throws. */
    std::set_new_handler(give_up);
    bool thrown = false;
    try {
        launder(::operator new(8 * MiB, A256));
    } catch (const std::bad_alloc &) {
        thrown = true;
    }
    std::set_new_handler(nullptr);
    CHECK(thrown && handler_calls == 2, "thrown %d, handler called %d times", thrown,
          handler_calls);
    CHECK(live() == before, "live %lld at the end", (long long)live());
    std::printf("ok %s\n", mode_name);
}

static void check_impossible() {
    int64_t before = live();
    const std::size_t huge = std::size_t(1) << 50;
    bool thrown = false;
    try {
        launder(new char[huge]);
    } catch (const std::bad_alloc &) {
        thrown = true;
    }
    CHECK(thrown, "new char[2^50] did not throw std::bad_alloc");
    void *p = ::operator new(huge, A256, std::nothrow);
    CHECK(launder(p) == nullptr, "aligned nothrow new(2^50) returned %p", p);
    ap_violation v = {};
    v.size = sizeof v;
    ap.last_violation(&v);
    CHECK(v.reason == AP_REASON_OOM && v.requested == huge, "reason %u requested %llu",
          v.reason, (unsigned long long)v.requested);
    CHECK(live() == before, "live %lld after the refusals", (long long)live());
    std::printf("ok %s\n", mode_name);
}

/* The cache works in a C++ program too, whose C++ runtime allocates before
 * the runtime's constructor has run. */
static void double_free() {
    void *p = launder(::operator new(40));
    ::operator delete(p);
    ::operator delete(p);
    std::printf("survived\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODE...\n", argv[0]);
        return 2;
    }
    if (std::strcmp(argv[1], "double-free") == 0) {
        /* Before anything registers the thread, as entering a scope does. */
        double_free();
        return 0;
    }
    if (!have_runtime()) {
        std::printf("FAIL: the runtime is not preloaded\n");
        return 1;
    }
    /* stdio's buffer must not appear in the instance's live bytes. */
    static char out[1 << 16];
    std::setvbuf(stdout, out, _IOFBF, sizeof out);
    uint32_t scope;
    if (ap.scope_find("work", &scope) != AP_OK || ap.enter(scope, &instance) != AP_OK) {
        std::printf("FAIL: cannot enter scope work\n");
        return 1;
    }
    for (int i = 1; i < argc; i++) {
        mode_name = argv[i];
        if (std::strcmp(argv[i], "accounting") == 0)
            check_accounting();
        else if (std::strcmp(argv[i], "refusal") == 0)
            check_refusal();
        else if (std::strcmp(argv[i], "handler") == 0)
            check_handler();
        else if (std::strcmp(argv[i], "impossible") == 0)
            check_impossible();

        else {
            std::fprintf(stderr, "unknown mode %s\n", argv[i]);
            return 2;
        }
    }
    ap.exit();
    std::fflush(stdout);
    return failures ? 1 : 0;
}
