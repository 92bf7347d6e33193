"""Hot-path cost of library scopes (``libraries = [...]``): ns per malloc/free
pair of 64 bytes, side by side, in one run.

    python benchmarks/lib_lookup.py [--pairs N] [--repeat R] [--lib PATH]

Variants (benchmarks/c/lib_pairs.c):

  none        preload, no library bound: the entry points test one flag
  bound-miss  preload, a scope bound to libpairs_bench.so, pairs made by the
              program's own code: every call looks up its caller (a hit in the
              per-thread cache) and finds it unbound
  bound-hit   the same, pairs made by libpairs_bench.so: the caller matches,
              each allocation runs in the library's instance (exact slow path)
  report      preload, no scope bound, the libraries report on: a lookup and
              three shared counters per allocation (diagnostic mode)
  plain       no preload, for reference

Each variant runs --repeat times, the order rotated on every repeat; the
figure is the median CPU time per pair of the timed loop (thread CPU clock).
With valgrind installed, instructions per pair are counted too (exact and
repeatable): the difference between runs of 2N and N pairs under cachegrind,
divided by N.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

VARIANTS = {
    "plain": ("no preload", None, "main"),
    "none": ("preload, no library bound", "v=1;process=raise:0", "main"),
    "bound-miss": (
        "library scope bound, caller not in it (cache hit)",
        "v=1;process=raise:0;scope=zlibish:raise:1073741824:0:lib=libpairs_bench.so",
        "main",
    ),
    "bound-hit": (
        "library scope bound, caller in it",
        "v=1;process=raise:0;scope=zlibish:raise:1073741824:0:lib=libpairs_bench.so",
        "lib",
    ),
    "report": ("libraries report on, nothing bound", "v=1;process=raise:0", "main"),
}


def build(out: Path) -> tuple[Path, Path]:
    cc = os.environ.get("CC", "cc")
    src = HERE / "c" / "lib_pairs.c"
    lib = out / "libpairs_bench.so"
    exe = out / "lib_pairs"
    subprocess.run([cc, "-O2", "-std=gnu11", "-shared", "-fPIC", "-DLIB_PAIRS_LIBRARY", str(src),
                    "-o", str(lib)], check=True)
    subprocess.run([cc, "-O2", "-std=gnu11", str(src), "-o", str(exe), "-ldl"], check=True)
    return exe, lib


def instructions(exe: Path, lib: Path, runtime: Path, variant: str, pairs: int, tmp: Path) -> float:
    """Instructions per pair of `variant` (cachegrind, no cache simulation)."""
    totals = []
    for n in (pairs, 2 * pairs):
        out_file = tmp / f"cg.{variant}.{n}"
        run_once(exe, lib, runtime, variant, n,
                 wrap=["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out_file}"])
        summary = [line for line in out_file.read_text().splitlines() if line.startswith("summary:")]
        totals.append(int(summary[0].split()[1]))
    return (totals[1] - totals[0]) / pairs


def run_once(exe: Path, lib: Path, runtime: Path, variant: str, pairs: int, wrap: list[str] = ()) -> float:
    _, table, who = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCPOLICY_") and k != "LD_PRELOAD"}
    if table is not None:
        env["LD_PRELOAD"] = str(runtime)
        env["ALLOCPOLICY_TABLE"] = table
    with open(os.devnull, "w") as sink:
        if variant == "report":
            # The table goes to /dev/null at exit; the counting is what is timed.
            env["ALLOCPOLICY_TABLE"] = f"{table};libreport={sink.fileno()}"
        out = subprocess.run([*wrap, str(exe), str(lib), who, "64", str(pairs)], env=env, capture_output=True,
                             text=True, check=True, pass_fds=(sink.fileno(),))
    return float(out.stdout.split("=")[1])


def measure(runtime: Path, *, pairs: int = 20_000_000, repeats: int = 7) -> dict:
    """Every variant, ``repeats`` times in rotated order; medians and, with
    valgrind, instructions per pair. Used by run.py (``--only libs``)."""
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    counted: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        exe, lib = build(Path(tmp))
        order = list(VARIANTS)
        for r in range(repeats):
            for variant in order[r % len(order):] + order[: r % len(order)]:
                samples[variant].append(run_once(exe, lib, runtime, variant, pairs))
        if shutil.which("valgrind"):
            for variant in VARIANTS:
                counted[variant] = instructions(exe, lib, runtime, variant, 200_000, Path(tmp))
    return {
        "pairs": pairs,
        "samples_ns": samples,
        "median_ns": {v: statistics.median(s) for v, s in samples.items()},
        "instructions": counted,
    }


def report(res: dict) -> str:
    """The side-by-side table of :func:`measure`'s result."""
    base = res["median_ns"]["none"]
    lines = [
        "\nLibrary scopes: malloc/free pairs of 64 bytes",
        f"  {'variant':<12} {'ns/pair':>8} {'vs none':>8} {'instr/pair':>10}  what",
    ]
    for variant, (what, _, _) in VARIANTS.items():
        med = res["median_ns"][variant]
        counted = res["instructions"].get(variant)
        ir = f"{counted:10.1f}" if counted is not None else f"{'-':>10}"
        lines.append(f"  {variant:<12} {med:8.2f} {med - base:+8.2f} {ir}  {what}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--lib", default=str(ROOT / "native" / "build" / "liballocpolicy.so"))
    args = parser.parse_args(argv)
    res = measure(Path(args.lib).resolve(), pairs=args.pairs, repeats=args.repeat)
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
