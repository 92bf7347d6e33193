"""An ordinary, object-heavy Python workload, timed under one tracing setup.

    python benchmarks/workload.py --scale 1.0 --mode plain|task|tracemalloc|memray

The workload is a small mix in the spirit of pyperformance: records as dicts
of short strings, a JSON round trip, instances of a class with attributes,
sorting, string formatting and splitting, and float arithmetic on small
objects. It allocates mostly small objects (pymalloc's domain) plus the
occasional large list or dict table and string (the malloc family).

Modes
    plain        no tracing (run it with or without LD_PRELOAD)
    task         the whole workload inside the task scope "task"; needs the
                 runtime preloaded and a policy declaring "task"
    tracemalloc  tracemalloc.start() before the workload
    memray       memray.Tracker around the workload

Prints one JSON object on stdout: elapsed wall seconds and process CPU seconds
from switching the tracer or scope on to switching it off again (interpreter
start-up and imports excluded), a checksum that
must be equal in every mode, and, in task mode, the scope's statistics.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import sys
import tempfile
import time

# ---------------------------------------------------------------------------
# The workload


class Particle:
    def __init__(self, name: str, x: float, y: float, vx: float, vy: float) -> None:
        self.name = name
        self.x = x
        self.y = y
        self.vx = vx
        self.vy = vy
        self.tags: list[str] = []

    def step(self, dt: float) -> None:
        self.x += self.vx * dt
        self.y += self.vy * dt
        if self.x < 0.0 or self.x > 100.0:
            self.vx = -self.vx
        if self.y < 0.0 or self.y > 100.0:
            self.vy = -self.vy

    def energy(self) -> float:
        return 0.5 * (self.vx * self.vx + self.vy * self.vy)


WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi "
    "omicron pi rho sigma tau upsilon phi chi psi omega"
).split()


def make_records(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        out.append(
            {
                "id": i,
                "name": f"{rng.choice(WORDS)}-{i}",
                "tags": [rng.choice(WORDS) for _ in range(rng.randint(1, 5))],
                "score": rng.random() * 100.0,
                "active": i % 3 != 0,
                "owner": {"first": rng.choice(WORDS), "last": rng.choice(WORDS).upper()},
            }
        )
    return out


def json_roundtrip(records: list[dict]) -> int:
    total = 0
    for chunk in range(0, len(records), 250):
        text = json.dumps(records[chunk : chunk + 250])
        back = json.loads(text)
        total += len(text) + len(back)
    return total


def particles(rng: random.Random, n: int, steps: int) -> float:
    ps = [
        Particle(f"p{i}", rng.random() * 100, rng.random() * 100, rng.random() - 0.5, rng.random() - 0.5)
        for i in range(n)
    ]
    for p in ps:
        p.tags.append(rng.choice(WORDS))
    for _ in range(steps):
        for p in ps:
            p.step(0.5)
    ps.sort(key=lambda p: (p.tags[0], p.x))
    return sum(p.energy() for p in ps)


def text_processing(rng: random.Random, lines: int) -> int:
    doc = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(lines))
    counts: dict[str, int] = {}
    for line in doc.splitlines():
        for word in line.split():
            counts[word] = counts.get(word, 0) + 1
    pairs = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    report = [f"{word:>10s} {count:6d}" for word, count in pairs]
    bigrams: dict[tuple[str, str], int] = {}
    words = doc.split()
    for a, b in zip(words, words[1:]):
        bigrams[(a, b)] = bigrams.get((a, b), 0) + 1
    return len("".join(report)) + len(bigrams)


def sorting(rng: random.Random, n: int) -> int:
    rows = [(rng.choice(WORDS), rng.randint(0, 1000), str(i)) for i in range(n)]
    rows.sort()
    by_len = sorted(rows, key=lambda r: (len(r[0]), r[2]))
    return len(rows) + len(by_len[0][2])


def workload(scale: float) -> int:
    rng = random.Random(12345)
    check = 0
    rounds = max(1, round(16 * scale))
    for _ in range(rounds):
        records = make_records(rng, 4000)
        check += json_roundtrip(records)
        records.sort(key=lambda r: (r["owner"]["last"], -r["score"]))
        check += records[0]["id"]
        check += int(particles(rng, 2000, 10))
        check += text_processing(rng, 1500)
        check += sorting(rng, 15000)
        del records
    return check


# ---------------------------------------------------------------------------
# Entering the task scope


class _ScopeStats(ctypes.Structure):
    """Mirror of ap_scope_stats (native/include/allocpolicy.h)."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("mode", ctypes.c_uint32),
        ("name", ctypes.c_char * 64),
        ("budget", ctypes.c_int64),
        ("total_budget", ctypes.c_int64),
        ("live", ctypes.c_int64),
        ("peak", ctypes.c_int64),
        ("allocations", ctypes.c_uint64),
        ("violations", ctypes.c_uint64),
        ("instances", ctypes.c_uint64),
        ("active", ctypes.c_uint64),
        ("escaped", ctypes.c_int64),
        ("grace_bytes", ctypes.c_int64),
        ("max_instance_peak", ctypes.c_int64),
    ]


