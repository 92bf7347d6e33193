"""What a task boundary reports: every refusal that left the task, and only those.

Each test runs a child under the preloaded runtime (``allocpolicy run``).
"""

from __future__ import annotations

import json

from runtime_run import check, run_python

JOBS = """
version = 1
[scopes.request]
on_oom = "raise"
budget = "64 MiB"

[scopes.job]
on_oom = "raise"
budget = "64 MiB"
total_budget = "96 MiB"

[scopes.quiet]
on_oom = "raise"
forbid = true
on_violation = "raise"

[scopes.outer]
on_oom = "raise"

[scopes.inner]
on_oom = "raise"
"""

# Runs fn() in a task with the n-th allocation of the task refused, and says
# what left the task: "ok", "AllocError<-CAUSE" or the exception's type.
INJECT_EACH = """
import collections, json, allocpolicy

def outcome(fn, n):
    try:
        with allocpolicy.task("request"):
            with allocpolicy.inject(scope="request", nth=n):
                fn()
        return "ok"
    except allocpolicy.AllocError as err:
        assert err.reason == "injected" and err.task == "request", err
        return "AllocError<-" + type(err.__cause__).__name__
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
"""


def test_a_refusal_carried_out_as_runtime_error_is_an_alloc_error(tmp_path):
    # GIVEN threading.Lock(), which reports a refused allocation as
    # RuntimeError("can't allocate lock")
    out = check(
        run_python(
            INJECT_EACH
            + """
import threading
seen = collections.Counter(outcome(threading.Lock, n) for n in range(1, 4))
print(json.dumps(seen))
try:
    with allocpolicy.task("request"):
        with allocpolicy.inject(scope="request", nth=1):
            threading.Lock()
except allocpolicy.AllocError as err:
    print(json.dumps([str(err.__cause__), err.size > 0]))
""",
            JOBS,
            tmp_path,
        )
    )
    seen, cause = (json.loads(line) for line in out.splitlines())
    # THEN the boundary reports it as AllocError, the RuntimeError as its cause;
    # nothing else ever leaves the task
    assert set(seen) <= {"ok", "AllocError<-RuntimeError"}, seen
    assert seen["AllocError<-RuntimeError"] >= 1, seen
    assert cause == ["can't allocate lock", True]


def test_a_refusal_carried_out_as_ssl_error_is_an_alloc_error(tmp_path):
    # GIVEN ssl.create_default_context() failing at every third allocation in turn
    out = check(
        run_python(
            INJECT_EACH
            + """
import ssl
seen = collections.Counter(outcome(ssl.create_default_context, n) for n in range(1, 400, 3))
print(json.dumps(seen))
""",
            JOBS,
            tmp_path,
        )
    )
    seen = json.loads(out)
    # THEN whatever OpenSSL or CPython raised, the task leaves with AllocError
    assert set(seen) <= {"ok", "AllocError<-SSLError", "AllocError<-NoneType"}, seen
    assert seen["AllocError<-SSLError"] >= 1, seen
    assert seen["ok"] >= 1, seen


def test_kept_alloc_errors_do_not_pin_the_failed_tasks_memory(tmp_path):
    # GIVEN tasks that each hold 40 MiB, then ask for 64 MiB more, run by an
    # executor whose futures keep their AllocError (and its traceback)
    out = check(
        run_python(
            """
            import concurrent.futures, gc, json, allocpolicy

            @allocpolicy.task("job")
            def bomb():
                held = bytearray(b"\\1") * (40 << 20)
                more = bytearray(64 << 20)

            @allocpolicy.task("job")
            def normal():
                return len(bytearray(b"\\1") * (60 << 20))

            with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                kept = [pool.submit(bomb) for _ in range(8)]
                errors = [f.exception() for f in kept]
                gc.collect()
                live = allocpolicy.stats().scopes["job"].live
                # THEN the memory is back: total_budget (96 MiB) admits a new task
                after = pool.submit(normal).result()
            print(json.dumps(dict(
                kinds=sorted({type(e).__name__ for e in errors}),
                tracebacks=all(e.__traceback__ is not None for e in errors),
                live=live, after=after)))
            """,
            JOBS,
            tmp_path,
        )
    )
    facts = json.loads(out)
    assert facts["kinds"] == ["AllocError"] and facts["tracebacks"], facts
    assert facts["live"] < 2 << 20, facts
    assert facts["after"] == 60 << 20


