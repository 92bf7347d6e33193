"""Ordinary Python workloads, timed under one tracing setup.

    python benchmarks/workload.py --scale 1.0 --mode plain|task|tracemalloc|memray
                                  [--kind objects|numpy]

objects (the default) is a small mix in the spirit of pyperformance: records
as dicts of short strings, a JSON round trip, instances of a class with
attributes, sorting, string formatting and splitting, and float arithmetic on
small objects. It allocates mostly small objects (pymalloc's domain) plus the
occasional large list or dict table and string (the malloc family).

numpy builds, computes on and serializes many small NumPy arrays (tobytes and
frombuffer, pickle, np.save): NumPy allocates array data and shapes through
the malloc family, so this is the C-extension side, where every small block
goes through the preloaded allocator.

Modes
    plain        no tracing (run it with or without LD_PRELOAD)
    task         the whole workload inside the task scope "task"; needs the
                 runtime preloaded and a policy declaring "task"
    tracemalloc  tracemalloc.start() before the workload
    memray       memray.Tracker around the workload

Prints one JSON object on stdout: elapsed wall seconds and process CPU seconds
from switching the tracer or scope on to switching it off again (interpreter
start-up and imports excluded), the process's peak resident set size
(`maxrss`, bytes, start-up included), a checksum that must be equal in every
mode, and, in task mode, the scope's statistics.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import pickle
import random
import resource
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


def numpy_arrays(rng: random.Random, n: int) -> int:
    """Many small arrays: built, combined, and serialized three ways."""
    import numpy as np

    check = 0
    batch = []
    for i in range(n):
        a = np.arange(rng.randint(1, 48), dtype=np.int64) * (i % 7 + 1)
        b = a.reshape(-1, 1) + a[: min(len(a), 4)]
        batch.append(b.sum(axis=1))
        if len(batch) == 64:
            joined = np.concatenate(batch)
            raw = joined.tobytes()
            back = np.frombuffer(raw, dtype=np.int64).copy()
            blob = pickle.dumps(batch, protocol=5)
            again = pickle.loads(blob)
            buf = io.BytesIO()
            np.save(buf, again[rng.randrange(len(again))])
            buf.seek(0)
            check += int(back.sum()) + len(blob) + int(np.load(buf).sum())
            batch = []
    return check


def workload_numpy(scale: float) -> int:
    rng = random.Random(12345)
    check = 0
    for _ in range(max(1, round(16 * scale))):
        check += numpy_arrays(rng, 6000)
    return check


# ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--mode", choices=["plain", "task", "tracemalloc", "memray"], default="plain")
    ap.add_argument("--scope", default="task")
    ap.add_argument("--kind", choices=["objects", "numpy"], default="objects")
    args = ap.parse_args()
    run = workload
    if args.kind == "numpy":
        import numpy  # noqa: F401  (imported before the clock starts)

        run = workload_numpy

    result: dict = {"mode": args.mode, "pythonmalloc": os.environ.get("PYTHONMALLOC", "")}
    gc.collect()
    if args.mode == "plain":
        t0, c0 = time.perf_counter(), time.process_time()
        check = run(args.scale)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    elif args.mode == "task":
        import allocpolicy

        # Resolve the lazily imported scope API before the clock starts:
        # importing it is a one-time cost, not a cost of running in a scope.
        task = allocpolicy.task
        t0, c0 = time.perf_counter(), time.process_time()
        with task(args.scope):
            check = run(args.scale)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        st = allocpolicy.stats()
        scope = st.scopes[args.scope]
        result["scope"] = {
            "peak": scope.peak,
            "live": scope.live,
            "allocations": scope.allocations,
            "violations": scope.violations,
            "budget": scope.budget,
            "arena_hook": st.process.arena_hook,
            "arenas_live": st.process.arenas_live,
        }
    elif args.mode == "tracemalloc":
        import tracemalloc

        t0, c0 = time.perf_counter(), time.process_time()
        tracemalloc.start()
        check = run(args.scale)
        result["traced_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    else:
        import memray

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "workload.bin")
            t0, c0 = time.perf_counter(), time.process_time()
            with memray.Tracker(path):
                check = run(args.scale)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            result["memray_file_bytes"] = os.path.getsize(path)
    result["elapsed"] = elapsed
    result["cpu"] = cpu
    result["check"] = check
    result["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
