"""Scopes bound to native libraries (``libraries = [...]``), raise_only_from
and the libraries report, under the preload.

A small test library (native/libscope_lib.c, built as libaptest_a.so and
libaptest_b.so) is loaded through ctypes and allocates on its own; its
allocations must follow the scope its file name is bound to, while the rest of
the program allocates freely. Every case runs in a child process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runtime_run import check, run_python

NATIVE = Path(__file__).resolve().parent / "native"

KIB = 1024
MIB = 1024 * KIB

# Loads the two test libraries (paths from the environment) with ctypes.
PRELUDE = """
import ctypes, os, sys
import allocpolicy
from allocpolicy import _native

def load(name):
    lib = ctypes.CDLL(os.path.join(os.environ["APTEST_DIR"], name))
    lib.aptest_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int]
    lib.aptest_entry.argtypes = [ctypes.c_int, ctypes.c_size_t]
    lib.aptest_kept.restype = ctypes.c_void_p
    lib.aptest_kept.argtypes = [ctypes.c_int]
    lib.aptest_unchecked.argtypes = [ctypes.c_size_t]
    lib.aptest_unchecked.restype = ctypes.c_size_t
    return lib

def scope_stats(name):
    return allocpolicy.stats().scopes[name]
"""


@pytest.fixture(scope="session")
def test_libs(tmp_path_factory: pytest.TempPathFactory, allocpolicy_lib: str) -> str:
    """Directory holding libaptest_a.so and libaptest_b.so."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler (cc) to build the test libraries")
    out = tmp_path_factory.mktemp("libscope")
    for name in ("libaptest_a.so", "libaptest_b.so"):
        cmd = [cc, "-std=gnu11", "-O1", "-g", "-shared", "-fPIC", "-fno-builtin", "-Wall",
               str(NATIVE / "libscope_lib.c"), "-o", str(out / name)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    return str(out)


def run(code: str, policy: str | None, tmp_path: Path, test_libs: str, **kwargs):
    code = PRELUDE + textwrap.dedent(code)
    return run_python(code, textwrap.dedent(policy), tmp_path, env={"APTEST_DIR": test_libs}, **kwargs)


LIB_A_RAISE = """
version = 1
[scopes.libtest]
on_oom = "raise"
budget = "1 MiB"
libraries = ["libaptest_a.so"]
"""


def test_library_budget_binds_only_the_library(tmp_path, test_libs):
    # GIVEN libaptest_a.so bound to a raise scope of 1 MiB, libaptest_b.so unbound
    # WHEN both allocate 64 blocks of 64 KiB and Python allocates 64 MiB
    out = check(run("""
        a, b = load("libaptest_a.so"), load("libaptest_b.so")
        print("a", a.aptest_alloc(64 * 1024, 64))
        print("b", b.aptest_alloc(64 * 1024, 64))
        big = [bytearray(1024 * 1024) for _ in range(64)]
        print("python", len(big))
        st = scope_stats("libtest")
        print("violations", st.violations, "live", st.live)
        a.aptest_free_all(); b.aptest_free_all()
        print("after_free", scope_stats("libtest").live)
    """, LIB_A_RAISE, tmp_path, test_libs))
    # THEN the bound library got NULL once its 1 MiB was used (it checks and
    # stops); the unbound one and Python were not limited
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["a"] == "16"
    assert lines["b"] == "64"
    assert lines["python"] == "64"
    assert lines["violations"] == f"1 live {16 * 64 * KIB}"
    assert lines["after_free"] == "0"


def test_every_entry_point_follows_the_library_scope(tmp_path, test_libs):
    out = check(run("""
        a = load("libaptest_a.so")
        n = a.aptest_entries()
        print("big", [a.aptest_entry(i, 2 * 1024 * 1024) for i in range(n)])
        print("small", [a.aptest_entry(i, 4096) for i in range(n)])
    """, LIB_A_RAISE, tmp_path, test_libs))
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    # malloc, calloc, realloc, posix_memalign, aligned_alloc, memalign, valloc, reallocarray
    assert lines["big"] == str([0] * 8)
    assert lines["small"] == str([1] * 8)


def test_abort_mode_library_scope_aborts_with_diagnostic(tmp_path, test_libs):
    policy = LIB_A_RAISE.replace('on_oom = "raise"', 'on_oom = "abort"')
    proc = run("""
        a = load("libaptest_a.so")
        print("before", flush=True)
        a.aptest_alloc(64 * 1024, 64)
        print("not reached")
    """, policy, tmp_path, test_libs)
    assert proc.returncode == -signal.SIGABRT, proc.stderr
    assert "before" in proc.stdout and "not reached" not in proc.stdout
    assert "allocation refused in scope 'libtest'" in proc.stderr
    assert "budget of scope 'libtest'=1048576" in proc.stderr


def test_budgets_stack_with_a_task_around_the_call(tmp_path, test_libs):
    # GIVEN a library scope of 100 MiB and a task of 1 MiB around the call
    policy = """
        version = 1
        [scopes.libtest]
        budget = "100 MiB"
        libraries = ["libaptest_a.so"]
        [scopes.task]
        budget = "1 MiB"
    """
    out = check(run("""
        a = load("libaptest_a.so")
        with allocpolicy.task("task"):
            print("in_task", a.aptest_alloc(64 * 1024, 64))
            v = _native.runtime().last_violation()
        rt = _native.runtime()
        print("refused_by", rt.scope_stats(v.scope).name.decode(), v.budget)
        a.aptest_free_all()
        print("outside", a.aptest_alloc(64 * 1024, 64))
        a.aptest_free_all()
        print("task_violations", scope_stats("task").violations)
        print("libtest_violations", scope_stats("libtest").violations)
    """, policy, tmp_path, test_libs))
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    # THEN the enclosing task's budget stops the library (fewer than 16
    # blocks: the task's own Python allocations count too), outside it does not
    assert 0 < int(lines["in_task"]) <= 16
    assert lines["outside"] == "64"
    # the refusal is the library instance's (the innermost), the limit the task's
    assert lines["refused_by"] == f"task {MIB}"
    assert lines["libtest_violations"] == "1"
    assert lines["task_violations"] == "0"


def test_library_loaded_later_and_reloaded(tmp_path, test_libs):
    policy = """
        version = 1
        [scopes.late]
        budget = "1 MiB"
        libraries = ["libaptest_b.so"]
    """
    out = check(run("""
        import _ctypes
        junk = [bytes(100) for _ in range(10000)]   # the program has been running
        b = load("libaptest_b.so")                   # dlopen() now
        print("first", b.aptest_alloc(64 * 1024, 64))
        kept = [b.aptest_kept(i) for i in range(16)]
        b.aptest_forget()
        handle = b._handle
        del b
        _ctypes.dlclose(handle)                      # unloaded with blocks still live
        libc = ctypes.CDLL(None)
        libc.free.argtypes = [ctypes.c_void_p]
        for p in kept:
            libc.free(p)                             # credited after the unload
        print("live", scope_stats("late").live)
        b = load("libaptest_b.so")                   # loaded again
        print("again", b.aptest_alloc(64 * 1024, 64))
        b.aptest_free_all()
        print("instances", scope_stats("late").instances)
    """, policy, tmp_path, test_libs))
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["first"] == "16"
    assert lines["live"] == "0"
    assert lines["again"] == "16"


ZLIB_POLICY = """
    version = 1
    [scopes.zlib]
    budget = "64 KiB"
    libraries = ["libz.so*"]
"""


def test_zlib_module_under_a_libz_scope(tmp_path, test_libs):
    # GIVEN libz (behind the zlib module) bound to a scope of 64 KiB
    out = check(run("""
        import zlib
        data = os.urandom(1 << 20) * 8
        try:
            zlib.compress(data, 9)
            print("compressed")
        except (MemoryError, zlib.error) as exc:
            print("refused", type(exc).__name__)
        # the rest of the program goes on, and allocates freely
        big = bytearray(64 * 1024 * 1024)
        print("python", len(big) // (1024 * 1024))
        print("violations", scope_stats("zlib").violations)
    """, ZLIB_POLICY, tmp_path, test_libs))
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["refused"] == "MemoryError"
    assert lines["python"] == "64"
    assert int(lines["violations"]) >= 1


def test_libs_report_lists_libraries_with_bytes_and_failures(tmp_path, test_libs):
    report = tmp_path / "libs.txt"
    proc = run("""
        import zlib
        a = load("libaptest_a.so")
        print("a", a.aptest_alloc(64 * 1024, 64))
        try:
            zlib.compress(os.urandom(1 << 20), 9)
        except MemoryError:
            pass
        rows = {s.name.decode(): s for s in _native.runtime().lib_stats()}
        row = rows["libaptest_a.so"]
        print("api", row.bytes, row.allocations, row.failures, row.loaded)
        print("libz_failures", rows["libz.so.1"].failures)
    """, LIB_A_RAISE + '\n[scopes.zlib]\nbudget = "64 KiB"\nlibraries = ["libz.so*"]\n',
        tmp_path, test_libs, run_options=("--libs-report", str(report)))
    out = check(proc)
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["a"] == "16"
    # 16 granted blocks of 64 KiB, then one failure
    assert lines["api"] == f"{16 * 64 * KIB} 16 1 1"
    assert int(lines["libz_failures"]) >= 1
    table = report.read_text()
    assert table.startswith("allocpolicy: allocations by shared object")
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    assert rows["libaptest_a.so"][1:] == [str(16 * 64 * KIB), "16", "1", "libtest"]
    assert rows["libz.so.1"][3] != "0" and rows["libz.so.1"][4] == "zlib"
    assert int(rows["libz.so.1"][1]) > 0
    # the interpreter is there too, under the name of its file
    assert any(name.startswith(("python", "libpython")) for name in rows)


RAISE_ONLY = """
    version = 1
    [process]
    raise_only_from = ["libaptest_b.so"]
    [scopes.liba]
    budget = "1 MiB"
    libraries = ["libaptest_a.so"]
    [scopes.libb]
    budget = "1 MiB"
    libraries = ["libaptest_b.so"]
    [scopes.task]
    budget = "1 MiB"
"""


def test_raise_only_from_listed_library_and_python_get_null(tmp_path, test_libs):
    out = check(run("""
        b = load("libaptest_b.so")
        print("b", b.aptest_alloc(64 * 1024, 64))
        try:
            with allocpolicy.task("task"):
                bytearray(4 * 1024 * 1024)
        except allocpolicy.AllocError as exc:
            print("python", exc.scope)
    """, RAISE_ONLY, tmp_path, test_libs))
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["b"] == "16"
    assert lines["python"] == "task"


def test_raise_only_from_unlisted_library_aborts(tmp_path, test_libs):
    proc = run("""
        a = load("libaptest_a.so")
        print("before", flush=True)
        a.aptest_unchecked(4 * 1024 * 1024)
        print("not reached")
    """, RAISE_ONLY, tmp_path, test_libs)
    assert proc.returncode == -signal.SIGABRT, proc.stderr
    assert "not reached" not in proc.stdout
    assert "allocation refused in scope 'liba'" in proc.stderr
    assert "the caller libaptest_a.so is not in raise_only_from, aborting" in proc.stderr


def test_no_library_scopes_no_lookup(tmp_path, test_libs):
    # Without libraries, raise_only_from or the report, nothing is looked up.
    out = check(run("""
        a = load("libaptest_a.so")
        print("a", a.aptest_alloc(64 * 1024, 64))
        print("seen", len(_native.runtime().lib_stats()))
    """, "version = 1\n", tmp_path, test_libs))
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["a"] == "64"
    assert lines["seen"] == "1"  # only the entry for code in no loaded object


def test_threads_get_an_instance_each_under_a_total_budget(tmp_path, test_libs):
    # GIVEN a library scope of 1 MiB per instance and 2 MiB in total
    policy = """
        version = 1
        [scopes.libtest]
        budget = "1 MiB"
        total_budget = "2 MiB"
        libraries = ["libaptest_a.so"]
    """
    # WHEN four threads (ctypes releases the GIL) each ask the library for 64
    # blocks of 64 KiB, holding them until every thread has asked
    out = check(run("""
        import threading
        a = load("libaptest_a.so")
        got, barrier = [], threading.Barrier(4)
        lock = threading.Lock()
        def work():
            n = a.aptest_alloc(64 * 1024, 64)
            with lock:
                got.append(n)
            barrier.wait()
            a.aptest_free_all()  # this thread's blocks
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        st = scope_stats("libtest")
        print("most", max(got))
        print("total", sum(got))
        print("instances", st.instances, "live", st.live, "peak", st.peak)
    """, policy, tmp_path, test_libs))
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    # THEN no thread got more than its instance's 1 MiB, all together no more
    # than the 2 MiB total, and every block came back
    assert int(lines["most"]) <= 16
    assert lines["total"] == "32"
    assert lines["instances"] == f"4 live 0 peak {2 * MIB}"


def test_raise_only_from_trusts_extension_modules_by_default(tmp_path, test_libs):
    # NumPy's array data is allocated by its extension module, which raises
    # MemoryError on NULL: with raise_only_from = [] it still gets NULL.
    pytest.importorskip("numpy")
    policy = """
        version = 1
        [process]
        raise_only_from = []
        [scopes.task]
        budget = "16 MiB"
    """
    out = check(run("""
        import numpy as np
        try:
            with allocpolicy.task("task"):
                np.ones(64 * 1024 * 1024, dtype=np.uint8)
        except allocpolicy.AllocError as exc:
            print("numpy", exc.scope, exc.reason)
    """, policy, tmp_path, test_libs))
    assert out == "numpy task budget\n"


def test_allocations_stay_attributed_while_another_thread_loads_and_unloads(tmp_path, test_libs):
    # GIVEN libaptest_a.so bound to 16 KiB per instance, used inside tasks by
    # two threads, while a third loads and unloads libaptest_b.so in a loop
    policy = """
        version = 1
        [scopes.a]
        budget = "16 KiB"
        libraries = ["libaptest_a.so"]
        [scopes.b]
        libraries = ["libaptest_b.so"]
        [scopes.task]
    """
    out = check(run("""
        import _ctypes, threading
        done = threading.Event()
        reloads = []
        def loader():
            n = 0
            while not done.is_set() or n == 0:
                b = load("libaptest_b.so")
                b.aptest_alloc(4096, 8)
                b.aptest_free_all()
                handle = b._handle
                del b
                _ctypes.dlclose(handle)
                n += 1
            reloads.append(n)
        def worker():
            a = load("libaptest_a.so")
            for _ in range(500):
                with allocpolicy.task("task"):
                    a.aptest_alloc(1024, 32)
                    a.aptest_free_all()
        workers = [threading.Thread(target=worker) for _ in range(2)]
        unloading = threading.Thread(target=loader)
        unloading.start()
        for t in workers: t.start()
        for t in workers: t.join()
        done.set()
        unloading.join()
        rows = {s.name.decode(): s for s in _native.runtime().lib_stats()}
        a = rows["libaptest_a.so"]
        print("a", a.allocations, a.failures)
        print("reloaded", reloads[0] > 0)
        print("live", scope_stats("a").live, scope_stats("b").live)
    """, policy, tmp_path, test_libs, run_options=("--libs-report", str(tmp_path / "libs.txt"))))
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    # THEN every task's library instance granted exactly 16 blocks and refused
    # the 17th: no allocation slipped past its scope during the reloads
    assert lines["a"] == f"{2 * 500 * 16} {2 * 500}"
    assert lines["reloaded"] == "True"
    assert lines["live"] == "0 0"


def test_library_scope_nests_in_a_module_scope(tmp_path, test_libs):
    # GIVEN a Python module bound to a 1 MiB scope that calls the library,
    # whose own scope has 100 MiB
    (tmp_path / "decoder.py").write_text(textwrap.dedent("""
        def decode(lib):
            return lib.aptest_alloc(64 * 1024, 64)
    """))
    policy = """
        version = 1
        [scopes.images]
        budget = "1 MiB"
        modules = ["decoder"]
        [scopes.libtest]
        budget = "100 MiB"
        libraries = ["libaptest_a.so"]
    """
    out = check(run("""
        sys.path.insert(0, os.getcwd())
        import decoder
        a = load("libaptest_a.so")
        print("in_module", decoder.decode(a))
        v = _native.runtime().last_violation()
        print("refused_by", _native.runtime().scope_stats(v.scope).name.decode())
        a.aptest_free_all()
        print("outside", a.aptest_alloc(64 * 1024, 64))
        a.aptest_free_all()
    """, policy, tmp_path, test_libs))
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    # THEN inside the module's call the module scope's budget binds the
    # library too; outside it only the library's own budget applies
    assert 0 < int(lines["in_module"]) <= 16
    assert lines["refused_by"] == "images"
    assert lines["outside"] == "64"


def test_libs_subcommand_writes_the_table(tmp_path):
    out = tmp_path / "libs.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "allocpolicy", "libs", "-o", str(out), "--",
         sys.executable, "-c", "import zlib; zlib.compress(bytes(10**6), 9)"],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("ALLOCPOLICY_")},
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in out.read_text().splitlines()[2:]}
    # libz's own state for level 9, granted, none failed, bound to no scope
    assert int(rows["libz.so.1"][1]) > 256 * KIB
    assert rows["libz.so.1"][3:] == ["0", "-"]
    usage = subprocess.run([sys.executable, "-m", "allocpolicy", "libs"], capture_output=True, text=True)
    assert usage.returncode == 2
    assert "libs: no command given" in usage.stderr
