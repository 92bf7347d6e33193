"""Scope semantics: nesting, modes, budgets, crediting frees, threads."""

from __future__ import annotations

import signal

import pytest

from runtime_run import check, run_python

NESTED = """
version = 1
[scopes.outer]
on_oom = "{outer}"
budget = "32 MiB"
[scopes.inner]
on_oom = "{inner}"
budget = "1 GiB"
"""


def test_enclosing_budget_applies_and_names_its_scope(tmp_path):
    # The inner scope has room, the outer does not: the outer budget refuses.
    out = check(
        run_python(
            """
            import allocpolicy
            try:
                with allocpolicy.task("outer"):
                    with allocpolicy.scope("inner"):
                        x = bytearray(64 << 20)
            except allocpolicy.AllocError as err:
                print(err.scope, err.limit, err.budget, err.task)
            """,
            NESTED.format(outer="raise", inner="raise"),
            tmp_path,
        )
    )
    assert out.split() == ["outer", "budget", str(32 << 20), "outer"]


def test_innermost_scope_decides_the_mode_raise_inside_abort(tmp_path):
    # The outer scope would abort, but the inner one raises: inner decides.
    out = check(
        run_python(
            """
            import allocpolicy
            with allocpolicy.scope("outer"):
                try:
                    with allocpolicy.task("inner"):
                        x = bytearray(64 << 20)
                except allocpolicy.AllocError as err:
                    print("raised", err.scope)
            print("alive")
            """,
            NESTED.format(outer="abort", inner="raise"),
            tmp_path,
        )
    )
    assert out.split() == ["raised", "outer", "alive"]


def test_innermost_scope_decides_the_mode_abort_inside_raise(tmp_path):
    proc = run_python(
        """
        import allocpolicy
        def crunch():
            return bytearray(64 << 20)
        with allocpolicy.task("outer"):
            with allocpolicy.scope("inner"):
                crunch()
        print("not reached")
        """,
        NESTED.format(outer="raise", inner="abort"),
        tmp_path,
    )
    assert proc.returncode == -signal.SIGABRT
    assert "not reached" not in proc.stdout
    assert "allocpolicy: allocation refused in scope 'inner'" in proc.stderr
    assert "budget of scope 'outer'=33554432" in proc.stderr
    assert f"requested={(64 << 20) + 1} bytes" in proc.stderr


def test_abort_mode_prints_diagnostic_then_python_traceback(tmp_path):
    proc = run_python(
        """
        import allocpolicy
        def load_everything():
            return [bytearray(1 << 20) for _ in range(100)]
        with allocpolicy.scope("critical"):
            load_everything()
        """,
        """
        version = 1
        [scopes.critical]
        on_oom = "abort"
        budget = "16 MiB"
        """,
        tmp_path,
    )
    assert proc.returncode == -signal.SIGABRT
    diag = proc.stderr.index("allocpolicy: allocation refused in scope 'critical'")
    assert "reason=budget" in proc.stderr and "live=" in proc.stderr
    # faulthandler's dump of the Python stack follows the diagnostic
    trace = proc.stderr.index("Fatal Python error: Aborted")
    assert diag < trace
    assert "in load_everything" in proc.stderr[trace:]


def test_abort_diagnostic_goes_to_the_configured_fd(tmp_path):
    proc = run_python(
        """
        import os, allocpolicy
        with allocpolicy.scope("critical"):
            bytearray(32 << 20)
        """,
        """
        version = 1
        [process]
        report_fd = 1
        [scopes.critical]
        on_oom = "abort"
        budget = "16 MiB"
        """,
        tmp_path,
    )
    assert proc.returncode == -signal.SIGABRT
    assert "allocpolicy: allocation refused in scope 'critical'" in proc.stdout
    assert "allocpolicy: allocation refused" not in proc.stderr


