"""No-allocation regions and allocation counting, under the preloaded runtime."""

from __future__ import annotations

import json
import signal

import pytest

from runtime_run import check, run_python

N = 1_000_000  # float64 elements: 8 MB per array

NUMPY_REGIONS = f"""
import json, warnings, numpy as np, allocpolicy
N = {N}
a, b, out = np.ones(N), np.ones(N), np.empty(N)
res = {{}}

# in place, with out=: nothing to allocate
with allocpolicy.no_alloc():
    np.add(a, b, out=out)
    np.multiply(out, 3.0, out=out)
res["inplace_ok"] = float(out[0])

# an operation that allocates its result
try:
    with allocpolicy.no_alloc():
        c = a + b
    res["allocating"] = "not refused"
except allocpolicy.AllocError as err:
    res["allocating"] = [err.reason, err.size, err.count, err.scope]

# the decorator form and the explicit form behave the same
@allocpolicy.no_alloc
def add_new(x, y):
    return x + y

@allocpolicy.no_alloc
def add_into(x, y, o):
    np.add(x, y, out=o)

add_into(a, b, out)
try:
    add_new(a, b)
except allocpolicy.AllocError as err:
    res["decorator"] = [err.reason, err.size]

region = allocpolicy.no_alloc()
region.enter()
np.add(a, b, out=out)
res["explicit_clean"] = region.exit().allocations
region.enter()
try:
    a * 2
except MemoryError:
    pass   # the code swallowed it: the region still reports at its end
try:
    region.exit()
except allocpolicy.AllocError as err:
    res["explicit"] = [err.reason, err.size]

# warn: one line per region, naming the first size; the work goes on
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with allocpolicy.no_alloc(action="warn"):
        c = a + b
        d = a * b
    res["warn"] = [str(w.message) for w in caught]
    res["warn_result"] = float(d[0])

# count: only records
counted = allocpolicy.no_alloc(action="count")
with counted:
    c = a + b
    d = a * b
res["count"] = [counted.stats.allocations, counted.stats.bytes >= 2 * 8 * N]
print(json.dumps(res))
"""


def test_no_alloc_around_numpy_operations(tmp_path):
    pytest.importorskip("numpy", reason="the regions are checked around NumPy operations")
    res = json.loads(check(run_python(NUMPY_REGIONS, None, tmp_path)))
    size = 8 * N
    assert res["inplace_ok"] == 6.0
    reason, refused_size, count, scope = res["allocating"]
    assert (reason, scope, count) == ("forbidden", "process", 1)
    # NumPy asks for the data buffer; the runtime names that size
    assert refused_size == size
    assert res["decorator"] == ["forbidden", size]
    assert res["explicit_clean"] == 0
    assert res["explicit"] == ["forbidden", size]
    assert len(res["warn"]) == 1
    # (NumPy may make small allocations of its own besides the two results)
    assert f"the first of {size} bytes" in res["warn"][0]
    assert res["warn_result"] == 1.0
    assert res["count"][0] >= 2 and res["count"][1]


def test_abort_action_dies_with_the_diagnostic(tmp_path):
    proc = run_python(
        """
        import allocpolicy
        with allocpolicy.no_alloc(action="abort"):
            blob = bytearray(123456)
        """,
        None,
        tmp_path,
    )
    assert proc.returncode == -signal.SIGABRT
    assert "reason=forbidden requested=123457 bytes" in proc.stderr
    # the diagnostic says which rule aborted: the region's, not a scope's mode
    assert "; an allocation in a no-allocation region (action=abort), aborting" in proc.stderr
    assert "mode=abort" not in proc.stderr


def test_frees_count_when_asked_and_surface_at_the_end(tmp_path):
    out = check(
            run_python(
                """
                import json, allocpolicy
                blob = bytearray(1 << 20)
                with allocpolicy.no_alloc():
                    del blob        # frees are not offences by default
                blob = bytearray(1 << 20)
                try:
                    with allocpolicy.no_alloc(frees=True):
                        del blob
                except allocpolicy.AllocError as err:
                    print(json.dumps([err.reason, err.count, str(err)]))
                # a free offended first: the first allocation is still refused
                blob = bytearray(1 << 20)
                try:
                    with allocpolicy.no_alloc(frees=True):
                        del blob
                        try:
                            more = bytearray(4096)
                            print(json.dumps("granted"))
                        except MemoryError:
                            print(json.dumps("refused"))
                except allocpolicy.AllocError as err:
                    print(json.dumps([err.reason, err.count, err.size]))
                """,
                None,
                tmp_path,
            )
    )
    res, second, third = (json.loads(line) for line in out.splitlines())
    assert res[0:2] == ["forbidden", 1]
    assert "frees are forbidden here" in res[2]
    assert second == "refused"
    assert third == ["forbidden", 2, 4097]


