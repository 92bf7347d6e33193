"""Cost of following asyncio tasks: per task step, and per task created.

    python benchmarks/asyncio_steps.py [--lib PATH] [--quick]
    python benchmarks/run.py --only asyncio

In a child process under the preloaded runtime, on the Python running this
script, on the default event loop and on uvloop (when installed). A task that
awaits ``asyncio.sleep(0)`` in a loop makes one step per iteration (the loop
runs once around for each); the figures are medians of such loops, in
nanoseconds per step, loop iteration included:

unfollowed        a task made with ``asyncio.Task(...)`` directly: no stepper,
                  what every task cost before tasks were followed (baseline)
outside scopes    a task made by the loop (stepped), in no scope: what every
                  task of a program pays
in a scope        the same task inside ``with allocpolicy.task()``: each step
                  attaches the instance and detaches it again
in 3 scopes       three nested scopes: the same two native calls, three levels

and, per task created and run to completion (``gather`` of tasks that return
at once): made by the loop's own ``create_task`` (as before the runtime wrapped
it: the baseline) against the wrapped one, outside and inside a scope.
Each variant is repeated with the order rotated. Loops are timed in CPU time
of the loop's thread (``thread_time_ns``), so time the machine spends on other
processes is not counted.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from children import run_child, standalone  # beside this script
from run import preload_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

STEP_VARIANTS = {
    "unfollowed": "step of a task made with asyncio.Task() (baseline)",
    "outside": "step of a task made by the loop, outside scopes",
    "scope": "step inside one scope",
    "scope3": "step inside three nested scopes",
}
SPAWN_VARIANTS = {
    "spawn_unfollowed": "task made by the loop's own create_task (baseline)",
    "spawn_outside": "task made by the loop, outside scopes",
    "spawn_scope": "task made by the loop inside a scope",
}


def child(loop_name: str, steps: int, spawns: int, repeats: int) -> dict:
    """Runs under the preload: time the loops on one event loop, return the samples."""
    import asyncio
    from time import thread_time_ns

    import allocpolicy

    if not allocpolicy.is_active():
        raise SystemExit("asyncio_steps: the runtime is not preloaded")
    allocpolicy.configure({"scopes": {"bench": {"on_oom": "raise", "budget": "1 GiB"}}})

    async def stepping(n, depth):
        if depth:
            with allocpolicy.task("bench"):
                return await stepping(n, depth - 1)
        t = thread_time_ns()
        for _ in range(n):
            await asyncio.sleep(0)
        return thread_time_ns() - t

    async def nothing():
        return None

    async def spawning(n, direct):
        loop = asyncio.get_running_loop()
        # The loop's create_task as it was before the runtime wrapped it.
        create = type(loop).create_task
        if direct:
            create = getattr(create, "__allocpolicy_original__")
        t = thread_time_ns()
        await asyncio.gather(*[create(loop, nothing()) for _ in range(n)])
        return thread_time_ns() - t

    async def in_scope(coro):
        with allocpolicy.task("bench"):
            return await coro

    async def main():
        loop = asyncio.get_running_loop()
        runs = {
            "unfollowed": lambda: asyncio.Task(stepping(steps, 0), loop=loop),
            "outside": lambda: loop.create_task(stepping(steps, 0)),
            "scope": lambda: loop.create_task(stepping(steps, 1)),
            "scope3": lambda: loop.create_task(stepping(steps, 3)),
            "spawn_unfollowed": lambda: loop.create_task(spawning(spawns, True)),
            "spawn_outside": lambda: loop.create_task(spawning(spawns, False)),
            "spawn_scope": lambda: loop.create_task(in_scope(spawning(spawns, False))),
        }
        per = {v: steps if v in STEP_VARIANTS else spawns for v in runs}
        order = list(runs)
        samples: dict[str, list[float]] = {v: [] for v in order}
        for r in range(repeats):
            for v in order[r % len(order):] + order[: r % len(order)]:
                samples[v].append(await runs[v]() / per[v])
        return samples

    if loop_name == "uvloop":
        import uvloop

        samples = uvloop.run(main())
    else:
        samples = asyncio.run(main())
    if allocpolicy.stats().scopes["bench"].active:
        raise SystemExit("asyncio_steps: a scope instance outlived its task")
    return {"samples": samples}


def _loops() -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["asyncio", "uvloop"]


def measure(lib: Path, *, quick: bool = False, repeats: int | None = None) -> dict:
    """Run the child under the preload of ``lib`` for each loop; medians in ns."""
    steps = 20_000 if quick else 100_000
    spawns = 2_000 if quick else 10_000
    repeats = repeats or (3 if quick else 7)
    env = preload_env(lib, "v=1;process=raise:0")
    out: dict = {"python": sys.version.split()[0], "steps": steps, "spawns": spawns,
                 "repeats": repeats, "loops": {}}
    for loop_name in _loops():
        res = run_child(__file__, [loop_name, steps, spawns, repeats], env,
                        f"asyncio_steps on {loop_name}")
        med = {v: statistics.median(xs) for v, xs in res["samples"].items()}
        out["loops"][loop_name] = {
            "ns": med,
            "added_ns": {
                "outside": med["outside"] - med["unfollowed"],
                "scope": med["scope"] - med["unfollowed"],
                "scope3": med["scope3"] - med["unfollowed"],
                "spawn_outside": med["spawn_outside"] - med["spawn_unfollowed"],
                "spawn_scope": med["spawn_scope"] - med["spawn_unfollowed"],
            },
            "samples": res["samples"],
        }
    return out


def report(res: dict) -> str:
    lines = [
        f"\nAsyncio tasks: ns per step and per task, medians of {res['repeats']} loops of "
        f"{res['steps']:,} steps / {res['spawns']:,} tasks (Python {res['python']})"
    ]
    for loop_name, r in res["loops"].items():
        lines.append(f"  {loop_name}")
        for v, label in {**STEP_VARIANTS, **SPAWN_VARIANTS}.items():
            base = "unfollowed" if v in STEP_VARIANTS else "spawn_unfollowed"
            added = "" if v == base else f"  (+{r['ns'][v] - r['ns'][base]:.0f})"
            lines.append(f"    {label:<52} {r['ns'][v]:8.0f}{added}")
    return "\n".join(lines)



if __name__ == "__main__":
    standalone(__doc__, measure, report, child, 4)
