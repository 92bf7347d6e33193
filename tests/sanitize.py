"""Build the runtime and its native stress programs under sanitizers, run them.

    python tests/sanitize.py                      # ThreadSanitizer, then ASan+UBSan
    python tests/sanitize.py --only thread
    CC=clang python tests/sanitize.py             # clang needs libclang-rt-*-dev

Run by ``nox -s sanitize``. Any sanitizer report, a mismatch in the programs'
own checks or a non-zero exit fails the run.

A sanitizer brings its own allocator and intercepts ``malloc`` to track every
block, and it must be initialised before any instrumented code runs; a
preloaded library whose ``malloc`` replaced the sanitizer's would run
instrumented code from inside the sanitizer's start-up. So the runtime is
linked into each program instead, with its malloc family renamed
(``objcopy --redefine-syms``, in the runtime's objects and the program's
alike): the program's allocations go through the runtime exactly as under
the preload, and the runtime's backend, found with ``dlsym(RTLD_NEXT)`` as
always, is the sanitizer's allocator. Everything the runtime does is then
instrumented: ThreadSanitizer sees every access to the instance table and
the counters, AddressSanitizer every access to a block and its header.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "native"
PROGRAMS = ROOT / "tests" / "integration" / "native"

SANITIZERS = {
    # Spans on over the sanitizer's allocator (the runtime would leave small
    # blocks to any backend but glibc): ThreadSanitizer checks their
    # cross-thread frees. AddressSanitizer keeps every block in its own heap,
    # where it sees each access to a block and its header.
    "thread": ["-fsanitize=thread", "-DAP_SPANS_ANY_BACKEND"],
    "address,undefined": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
}

# Every allocator entry point the runtime may define, C++ operators included.
RENAMED = [
    "malloc", "free", "calloc", "realloc", "reallocarray", "posix_memalign",
    "aligned_alloc", "memalign", "valloc", "pvalloc", "malloc_usable_size",
    "_Znwm", "_Znam", "_ZnwmRKSt9nothrow_t", "_ZnamRKSt9nothrow_t",
    "_ZnwmSt11align_val_t", "_ZnamSt11align_val_t",
    "_ZnwmSt11align_val_tRKSt9nothrow_t", "_ZnamSt11align_val_tRKSt9nothrow_t",
    "_ZdlPv", "_ZdaPv", "_ZdlPvm", "_ZdaPvm", "_ZdlPvRKSt9nothrow_t", "_ZdaPvRKSt9nothrow_t",
    "_ZdlPvSt11align_val_t", "_ZdaPvSt11align_val_t", "_ZdlPvmSt11align_val_t",
    "_ZdaPvmSt11align_val_t", "_ZdlPvSt11align_val_tRKSt9nothrow_t",
    "_ZdaPvSt11align_val_tRKSt9nothrow_t",
]

STRESS_TABLE = (
    "v=1;process=raise:0;grace=0;"
    "scope=work:raise:0:0;scope=nested:raise:0:0;scope=shared:raise:0:0;"
    "scope=tight:raise:262144:0"
)
ESCAPES_TABLE = (
    "v=1;process=raise:0;scope=server:raise:0:0;scope=request:raise:1048576:0;"
    "scope=sub:raise:0:0;scope=inner:raise:0:0;scope=leaf:raise:0:0"
)
SPANS_TABLE = "v=1;process=raise:0;scope=work:raise:0:0"

# (program, arguments, table, what its output must say)
RUNS = [
    ("stress", ["60000", "1"], STRESS_TABLE, "RESULT mismatches=0 corrupt=0 api_errors=0"),
    ("stress", ["12000", "2", "churn"], STRESS_TABLE, "RESULT mismatches=0 corrupt=0 api_errors=0"),
    ("escapes", ["keep", "70000"], ESCAPES_TABLE, "RESULT failures=0"),
    ("escapes", ["nested", "70000"], ESCAPES_TABLE, "RESULT failures=0"),
    ("escapes", ["nested", "40000", "4", "2"], ESCAPES_TABLE, "RESULT failures=0"),
    ("escapes", ["zero"], ESCAPES_TABLE, "RESULT failures=0"),
    ("span_blocks", ["alternate", "8"], SPANS_TABLE, "RESULT failures=0"),
    ("span_blocks", ["orphans", "3000"], SPANS_TABLE, "RESULT failures=0"),
]

REPORT_MARKS = ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "runtime error:",
                "ERROR: LeakSanitizer")

SANITIZER_OPTIONS = {
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:second_deadlock_stack=1",
    "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1:abort_on_error=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}


def run(cmd: list[str], **kwargs) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        sys.exit(f"sanitize: {' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")


def build(cc: str, flags: list[str], work: Path) -> dict[str, Path]:
    """The runtime's objects and each program, linked together, hooks renamed."""
    renames = work / "renames.txt"
    renames.write_text("".join(f"{name} ap_sanitized_{name}\n" for name in RENAMED))
    common = ["-O1", "-g", "-fno-omit-frame-pointer", "-pthread", *flags,
              f"-I{NATIVE / 'include'}"]
    objects = []
    for source in sorted((NATIVE / "src").glob("*.c")):
        obj = work / f"{source.stem}.o"
        run([cc, "-std=c11", "-fPIC", "-fvisibility=hidden", "-fno-semantic-interposition",
             "-Wall", "-Wextra", "-Wno-unused-parameter", *common, "-c", str(source), "-o", str(obj)])
        objects.append(obj)
    built = {}
    for name in sorted({r[0] for r in RUNS}):
        obj = work / f"prog_{name}.o"
        # -fno-builtin: the programs call the allocator for its effects.
        run([cc, "-std=gnu11", "-fno-builtin", "-DAP_STRESS_RENAMED", *common,
             "-c", str(PROGRAMS / f"{name}.c"), "-o", str(obj)])
        for o in [*objects, obj]:
            run(["objcopy", f"--redefine-syms={renames}", str(o)])
        exe = work / name
        # -rdynamic: the programs find the ap_ functions with dlsym.
        run([cc, *common, "-rdynamic", str(obj), *map(str, objects), "-o", str(exe), "-ldl"])
        built[name] = exe
    return built


