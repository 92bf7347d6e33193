"""Cost of entering and leaving a task or scope, against ``contextlib.nullcontext()``.

    python benchmarks/scope_entry.py [--lib PATH] [--quick]
    python benchmarks/run.py --only enter

Loops of ``with X: pass`` in a child process under the preloaded runtime:

nullcontext      ``with contextlib.nullcontext(): pass``, the floor of any
                 context manager made per use
task             ``with allocpolicy.task("bench"): pass``: a new task object,
                 an instance entered and left
task, reused     ``with t: pass`` for one task object made once
scope            ``with allocpolicy.scope("bench"): pass``

Each loop is timed with perf_counter_ns, repeated with the order rotated; the
figures are medians in nanoseconds per block, loop overhead included (the
same in every variant), and ratios to nullcontext in the same run
(target: task at most 2x, docs/benchmarks.rst). With valgrind on the PATH (and
not --quick), the same loops are also counted in instructions per block under
callgrind, which the load of a shared machine does not move.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from children import run_child, standalone  # beside this script
from run import preload_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

TARGET = 2.0

VARIANTS = {
    "nullcontext": "with contextlib.nullcontext(): pass",
    "task": 'with allocpolicy.task("bench"): pass',
    "task_reused": "with t: pass (one task object)",
    "scope": 'with allocpolicy.scope("bench"): pass',
}


def child(blocks: int, repeats: int) -> dict:
    """Runs under the preload: time the loops, return the samples."""
    import contextlib
    from time import perf_counter_ns

    import allocpolicy

    if not allocpolicy.is_active():
        raise SystemExit("scope_entry: the runtime is not preloaded")
    allocpolicy.configure({"scopes": {"bench": {"on_oom": "raise"}}})
    nullcontext, task, scope = contextlib.nullcontext, allocpolicy.task, allocpolicy.scope
    reused = task("bench")

    def run_null():
        t = perf_counter_ns()
        for _ in range(blocks):
            with nullcontext():
                pass
        return perf_counter_ns() - t

    def run_task():
        t = perf_counter_ns()
        for _ in range(blocks):
            with task("bench"):
                pass
        return perf_counter_ns() - t

    def run_reused():
        t = perf_counter_ns()
        for _ in range(blocks):
            with reused:
                pass
        return perf_counter_ns() - t

    def run_scope():
        t = perf_counter_ns()
        for _ in range(blocks):
            with scope("bench"):
                pass
        return perf_counter_ns() - t

    runs = {"nullcontext": run_null, "task": run_task, "task_reused": run_reused, "scope": run_scope}
    before = allocpolicy.stats().scopes["bench"].instances
    for fn in runs.values():  # warm up: caches, the first lookups
        fn()
    order = list(runs)
    samples: dict[str, list[float]] = {v: [] for v in order}
    for r in range(repeats):
        for v in order[r % len(order):] + order[: r % len(order)]:
            samples[v].append(runs[v]() / blocks)
    entered = allocpolicy.stats().scopes["bench"].instances - before
    expected = (repeats + 1) * 3 * blocks
    if entered != expected:
        raise SystemExit(f"scope_entry: {entered} instances entered, expected {expected}")
    return {"samples": samples}


def count_child(variant: str, blocks: int) -> None:
    """Runs under the preload and callgrind: one loop of ``variant``."""
    import contextlib

    import allocpolicy

    allocpolicy.configure({"scopes": {"bench": {"on_oom": "raise"}}})
    nullcontext, task, scope = contextlib.nullcontext, allocpolicy.task, allocpolicy.scope
    reused = task("bench")
    with task("bench"):  # the first entry of the name looks its id up
        pass
    if variant == "nullcontext":
        for _ in range(blocks):
            with nullcontext():
                pass
    elif variant == "task":
        for _ in range(blocks):
            with task("bench"):
                pass
    elif variant == "task_reused":
        for _ in range(blocks):
            with reused:
                pass
    elif variant == "scope":
        for _ in range(blocks):
            with scope("bench"):
                pass


def instructions(env: dict, blocks: int = 40_000) -> dict[str, float]:
    """Instructions per block of each variant: the difference between a run
    of ``blocks`` blocks and one of none, under callgrind."""
    def total(variant: str, n: int) -> int:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
             str(Path(__file__).resolve()), "--count", variant, str(n)],
            env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(),
        )
        found = re.search(r"Collected : (\d+)", out.stderr)
        if out.returncode != 0 or found is None:
            raise SystemExit(f"scope_entry: callgrind failed:\n{out.stderr.strip()[-2000:]}")
        return int(found.group(1))

    return {v: (total(v, blocks) - total(v, 0)) / blocks for v in VARIANTS}


def measure(lib: Path, *, quick: bool = False, repeats: int | None = None) -> dict:
    """Run the child under the preload of ``lib``; medians in ns per block."""
    blocks = 20_000 if quick else 100_000
    repeats = repeats or (3 if quick else 7)
    env = preload_env(lib, "v=1;process=raise:0")
    res = run_child(__file__, [blocks, repeats], env, "scope_entry")
    med = {v: statistics.median(xs) for v, xs in res["samples"].items()}
    counted = instructions(env) if not quick and shutil.which("valgrind") else {}
    return {
        "instructions_per_block": counted,
        "instruction_ratio_to_nullcontext": {v: counted[v] / counted["nullcontext"] for v in counted},
        "python": sys.version.split()[0],
        "blocks": blocks,
        "repeats": repeats,
        "ns_per_block": med,
        "ratio_to_nullcontext": {v: med[v] / med["nullcontext"] for v in med},
        "target": TARGET,
        "samples": res["samples"],
    }


def report(res: dict) -> str:
    lines = [
        f"\nScope entry and exit: ns per block, median of {res['repeats']} loops of "
        f"{res['blocks']:,} (Python {res['python']})"
    ]
    for v, label in VARIANTS.items():
        lines.append(f"  {label:<42} {res['ns_per_block'][v]:8.1f}  "
                     f"{res['ratio_to_nullcontext'][v]:5.2f}x")
    counted = res.get("instructions_per_block") or {}
    if counted:
        lines.append("  instructions per block under callgrind:")
        for v, label in VARIANTS.items():
            lines.append(f"  {label:<42} {counted[v]:8.0f}  "
                         f"{res['instruction_ratio_to_nullcontext'][v]:5.2f}x")
    lines.append(f"  target: task at most {res['target']:.1f}x nullcontext")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--count":
        count_child(sys.argv[2], int(sys.argv[3]))
        return
    standalone(__doc__, measure, report, child, 2)


if __name__ == "__main__":
    main()
