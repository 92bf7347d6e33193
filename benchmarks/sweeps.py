"""Speed of an OOM sweep: forked runs per second for a test of about 200 allocations.

    python benchmarks/sweeps.py [--lib PATH] [--quick]
    python benchmarks/run.py --only sweeps

A test file whose body builds small Python objects (about 200 allocations,
counted by the sweep itself) is swept by pytest in a child process, with the
plugin as users load it:

preloaded, 1 job     ``allocpolicy run -- python -m pytest``, one forked run at a time
preloaded, N jobs    the same, one run per CPU this process may use (the default)
in-process, 1 job    plain ``python -m pytest`` (the runtime installed in-process)
in-process, N jobs   the same, one run per CPU

Each figure is the sweep's own count of runs divided by its own elapsed time
(the "[oom_sweep] ... N s, R runs/s" line: from the counting run to the last
child collected), so pytest's start-up is not in it. Repeated with the order
rotated; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# 48 rounds of a tuple, a str and an int, and the list's growth: about 200
# numbered allocations on CPython 3.11-3.13 (the sweep reports the count).
TEST = '''
import pytest

@pytest.mark.oom_sweep
def test_builds_rows():
    rows = []
    for i in range(48):
        rows.append(("row", str(i * 1000)))
    assert len(rows) == 48
'''

LINE = re.compile(
    r"\[oom_sweep\] \S+: (\d+) of (\d+) allocations failed in turn.*, (\d+) problem\(s\), "
    r"([0-9.]+) s, ([0-9.]+) runs/s"
)


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def variants() -> dict[str, tuple[bool, int]]:
    n = cores()
    return {
        "preloaded, 1 job": (True, 1),
        f"preloaded, {n} jobs": (True, n),
        "in-process, 1 job": (False, 1),
        f"in-process, {n} jobs": (False, n),
    }


def run_once(where: Path, lib: Path | None, preload: bool, jobs: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "PYTHONMALLOC", "PYTEST_ADDOPTS") and not k.startswith("ALLOCPOLICY_")}
    if lib is not None:
        env["ALLOCPOLICY_LIBRARY"] = str(lib)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
           "--oom-sweep-jobs", str(jobs), "test_sweep_speed.py"]
    if preload:
        cmd = [sys.executable, "-m", "allocpolicy", "run", "--", *cmd]
    proc = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=900)
    m = LINE.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"the sweep did not run as expected (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    runs, total, problems, seconds, rate = m.groups()
    return {"runs": int(runs), "allocations": int(total), "problems": int(problems),
            "seconds": float(seconds), "runs_per_second": float(rate)}


def measure(lib: Path | None = None, quick: bool = False, repeats: int = 5) -> dict:
    repeats = 1 if quick else repeats
    names = list(variants())
    samples: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="allocpolicy-sweeps-") as tmp:
        where = Path(tmp)
        (where / "pytest.ini").write_text("[pytest]\n")
        (where / "test_sweep_speed.py").write_text(TEST)
        for r in range(repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                preload, jobs = variants()[name]
                samples[name].append(run_once(where, lib, preload, jobs))
    result = {"cores": cores(), "repeats": repeats, "python": sys.version.split()[0], "variants": {}}
    for name, runs in samples.items():
        rates = sorted(s["runs_per_second"] for s in runs)
        result["variants"][name] = {
            "allocations": runs[0]["allocations"],
            "runs_per_second": statistics.median(rates),
            "min": rates[0],
            "max": rates[-1],
            "seconds": statistics.median(s["seconds"] for s in runs),
            "samples": runs,
        }
    return result


def report(res: dict) -> str:
    lines = [f"\nOOM sweep of a test of about 200 allocations: forked runs per second, median of "
             f"{res['repeats']} ({res['cores']} CPUs, Python {res['python']})"]
    head = f"{'variant':<24}{'allocations':>12}{'runs/s':>9}{'[min-max]':>15}{'sweep s':>9}"
    lines += [head, "-" * len(head)]
    for name, d in res["variants"].items():
        spread = f"[{d['min']:.1f}-{d['max']:.1f}]"
        lines.append(f"{name:<24}{d['allocations']:>12}{d['runs_per_second']:>9.1f}{spread:>15}"
                     f"{d['seconds']:>9.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", help="runtime library (default: the package's)")
    ap.add_argument("--quick", action="store_true", help="one repeat")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    res = measure(Path(args.lib) if args.lib else None, quick=args.quick, repeats=args.repeats)
    print(json.dumps({k: v for k, v in res.items() if k != "variants"}))
    print(report(res))


if __name__ == "__main__":
    main()