def test_memory_freed_after_the_task_ended_is_credited_back(tmp_path):
    # Bytes that outlive their task are escaped: recorded on the scope, no
    # longer part of its live total (which sums live instances), still live
    # in the process until freed, and credited back there when freed.
    out = check(
        run_python(
            """
            import allocpolicy
            def process_live():
                return allocpolicy.stats().process.live
            with allocpolicy.task("request"):
                kept = bytearray(10 << 20)
            st = allocpolicy.stats().scopes["request"]
            before = process_live()
            del kept
            after = process_live()
            print(st.live, st.escaped, st.active, before - after)
            """,
            """
            version = 1
            [scopes.request]
            budget = "64 MiB"
            """,
            tmp_path,
        )
    )
    live, escaped, active, freed = map(int, out.split())
    size = (10 << 20) + 1
    # what escaped is the buffer (plus at most one pymalloc arena)
    assert size <= escaped <= size + (1 << 20)
    assert live == 0 and active == 0
    assert freed == size


def test_free_from_another_thread_is_credited_to_the_allocating_task(tmp_path):
    out = check(
        run_python(
            """
            import threading, allocpolicy
            def live():
                return allocpolicy.stats().scopes["request"].live
            go = threading.Event()
            box = []
            def free_it():
                go.wait(60)
                box.clear()                      # frees it in this other thread
            t = threading.Thread(target=free_it)
            t.start()
            with allocpolicy.task("request"):
                box.append(bytearray(20 << 20))
                during = live()
                go.set(); t.join()
                print(during - live())
            """,
            """
            version = 1
            [scopes.request]
            budget = "64 MiB"
            """,
            tmp_path,
        )
    )
    # the task itself allocates a little while waiting (lock, frames)
    assert abs(int(out) - ((20 << 20) + 1)) < 64 << 10


def test_bind_carries_the_task_instance_into_a_thread_pool(tmp_path):
    # Work handed to a pool with bind() counts against the task's budget and
    # fails as AllocError; unbound work in the pool is not limited.
    out = check(
        run_python(
            """
            from concurrent.futures import ThreadPoolExecutor
            import allocpolicy
            pool = ThreadPoolExecutor(2)
            def grab(n):
                return len(bytearray(n))
            with allocpolicy.task("request"):
                held = bytearray(40 << 20)
                fut = pool.submit(allocpolicy.bind(grab), 40 << 20)
                try:
                    fut.result()
                except allocpolicy.AllocError as err:
                    print("bound", err.scope, err.reason)
                print("unbound", pool.submit(grab, 40 << 20).result())
            """,
            """
            version = 1
            [scopes.request]
            budget = "64 MiB"
            """,
            tmp_path,
        )
    )
    assert out.splitlines() == ["bound request budget", f"unbound {40 << 20}"]


def test_total_budget_caps_all_live_instances_together(tmp_path):
    out = check(
        run_python(
            """
            import threading, allocpolicy
            first_holds = threading.Event(); done = threading.Event()
            def first():
                with allocpolicy.task("request"):
                    held = bytearray(b"1") * (40 << 20)
                    first_holds.set(); done.wait(60)
            t = threading.Thread(target=first); t.start(); first_holds.wait(60)
            try:
                with allocpolicy.task("request"):
                    bytearray(40 << 20)      # fits its own 64 MiB, not the 64 MiB total
                print("granted")
            except allocpolicy.AllocError as err:
                print(err.limit, err.scope, err.budget)
            done.set(); t.join()
            with allocpolicy.task("request"):  # the first task is gone: room again
                print(len(bytearray(40 << 20)))
            """,
            """
            version = 1
            [scopes.request]
            budget = "64 MiB"
            total_budget = "64 MiB"
            """,
            tmp_path,
        )
    )
    assert out.splitlines() == [f"total_budget request {64 << 20}", str(40 << 20)]


def test_process_budget_limits_everything(tmp_path):
    out = check(
        run_python(
            """
            import allocpolicy
            try:
                bytearray(300 << 20)         # outside any scope: a plain MemoryError
            except allocpolicy.AllocError:
                print("unexpected AllocError")
            except MemoryError:
                print("plain MemoryError")
            try:
                with allocpolicy.task("request"):
                    bytearray(300 << 20)     # the task's own budget has room
            except allocpolicy.AllocError as err:
                print(err.scope, err.limit, err.budget)
            """,
            """
            version = 1
            [process]
            budget = "200 MiB"
            [scopes.request]
            budget = "1 GiB"
            """,
            tmp_path,
        )
    )
    assert out.splitlines() == ["plain MemoryError", f"process process {200 << 20}"]