def check(sanitizer: str, exe: Path, args: list[str], table: str, expect: str) -> bool:
    env = {**os.environ, **SANITIZER_OPTIONS, "ALLOCPOLICY_TABLE": table}
    env.pop("LD_PRELOAD", None)
    start = time.monotonic()
    proc = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - start
    problems = [m for m in REPORT_MARKS if m in proc.stderr]
    ok = proc.returncode == 0 and not problems and expect in proc.stdout
    print(f"  {sanitizer}: {exe.name} {' '.join(args)}: {'clean' if ok else 'FAILED'} ({took:.0f} s)")
    if not ok:
        print(f"    exit status {proc.returncode}; reports: {problems or 'none'}")
        print("    --- stdout (tail)\n" + proc.stdout[-3000:])
        print("    --- stderr (head)\n" + proc.stderr[:12000])
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(SANITIZERS), action="append",
                        help="run only this sanitizer build (repeatable)")
    args = parser.parse_args(argv)
    cc = os.environ.get("CC", "cc")
    if not shutil.which(cc) or not shutil.which("objcopy"):
        sys.exit(f"sanitize: needs a C compiler ({cc}) and objcopy (binutils)")
    failed = 0
    for sanitizer in args.only or list(SANITIZERS):
        with tempfile.TemporaryDirectory(prefix=f"ap-{sanitizer.replace(',', '-')}-") as tmp:
            print(f"building with -fsanitize={sanitizer} ({cc})", flush=True)
            programs = build(cc, SANITIZERS[sanitizer], Path(tmp))
            for name, run_args, table, expect in RUNS:
                failed += not check(sanitizer, programs[name], run_args, table, expect)
    print("sanitize: all runs clean" if not failed else f"sanitize: {failed} run(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