class _ProcessStats(ctypes.Structure):
    """Mirror of ap_process_stats."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("preloaded", ctypes.c_uint32),
        ("budget", ctypes.c_int64),
        ("live", ctypes.c_int64),
        ("peak", ctypes.c_int64),
        ("allocations", ctypes.c_uint64),
        ("violations", ctypes.c_uint64),
        ("arenas_live", ctypes.c_uint64),
        ("foreign_frees", ctypes.c_uint64),
        ("scopes", ctypes.c_uint32),
        ("arena_hook", ctypes.c_uint32),
        ("grace", ctypes.c_int64),
    ]


class _CtypesTask:
    """The task scope through the C ABI of the preloaded library directly."""

    api = "ctypes"

    def __init__(self, name: str) -> None:
        # PyDLL: calls keep the GIL, which the arena hook installation needs.
        lib = ctypes.PyDLL(None)
        if not hasattr(lib, "ap_enter"):
            raise SystemExit("workload: task mode needs LD_PRELOAD=liballocpolicy.so")
        self.lib = lib
        scope = ctypes.c_uint32()
        if lib.ap_scope_find(name.encode(), ctypes.byref(scope)) != 0:
            raise SystemExit(f"workload: scope {name!r} is not in ALLOCPOLICY_TABLE")
        self.scope = scope.value
        get = ctypes.cast(ctypes.pythonapi.PyObject_GetArenaAllocator, ctypes.c_void_p)
        set_ = ctypes.cast(ctypes.pythonapi.PyObject_SetArenaAllocator, ctypes.c_void_p)
        lib.ap_py_install_arena_hook.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        if lib.ap_py_install_arena_hook(get.value, set_.value) != 0:
            raise SystemExit("workload: ap_py_install_arena_hook failed")

    def __enter__(self) -> None:
        inst = ctypes.c_uint32()
        if self.lib.ap_enter(self.scope, ctypes.byref(inst)) != 0:
            raise SystemExit("workload: ap_enter failed")

    def __exit__(self, *exc: object) -> None:
        self.lib.ap_exit()

    def stats(self) -> dict:
        self.lib.ap_flush()
        s = _ScopeStats(size=ctypes.sizeof(_ScopeStats))
        self.lib.ap_get_scope_stats(self.scope, ctypes.byref(s))
        p = _ProcessStats(size=ctypes.sizeof(_ProcessStats))
        self.lib.ap_get_process_stats(ctypes.byref(p))
        return {
            "peak": s.peak,
            "live": s.live,
            "allocations": s.allocations,
            "violations": s.violations,
            "budget": s.budget,
            "arena_hook": p.arena_hook,
            "arenas_live": p.arenas_live,
        }


class _PublicTask:
    """The task scope through the public Python API."""

    api = "public"

    def __init__(self, name: str) -> None:
        import allocpolicy

        self.mod = allocpolicy
        self.name = name
        self.cm = None

    def __enter__(self) -> None:
        self.cm = self.mod.task(self.name)
        self.cm.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.cm.__exit__(None, None, None)

    def stats(self) -> dict:
        s = self.mod.stats().scopes[self.name]
        out = {}
        for key in ("peak", "live", "allocations", "violations", "budget"):
            value = getattr(s, key, None)
            if value is not None:
                out[key] = value
        return out


def _task_scope(name: str, api: str):
    if api in ("auto", "public"):
        try:
            import allocpolicy

            if hasattr(allocpolicy, "task") and hasattr(allocpolicy, "stats"):
                return _PublicTask(name)
        except Exception:
            if api == "public":
                raise
        if api == "public":
            raise SystemExit("workload: allocpolicy.task/stats not available")
    return _CtypesTask(name)


# ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--mode", choices=["plain", "task", "tracemalloc", "memray"], default="plain")
    ap.add_argument("--api", choices=["auto", "public", "ctypes"], default="auto")
    ap.add_argument("--scope", default="task")
    args = ap.parse_args()

    result: dict = {"mode": args.mode, "pythonmalloc": os.environ.get("PYTHONMALLOC", "")}
    gc.collect()
    if args.mode == "plain":
        t0, c0 = time.perf_counter(), time.process_time()
        check = workload(args.scale)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    elif args.mode == "task":
        t0, c0 = time.perf_counter(), time.process_time()
        task = _task_scope(args.scope, args.api)
        with task:
            check = workload(args.scale)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        result["api"] = task.api
        result["scope"] = task.stats()
    elif args.mode == "tracemalloc":
        import tracemalloc

        t0, c0 = time.perf_counter(), time.process_time()
        tracemalloc.start()
        check = workload(args.scale)
        result["traced_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    else:
        import memray

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "workload.bin")
            t0, c0 = time.perf_counter(), time.process_time()
            with memray.Tracker(path):
                check = workload(args.scale)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            result["memray_file_bytes"] = os.path.getsize(path)
    result["elapsed"] = elapsed
    result["cpu"] = cpu
    result["check"] = check
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
