"""Per-call cost of a scope bound to a Python module (``modules = [...]``).

    python benchmarks/module_scope_calls.py [--lib PATH] [--quick]
    python benchmarks/run.py --only modules

Loops of calls to a function that does nothing, in a child process under the
preloaded runtime, on the Python running this script:

unbound          from unbound code to a function of a module no scope is bound to
into bound       from unbound code into a bound module: every call enters an
                 instance of the scope and leaves it
within bound     from a function of the bound module to another one of the same
                 module: the thread is in the scope already, nothing is entered
within unbound   the same loop in the unbound module, the baseline of the previous

The mechanism differs by version (sys.monitoring on 3.12+, wrappers on 3.11;
see docs/binding.rst), so the figures do too. Each loop is timed with
perf_counter_ns, repeated with the order rotated; the figures are medians in
nanoseconds per call, loop overhead included (the same in every variant).
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

# Both modules have this source; only the first is bound.
BOUND, FREE = "apbench_bound", "apbench_free"
SOURCE = '''
from time import perf_counter_ns

def leaf():
    return None

def loop(n):
    """n calls from this module to this module, timed from inside."""
    f = leaf
    t = perf_counter_ns()
    for _ in range(n):
        f()
    return perf_counter_ns() - t
'''

VARIANTS = {
    "unbound": "call to an unbound function",
    "into_bound": "call into a bound module (enter + exit)",
    "within_bound": "call within bound code (already in the scope)",
    "within_unbound": "the same loop within an unbound module",
}


def _timed_calls(fn, n: int) -> int:
    from time import perf_counter_ns

    t = perf_counter_ns()
    for _ in range(n):
        fn()
    return perf_counter_ns() - t


def child(calls: int, repeats: int) -> dict:
    """Runs under the preload: bind one module, time the loops, return the samples."""
    work = Path(tempfile.mkdtemp(prefix="apbench-"))
    for name in (BOUND, FREE):
        (work / f"{name}.py").write_text(SOURCE)
    sys.path.insert(0, str(work))
    import allocpolicy

    if not allocpolicy.is_active():
        raise SystemExit("module_scope_calls: the runtime is not preloaded")
    allocpolicy.configure({"scopes": {"bench": {"modules": [BOUND]}}})
    bound = __import__(BOUND)
    free = __import__(FREE)
    before = allocpolicy.stats().scopes["bench"].instances
    runs = {
        "unbound": lambda: _timed_calls(free.leaf, calls),
        "into_bound": lambda: _timed_calls(bound.leaf, calls),
        # one entry into the scope, then `calls` calls inside it
        "within_bound": lambda: bound.loop(calls),
        "within_unbound": lambda: free.loop(calls),
    }
    order = list(runs)
    samples: dict[str, list[float]] = {v: [] for v in order}
    for r in range(repeats):
        for v in order[r % len(order):] + order[: r % len(order)]:
            samples[v].append(runs[v]() / calls)
    entered = allocpolicy.stats().scopes["bench"].instances - before
    expected = repeats * (calls + 1)  # into_bound: one per call; within_bound: one per loop
    if entered != expected:
        raise SystemExit(f"module_scope_calls: {entered} instances entered, expected {expected}")
    return {"samples": samples, "instances_entered": entered}


def measure(lib: Path, *, quick: bool = False, repeats: int | None = None) -> dict:
    """Run the child under the preload of ``lib``; medians in ns per call."""
    calls = 50_000 if quick else 200_000
    repeats = repeats or (3 if quick else 7)
    env = preload_env(lib, "v=1;process=raise:0")
    res = run_child(__file__, [calls, repeats], env, "module_scope_calls")
    med = {v: statistics.median(xs) for v, xs in res["samples"].items()}
    return {
        "python": sys.version.split()[0],
        "mechanism": "sys.monitoring" if sys.version_info >= (3, 12) else "wrappers",
        "calls": calls,
        "repeats": repeats,
        "ns_per_call": med,
        "added_ns": {
            "into_bound": med["into_bound"] - med["unbound"],
            "within_bound": med["within_bound"] - med["within_unbound"],
        },
        "samples": res["samples"],
    }


def report(res: dict) -> str:
    lines = [
        f"\nModule-bound scope: ns per call, median of {res['repeats']} loops of {res['calls']:,} calls "
        f"(Python {res['python']}, {res['mechanism']})"
    ]
    for v, label in VARIANTS.items():
        lines.append(f"  {label:<50} {res['ns_per_call'][v]:8.1f}")
    added = res["added_ns"]
    lines.append(f"  added by entering and leaving the scope: {added['into_bound']:.1f} ns per call; "
                 f"inside bound code: {added['within_bound']:.1f} ns per call")
    return "\n".join(lines)



if __name__ == "__main__":
    standalone(__doc__, measure, report, child, 2)
