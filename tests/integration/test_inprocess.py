"""In-process mode: allocpolicy.install() in a plain `python`, without the preload.

Every case runs its code in a child interpreter started WITHOUT LD_PRELOAD (so
nothing is interposed before install()), except the one that checks install()
under the preload. The children compare Python's allocators with ctypes
directly, not through the package, so "exactly the originals" is checked
independently of the code under test.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from runtime_run import check, run_python

# Shared by the children: the allocators in force, read straight from CPython.
PRELUDE = r"""
import ctypes, gc, json, sys
import allocpolicy

class _PyMemAllocatorEx(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("ctx", "malloc", "calloc", "realloc", "free")]

class _ArenaAllocator(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("ctx", "alloc", "free")]

_api = ctypes.PyDLL(None)

def allocators():
    out = []
    for domain in range(3):  # PYMEM_DOMAIN_RAW, _MEM, _OBJ
        a = _PyMemAllocatorEx()
        _api.PyMem_GetAllocator(domain, ctypes.byref(a))
        out.append([getattr(a, n) for n, _ in a._fields_])
    arena = _ArenaAllocator()
    _api.PyObject_GetArenaAllocator(ctypes.byref(arena))
    out.append([getattr(arena, n) for n, _ in arena._fields_])
    return out

def outcome(fn):
    try:
        fn()
        return {"refused": False}
    except allocpolicy.AllocError as err:
        return {"refused": True, "scope": err.scope, "size": err.size, "reason": err.reason,
                "budget": err.budget}