def test_forbid_scopes_do_not_depend_on_an_earlier_python_object_region(tmp_path):
    # GIVEN a forbid scope around code that makes Python objects only (no malloc)
    out = check(
        run_python(
            """
            import allocpolicy

            def objects():
                return [(i, str(i)) for i in range(50)]

            def in_quiet():
                try:
                    with allocpolicy.scope("quiet"):
                        objects()
                    return "ok"
                except allocpolicy.AllocError as err:
                    return f"AllocError {err.reason}"

            print(in_quiet())
            # WHEN a region once watched Python's objects by name
            with allocpolicy.no_alloc(action="count", domains=["py_obj", "py_mem"]) as region:
                objects()
            print(region.stats.allocations > 0)
            # THEN the forbid scope behaves as before
            print(in_quiet())
            """,
            JOBS,
            tmp_path,
        )
    )
    assert out.split() == ["ok", "True", "ok"]


def test_an_out_of_order_exit_is_reported_and_pops_no_other_instance(tmp_path):
    # GIVEN two generators that each hold a scope across a yield
    out = check(
        run_python(
            """
            import json, allocpolicy
            from allocpolicy import _native
            from allocpolicy._core.names import scope_name

            rt = _native.runtime()

            def innermost():
                instance, _ = rt.current()
                return scope_name(rt, rt.instance_stats(instance).scope) if instance else "process"

            def holding(name):
                with allocpolicy.scope(name):
                    yield

            first, second = holding("outer"), holding("inner")
            next(first)
            next(second)
            # WHEN the first is resumed and leaves its scope while the second's is innermost
            try:
                next(first)
            except allocpolicy.ScopeMismatchError as err:
                print(json.dumps(["error", str(err)]))
            # THEN the second's instance is still the one allocations go to
            print(json.dumps(["innermost", innermost()]))
            next(second, None)
            # and once it is left, so is the first's: nothing stays entered
            st = allocpolicy.stats().scopes
            print(json.dumps(["after", innermost(), st["outer"].active, st["inner"].active]))
            """,
            JOBS,
            tmp_path,
        )
    )
    error, inner, after = (json.loads(line) for line in out.splitlines())
    assert error[0] == "error"
    assert "scope('outer') exited while scope 'inner', entered after it" in error[1]
    assert "reverse order" in error[1]
    assert inner == ["innermost", "inner"]
    assert after == ["after", "process", 0, 0]


def test_a_thread_that_ended_inside_a_scope_leaves_nothing_to_a_thread_with_its_id(tmp_path):
    # Entries are recorded per thread id, and Linux hands an ended thread's id
    # to the next thread: the record must go with the thread that made it.
    out = check(
        run_python(
            """
            import json, threading
            import allocpolicy

            block = allocpolicy.scope("outer")
            ids = []

            def enter_and_end():
                ids.append(threading.get_ident())
                block.__enter__()  # GIVEN a thread that ends inside the scope

            def exit_here():
                ids.append(threading.get_ident())
                with allocpolicy.scope("outer"):
                    try:
                        block.__exit__(None, None, None)  # WHEN a later thread leaves it
                    except allocpolicy.ScopeMismatchError as err:
                        print(json.dumps(["error", str(err)]))
                    else:
                        print(json.dumps(["left"]))

            for target in (enter_and_end, exit_here):
                t = threading.Thread(target=target)
                t.start()
                t.join()
            print(json.dumps(["same id", ids[0] == ids[1]]))
            """,
            JOBS,
            tmp_path,
        )
    )
    result, same = (json.loads(line) for line in out.splitlines())
    # THEN the later thread is told it never entered it, not that it entered
    # it below its own scope (with the same id too)
    assert result[0] == "error"
    assert "exited on a thread where it is not active" in result[1]
    assert same[0] == "same id"