def test_python_binds_to_the_preloaded_copy(tmp_path):
    out = check(
        run_python(
            """
            import allocpolicy
            from allocpolicy import _native
            rt = _native.runtime()
            print(rt.preloaded, rt.path == allocpolicy.library_path())
            before = allocpolicy.stats().process.allocations
            x = [bytearray(1000) for _ in range(100)]
            print(allocpolicy.stats().process.allocations - before >= 100)
            """,
            None,
            tmp_path,
        )
    )
    assert out.split() == ["True", "True", "True"]


def test_scope_and_task_work_as_decorators(tmp_path):
    out = check(
        run_python(
            """
            import allocpolicy
            @allocpolicy.task("request")
            def handler(n):
                return len(bytearray(n))
            print(handler(1 << 20))
            try:
                handler(100 << 20)
            except allocpolicy.AllocError as err:
                print(err.scope)
            try:
                @allocpolicy.task("request")
                async def nope():
                    yield  # an async generator: its consumer would run in the scope
            except TypeError as err:
                print("TypeError")
            """,
            """
            version = 1
            [scopes.request]
            budget = "64 MiB"
            """,
            tmp_path,
        )
    )
    assert out.split() == [str(1 << 20), "request", "TypeError"]


def test_programs_that_never_import_allocpolicy_are_governed_too(tmp_path):
    # The process budget sees Python's small objects, and an abort shows the
    # Python traceback, without the program importing the package.
    proc = run_python(
        """
        import sys
        try:
            rows = [{} for _ in range(3_000_000)]
            print("completed")
        except MemoryError:
            rows = None
            print("refused", "allocpolicy" in sys.modules)
        """,
        """
        version = 1
        [process]
        budget = "100 MiB"
        """,
        tmp_path,
    )
    assert check(proc).split() == ["refused", "True"]


def test_a_malformed_table_set_by_hand_is_reported(tmp_path):
    # The library cannot complain before Python starts; the package does, as
    # the interpreter starts (it is imported at startup under the preload).
    proc = run_python(
        """
        import allocpolicy
        print(sorted(allocpolicy.stats().scopes))
        """,
        None,
        tmp_path,
        table="v=1;scope=bad name:raise:1:0",
    )
    assert check(proc).strip() == "[]"  # nothing of the bad table was applied
    assert "AllocPolicyWarning: ALLOCPOLICY_TABLE is malformed and was ignored" in proc.stderr


def test_active_policy_is_what_run_compiled_even_when_the_file_changed_after_launch(tmp_path):
    # `run` hands the text it read on: the program never reads the file again.
    out = check(
        run_python(
            """
            import pathlib, sys, warnings, allocpolicy
            pathlib.Path(sys.argv[1]).write_text("version = 'broken'")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                policy = allocpolicy.active_policy()
            print(policy.source, policy.scopes["request"].budget, len(caught))
            """,
            """
            version = 1
            [scopes.request]
            budget = "64 MiB"
            """,
            tmp_path,
            args=("policy.toml",),
        )
    )
    assert out.split() == [str(tmp_path / "policy.toml"), str(64 << 20), "0"]


def test_report_fd_override_sends_diagnostic_and_traceback_together(tmp_path):
    proc = run_python(
        """
        import allocpolicy
        def grab():
            return bytearray(32 << 20)
        with allocpolicy.scope("critical"):
            grab()
        """,
        """
        version = 1
        [scopes.critical]
        on_oom = "abort"
        budget = "16 MiB"
        """,
        tmp_path,
        run_options=("--report-fd", "1"),
    )
    assert proc.returncode == -signal.SIGABRT
    assert "allocpolicy: allocation refused in scope 'critical'" in proc.stdout
    assert "in grab" in proc.stdout
    assert "Fatal Python error" not in proc.stderr


def test_impossible_request_in_abort_mode_aborts_as_out_of_memory(tmp_path):
    proc = run_python(
        """
        import ctypes, allocpolicy
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        with allocpolicy.scope("critical"):
            libc.malloc(1 << 62)
        print("not reached")
        """,
        """
        version = 1
        [scopes.critical]
        on_oom = "abort"
        """,
        tmp_path,
    )
    assert proc.returncode == -signal.SIGABRT
    assert "reason=oom requested=4611686018427387904 bytes" in proc.stderr