def test_forbid_scope_from_the_policy(tmp_path):
    policy = """
    version = 1
    [scopes.audio]
    forbid = true
    on_violation = "raise"
    [scopes.audit]
    forbid = true
    on_violation = "count"
    """
    res = json.loads(
        check(
            run_python(
                """
                import json, allocpolicy
                res = {}
                with allocpolicy.scope("audio"):
                    pass
                res["clean"] = True
                try:
                    with allocpolicy.scope("audio"):
                        buf = bytearray(50000)
                except allocpolicy.AllocError as err:
                    res["audio"] = [err.reason, err.scope, err.size]
                with allocpolicy.scope("audit"):
                    buf = bytearray(50000)
                res["audit"] = len(buf)
                s = allocpolicy.stats().scopes
                res["forbidden"] = [s["audio"].forbidden >= 1, s["audit"].forbidden >= 1]
                print(json.dumps(res))
                """,
                policy,
                tmp_path,
            )
        )
    )
    assert res["clean"] is True
    assert res["audio"] == ["forbidden", "audio", 50001]
    assert res["audit"] == 50000
    assert res["forbidden"] == [True, True]


def test_count_allocs_current_thread_and_all_threads(tmp_path):
    res = json.loads(
        check(
            run_python(
                """
                import json, threading, allocpolicy
                with allocpolicy.count_allocs() as nothing:
                    pass
                started, go, done = threading.Event(), threading.Event(), threading.Event()
                def other():
                    started.set()
                    go.wait()
                    keep = [bytearray(10000 + i) for i in range(20)]
                    done.set()
                t = threading.Thread(target=other)
                t.start()
                started.wait()
                with allocpolicy.count_allocs() as mine:
                    go.set()
                    blocks = [bytearray(5000) for _ in range(7)]
                    del blocks
                # (waiting allocates a lock: outside the exact count)
                done.wait()
                t.join()
                go.clear(); done.clear(); started.clear()
                t = threading.Thread(target=other)
                t.start()
                started.wait()
                with allocpolicy.count_allocs(threads="all") as everyone:
                    go.set()
                    done.wait()
                    blocks = [bytearray(5000) for _ in range(7)]
                    del blocks
                t.join()
                print(json.dumps([mine.allocations, mine.frees, mine.bytes, everyone.allocations,
                                  everyone.bytes, nothing.allocations]))
                """,
                None,
                tmp_path,
            )
        )
    )
    mine_allocs, mine_frees, mine_bytes, all_allocs, all_bytes, nothing = res
    # this thread: exactly its 7 blocks (and their frees), nothing of the other
    assert mine_allocs == 7 and mine_frees == 7 and mine_bytes == 7 * 5001
    # every thread: both threads' blocks
    assert all_allocs >= 27 and all_bytes >= 7 * 5001 + sum(10001 + i for i in range(20))
    assert nothing == 0


def test_region_arguments_are_checked(tmp_path):
    out = check(
        run_python(
            """
            import allocpolicy
            for call in (lambda: allocpolicy.no_alloc(action="explode"),
                         lambda: allocpolicy.no_alloc(domains=["gpu"]),
                         lambda: allocpolicy.count_allocs(threads="some")):
                try:
                    call()
                except (TypeError, ValueError) as exc:
                    print(type(exc).__name__, exc)
            """,
            None,
            tmp_path,
        )
    )
    lines = out.splitlines()
    assert lines[0].startswith("ValueError no_alloc(): argument 'action' must be one of")
    assert lines[1].startswith("ValueError no_alloc(): argument 'domains': unknown domain 'gpu'")
    assert lines[2].startswith("ValueError count_allocs(): argument 'threads'")


def test_python_domains_see_every_object_when_named(tmp_path):
    out = json.loads(
        check(
            run_python(
                """
                import json, allocpolicy
                with allocpolicy.count_allocs() as default:
                    words = [str(i) for i in range(1000)]
                with allocpolicy.count_allocs(domains=["py_mem", "py_obj"]) as python:
                    words = [str(i) for i in range(1000)]
                try:
                    with allocpolicy.no_alloc(domains="py_obj"):
                        tiny = (object(),)
                    outcome = "passed"
                except allocpolicy.AllocError as err:
                    outcome = [err.reason, err.size < 512]
                print(json.dumps([default.allocations, python.allocations, outcome]))
                """,
                None,
                tmp_path,
            )
        )
    )
    default, python, outcome = out
    # by default the small strings are pymalloc's business, not malloc's
    assert default < 100
    # with the Python domains, each of the 1000 strings is an allocation
    assert python >= 1000
    assert outcome == ["forbidden", True]
