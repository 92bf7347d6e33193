"""Overhead of the allocpolicy runtime, measured side by side in one run.

    python benchmarks/run.py            # full run, a few minutes
    python benchmarks/run.py --quick    # smoke run, well under 30 seconds
    nox -s bench [-- --quick]

Eleven parts, each optional (--only PART, repeatable):

c          a C program doing malloc/free pairs of small blocks, 1 and 2
           threads: (a) no preload, (n) a null interposer that only forwards
           to glibc (the floor for any preload), (b) preload outside any
           scope, (c) each
           thread in its own scope instance with a budget, (d) two threads in
           one shared instance.
callgrind  the same program under valgrind's callgrind: instructions per pair
           (exact and repeatable, unlike time on a shared machine) and where
           the added instructions go; and instructions per round of the
           Python workload (cachegrind), without the preload and in the task
           scope, with pymalloc and with PYTHONMALLOC=malloc (not with
           --quick).
rss        resident memory of a C program holding 2 million small blocks
           (24 bytes, random 8-128, 64, 200 and 1000 bytes): no preload, the
           null interposer, the preload outside any scope and inside a scope
           (benchmarks/c/small_blocks.c). memray and tracemalloc trace Python
           code only; their resident memory is in the python part.
profile    the same program sampled by `perf record -e cpu-clock`: ns per
           pair spent in each function, without and with the preload.
python     two Python workloads, object-heavy (pymalloc's small objects) and
           NumPy-heavy (many small arrays built, computed on and serialized:
           C-extension allocations through the malloc family), each without
           preload, under the preload inside allocpolicy.task("task") with a
           budget, under tracemalloc, under memray, and with
           PYTHONMALLOC=malloc with and without the preload: CPU time and
           peak resident memory.
modules    ns per call into a module bound to a scope, within bound code and
           unbound, on this Python (module_scope_calls.py).
enter      ns per `with allocpolicy.task(...): pass` and `with scope(...)`
           against `with contextlib.nullcontext(): pass` in the same run
           (scope_entry.py).
libs       the hot-path cost of library scopes: malloc/free pairs with no
           library bound, with one bound that the caller is not in (a lookup
           that hits the per-thread cache), with the caller in it, and with
           the libraries report on (lib_lookup.py).
asyncio    ns per asyncio task step and per task created, with tasks not
           followed (the baseline), followed outside scopes, and inside one
           and three scopes, on the default loop and on uvloop
           (asyncio_steps.py).
web        requests/s and server CPU per request of Flask under gunicorn and
           Starlette under uvicorn, without the runtime, under it, and behind
           the integration (web_requests.py).
sweeps     forked runs per second of an OOM sweep of a test of about 200
           allocations, preloaded and in-process, one job and one per CPU
           (sweeps.py).

Every configuration is repeated (7 times by default) and the order of the
variants is rotated on every repeat, so slow drift of the machine is spread
over all of them; the figures are medians. A table of ratios is printed and
everything, raw samples included, is written to benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIBRARY_NAME = "liballocpolicy.so"

# Targets (docs/benchmarks.rst): ratio to the run without the preload.
C_TARGET = 1.10
PY_TARGET = 1.05

C_BUDGET = 1 << 30  # 1 GiB per instance of "work": never refuses here
PY_BUDGET = 4 << 30  # 4 GiB per instance of "task"

C_VARIANTS = {
    "a": "no preload",
    "n": "null interposer",
    "b": "preload, no scope",
    "c": "preload, own scope",
    "d": "preload, shared scope",
}

PY_VARIANTS = {
    "plain": "no preload",
    "preload": "preload, no scope",
    "task": "preload, task scope + budget",
    "tracemalloc": "tracemalloc, no preload",
    "memray": "memray Tracker, no preload",
    "malloc": "PYTHONMALLOC=malloc, no preload",
    "malloc+task": "PYTHONMALLOC=malloc, preload, task scope",
}

# Environment variables a variant must not inherit from whoever runs this.
_SCRUB = ("LD_PRELOAD", "PYTHONMALLOC", "PYTHONTRACEMALLOC", "ALLOCPOLICY_TABLE", "ALLOCPOLICY_POLICY")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Setup


def find_library(explicit: str | None) -> Path:
    """The runtime library: --lib, else the installed package's, else a build
    of native/ in the source tree (made with `make -C native` if missing)."""
    if explicit:
        path = Path(explicit).resolve()
        if not path.is_file():
            raise SystemExit(f"run.py: --lib {explicit}: no such file")
        return path
    code = (
        "import importlib.util, pathlib, sys\n"
        "spec = importlib.util.find_spec('allocpolicy')\n"
        "sys.stdout.write(str(pathlib.Path(spec.origin).parent) if spec and spec.origin else '')\n"
    )
    # Run from a neutral directory so the source tree's package does not shadow
    # the installed one.
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    pkg = out.stdout.strip()
    if pkg:
        candidate = Path(pkg) / "_lib" / LIBRARY_NAME
        if candidate.is_file():
            return candidate.resolve()
    candidate = ROOT / "native" / "build" / LIBRARY_NAME
    if not candidate.is_file():
        log("building the runtime: make -C native")
        subprocess.run(["make", "-C", str(ROOT / "native")], check=True, stdout=subprocess.DEVNULL)
    return candidate.resolve()


def build_c(build_dir: Path) -> tuple[Path, Path]:
    """The pair program and the null interposer (benchmarks/c/); the
    small-block program beside them."""
    cc = os.environ.get("CC", "cc")
    flags = [cc, "-O2", "-std=c11", "-Wall", "-Wextra"]
    binary = build_dir / "malloc_pairs"
    subprocess.run([*flags, "-o", str(binary), str(HERE / "c" / "malloc_pairs.c"),
                    "-ldl", "-lpthread"], check=True)
    null = build_dir / "null_preload.so"
    subprocess.run([*flags, "-shared", "-fPIC", "-o", str(null), str(HERE / "c" / "null_preload.c"),
                    "-ldl"], check=True)
    subprocess.run([*flags, "-o", str(build_dir / "small_blocks"),
                    str(HERE / "c" / "small_blocks.c"), "-ldl"], check=True)
    return binary, null


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    return env


def preload_env(lib: Path, table: str) -> dict[str, str]:
    env = base_env()
    env["LD_PRELOAD"] = str(lib)
    env["ALLOCPOLICY_TABLE"] = table
    return env


def command_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "glibc": " ".join(platform.libc_ver()),
        "cc": command_output([os.environ.get("CC", "cc"), "--version"]).splitlines()[0:1],
        "valgrind": command_output(["valgrind", "--version"]),
    }


def source_info() -> dict:
    """Commit of the source tree and whether native/ has uncommitted changes
    (the installed library is built from the tree as it was at install time)."""
    head = command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "native"])
    return {"commit": head, "native_modified": bool(dirty)}


def rotated(items: list, r: int) -> list:
    k = r % len(items)
    return items[k:] + items[:k]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------
# C malloc/free pairs


def c_cases() -> list[tuple[str, int]]:
    # fixed4096 is beyond the runtime's small-block cache: it shows the cost of
    # the header and the counting alone.
    return [(p, t) for p in ("fixed64", "mix") for t in (1, 2)] + [("fixed4096", 1)]


def c_variants(threads: int) -> list[str]:
    return ["a", "n", "b", "c", "d"] if threads > 1 else ["a", "n", "b", "c"]


C_SCOPE = {"a": "none", "n": "none", "b": "none", "c": "own", "d": "shared"}


def c_env(variant: str, lib: Path, null: Path) -> dict[str, str]:
    if variant == "a":
        return base_env()
    if variant == "n":
        env = base_env()
        env["LD_PRELOAD"] = str(null)
        return env
    return preload_env(lib, f"v=1;process=raise:0;scope=work:raise:{C_BUDGET}:0")


def run_c_once(binary: Path, lib: Path, null: Path, pattern: str, threads: int, variant: str,
               pairs: int) -> float:
    env = c_env(variant, lib, null)
    scope = C_SCOPE[variant]
    out = subprocess.run(
        [str(binary), pattern, str(threads), scope, str(pairs)],
        env=env, capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"malloc_pairs {pattern} {threads} {scope} failed: {out.stderr.strip()}")
    m = re.search(r"ns_per_pair=([0-9.]+) cpu_ns_per_pair=([0-9.]+)", out.stdout)
    if not m:
        raise SystemExit(f"malloc_pairs: unexpected output {out.stdout!r}")
    return float(m.group(2)), float(m.group(1))


def bench_c(binary: Path, lib: Path, null: Path, repeats: int, pairs: int) -> dict:
    cpu: dict[str, dict[str, list[float]]] = {}
    wall: dict[str, dict[str, list[float]]] = {}
    for r in range(repeats):
        log(f"  c: repeat {r + 1}/{repeats}")
        for pattern, threads in c_cases():
            case = f"{pattern}/{threads}t"
            for v in rotated(c_variants(threads), r):
                c, w = run_c_once(binary, lib, null, pattern, threads, v, pairs)
                cpu.setdefault(case, {}).setdefault(v, []).append(c)
                wall.setdefault(case, {}).setdefault(v, []).append(w)
    cases = {}
    for pattern, threads in c_cases():
        case = f"{pattern}/{threads}t"
        med = {v: median(xs) for v, xs in cpu[case].items()}
        wmed = {v: median(xs) for v, xs in wall[case].items()}
        cases[case] = {
            "pattern": pattern,
            "threads": threads,
            "ns_per_pair": med,
            "ratio": {v: med[v] / med["a"] for v in med},
            # Interference from other processes only ever adds time, so the
            # fastest run of each variant is a second, less noisy estimate.
            "min_ns_per_pair": {v: min(xs) for v, xs in cpu[case].items()},
            "min_ratio": {v: min(xs) / min(cpu[case]["a"]) for v, xs in cpu[case].items()},
            "wall_ns_per_pair": wmed,
            "wall_ratio": {v: wmed[v] / wmed["a"] for v in wmed},
            "samples": cpu[case],
            "wall_samples": wall[case],
        }
    return {"pairs_per_thread": pairs, "repeats": repeats, "clock": "thread CPU time",
            "cases": cases}


# ---------------------------------------------------------------------------
# Instruction counts under callgrind

_ANNOTATE_LINE = re.compile(r"^\s*([0-9,]+)\s+\([ 0-9.]+%\)\s+(\S.*?)\s*$")


def _callgrind(binary: Path, env: dict, args: list[str], out_file: Path) -> dict[str, int]:
    """Run under callgrind; return {function: self instructions} and the total."""
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}", str(binary), *args],
        env=env, check=True, capture_output=True,
    )
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--auto=no", str(out_file)],
        capture_output=True, text=True, check=True,
    ).stdout
    funcs: dict[str, int] = {}
    for line in text.splitlines():
        m = _ANNOTATE_LINE.match(line)
        if not m:
            continue
        count = int(m.group(1).replace(",", ""))
        name = m.group(2)
        if name.startswith("PROGRAM TOTALS"):
            funcs["TOTAL"] = count
        else:
            # "file:function [object]" -> "function [object]"; keep it short.
            name = re.sub(r"^\S*?/([^/\s]+):", r"\1:", name)
            name = re.sub(r"\[\S*/([^/\]]+)\]$", r"[\1]", name)
            funcs[name] = funcs.get(name, 0) + count
    return funcs


def bench_callgrind(binary: Path, lib: Path, null: Path, pairs: int, work: Path,
                    variants: tuple[str, ...] = ("a", "n", "b", "c")) -> dict:
    """Instructions per pair, from two run lengths so start-up cancels out."""
    results: dict = {"pairs": [pairs, 2 * pairs], "cases": {}, "added_by_function": {}}
    for pattern in ("fixed64", "mix", "fixed4096"):
        case: dict = {}
        for v in variants:
            env = c_env(v, lib, null)
            scope = C_SCOPE[v]
            runs = []
            for n in (pairs, 2 * pairs):
                runs.append(_callgrind(binary, env, [pattern, "1", scope, str(n)],
                                       work / f"cg.{pattern}.{v}.{n}"))
            per_pair = {
                name: (runs[1].get(name, 0) - runs[0].get(name, 0)) / pairs
                for name in set(runs[0]) | set(runs[1])
            }
            per_pair = {k: round(x, 1) for k, x in per_pair.items() if abs(x) >= 0.5}
            case[v] = {
                "instructions_per_pair": per_pair.get("TOTAL", 0.0),
                "by_function": dict(sorted(
                    ((k, x) for k, x in per_pair.items() if k != "TOTAL"),
                    key=lambda kv: -kv[1],
                )),
            }
            log(f"  callgrind: {pattern} {v}: {case[v]['instructions_per_pair']:.1f} instructions/pair")
        base = case["a"]["instructions_per_pair"]
        for v in case:
            case[v]["ratio"] = case[v]["instructions_per_pair"] / base if base else float("nan")
        fa, fc = case["a"]["by_function"], case["c"]["by_function"]
        delta = {k: round(fc.get(k, 0) - fa.get(k, 0), 1) for k in set(fa) | set(fc)}
        results["added_by_function"][pattern] = dict(sorted(
            ((k, x) for k, x in delta.items() if abs(x) >= 0.5), key=lambda kv: -abs(kv[1])
        ))
        results["cases"][pattern] = case
    return results


# ---------------------------------------------------------------------------
# Sampled time profile (perf, software clock)

_PERF_LINE = re.compile(r"^\s*(\d+)\s+(\S+)\s+\[[.k]\]\s+(.+?)\s*$")
PERF_FREQ = 4999


def perf_works() -> bool:
    if not shutil.which("perf"):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["perf", "record", "-q", "-e", "cpu-clock", "-o", f"{tmp}/p.data", "true"],
            capture_output=True,
        )
        return out.returncode == 0


def _perf(binary: Path, env: dict, args: list[str], out_file: Path) -> tuple[dict[str, int], float]:
    """Sample the program on the CPU clock; return {"symbol [dso]": samples} and
    the ns per pair the program itself reported."""
    run = subprocess.run(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(PERF_FREQ), "-o", str(out_file),
         "--", str(binary), *args],
        env=env, capture_output=True, text=True, check=True,
    )
    m = re.search(r"cpu_ns_per_pair=([0-9.]+)", run.stdout)
    text = subprocess.run(
        ["perf", "report", "-i", str(out_file), "--stdio", "--no-children",
         "--sort", "dso,sym", "-F", "sample,dso,sym"],
        capture_output=True, text=True, check=True,
    ).stdout
    samples: dict[str, int] = {}
    for line in text.splitlines():
        m2 = _PERF_LINE.match(line)
        if m2:
            key = f"{m2.group(3)} [{m2.group(2)}]"
            samples[key] = samples.get(key, 0) + int(m2.group(1))
    return samples, float(m.group(1)) if m else float("nan")


def bench_profile(binary: Path, lib: Path, null: Path, pairs: int, work: Path,
                  patterns: tuple[str, ...] = ("fixed64", "mix")) -> dict:
    """Where the time of one pair goes, 1 thread: ns per pair for each symbol,
    without the preload (a) and in an own scope (c)."""
    results: dict = {"event": "cpu-clock", "frequency": PERF_FREQ, "pairs": pairs, "cases": {}}
    for pattern in patterns:
        case = {}
        for v in ("a", "c"):
            env = c_env(v, lib, null)
            scope = C_SCOPE[v]
            samples, reported = _perf(binary, env, [pattern, "1", scope, str(pairs)],
                                      work / f"perf.{pattern}.{v}")
            per_pair = {k: n / PERF_FREQ / pairs * 1e9 for k, n in samples.items()}
            per_pair = {k: round(x, 2) for k, x in sorted(per_pair.items(), key=lambda kv: -kv[1])
                        if x >= 0.05}
            case[v] = {"reported_ns_per_pair": reported, "ns_per_pair_by_symbol": per_pair}
        results["cases"][pattern] = case
        log(f"  profile: {pattern} done")
    return results


# ---------------------------------------------------------------------------
# Resident memory of many small blocks

RSS_PATTERNS = ("fixed24", "rand8-128", "fixed64", "fixed200", "fixed1000")
RSS_VARIANTS = ("a", "n", "b", "c")
RSS_TARGET = 1.10
RSS_GOAL = 1.03
RSS_BUDGET = 64 << 30  # the blocks are never refused


def run_rss_once(binary: Path, lib: Path, null: Path, pattern: str, variant: str,
                 blocks: int) -> dict:
    env = c_env(variant, lib, null)
    if variant in ("b", "c"):
        env["ALLOCPOLICY_TABLE"] = f"v=1;process=raise:0;scope=work:raise:{RSS_BUDGET}:0"
    out = subprocess.run([str(binary), pattern, str(blocks), C_SCOPE[variant]],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"small_blocks {pattern} {variant} failed: {out.stderr.strip()}")
    m = re.search(r"rss_before=(\d+) rss_after=(\d+) blocks=(\d+) bytes=(\d+)", out.stdout)
    if not m:
        raise SystemExit(f"small_blocks: unexpected output {out.stdout!r}")
    return {"before": int(m.group(1)), "after": int(m.group(2)), "bytes": int(m.group(4))}


def bench_rss(binary: Path, lib: Path, null: Path, repeats: int, blocks: int) -> dict:
    """Process RSS with every block held, per variant: medians of the repeats,
    as ratios to the program without preload. The whole process is measured
    (the array of pointers, 8 bytes a block, included), as a user sees it."""
    samples: dict[str, dict[str, list[int]]] = {p: {v: [] for v in RSS_VARIANTS} for p in RSS_PATTERNS}
    requested: dict[str, int] = {}
    for r in range(repeats):
        log(f"  rss: repeat {r + 1}/{repeats}")
        for pattern in RSS_PATTERNS:
            for v in rotated(list(RSS_VARIANTS), r):
                got = run_rss_once(binary, lib, null, pattern, v, blocks)
                samples[pattern][v].append(got["after"])
                requested[pattern] = got["bytes"]
    cases = {}
    for pattern in RSS_PATTERNS:
        med = {v: median(xs) for v, xs in samples[pattern].items()}
        cases[pattern] = {
            "requested_bytes": requested[pattern],
            "rss_bytes": med,
            "ratio": {v: med[v] / med["a"] for v in med},
            "samples": samples[pattern],
        }
    return {"blocks": blocks, "repeats": repeats, "cases": cases}


# ---------------------------------------------------------------------------
# Python workload


def py_command(lib: Path, variant: str, scale: float,
               kind: str = "objects") -> tuple[list[str], dict[str, str]]:
    table = f"v=1;process=raise:0;scope=task:raise:{PY_BUDGET}:0"
    mode = {"plain": "plain", "preload": "plain", "task": "task", "tracemalloc": "tracemalloc",
            "memray": "memray", "malloc": "plain", "malloc+task": "task"}[variant]
    preload = variant in ("preload", "task", "malloc+task")
    env = preload_env(lib, table) if preload else base_env()
    if variant.startswith("malloc"):
        env["PYTHONMALLOC"] = "malloc"
    cmd = [sys.executable, str(HERE / "workload.py"), "--scale", str(scale), "--mode", mode,
           "--kind", kind]
    return cmd, env


def run_py_once(lib: Path, variant: str, scale: float, kind: str) -> dict:
    cmd, env = py_command(lib, variant, scale, kind)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise SystemExit(f"workload {kind} {variant} failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _instructions(cmd: list[str], env: dict, out_file: Path) -> tuple[int, dict]:
    """Total instructions of a workload run (cachegrind without cache
    simulation: an exact count, about 2x faster than callgrind) and the
    JSON the workload printed."""
    run = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out_file}",
         *cmd],
        env=env, check=True, capture_output=True, text=True, cwd=tempfile.gettempdir(),
    )
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    for line in out_file.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1]), printed
    raise SystemExit(f"cachegrind wrote no summary to {out_file}")


PY_INSTR_VARIANTS = ("plain", "task", "malloc", "malloc+task")


def bench_py_instructions(lib: Path, work: Path) -> dict:
    """Instructions per workload round, from one round and two rounds so that
    start-up (imports included) cancels out."""
    scales = (1 / 16, 2 / 16)  # workload.py runs round(16 * scale) rounds
    out: dict = {"rounds": [1, 2], "variants": {}}
    for v in PY_INSTR_VARIANTS:
        totals, charged = [], []
        for sc in scales:
            cmd, env = py_command(lib, v, sc)
            env["PYTHONHASHSEED"] = "0"
            total, printed = _instructions(cmd, env, work / f"cg.py.{v}.{sc}")
            totals.append(total)
            charged.append(printed.get("scope", {}).get("allocations", 0))
        d = {"per_round": totals[1] - totals[0], "startup": 2 * totals[0] - totals[1]}
        if charged[1]:
            d["charged_allocations_per_round"] = charged[1] - charged[0]
        out["variants"][v] = d
        log(f"  instructions: python {v}: {d['per_round']:,} per round")
    per = {v: d["per_round"] for v, d in out["variants"].items()}
    out["ratio"] = per["task"] / per["plain"]
    out["ratio_malloc_task_to_malloc"] = per["malloc+task"] / per["malloc"]
    out["ratio_malloc_to_plain"] = per["malloc"] / per["plain"]
    n = out["variants"]["malloc+task"].get("charged_allocations_per_round")
    if n:
        out["added_per_charged_allocation"] = (per["malloc+task"] - per["malloc"]) / n
    return out


def have_memray() -> bool:
    out = subprocess.run([sys.executable, "-c", "import memray"], capture_output=True,
                         env=base_env())
    return out.returncode == 0


def bench_python(lib: Path, repeats: int, scale: float, kind: str) -> dict:
    variants = list(PY_VARIANTS)
    skipped = {}
    if not have_memray():
        variants.remove("memray")
        skipped["memray"] = "memray is not importable by this interpreter"
    samples: dict[str, list[float]] = {v: [] for v in variants}
    wall: dict[str, list[float]] = {v: [] for v in variants}
    rss: dict[str, list[float]] = {v: [] for v in variants}
    details: dict[str, dict] = {}
    checks: set[int] = set()
    for r in range(repeats):
        log(f"  python ({kind}): repeat {r + 1}/{repeats}")
        for v in rotated(variants, r):
            res = run_py_once(lib, v, scale, kind)
            samples[v].append(res["cpu"])
            wall[v].append(res["elapsed"])
            rss[v].append(res["maxrss"])
            checks.add(res["check"])
            details[v] = {k: x for k, x in res.items()
                          if k not in ("elapsed", "cpu", "check", "maxrss")}
    if len(checks) != 1:
        raise SystemExit(f"workload checksums differ between variants: {sorted(checks)}")
    med = {v: median(xs) for v, xs in samples.items()}
    wmed = {v: median(xs) for v, xs in wall.items()}
    # Each repeat ran every variant once, close together in time: the ratio
    # within a repeat cancels slow drift of the machine.
    paired = {v: sorted(x / b for x, b in zip(xs, samples["plain"])) for v, xs in samples.items()}
    rmed = {v: median(xs) for v, xs in rss.items()}
    return {
        "kind": kind,
        "scale": scale,
        "repeats": repeats,
        "clock": "process CPU time",
        "maxrss_bytes": rmed,
        "maxrss_ratio": {v: rmed[v] / rmed["plain"] for v in rmed},
        "maxrss_samples": rss,
        "seconds": med,
        "ratio": {v: med[v] / med["plain"] for v in med},
        "paired_ratios": paired,
        "min_seconds": {v: min(xs) for v, xs in samples.items()},
        "min_ratio": {v: min(xs) / min(samples["plain"]) for v, xs in samples.items()},
        "wall_seconds": wmed,
        "wall_ratio": {v: wmed[v] / wmed["plain"] for v in wmed},
        "samples": samples,
        "wall_samples": wall,
        "last_run": details,
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------
# Report


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def print_report(res: dict) -> None:
    out = sys.stdout
    if "c" in res:
        c = res["c"]
        out.write(f"\nC malloc/free pairs: CPU ns per pair and thread, median of {c['repeats']}, "
                  f"{c['pairs_per_thread']:,} pairs per thread (ratio to a); 'fastest': the "
                  "fastest run of each\n")
        head = f"{'case':<12}" + "".join(f"{v + ': ' + C_VARIANTS[v]:>25}" for v in C_VARIANTS)
        out.write(head + "\n" + "-" * len(head) + "\n")
        for case, d in c["cases"].items():
            row = f"{case:<12}"
            for v in C_VARIANTS:
                if v in d["ns_per_pair"]:
                    cell = f"{d['ns_per_pair'][v]:.2f}"
                    if v != "a":
                        cell += f" ({fmt_ratio(d['ratio'][v])})"
                else:
                    cell = "-"
                row += f"{cell:>25}"
            out.write(row + "\n")
            row = f"{'  fastest':<12}"
            for v in C_VARIANTS:
                cell = "-"
                if v in d["min_ns_per_pair"]:
                    cell = f"{d['min_ns_per_pair'][v]:.2f}"
                    if v != "a":
                        cell += f" ({fmt_ratio(d['min_ratio'][v])})"
                row += f"{cell:>25}"
            out.write(row + "\n")
    if "callgrind" in res:
        cg = res["callgrind"]
        out.write("\nInstructions per malloc/free pair (callgrind, 1 thread, exact)\n")
        for pattern, case in cg["cases"].items():
            cells = ", ".join(
                f"{v}: {case[v]['instructions_per_pair']:.1f}"
                + ("" if v == "a" else f" ({fmt_ratio(case[v]['ratio'])})")
                for v in ("a", "n", "b", "c") if v in case
            )
            out.write(f"  {pattern:<8} {cells}\n")
        for pattern, added in cg["added_by_function"].items():
            out.write(f"  instructions added per pair, c - a, {pattern}:\n")
            for name, n in added.items():
                out.write(f"    {n:+8.1f}  {name}\n")
    if "py_instructions" in res:
        pi = res["py_instructions"]
        out.write("\nPython workload, instructions per round (cachegrind, exact)\n")
        for v, d in pi["variants"].items():
            extra = ""
            if "charged_allocations_per_round" in d:
                extra = f"   {d['charged_allocations_per_round']:,} allocations charged per round"
            out.write(f"  {v:<12} {d['per_round']:>14,}   start-up {d['startup']:>13,}{extra}\n")
        out.write(f"  task / plain: {pi['ratio']:.4f};  malloc / plain: {pi['ratio_malloc_to_plain']:.4f};  "
                  f"malloc+task / malloc: {pi['ratio_malloc_task_to_malloc']:.4f}\n")
        if "added_per_charged_allocation" in pi:
            out.write(f"  with PYTHONMALLOC=malloc the preload adds {pi['added_per_charged_allocation']:.1f} "
                      "instructions per charged allocation\n")
    if "rss" in res:
        rs = res["rss"]
        out.write(f"\nResident memory holding {rs['blocks']:,} blocks: MiB, median of {rs['repeats']} "
                  f"(ratio to a); goal {fmt_ratio(RSS_GOAL)}, target {fmt_ratio(RSS_TARGET)}\n")
        head = f"{'pattern':<12}" + "".join(f"{v + ': ' + C_VARIANTS[v]:>25}" for v in RSS_VARIANTS)
        out.write(head + "\n" + "-" * len(head) + "\n")
        for pattern, d in rs["cases"].items():
            row = f"{pattern:<12}"
            for v in RSS_VARIANTS:
                cell = f"{d['rss_bytes'][v] / 2**20:.1f}"
                if v != "a":
                    cell += f" ({fmt_ratio(d['ratio'][v])})"
                row += f"{cell:>25}"
            out.write(row + "\n")
    if "profile" in res:
        pr = res["profile"]
        out.write("\nTime per pair by symbol (perf, cpu-clock samples, 1 thread), ns\n")
        for pattern, case in pr["cases"].items():
            out.write(f"  {pattern}: a {case['a']['reported_ns_per_pair']:.2f} ns, "
                      f"c {case['c']['reported_ns_per_pair']:.2f} ns per pair (as timed under perf)\n")
            syms = list(dict.fromkeys([*case["c"]["ns_per_pair_by_symbol"], *case["a"]["ns_per_pair_by_symbol"]]))
            for k in syms[:10]:
                a = case["a"]["ns_per_pair_by_symbol"].get(k, 0.0)
                c = case["c"]["ns_per_pair_by_symbol"].get(k, 0.0)
                out.write(f"    {a:7.2f} -> {c:7.2f}  {k}\n")
    for key in ("python", "python_numpy"):
        if key not in res:
            continue
        p = res[key]
        out.write(f"\nPython workload ({p['kind']}): CPU seconds (and wall), median of {p['repeats']} "
                  f"(scale {p['scale']}); peak RSS\n")
        head = (f"{'variant':<58}{'cpu s':>9}{'ratio':>8}{'paired: median [min-max]':>27}"
                f"{'fastest':>9}{'wall s':>9}{'ratio':>8}{'RSS MiB':>9}{'ratio':>8}")
        out.write(head + "\n" + "-" * len(head) + "\n")
        for v, label in PY_VARIANTS.items():
            if v not in p["seconds"]:
                out.write(f"{v + ' (' + label + ')':<58}{'skipped':>9}\n")
                continue
            pr = p["paired_ratios"][v]
            spread = f"{median(pr):.2f} [{pr[0]:.2f}-{pr[-1]:.2f}]"
            out.write(f"{v + ' (' + label + ')':<58}{p['seconds'][v]:>9.3f}"
                      f"{fmt_ratio(p['ratio'][v]):>8}{spread:>27}{fmt_ratio(p['min_ratio'][v]):>9}"
                      f"{p['wall_seconds'][v]:>9.3f}"
                      f"{fmt_ratio(p['wall_ratio'][v]):>8}"
                      f"{p['maxrss_bytes'][v] / 2**20:>9.1f}{fmt_ratio(p['maxrss_ratio'][v]):>8}\n")
        task = p["last_run"].get("task", {})
        scope = task.get("scope", {})
        if scope:
            out.write(f"  task scope: peak {scope.get('peak', 0) / 2**20:.1f} MiB, "
                      f"{scope.get('allocations', 0):,} allocations charged, "
                      f"{scope.get('violations', 0)} violations\n")
    if "modules" in res:
        import module_scope_calls

        out.write(module_scope_calls.report(res["modules"]) + "\n")
    if "enter" in res:
        import scope_entry

        out.write(scope_entry.report(res["enter"]) + "\n")
    if "libs" in res:
        import lib_lookup

        out.write(lib_lookup.report(res["libs"]) + "\n")
    if "asyncio" in res:
        import asyncio_steps

        out.write(asyncio_steps.report(res["asyncio"]) + "\n")
    if "web" in res:
        import web_requests

        out.write(web_requests.report(res["web"]) + "\n")
    if "sweeps" in res:
        import sweeps

        out.write(sweeps.report(res["sweeps"]) + "\n")
    t = res.get("targets", {})
    if t:
        out.write("\nTargets\n")
        for name, d in t.items():
            verdict = "met" if d["met"] else "MISSED"
            out.write(f"  {name}: worst {fmt_ratio(d['worst'])} ({d['where']}), target <= "
                      f"{fmt_ratio(d['target'])}: {verdict}\n")
    out.flush()


# The pairs the C target is about: small blocks, as in a malloc/free loop.
# fixed4096 is reported beside them, not judged against the target.
TARGET_PATTERNS = ("fixed64", "mix")


def targets(res: dict) -> dict:
    t = {}
    if "c" in res:
        worst, where = 0.0, ""
        for case, d in res["c"]["cases"].items():
            if case.split("/")[0] not in TARGET_PATTERNS:
                continue
            for v, x in d["ratio"].items():
                if v not in ("a", "n") and x > worst:
                    worst, where = x, f"{case} {v}"
        t["C malloc/free pair, time"] = {"worst": worst, "where": where, "target": C_TARGET,
                                         "met": worst <= C_TARGET}
    if "callgrind" in res:
        worst, where = 0.0, ""
        for pattern, case in res["callgrind"]["cases"].items():
            if pattern not in TARGET_PATTERNS:
                continue
            for v, d in case.items():
                if v not in ("a", "n") and d["ratio"] > worst:
                    worst, where = d["ratio"], f"{pattern} {v}"
        t["C malloc/free pair, instructions"] = {"worst": worst, "where": where,
                                                 "target": C_TARGET, "met": worst <= C_TARGET}
    if "rss" in res:
        worst, where = 0.0, ""
        for pattern, d in res["rss"]["cases"].items():
            for v in ("b", "c"):
                if d["ratio"][v] > worst:
                    worst, where = d["ratio"][v], f"{pattern} {v}"
        t["Small blocks, resident memory"] = {"worst": worst, "where": where, "target": RSS_TARGET,
                                              "met": worst <= RSS_TARGET}
    if "enter" in res:
        x = res["enter"]["ratio_to_nullcontext"]["task"]
        t["task enter + exit, vs nullcontext"] = {"worst": x, "where": "task",
                                                  "target": res["enter"]["target"],
                                                  "met": x <= res["enter"]["target"]}
    if "py_instructions" in res:
        x = res["py_instructions"]["ratio"]
        t["Python workload, task scope, instructions"] = {"worst": x, "where": "task",
                                                          "target": PY_TARGET, "met": x <= PY_TARGET}
    if "python" in res and "task" in res["python"]["ratio"]:
        x = res["python"]["ratio"]["task"]
        t["Python workload, task scope"] = {"worst": x, "where": "task", "target": PY_TARGET,
                                            "met": x <= PY_TARGET}
    return t


PARTS = ["c", "callgrind", "rss", "profile", "python", "modules", "enter", "libs", "asyncio", "web", "sweeps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few repeats, small sizes")
    ap.add_argument("--repeats", type=int, help="repeats per configuration (default 7; 3 with --quick)")
    ap.add_argument("--pairs", type=int, help="malloc/free pairs per thread (default 10M; 1M with --quick)")
    ap.add_argument("--scale", type=float, help="Python workload size (default 0.75, about 1 s; 0.0625 with --quick)")
    ap.add_argument("--callgrind-pairs", type=int, help="pairs for the shorter callgrind run (default 200k)")
    ap.add_argument("--rss-blocks", type=int, help="blocks the rss program holds (default 2M; 200k with --quick)")
    ap.add_argument("--only", action="append", choices=PARTS,
                    help="run only this part (repeatable)")
    ap.add_argument("--lib", help="runtime library to preload (default: the installed package's)")
    ap.add_argument("--output", default=str(HERE / "results" / "latest.json"))
    args = ap.parse_args()

    repeats = args.repeats or (3 if args.quick else 7)
    pairs = args.pairs or (1_000_000 if args.quick else 10_000_000)
    scale = args.scale or (0.0625 if args.quick else 0.75)
    cg_pairs = args.callgrind_pairs or (10_000 if args.quick else 200_000)
    rss_blocks = args.rss_blocks or (200_000 if args.quick else 2_000_000)
    parts = list(dict.fromkeys(args.only or PARTS))
    if "callgrind" in parts and not (shutil.which("valgrind") and shutil.which("callgrind_annotate")):
        log("valgrind not found: skipping the instruction counts")
        parts = [p for p in parts if p != "callgrind"]
    if "profile" in parts and not perf_works():
        log("perf record does not work here: skipping the time profile")
        parts = [p for p in parts if p != "profile"]

    lib = find_library(args.lib)
    log(f"runtime library: {lib}")
    stale = ROOT / "native" / "build" / LIBRARY_NAME
    if lib != stale.resolve() and stale.is_file() and stale.stat().st_mtime > lib.stat().st_mtime:
        log(f"note: {stale} is newer than the library measured; reinstall (pip install .) "
            "or pass --lib to measure it")
    started = time.time()
    res: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "library": str(lib),
        "machine": machine_info(),
        "source": source_info(),
        "variants": {"c": C_VARIANTS, "python": PY_VARIANTS},
    }
    with tempfile.TemporaryDirectory(prefix="allocpolicy-bench-") as tmp:
        work = Path(tmp)
        binary, null = build_c(work)
        part_seconds = {}
        for part in parts:
            t0 = time.time()
            if part == "c":
                res["c"] = bench_c(binary, lib, null, repeats, pairs)
            elif part == "callgrind":
                # b runs the same instructions as c (the scope changes no code
                # path), so the quick run leaves it and n out.
                cg_variants = ("a", "c") if args.quick else ("a", "n", "b", "c")
                res["callgrind"] = bench_callgrind(binary, lib, null, cg_pairs, work, cg_variants)
                if not args.quick:  # about 40 s: the interpreter runs 30x slower under valgrind
                    res["py_instructions"] = bench_py_instructions(lib, work)
            elif part == "rss":
                res["rss"] = bench_rss(work / "small_blocks", lib, null, repeats, rss_blocks)
            elif part == "profile":
                res["profile"] = bench_profile(binary, lib, null, pairs, work,
                                               ("fixed64",) if args.quick else ("fixed64", "mix"))
            elif part == "python":
                res["python"] = bench_python(lib, repeats, scale, "objects")
                res["python_numpy"] = bench_python(lib, repeats, scale, "numpy")
            elif part == "modules":
                import module_scope_calls  # beside this script

                res["modules"] = module_scope_calls.measure(lib, quick=args.quick, repeats=repeats)
            elif part == "enter":
                import scope_entry  # beside this script

                res["enter"] = scope_entry.measure(lib, quick=args.quick, repeats=repeats)
            elif part == "libs":
                import lib_lookup  # beside this script

                res["libs"] = lib_lookup.measure(Path(lib), pairs=pairs, repeats=repeats)
            elif part == "asyncio":
                import asyncio_steps  # beside this script

                res["asyncio"] = asyncio_steps.measure(Path(lib), quick=args.quick, repeats=repeats)
            elif part == "web":
                import web_requests  # beside this script

                res["web"] = web_requests.measure(Path(lib), quick=args.quick, repeats=repeats)
            elif part == "sweeps":
                import sweeps  # beside this script

                res["sweeps"] = sweeps.measure(Path(lib), quick=args.quick, repeats=min(repeats, 5))
            part_seconds[part] = round(time.time() - t0, 1)
        res["part_seconds"] = part_seconds
    res["targets"] = targets(res)
    res["seconds_total"] = round(time.time() - started, 1)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print_report(res)
    print(f"\nwrote {out} ({res['seconds_total']} s)")


if __name__ == "__main__":
    main()
