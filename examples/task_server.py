"""A small task server that survives memory bombs.

Run it under the runtime, with the built-in default policy (scope ``task``:
``on_oom = "raise"``, 256 MiB per task)::

    allocpolicy run -- python examples/task_server.py

A pool of worker threads processes a batch of ordinary tasks (parsing and
serialising JSON, compressing, sorting, hashing) while a few memory bombs run
among them. Every task runs inside ``allocpolicy.task("task")``, so a bomb
fails alone with ``AllocError`` at its own boundary; the other tasks, running
concurrently in the same process, complete. The process exits 0 when every
ordinary task completed and every bomb was stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import allocpolicy

# --- the work ---------------------------------------------------------------


def normal_task(seed: int) -> str:
    """An ordinary request: a few MiB of real work."""
    rng = random.Random(seed)
    records = [
        {"id": i, "name": f"user-{rng.randrange(10**6)}", "tags": [rng.random() for _ in range(5)]}
        for i in range(rng.randint(2_000, 20_000))
    ]
    text = json.dumps(records)
    parsed = json.loads(text)
    parsed.sort(key=lambda r: r["name"])
    packed = zlib.compress(text.encode(), 6)
    digest = hashlib.sha256(packed).hexdigest()[:12]
    return f"{len(parsed)} records, {len(packed)} bytes compressed, sha256 {digest}"


def bomb_one_huge_buffer(seed: int) -> str:
    """Asks for 8 GiB at once: refused before anything is allocated."""
    blob = bytearray(8 << 30)
    return f"allocated {len(blob)} bytes"


def bomb_small_objects(seed: int) -> str:
    """Millions of small dicts: pymalloc memory, counted through its arenas."""
    rows = []
    while True:
        rows.append({"row": len(rows), "value": len(rows) * 2})


def bomb_doubling(seed: int) -> str:
    """A buffer that doubles until it does not fit."""
    data = b"x" * (1 << 20)
    while True:
        data = data + data


BOMBS = [bomb_one_huge_buffer, bomb_small_objects, bomb_doubling]


# --- the server ---------------------------------------------------------------


def run_task(task_id: int, kind: str, fn) -> tuple[int, str, str, str, float]:
    """One task boundary: whatever happens inside stays inside."""
    started = time.perf_counter()
    try:
        with allocpolicy.task("task"):
            detail = fn(task_id)
        outcome = "ok"
    except allocpolicy.AllocError as err:
        outcome = "AllocError"
        detail = (
            f"{err.reason}: {err.size} bytes refused in scope {err.scope!r} "
            f"(budget {err.budget}, live {err.live})"
        )
    except Exception as err:  # an unexpected failure is reported, not hidden
        outcome = type(err).__name__
        detail = str(err)
    return task_id, kind, outcome, detail, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=24, help="ordinary tasks (default 24)")
    parser.add_argument("--workers", type=int, default=4, help="worker threads (default 4)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    if not allocpolicy.is_active():
        print(
            "task_server: the allocpolicy runtime is not active; start this example with\n"
            "    allocpolicy run -- python examples/task_server.py",
            file=sys.stderr,
        )
        return 2

    jobs = [(i, "normal", normal_task) for i in range(args.tasks)]
    # Spread the bombs through the batch so they run next to ordinary tasks.
    for n, bomb in enumerate(BOMBS):
        jobs.insert((n + 1) * len(jobs) // (len(BOMBS) + 1), (1000 + n, bomb.__name__, bomb))

    policy = allocpolicy.active_policy()
    budget = policy.scopes["task"].budget
    print(
        f"task_server: {args.tasks} tasks and {len(BOMBS)} bombs on {args.workers} threads; "
        f"policy {policy.source}, scope 'task' budget {budget} bytes"
    )
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(lambda job: run_task(*job), jobs))

    for task_id, kind, outcome, detail, seconds in results:
        print(f"  task {task_id:>4} {kind:<22} {outcome:<10} {seconds:6.2f}s  {detail}")

    normal_ok = sum(1 for r in results if r[1] == "normal" and r[2] == "ok")
    bombs_stopped = sum(1 for r in results if r[1] != "normal" and r[2] == "AllocError")
    print()
    print(allocpolicy.stats().format())
    print()
    print(
        f"task_server: {normal_ok}/{args.tasks} ordinary tasks completed, "
        f"{bombs_stopped}/{len(BOMBS)} bombs stopped with AllocError; the process carried on"
    )
    return 0 if normal_ok == args.tasks and bombs_stopped == len(BOMBS) else 1


if __name__ == "__main__":
    sys.exit(main())
