"""Semantics 8: under the preload, with a policy that never refuses, programs
behave exactly as without it. The evidence is other people's test suites: a
selection of CPython's regression tests and of NumPy's tests, run once without
the preload and once with it, must give the same outcome for every test case.

Both runs go side by side (they are independent processes). A test case whose
outcome differs is run again in both configurations before it counts as a
difference, so one flaky timing test cannot fail the comparison, while a
difference the preload causes shows up twice.

These are the suite's `heavy` tests: the full selections take minutes of CPU
per Python. ``--heavy=quick`` (and ``--quick``) compares a small selection
over glibc only, in well under a minute; CI runs the full selections on one
Python and the quick ones on the others (noxfile.py).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.heavy

# Chosen for what they put through the allocator (containers growing and
# shrinking, large buffers, realloc-heavy bytes/str building, compression
# buffers, mmap, the cyclic GC, tracemalloc's own hooks) and for the process
# behaviour the preload must not change (threads, fork, subprocesses). Together
# about a minute of CPU per run.
CPYTHON_TESTS = [
    "test_list",
    "test_dict",
    "test_set",
    "test_tuple",
    "test_bytes",
    "test_unicode",  # renamed test_str in 3.12
    "test_str",
    "test_json",
    "test_re",
    "test_struct",
    "test_array",
    "test_deque",
    "test_memoryview",
    "test_zlib",
    "test_mmap",
    "test_gc",
    "test_weakref",
    "test_tracemalloc",
    "test_threading",
    "test_fork1",
]
# --heavy=quick: the containers, the GC, and threads (whose tests start
# subprocesses and threads that outlive their test case).
CPYTHON_QUICK_TESTS = ["test_list", "test_bytes", "test_gc", "test_threading"]

# NumPy tests, with NumPy's own slow tests deselected. Arrays are resized
# with realloc, allocated with alignment requirements, pickled and exported
# through the buffer protocol: what the preload touches. Entries under "core"
# are relative to numpy._core.tests (numpy.core.tests before NumPy 2.0). About
# 20 s of CPU per run; test_multiarray as a whole would be 40 s more.
NUMPY_CORE_TESTS = [
    "test_multiarray::TestResize",
    "test_multiarray::TestAlignment",
    "test_multiarray::TestPickling",
    "test_multiarray::TestNewBufferProtocol",
    "test_multiarray::TestCreation",
    "test_multiarray::TestMethods",
    "test_numeric",
    "test_ufunc",
]
NUMPY_OTHER_TESTS = ["numpy.fft.tests.test_pocketfft", "numpy.linalg.tests.test_linalg"]
NUMPY_QUICK_CORE_TESTS = [
    "test_multiarray::TestResize", "test_multiarray::TestAlignment", "test_multiarray::TestPickling",
]
NUMPY_QUICK_OTHER_TESTS = ["numpy.fft.tests.test_pocketfft"]

#: Seconds between progress lines while a pair of runs goes on.
PROGRESS_EVERY = 30

RUN_TIMEOUT = 900


@dataclass
class Run:
    label: str
    returncode: int
    outcomes: dict[str, str]
    output: str


def outcomes_from_junit(path: Path) -> dict[str, str]:
    """test case name -> passed / failure / error / skipped."""
    if not path.is_file():
        return {}
    outcomes: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        if case.get("classname"):
            name = f"{case.get('classname')}::{name}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
                break
        # Parametrized and rerun cases can repeat a name: the worst one counts.
        previous = outcomes.get(name)
        if previous is None or previous == "passed" or (previous == "skipped" and outcome != "passed"):
            outcomes[name] = outcome
    return outcomes


def last_line(path: Path) -> str:
    """The last line a run has printed so far, for the progress report."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").replace("\r", "\n").split("\n")
    except OSError:
        return ""
    text = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return text if len(text) <= 90 else text[:87] + "..."