# Runs each case in a task: the task's first refusal is caught by the
# application, then `then` runs. Prints, per case, what left the task:
# the exception's type, and for an AllocError the type of its cause and the
# size it reports, in MiB.
C_LEVEL_ERRORS_AFTER_A_CAUGHT_REFUSAL = """
import asyncio, json, sys, threading
import allocpolicy

def maxsize_bytearray():
    bytearray(sys.maxsize)  # CPython refuses the size itself: no allocation

def subscript_key_error():
    {}[object()]  # raised by C code for the subscript

def called_key_error():
    {}.pop("missing")  # raised by C code that Python called

def caught_then_refused_again():
    bytearray(300 << 20)  # a new refusal: it is the one that leaves

def raised_while_handling_a_refusal():
    try:
        bytearray(300 << 20)
    except MemoryError:
        {}.pop("missing")  # the refusal is this KeyError's __context__

def reraised_refusal():
    try:
        bytearray(300 << 20)
    except MemoryError:
        raise  # the new refusal, re-raised after cleaning up

def memory_error_of_the_application():
    raise MemoryError("from the application")

def value_error_of_the_application():
    raise ValueError("bad input")

def reported_inside_then_impossible_list():
    try:
        with allocpolicy.task("request"):
            bytearray(400 << 20)
    except allocpolicy.AllocError:
        pass  # reported by the inner boundary and handled
    [None] * (1 << 62)  # CPython refuses the size itself: no allocation

CASES = (maxsize_bytearray, subscript_key_error, called_key_error,
         caught_then_refused_again, raised_while_handling_a_refusal, reraised_refusal,
         memory_error_of_the_application, value_error_of_the_application,
         reported_inside_then_impossible_list)

def describe(exc):
    if isinstance(exc, allocpolicy.AllocError):
        return ["AllocError", type(exc.__cause__).__name__, exc.size >> 20, exc.scope]
    return [type(exc).__name__]

def in_task(then):
    try:
        with allocpolicy.task("request"):
            try:
                bytearray(200 << 20)
            except MemoryError:
                pass  # the application handles it and goes on
            then()
    except Exception as exc:
        return describe(exc)
    return ["ok"]

async def in_asyncio_task(then):
    try:
        with allocpolicy.task("request"):
            try:
                bytearray(200 << 20)
            except MemoryError:
                pass
            await asyncio.sleep(0)  # other tasks' steps run on the thread meanwhile
            then()
    except Exception as exc:
        return describe(exc)
    return ["ok"]

def in_threads():
    results = {}
    def run(case):
        results[case.__name__] = in_task(case)
    threads = [threading.Thread(target=run, args=(case,)) for case in CASES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {case.__name__: results[case.__name__] for case in CASES}

async def in_asyncio_tasks():
    outcomes = await asyncio.gather(*(in_asyncio_task(case) for case in CASES))
    return {case.__name__: outcome for case, outcome in zip(CASES, outcomes)}

print(json.dumps({
    "main": {case.__name__: in_task(case) for case in CASES},
    "threads": in_threads(),
    "asyncio": asyncio.run(in_asyncio_tasks()),
}))
"""


def test_c_level_errors_after_a_caught_refusal_reach_the_caller_as_they_are(tmp_path):
    # GIVEN tasks (on the main thread, in threads, in asyncio tasks) that
    # catch their first refusal and go on
    out = check(run_python(C_LEVEL_ERRORS_AFTER_A_CAUGHT_REFUSAL, JOBS, tmp_path))
    by_place = json.loads(out)
    for place, seen in by_place.items():
        # WHEN C code raises an exception of its own later in the task
        # THEN it leaves the task unconverted: the refusal did not cause it
        assert seen["maxsize_bytearray"] == ["MemoryError"], (place, seen)
        assert seen["subscript_key_error"] == ["KeyError"], (place, seen)
        assert seen["called_key_error"] == ["KeyError"], (place, seen)
        assert seen["reported_inside_then_impossible_list"] == ["MemoryError"], (place, seen)
        # nor one that the application raises itself after handling it
        assert seen["memory_error_of_the_application"] == ["MemoryError"], (place, seen)
        assert seen["value_error_of_the_application"] == ["ValueError"], (place, seen)
        # and a refusal that does leave the task is reported, with its own
        # facts, also when an exception raised while handling it carries it
        refused = ["AllocError", "NoneType", 300, "request"]
        assert seen["caught_then_refused_again"] == refused, (place, seen)
        assert seen["reraised_refusal"] == refused, (place, seen)
        assert seen["raised_while_handling_a_refusal"] == ["AllocError", "KeyError", 300, "request"], (
            place,
            seen,
        )