POLICY = {"scopes": {"job": {"on_oom": "raise", "budget": "64 MiB"}}}
"""

NUMPY_MISSING = "NumPy is not installed for this interpreter (the `test` extra installs it)"


def run_plain(code: str, tmp_path, env: dict[str, str] | None = None) -> dict:
    """Run PRELUDE + code in a plain child interpreter; its last stdout line is JSON."""
    clean = {"ALLOCPOLICY_TABLE": "", "ALLOCPOLICY_POLICY": "", "LD_PRELOAD": ""}
    proc = run_python(
        PRELUDE + textwrap.dedent(code), None, tmp_path, preload=False, env={**clean, **(env or {})}
    )
    return json.loads(check(proc).splitlines()[-1])


def test_task_budget_stops_a_list_of_small_objects_and_the_process_goes_on(tmp_path):
    # GIVEN a plain interpreter where install() applied a 64 MiB task budget
    out = run_plain(
        """
        allocpolicy.install(POLICY)
        assert not allocpolicy.stats().process.preloaded and allocpolicy.is_installed()

        def build():
            with allocpolicy.task("job"):
                items = [str(i) * 3 for i in range(50_000_000)]  # ~3 GiB if allowed

        # WHEN a task builds a large list of small objects
        first = outcome(build)
        # THEN it fails alone with AllocError; the next task and the program go on
        def small():
            with allocpolicy.task("job"):
                items = [str(i) for i in range(100_000)]
        second = outcome(small)
        stats = allocpolicy.stats()
        print(json.dumps({"first": first, "second": second,
                          "job_live": stats.scopes["job"].live,
                          "violations": stats.scopes["job"].violations}))
        """,
        tmp_path,
    )
    assert out["first"]["refused"] and out["first"]["scope"] == "job"
    assert out["first"]["reason"] == "budget" and out["first"]["budget"] == 64 << 20
    assert out["second"] == {"refused": False}
    assert out["violations"] >= 1
    # The refused task's 64 MiB came back, but for the 1 MiB arenas that a
    # survivor (objects kept on Python's free lists) still holds.
    assert 0 <= out["job_live"] <= 16 << 20


def test_task_budget_refuses_a_large_numpy_array_before_allocating_it(tmp_path):
    pytest.importorskip("numpy", reason=NUMPY_MISSING)
    out = run_plain(
        """
        import numpy as np
        allocpolicy.install(POLICY)

        def big():
            with allocpolicy.task("job"):
                a = np.ones((20000, 20000))  # 3.2 GB of float64

        def fits():
            with allocpolicy.task("job"):
                a = np.ones((1000, 1000))
                return float(a.sum())
        first, second = outcome(big), outcome(fits)
        rss_after = int(open("/proc/self/statm").read().split()[1]) * 4096
        print(json.dumps({"first": first, "second": second, "rss": rss_after,
                          "handler": np.core.multiarray.get_handler_name()
                          if hasattr(np, "core") else None}))
        """,
        tmp_path,
        env={"PYTHONWARNINGS": "ignore::DeprecationWarning"},
    )
    assert out["first"] == {
        "refused": True, "scope": "job", "size": 20000 * 20000 * 8, "reason": "budget",
        "budget": 64 << 20,
    }
    assert out["second"] == {"refused": False}
    # Decided before allocating: the 3.2 GB never became resident.
    assert out["rss"] < 1 << 30
    assert out["handler"] in (None, "allocpolicy")


def test_numpy_imported_later_and_used_in_other_threads_is_charged(tmp_path):
    pytest.importorskip("numpy", reason=NUMPY_MISSING)
    out = run_plain(
        """
        import threading
        allocpolicy.install(POLICY)
        assert "numpy" not in sys.modules
        import numpy as np   # after install(): the import hook sets the handler

        results = {}
        def in_thread():
            # A new thread has a fresh context, where NumPy's default handler
            # is in force until the thread's first scope entry.
            results["thread"] = outcome(lambda: _task(lambda: np.zeros(100_000_000)))

        def _task(fn):
            with allocpolicy.task("job"):
                return fn()

        results["main"] = outcome(lambda: _task(lambda: np.empty(50_000_000)))
        t = threading.Thread(target=in_thread)
        t.start(); t.join()
        with allocpolicy.task("job"):
            kept = np.ones(1_000_000)      # 8 MB that outlive the task
        escaped = allocpolicy.stats().scopes["job"].escaped
        del kept
        live_after = allocpolicy.stats().scopes["job"].live
        print(json.dumps({**results, "escaped": escaped, "live_after": live_after}))
        """,
        tmp_path,
    )
    assert out["main"]["refused"] and out["main"]["size"] == 50_000_000 * 8
    assert out["thread"]["refused"] and out["thread"]["size"] == 100_000_000 * 8
    assert out["escaped"] >= 8_000_000
    # Freed after its task ended: credited back to it.
    assert out["live_after"] <= out["escaped"] - 8_000_000 + (1 << 20)


def test_objects_from_before_install_are_freed_after_it_safely(tmp_path):
    out = run_plain(
        """
        # GIVEN a few hundred MB of varied objects made before install()
        keep = [bytes(700 + i % 3000) for i in range(150_000)]            # RAW blocks
        keep += [list(range(i % 300)) for i in range(100_000)]              # item arrays
        keep += [{str(i): i, "k": [i]} for i in range(300_000)]            # small objects
        keep += [bytearray(1 << 20) for i in range(100)]                    # large blocks
        keep += ["x" * (i % 2000) for i in range(100_000)]
        growing = [bytearray(5000) for _ in range(1000)]
        allocpolicy.install(POLICY)
        # WHEN they are resized and freed while installed (inside a task, too)
        with allocpolicy.task("job"):
            for b in growing:
                b.extend(b"y" * 3000)          # realloc of blocks from before
        del growing
        with allocpolicy.task("job"):
            del keep[: len(keep) // 2]
        del keep
        gc.collect()
        stats = allocpolicy.stats()
        # THEN nothing crashed and no counter went below zero
        print(json.dumps({"process_live": stats.process.live, "job_live": stats.scopes["job"].live,
                          "job_peak": stats.scopes["job"].peak}))
        """,
        tmp_path,
    )
    assert out["process_live"] >= 0
    assert out["job_live"] >= 0
    # The grown blocks became accounted when they moved: at least 1000 x 8000 bytes.
    assert out["job_peak"] >= 8_000_000


@pytest.mark.parametrize("pythonmalloc", ["", "malloc", "debug", "malloc_debug"])
def test_uninstall_restores_exactly_the_original_allocators(tmp_path, pythonmalloc):
    # PYTHONMALLOC=malloc: MEM and OBJ are accounted like RAW; debug: the layers
    # sit over CPython's debug hooks, which check every block they get back.
    out = run_plain(
        """
        def big():
            with allocpolicy.task("job"):
                x = [bytes(1000) for _ in range(200_000)]

        before = allocators()
        allocpolicy.install(POLICY)
        during = allocators()
        allocpolicy.install(POLICY)            # installing twice is harmless
        twice = allocators()
        budget_holds = outcome(big)["refused"]
        blocks = [bytes(4000) for _ in range(1000)]   # charged, freed after uninstall
        allocpolicy.uninstall()
        after = allocators()
        del blocks
        inert = outcome(big)
        allocpolicy.uninstall()                # harmless too
        print(json.dumps({"before": before, "during": during, "twice": twice, "after": after,
                          "budget_holds": budget_holds, "inert": inert,
                          "installed": allocpolicy.is_installed(),
                          "active": allocpolicy.is_active()}))
        """,
        tmp_path,
        env={"PYTHONMALLOC": pythonmalloc} if pythonmalloc else None,
    )
    assert out["during"] != out["before"]
    assert out["twice"] == out["during"]  # no second layer
    assert out["budget_holds"]
    assert out["after"] == out["before"]  # RAW, MEM, OBJ and the arena allocator
    assert out["inert"] == {"refused": False}
    assert not out["installed"] and not out["active"]


def test_reinstall_after_uninstall_enforces_again_and_restores_again(tmp_path):
    out = run_plain(
        """
        def big():
            with allocpolicy.task("job"):
                x = [bytes(1000) for _ in range(200_000)]
        before = allocators()
        rounds = []
        for _ in range(20):   # more rounds than the runtime has layer slots
            allocpolicy.install(POLICY)
            rounds.append(outcome(big)["refused"])
            allocpolicy.uninstall()
        print(json.dumps({"rounds": rounds, "same": allocators() == before}))
        """,
        tmp_path,
    )
    assert out["rounds"] == [True] * 20
    assert out["same"]


TRACEMALLOC_CASES = {
    # tracemalloc before install(), stopped after uninstall()
    "before": """
        tracemalloc.start(); traced = allocators()
        allocpolicy.install(POLICY)
        work()
        allocpolicy.uninstall(); back_to_tracemalloc = allocators() == traced
        tracemalloc.stop()
    """,
    # started after install(), stopped before uninstall()
    "after": """
        allocpolicy.install(POLICY); tracemalloc.start()
        work()
        tracemalloc.stop(); allocpolicy.uninstall(); back_to_tracemalloc = None
    """,
    # started before install() and stopped in the middle: tracemalloc puts back
    # what it found, dropping our layers; the next task entry puts them back
    "stopped_in_the_middle": """
        tracemalloc.start(); allocpolicy.install(POLICY)
        tracemalloc.stop()
        tracemalloc.start(); work(); tracemalloc.stop()
        allocpolicy.uninstall(); back_to_tracemalloc = None
    """,
}


@pytest.mark.parametrize("case", sorted(TRACEMALLOC_CASES))
def test_coexists_with_tracemalloc(tmp_path, case):
    work = """
        import tracemalloc
        original = allocators()
        seen = {}

        def work():
            def bomb():
                with allocpolicy.task("job"):
                    x = [bytes(1000) for _ in range(200_000)]
            seen["refused"] = outcome(bomb)
            keep = [bytes(2000) for _ in range(2000)]     # 4 MB, traced
            seen["traced"] = tracemalloc.get_traced_memory()[0]
            snapshot = tracemalloc.take_snapshot()
            seen["in_snapshot"] = sum(s.size for s in snapshot.statistics("filename"))
            del keep
        """
    report = """
        print(json.dumps({**seen, "exact": allocators() == original,
                          "back_to_tracemalloc": back_to_tracemalloc}))
        """
    code = textwrap.dedent(work) + textwrap.dedent(TRACEMALLOC_CASES[case]) + textwrap.dedent(report)
    out = run_plain(code, tmp_path)
    assert out["refused"]["refused"] and out["refused"]["scope"] == "job"
    # tracemalloc still sees what the program allocates (4 MB, plus a little).
    assert 4_000_000 <= out["traced"] <= 40_000_000
    assert 4_000_000 <= out["in_snapshot"] <= 40_000_000
    assert out["exact"]
    assert out["back_to_tracemalloc"] in (None, True)


def test_tracemalloc_started_after_install_and_still_tracing_at_uninstall(tmp_path):
    out = run_plain(
        """
        import tracemalloc, warnings
        original = allocators()
        allocpolicy.install(POLICY)
        tracemalloc.start()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            allocpolicy.uninstall()
        # Our layer is under tracemalloc's, passing through: nothing counts.
        x = [bytes(1000) for _ in range(100_000)]
        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del x
        ours_on_top = allocators() != original
        allocpolicy.install(POLICY)         # finds its layer on top again
        allocpolicy.uninstall()
        print(json.dumps({"warning": [str(w.message) for w in caught], "traced": traced,
                          "ours_on_top": ours_on_top, "exact": allocators() == original}))
        """,
        tmp_path,
    )
    assert len(out["warning"]) == 1 and "tracemalloc" in out["warning"][0]
    assert out["traced"] >= 100_000_000
    assert out["ours_on_top"]
    assert out["exact"]


def test_bad_arguments_name_the_argument_and_change_nothing(tmp_path):
    out = run_plain(
        """
        before = allocators()
        errors = []
        for bad in (42, b"policy.toml", {"scopes": {"job": {"budget": "lots"}}},
                    "/no/such/policy.toml"):
            try:
                allocpolicy.install(bad)
            except (TypeError, ValueError, OSError) as err:
                errors.append([type(err).__name__, str(err)])
        print(json.dumps({"errors": errors, "installed": allocpolicy.is_installed(),
                          "same": allocators() == before}))
        """,
        tmp_path,
    )
    kinds = [e[0] for e in out["errors"]]
    assert kinds[:2] == ["TypeError", "TypeError"]
    assert all("argument 'policy'" in e[1] for e in out["errors"][:2])
    assert kinds[2] == "PolicyError" and "budget" in out["errors"][2][1]
    assert len(kinds) == 4
    assert not out["installed"] and out["same"]


def test_uninstall_inside_a_scope_is_refused_and_changes_nothing(tmp_path):
    out = run_plain(
        """
        allocpolicy.install(POLICY)
        with allocpolicy.scope("job"):
            try:
                allocpolicy.uninstall()
                message = None
            except RuntimeError as err:
                message = str(err)
        still = allocpolicy.is_installed()
        allocpolicy.uninstall()
        print(json.dumps({"message": message, "still": still,
                          "after": allocpolicy.is_installed()}))
        """,
        tmp_path,
    )
    assert out["message"] and "still active" in out["message"]
    assert out["still"] and not out["after"]


def test_frees_credit_the_instance_that_allocated_even_from_another_thread(tmp_path):
    out = run_plain(
        """
        import threading
        allocpolicy.install(POLICY)
        with allocpolicy.task("job"):
            blocks = [bytes(10_000) for _ in range(1000)]   # 10 MB of RAW blocks
            live_inside = allocpolicy.stats().scopes["job"].live
        escaped = allocpolicy.stats().scopes["job"].escaped
        t = threading.Thread(target=blocks.clear)
        t.start(); t.join()
        print(json.dumps({"inside": live_inside, "escaped": escaped,
                          "after": allocpolicy.stats().scopes["job"].live}))
        """,
        tmp_path,
    )
    assert out["inside"] >= 10_000_000
    assert out["escaped"] >= 10_000_000
    assert 0 <= out["after"] <= out["escaped"] - 10_000_000 + (2 << 20)


def test_under_the_preload_install_does_not_count_twice(tmp_path):
    proc = run_python(
        PRELUDE
        + textwrap.dedent("""
        def measure():
            with allocpolicy.task("job"):
                data = [bytes(100_000) for _ in range(100)]   # 10 MB
            return allocpolicy.stats().scopes["job"].max_instance_peak

        before_install = measure()
        original = allocators()
        allocpolicy.install()            # only applies the policy
        after_install = measure()
        allocpolicy.install({"scopes": {"job": {"budget": "5 MiB", "on_oom": "raise"}}})
        refused = outcome(measure)["refused"]
        allocpolicy.uninstall()          # nothing to take off
        print(json.dumps({"before": before_install, "after": after_install,
                          "installed": allocpolicy.is_installed(),
                          "same_allocators": allocators() == original, "refused": refused,
                          "preloaded": allocpolicy.stats().process.preloaded}))
        """),
        """
        version = 1

        [scopes.job]
        on_oom = "raise"
        budget = "64 MiB"
        """,
        tmp_path,
    )
    out = json.loads(check(proc).splitlines()[-1])
    assert out["preloaded"]
    assert not out["installed"] and out["same_allocators"]
    assert 10_000_000 <= out["before"] < 12_000_000
    # Each instance's peak is the same 10 MB, not 20 MB.
    assert abs(out["after"] - out["before"]) < 1 << 20
    assert out["refused"]


def test_in_process_library_is_shipped_next_to_the_preload_library():
    from allocpolicy import _native

    path = _native.inprocess_library_path()
    assert os.path.dirname(path) == os.path.dirname(_native.library_path())


def test_a_forbid_scope_in_a_new_thread_sees_none_of_the_handler_setup(tmp_path):
    pytest.importorskip("numpy", reason=NUMPY_MISSING)
    # The first scope entry of a thread sets NumPy's handler in its context;
    # that must happen outside the scope being entered.
    out = run_plain(
        """
        import threading
        import numpy as np
        allocpolicy.install({"scopes": {"quiet": {"forbid": True, "on_violation": "raise"}}})
        result = {}
        def quiet():
            with allocpolicy.scope("quiet"):
                pass
        def worker():
            result["outcome"] = outcome(quiet)
        t = threading.Thread(target=worker)
        t.start(); t.join()
        print(json.dumps(result))
        """,
        tmp_path,
    )
    assert out["outcome"] == {"refused": False}


def test_only_the_refusals_exception_is_converted_in_process_too(tmp_path):
    # GIVEN a task in a plain interpreter under install() that catches its
    # first refusal and goes on
    out = run_plain(
        """
        import sys
        allocpolicy.install(POLICY)

        def after_a_caught_refusal(then):
            try:
                with allocpolicy.task("job"):
                    try:
                        bytearray(100 << 20)
                    except MemoryError:
                        pass
                    then()
            except Exception as exc:
                return type(exc).__name__

        def impossible():
            bytearray(sys.maxsize)  # no allocation: CPython refuses the size

        def refused_again():
            bytearray(200 << 20)

        print(json.dumps([after_a_caught_refusal(impossible),
                          after_a_caught_refusal(lambda: int("64 MiB")),
                          after_a_caught_refusal(refused_again)]))
        """,
        tmp_path,
    )
    # THEN what C code raised later for its own reasons leaves as it is, and
    # a refusal that leaves the task is reported
    assert out == ["MemoryError", "ValueError", "AllocError"]
