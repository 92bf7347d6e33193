"""Run under ``allocpolicy run --policy task_policy.toml``: ordinary tasks with
bombs among them through each scoped runner; prints one JSON line per runner.

    python task_runners.py thread|process-fork|process-spawn|pool-fork|pool-forkserver
"""

from __future__ import annotations

import json
import multiprocessing
import sys

import allocpolicy
import jobs
from allocpolicy.integrations.futures import ScopedProcessPoolExecutor, ScopedThreadPoolExecutor
from allocpolicy.integrations.pool import ScopedPool

N = 60  # ordinary tasks
EVERY = 6  # a bomb after every 6th


def plan() -> list[tuple[str, object, int]]:
    out = []
    for i in range(N):
        out.append(("normal", jobs.normal, i))
        if i % EVERY == EVERY - 1:
            bomb = jobs.BOMBS[(i // EVERY) % len(jobs.BOMBS)]
            out.append((bomb.__name__, bomb, i))
    return out


def outcome(get) -> dict:
    try:
        value = get()
    except allocpolicy.AllocError as err:
        return {"error": "AllocError", "scope": err.scope, "task": err.task, "size": err.size,
                "budget": err.budget, "reason": err.reason}
    except BaseException as err:  # reported, never hidden
        return {"error": type(err).__name__, "detail": str(err)[:300]}
    return {"value": value}


def run_futures(pool) -> dict:
    work = plan()
    with pool:
        futures = [pool.submit(fn, i) for _, fn, i in work]
        results = [dict(kind=kind, **outcome(f.result)) for (kind, _, _), f in zip(work, futures)]
        # map with chunks: each item still in its own instance
        mapped = outcome(lambda: list(pool.map(jobs.normal, range(8), chunksize=4)))
        lives = [pool.submit(jobs.scope_live).result() for _ in range(4)]
    return {"results": results, "mapped": mapped, "lives": lives}


def run_pool(pool) -> dict:
    work = plan()
    with pool:
        pending = [pool.apply_async(fn, (i,)) for _, fn, i in work]
        results = [dict(kind=kind, **outcome(lambda p=p: p.get(60))) for (kind, _, _), p in zip(work, pending)]
        mapped = outcome(lambda: pool.map(jobs.normal, range(8), chunksize=4))
        starred = outcome(lambda: pool.starmap(jobs.add, [(1, 2), (3, 4)]))
        unordered = outcome(lambda: sorted(pool.imap_unordered(jobs.bomb_bytes, range(2))))
        lives = [pool.apply(jobs.scope_live) for _ in range(4)]
    return {"results": results, "mapped": mapped, "starred": starred, "unordered": unordered, "lives": lives}


def run_retries() -> dict:
    """A 100 MiB job under a 64 MiB budget: refused without retries, done
    with one rerun at twice the budget; a bomb still fails after its reruns."""
    out = {}
    runners = {
        "thread": lambda **kw: ScopedThreadPoolExecutor(max_workers=2, **kw),
        "process": lambda **kw: ScopedProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"), **kw),
    }
    for name, make in runners.items():
        for retries in (0, 1):
            with make(retries=retries, escalate=2.0) as pool:
                out[f"{name}-{retries}"] = [outcome(pool.submit(jobs.needs_mib, 100).result),
                                            outcome(pool.submit(jobs.bomb_bytes, 0).result)]
    with ScopedPool(2, retries=1, context=multiprocessing.get_context("fork")) as pool:
        out["pool-1"] = [outcome(lambda: pool.apply(jobs.needs_mib, (100,))),
                         outcome(lambda: pool.apply(jobs.bomb_bytes, (0,)))]
    return out


def main(which: str) -> None:
    if which == "retries":
        print(json.dumps(run_retries()))
        return
    if which == "thread":
        before = jobs.scope_live()
        out = run_futures(ScopedThreadPoolExecutor(max_workers=4))
        out["live_before"], out["live_after"] = before, jobs.scope_live()
    elif which.startswith("process-"):
        ctx = multiprocessing.get_context(which.split("-")[1])
        out = run_futures(ScopedProcessPoolExecutor(max_workers=2, mp_context=ctx))
    else:
        out = run_pool(ScopedPool(2, context=multiprocessing.get_context(which.split("-")[1])))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
