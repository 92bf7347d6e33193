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
(target: task at most 2x, docs/benchmarks.rst).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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


def measure(lib: Path, *, quick: bool = False, repeats: int | None = None) -> dict:
    """Run the child under the preload of ``lib``; medians in ns per block."""
    blocks = 20_000 if quick else 100_000
    repeats = repeats or (3 if quick else 7)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONMALLOC")
           and not k.startswith("ALLOCPOLICY_")}
    env["LD_PRELOAD"] = str(lib)
    env["ALLOCPOLICY_TABLE"] = "v=1;process=raise:0"
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(blocks), str(repeats)],
        env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(),
    )
    if out.returncode != 0:
        raise SystemExit(f"scope_entry failed:\n{out.stderr.strip()}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    med = {v: statistics.median(xs) for v, xs in res["samples"].items()}
    return {
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
    lines.append(f"  target: task at most {res['target']:.1f}x nullcontext")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]), int(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=str(ROOT / "native" / "build" / "liballocpolicy.so"),
                    help="runtime library to preload (default: the source tree's build)")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter loops")
    args = ap.parse_args()
    print(report(measure(Path(args.lib), quick=args.quick)))


if __name__ == "__main__":
    main()