def run_pair(make_argv, workdir: Path, chain: list[str], child, progress, processes,
             timeout: float = RUN_TIMEOUT):
    """Run argv once without and once with the preload ``chain`` (the runtime,
    then possibly a backend), concurrently, reporting progress every
    PROGRESS_EVERY seconds.

    make_argv(junit_path) -> argv. Returns (baseline Run, preloaded Run).
    Each run is the leader of its own process group, and everything either
    started is killed when both are done: CPython's test_threading, for one,
    leaves processes that would otherwise run on after the suite.
    """
    procs = {}
    children_before = processes.children()
    for label, preload in (("baseline", None), ("preloaded", chain)):
        cwd = workdir / label
        cwd.mkdir(parents=True, exist_ok=True)
        junit = cwd / "junit.xml"
        junit.unlink(missing_ok=True)
        log = open(cwd / "output.txt", "w+")
        proc = subprocess.Popen(
            make_argv(junit),
            cwd=cwd,
            env=child.env(preload, child.permissive_table if preload else None),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=child.preexec_fn,
            start_new_session=True,
        )
        procs[label] = (proc, junit, log)
    runs = []
    try:
        deadline = time.monotonic() + timeout
        for label, (proc, junit, log) in procs.items():
            while True:
                try:
                    proc.wait(timeout=min(PROGRESS_EVERY, max(0.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        raise
                    progress(" | ".join(
                        f"{name}: {last_line(Path(log.name)) if p.poll() is None else 'done'}"
                        for name, (p, _, log) in procs.items()
                    ))
            log.seek(0)
            runs.append(Run(label, proc.returncode, outcomes_from_junit(junit), log.read()))
    finally:
        for proc, _, log in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            log.close()
        # Processes that left the groups (regrtest starts its workers in
        # sessions of their own) come back here through the subreaper.
        processes.kill_new(children_before)
    return runs[0], runs[1]


def differences(base: Run, pre: Run) -> dict[str, tuple[str | None, str | None]]:
    names = set(base.outcomes) | set(pre.outcomes)
    return {
        n: (base.outcomes.get(n), pre.outcomes.get(n))
        for n in sorted(names)
        if base.outcomes.get(n) != pre.outcomes.get(n)
    }


def summary(run: Run) -> str:
    counts: dict[str, int] = {}
    for outcome in run.outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return f"{run.label}: rc={run.returncode} {sorted(counts.items())}"


def assert_same(base: Run, pre: Run, recheck) -> None:
    """Same outcome for every test case, after re-running the differing ones."""
    tail = lambda run: run.output[-5000:]  # noqa: E731
    assert base.outcomes, f"the baseline run produced no results\n{tail(base)}"
    assert pre.outcomes or pre.returncode == base.returncode, (
        f"the preloaded run produced no results\n{summary(pre)}\n{tail(pre)}"
    )
    assert "cannot be preloaded" not in pre.output, tail(pre)
    diff = differences(base, pre)
    if diff:
        base2, pre2 = recheck(sorted(diff))
        still = {}
        for name in diff:
            b = base2.outcomes.get(name, base.outcomes.get(name))
            p = pre2.outcomes.get(name)
            if p is None or b != p:
                still[name] = (b, p)
        assert not still, (
            "outcomes differ under the preload (baseline, preloaded):\n"
            + "\n".join(f"  {n}: {o}" for n, o in list(still.items())[:50])
            + f"\n{summary(base)}\n{summary(pre)}\n--- preloaded output ---\n{tail(pre)}"
            + f"\n--- recheck output ---\n{tail(pre2)}"
        )
        return
    # Every test case agreed; the overall status must agree too (a crash at
    # exit, after the last test, would only show there).
    assert pre.returncode == base.returncode, (
        f"{summary(base)}\n{summary(pre)}\n--- preloaded output ---\n{tail(pre)}"
    )


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def assert_preload_takes(allocpolicy_lib, child):
    """ld.so ignores a preload it cannot load, and the comparison would then
    pass without testing anything: make sure the interpreter really runs with
    the runtime as its malloc."""
    proc = subprocess.run(
        [sys.executable, "-c", "import ctypes; print(ctypes.CDLL(None).ap_is_preloaded())"],
        env=child.env([allocpolicy_lib], child.permissive_table),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.stdout.strip() == "1", (proc.returncode, proc.stdout, proc.stderr)
    assert "cannot be preloaded" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("backend", [None, "jemalloc", "mimalloc"])
def test_cpython_regression_tests(allocpolicy_lib, child_process, tmp_path, backend,
                                  backend_library, heavy_mode, progress, processes):
    if backend and heavy_mode == "quick":
        pytest.skip("--heavy=quick compares over glibc only")
    # Over a backend the baseline is still glibc without any preload: the
    # suites must not tell the difference either way.
    chain = [allocpolicy_lib, *([backend_library(backend)] if backend else [])]
    assert_preload_takes(allocpolicy_lib, child_process)
    if not has_module("test.libregrtest"):
        pytest.skip("this interpreter ships without its test suite (the `test` package)")
    selection = CPYTHON_TESTS if heavy_mode == "full" else CPYTHON_QUICK_TESTS
    tests = [t for t in selection if has_module(f"test.{t}")]
    assert len(tests) >= len(selection) - 1, tests  # test_unicode or test_str
    jobs = str(min(2, os.cpu_count() or 1))

    def regrtest(names, jobs=jobs):
        def argv(junit):
            # --timeout: a hung test dumps its traceback and fails instead of
            # stalling; the subprocess timeout is the last resort.
            return [
                sys.executable, "-m", "test", "-j", jobs, "--timeout", "300",
                "--junit-xml", str(junit), *names,
            ]
        return argv

    def pair(names, where):
        return run_pair(regrtest(names), tmp_path / where, chain, child_process, progress,
                        processes)

    base, pre = pair(tests, "all")

    def recheck(names):
        return pair(sorted({n.split(".")[1] for n in names if n.startswith("test.")} or set(tests)),
                    "recheck")

    assert_same(base, pre, recheck)
    # The comparison means something only if the suites really ran. (Their
    # own pass/fail status is the environment's business: a test that fails
    # here without the preload must merely fail the same way with it.)
    assert len(base.outcomes) > (2000 if heavy_mode == "full" else 500), summary(base)


def numpy_test_modules(heavy_mode: str) -> list[str]:
    core = "numpy._core.tests" if has_module("numpy._core.tests") else "numpy.core.tests"
    if heavy_mode == "full":
        core_tests, other_tests = NUMPY_CORE_TESTS, NUMPY_OTHER_TESTS
    else:
        core_tests, other_tests = NUMPY_QUICK_CORE_TESTS, NUMPY_QUICK_OTHER_TESTS
    modules = [f"{core}.{m}" for m in core_tests] + other_tests
    return [m for m in modules if has_module(m.split("::")[0])]


def test_numpy_tests(allocpolicy_lib, child_process, tmp_path, heavy_mode, progress, processes):
    assert_preload_takes(allocpolicy_lib, child_process)
    if not has_module("numpy"):
        pytest.skip("NumPy is not installed for this interpreter")
    modules = numpy_test_modules(heavy_mode)
    assert modules, "none of the selected NumPy test modules exist"

    def pytest_argv(selection):
        def argv(junit):
            return [
                # Same order in both runs: no random-order plugin.
                sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                "-m", "not slow", "-o", "junit_family=xunit2", f"--junitxml={junit}",
                "--pyargs", *selection,
            ]
        return argv

    def pair(selection, where):
        return run_pair(pytest_argv(selection), tmp_path / where, [allocpolicy_lib],
                        child_process, progress, processes)

    base, pre = pair(modules, "all")

    def recheck(names):
        # junit names are "<classname>::<test>"; rerun whole modules.
        touched = sorted(
            {m for m in modules for n in names if m.split("::")[0].rsplit(".", 1)[1] in n}
        )
        return pair(touched or modules, "recheck")

    assert_same(base, pre, recheck)
    assert len(base.outcomes) > (2000 if heavy_mode == "full" else 150), summary(base)
