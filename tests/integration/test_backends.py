"""The runtime over another allocator: LD_PRELOAD="liballocpolicy.so libjemalloc.so.2"
(or libmimalloc.so.2) makes that allocator the backend the hooks call.

Each test first proves the backend really serves the blocks (its own
statistics or heap queries see them), then that results are identical to the
runs with glibc as the backend and with no preload at all.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.backend

BACKEND_NAMES = ["jemalloc", "mimalloc"]
SMALL_WORK = "v=1;process=raise:0;grace=0;scope=work:raise:65536:0"
STRESS_TABLE = (
    "v=1;process=raise:0;grace=0;"
    "scope=work:raise:0:0;scope=nested:raise:0:0;scope=shared:raise:0:0;"
    "scope=tight:raise:262144:0"
)

# Deterministic work through many allocation patterns; prints a digest of the
# results and, separately, facts about the allocator in use.
PY_WORKLOAD = textwrap.dedent(
    r"""
    import ctypes, hashlib, json, sys, threading, zlib

    h = hashlib.sha256()
    def feed(x):
        h.update(repr(x).encode())

    # Containers growing and shrinking (realloc), many small objects.
    data = {f"k{i}": [i] * (i % 50) for i in range(20000)}
    for i in range(0, 20000, 3):
        del data[f"k{i}"]
    feed(sorted(data)[:100]); feed(sum(len(v) for v in data.values()))
    text = json.dumps(data, sort_keys=True)
    feed(len(text)); feed(json.loads(text) == data)
    blob = b"".join(str(i).encode() * 7 for i in range(50000))
    packed = zlib.compress(blob, 6)
    feed(len(packed)); feed(zlib.decompress(packed) == blob)
    s = ""
    for i in range(3000):
        s += chr(65 + i % 26) * (i % 13)
    feed(hashlib.md5(s.encode()).hexdigest())
    big = bytearray(48 << 20)
    big[-1] = 7
    feed(sum(big[-10:]))
    del big

    # Threads allocating and handing objects to each other.
    results = [None] * 8
    shared = []
    lock = threading.Lock()
    def worker(n):
        acc = []
        for i in range(4000):
            acc.append(bytes(range(i % 256)) * (1 + n))
            if i % 7 == 0:
                with lock:
                    shared.append(acc.pop())
        results[n] = sum(map(len, acc))
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    feed(results); feed(sum(map(len, shared)))
    print("digest", h.hexdigest())

    libc = ctypes.CDLL(None)
    preloaded = hasattr(libc, "ap_is_preloaded") and libc.ap_is_preloaded() == 1
    print("facts preloaded=%d jemalloc=%d mimalloc=%d" % (
        preloaded, hasattr(libc, "mallctl"), hasattr(libc, "mi_version")))

    # The backend sees Python's big buffers.
    n = 64 << 20
    if hasattr(libc, "mallctl"):
        mallctl = libc.mallctl
        mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                            ctypes.c_void_p, ctypes.c_size_t]
        def allocated():
            epoch = ctypes.c_uint64(1)
            mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
            value = ctypes.c_size_t(0)
            size = ctypes.c_size_t(ctypes.sizeof(value))
            assert mallctl(b"stats.allocated", ctypes.byref(value), ctypes.byref(size), None, 0) == 0
            return value.value
        before = allocated()
        buf = bytearray(n)
        print("serves", allocated() - before >= n)
    elif hasattr(libc, "mi_is_in_heap_region"):
        in_heap = libc.mi_is_in_heap_region
        in_heap.argtypes = [ctypes.c_void_p]
        buf = bytearray(n)
        address = ctypes.addressof((ctypes.c_char * n).from_buffer(buf))
        print("serves", bool(in_heap(address)))
    """
)


@pytest.fixture(scope="module")
def entrypoints(build_c):
    return build_c("entrypoints")


@pytest.fixture(scope="module")
def stress(build_c):
    return build_c("stress")


@pytest.fixture(params=BACKEND_NAMES)
def backend(request, backend_library):
    return request.param, backend_library(request.param)


def assert_clean(proc):
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-5000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, detail
    assert "FAIL" not in proc.stdout, detail
    assert "cannot be preloaded" not in proc.stderr, detail
    return detail


def test_backend_is_the_next_allocator(entrypoints, run_preloaded, backend):
    name, path = backend
    proc = run_preloaded([entrypoints, "backend", f"{name}_serves"], preload=[path])
    detail = assert_clean(proc)
    expected = "jemalloc=1 mimalloc=0" if name == "jemalloc" else "jemalloc=0 mimalloc=1"
    assert f"backend {expected} preloaded=1" in proc.stdout, detail
    assert f"ok {name}_serves" in proc.stdout, detail


def test_entry_points_identical_over_backend(entrypoints, run_preloaded, backend):
    _, path = backend
    bare = run_preloaded([entrypoints, "all"], preload=False)
    over_glibc = run_preloaded([entrypoints, "all"])
    over_backend = run_preloaded([entrypoints, "all"], preload=[path])
    assert_clean(bare)
    assert_clean(over_glibc)
    assert_clean(over_backend)
    assert over_backend.stdout == over_glibc.stdout == bare.stdout


@pytest.mark.parametrize("mode", ["realloc_fail", "budget_raise"])
def test_budget_refusals_over_backend(entrypoints, run_preloaded, backend, mode):
    _, path = backend
    proc = run_preloaded([entrypoints, mode, "all"], table=SMALL_WORK, preload=[path])
    detail = assert_clean(proc)
    assert f"ok {mode}" in proc.stdout, detail
    # The refusals left the program fine: every portable check ran after them.
    assert sum(line.startswith("ok ") for line in proc.stdout.splitlines()) == 20, detail


def test_aligned_accounting_over_backend(entrypoints, run_preloaded, backend):
    _, path = backend
    proc = run_preloaded([entrypoints, "aligned_accounting"],
                         table="v=1;process=raise:0;scope=work:raise:0:0", preload=[path])
    detail = assert_clean(proc)
    assert "ok aligned_accounting" in proc.stdout, detail


def test_abort_over_backend(entrypoints, run_preloaded, backend):
    _, path = backend
    proc = run_preloaded(
        [entrypoints, "budget_abort"],
        table="v=1;process=raise:0;scope=strict:abort:65536:0",
        preload=[path],
    )
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stdout, proc.stderr)
    assert "allocpolicy: allocation refused in scope 'strict'" in proc.stderr


def test_stress_accounting_over_backend(stress, run_preloaded, backend):
    _, path = backend
    proc = run_preloaded([stress, "100000", "4"], table=STRESS_TABLE, preload=[path])
    detail = assert_clean(proc)
    assert "MISMATCH" not in proc.stdout, detail
    assert re.search(r"^RESULT mismatches=0 corrupt=0 api_errors=0 ", proc.stdout, re.M), detail


def test_python_workload_identical_over_backend(run_preloaded, backend):
    name, path = backend
    argv = [sys.executable, "-c", PY_WORKLOAD]
    bare = run_preloaded(argv, preload=False)
    over_glibc = run_preloaded(argv)
    over_backend = run_preloaded(argv, preload=[path])
    for proc in (bare, over_glibc, over_backend):
        assert_clean(proc)

    def digest(proc):
        return re.search(r"^digest (\w+)$", proc.stdout, re.M).group(1)

    assert digest(over_backend) == digest(over_glibc) == digest(bare)
    assert "facts preloaded=0 jemalloc=0 mimalloc=0" in bare.stdout
    assert "facts preloaded=1 jemalloc=0 mimalloc=0" in over_glibc.stdout
    expected = "jemalloc=1 mimalloc=0" if name == "jemalloc" else "jemalloc=0 mimalloc=1"
    assert f"facts preloaded=1 {expected}" in over_backend.stdout, over_backend.stdout
    assert "serves True" in over_backend.stdout, over_backend.stdout


def test_task_server_example_over_backend(backend):
    # The README's main job through `allocpolicy run --backend NAME`: the same
    # outcome as over glibc (every task done, every bomb stopped, exit 0).
    name, _ = backend
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "allocpolicy", "run", "--backend", name, "--",
         sys.executable, str(repo / "examples" / "task_server.py"), "--tasks", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8/8 ordinary tasks completed, 3/3 bombs stopped with AllocError" in proc.stdout
