/*
 * hooks_pyarena.c - Python's small objects, seen through pymalloc's arenas.
 *
 * pymalloc serves objects of 512 bytes or less from 1 MiB arenas (256 KiB on
 * 32-bit builds) that it maps itself, so they never reach malloc. Wrapping the
 * object domain would see every object, but costs an indirect call and
 * bookkeeping on Python's hottest path, and pymalloc's free does not say the
 * size. The arena allocator hook runs once per arena, and its free receives
 * the size, so budgets see small objects at arena granularity at no cost per
 * object: an arena is charged to the instance whose allocation made pymalloc
 * open it, and credited back to that instance when pymalloc releases it.
 *
 * Arena owners are kept in a fixed open-addressing table. pymalloc calls the
 * hook with the GIL held; the table still takes a spin lock so that
 * sub-interpreters with their own GIL (3.12+) are safe. Arena operations are
 * rare (one per MiB), so this is not on the allocation fast path.
 */
#define _GNU_SOURCE
#include <string.h>

#include "internal.h"

typedef struct {
    void *ctx;
    void *(*alloc)(void *ctx, size_t size);
    void (*free)(void *ctx, void *ptr, size_t size);
} py_arena_allocator;

typedef void (*arena_accessor)(py_arena_allocator *);

#define TABLE_SIZE 65536u /* power of two; 64 GiB of 1 MiB arenas */
#define TOMBSTONE ((uintptr_t)1)

static struct {
    uintptr_t key;
    uint32_t instance;
} table[TABLE_SIZE];
static atomic_flag table_lock = ATOMIC_FLAG_INIT;
static py_arena_allocator original;
static _Atomic int installed;
static _Atomic uint64_t arenas_live;

uint64_t ap__arenas_live(void) { return atomic_load(&arenas_live); }
int ap__arena_hook_installed(void) { return atomic_load(&installed); }

static inline uint32_t slot_of(uintptr_t key) {
    return (uint32_t)((key >> 20) * 0x9E3779B1u) & (TABLE_SIZE - 1);
}

static void lock(void) {
    while (atomic_flag_test_and_set_explicit(&table_lock, memory_order_acquire)) {
    }
}
static void unlock(void) { atomic_flag_clear_explicit(&table_lock, memory_order_release); }

static int remember(uintptr_t key, uint32_t instance) {
    lock();
    for (uint32_t i = 0, s = slot_of(key); i < TABLE_SIZE; i++, s = (s + 1) & (TABLE_SIZE - 1)) {
        if (table[s].key == 0 || table[s].key == TOMBSTONE) {
            table[s].key = key;
            table[s].instance = instance;
            unlock();
            return 1;
        }
    }
    unlock();
    return 0;
}

static int forget(uintptr_t key, uint32_t *instance) {
    lock();
    for (uint32_t i = 0, s = slot_of(key); i < TABLE_SIZE; i++, s = (s + 1) & (TABLE_SIZE - 1)) {
        if (table[s].key == 0)
            break;
        if (table[s].key == key) {
            *instance = table[s].instance;
            table[s].key = TOMBSTONE;
            unlock();
            return 1;
        }
    }
    unlock();
    return 0;
}

static void *arena_alloc(void *ctx, size_t size) {
    (void)ctx;
    if (!ap__charge(size, AP_DOMAIN_PY_ARENA))
        return NULL;
    void *p = original.alloc(original.ctx, size);
    if (!p) {
        ap__credit(ap__tls.cur, size, AP__UNDO);
        ap__backend_failed(size, AP_DOMAIN_PY_ARENA);
        return NULL;
    }
    if (remember((uintptr_t)p, ap__tls.cur)) {
        atomic_fetch_add(&arenas_live, 1);
    } else {
        ap__credit(ap__tls.cur, size, AP__UNDO); /* table full: leave it uncounted */
    }
    return p;
}

static void arena_free(void *ctx, void *p, size_t size) {
    (void)ctx;
    uint32_t instance;
    /* Forget the address before pymalloc unmaps it: once unmapped, the same
     * address can come back as another arena. Arenas from before the hook was
     * installed are not in the table and were never charged. */
    if (p && forget((uintptr_t)p, &instance)) {
        atomic_fetch_sub(&arenas_live, 1);
        ap__credit(instance, size, AP_DOMAIN_PY_ARENA);
    }
    original.free(original.ctx, p, size);
}

ap_status ap_py_install_arena_hook(void *get_arena, void *set_arena) {
    if (!get_arena || !set_arena)
        return AP_EINVAL;
    int expect = 0;
    if (!atomic_compare_exchange_strong(&installed, &expect, 1))
        return AP_OK; /* installing twice is harmless */
    ((arena_accessor)get_arena)(&original);
    py_arena_allocator ours = {NULL, arena_alloc, arena_free};
    ((arena_accessor)set_arena)(&ours);
    return AP_OK;
}
