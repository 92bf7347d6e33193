"""Scopes in coroutines follow their asyncio task, not the thread.

Every case runs in a child interpreter, under ``allocpolicy run`` (the
preload) and after ``allocpolicy.install()`` in a plain interpreter, on the
default event loop and on uvloop. Nothing in the child programs prepares for
the runtime: they are plain asyncio programs with ``with allocpolicy.task()``
in them. The children read the instance each piece of code runs in, and its
live bytes, from the runtime itself (``rt.current()``, ``rt.instance_stats()``),
after each step has been detached, so what is asserted is what was charged.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from runtime_run import check, run_python

POLICY = """
version = 1
[scopes.request]
on_oom = "raise"
budget = "64 MiB"
[scopes.part]
on_oom = "raise"
budget = "16 MiB"
"""

# The same policy for install(): a mapping, as configure() takes it.
PRELUDE = r"""
import asyncio, gc, json, sys, threading
import allocpolicy
from allocpolicy import _native

MODE, LOOP = sys.argv[1], sys.argv[2]
if MODE == "install":
    allocpolicy.install({"scopes": {"request": {"on_oom": "raise", "budget": "64 MiB"},
                                    "part": {"on_oom": "raise", "budget": "16 MiB"}}})
rt = _native.runtime()
MiB = 1 << 20


def here():
    "The instance the calling code is charged to (0: the process)."
    return rt.current()[0]


def live(instance):
    rt.flush()
    return rt.instance_stats(instance).live


def run(main):
    if LOOP == "uvloop":
        import uvloop
        return uvloop.run(main())
    return asyncio.run(main())


def report(**facts):
    print(json.dumps(facts))
"""

MODES = ["preload", "install"]
LOOPS = ["asyncio", "uvloop"]


def run_child(code: str, tmp_path, mode: str, loop: str) -> dict:
    """Run PRELUDE + code in a child (``mode``: preload or install, on ``loop``);
    its last line of output is JSON."""
    if loop == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed (the `test` extra installs it)")
    if mode == "preload":
        proc = run_python(PRELUDE + textwrap.dedent(code), POLICY, tmp_path, args=(mode, loop))
    else:
        clean = {"ALLOCPOLICY_TABLE": "", "ALLOCPOLICY_POLICY": "", "LD_PRELOAD": ""}
        proc = run_python(
            PRELUDE + textwrap.dedent(code), None, tmp_path, args=(mode, loop), preload=False, env=clean
        )
    return json.loads(check(proc).splitlines()[-1])


both = pytest.mark.parametrize("mode", MODES)
loops = pytest.mark.parametrize("loop", LOOPS)

MIB = 1 << 20
# What an instance may hold beyond what the test allocated: pymalloc arenas
# (1 MiB each) are charged whole to the instance that needed one.
SLACK = 2 * MIB


@both
@loops
def test_three_concurrent_tasks_are_each_charged_their_own_30_mib(tmp_path, mode, loop):
    # GIVEN three requests that each hold 30 MiB across awaits, interleaved on
    # one loop (all three hold their blobs at the same time): 90 MiB in all,
    # with a budget of 64 MiB per request
    facts = run_child(
        """
        async def request(i, started):
            with allocpolicy.task("request"):
                blob = bytearray(30 * MiB)
                started.append(i)
                for _ in range(200):  # bounded: a refused request never arrives
                    if len(started) == 3:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.01)
                return {"live": live(here()), "instance": here()}

        async def main():
            started = []
            results = await asyncio.gather(*(request(i, started) for i in range(3)),
                                           return_exceptions=True)
            return [r if isinstance(r, dict) else repr(r) for r in results]

        results = run(main)
        s = allocpolicy.stats().scopes["request"]
        report(results=results, peak=s.max_instance_peak, violations=s.violations,
               process_live_after=rt.process_stats().live, loop=here())
        """,
        tmp_path, mode, loop,
    )
    # THEN each request succeeded and was charged its own 30 MiB only
    assert [type(r) for r in facts["results"]] == [dict, dict, dict], facts
    assert len({r["instance"] for r in facts["results"]}) == 3
    for r in facts["results"]:
        assert 30 * MIB <= r["live"] < 30 * MIB + SLACK, facts
    assert facts["peak"] < 30 * MIB + SLACK
    assert facts["violations"] == 0
    # and the loop's thread is back in the process scope
    assert facts["loop"] == 0


@both
@loops
def test_a_bomb_task_is_refused_with_its_own_bytes_and_innocent_tasks_succeed(tmp_path, mode, loop):
    # GIVEN three innocent requests holding 30 MiB each, and a bomb growing by
    # 4 MiB at every step, all interleaved
    facts = run_child(
        """
        async def innocent(i):
            with allocpolicy.task("request"):
                blob = bytearray(30 * MiB)
                for _ in range(40):
                    await asyncio.sleep(0)
                return "ok"

        async def bomb():
            chunks = []
            try:
                with allocpolicy.task("request"):
                    while True:
                        chunks.append(bytearray(4 * MiB))
                        await asyncio.sleep(0)
            except allocpolicy.AllocError as err:
                return {"scope": err.scope, "live": err.live, "budget": err.budget,
                        "size": err.size, "reason": err.reason, "task": err.task,
                        "held": sum(map(len, chunks))}

        async def main():
            return await asyncio.gather(innocent(0), bomb(), innocent(1), innocent(2),
                                        return_exceptions=True)

        results = run(main)
        report(results=[r if isinstance(r, (dict, str)) else repr(r) for r in results])
        """,
        tmp_path, mode, loop,
    )
    first, bomb, *rest = facts["results"]
    # THEN every innocent request succeeded
    assert [first, *rest] == ["ok", "ok", "ok"], facts
    # AND the bomb was refused in its own scope, with its own live bytes
    assert bomb["scope"] == "request" and bomb["task"] == "request" and bomb["reason"] == "budget"
    assert bomb["budget"] == 64 * MIB
    # 15 chunks fit the 64 MiB, the 16th does not (14 if arenas took the room)
    assert bomb["held"] in (56 * MIB, 60 * MIB), bomb
    assert bomb["held"] <= bomb["live"] < bomb["held"] + SLACK, bomb
    assert bomb["live"] + bomb["size"] > 64 * MIB


@both
@loops
def test_spawned_tasks_and_thread_handoffs_inherit_the_instance(tmp_path, mode, loop):
    facts = run_child(
        """
        import concurrent.futures

        def in_thread():
            blob = bytearray(5 * MiB)
            return here(), threading.current_thread() is not threading.main_thread()

        async def in_task():
            blob = bytearray(5 * MiB)
            await asyncio.sleep(0)
            return here(), True

        async def spawn_all():
            loop = asyncio.get_running_loop()
            pool = concurrent.futures.ThreadPoolExecutor(1)
            out = {
                "create_task": await asyncio.create_task(in_task()),
                "ensure_future": await asyncio.ensure_future(in_task()),
                "gather": (await asyncio.gather(in_task()))[0],
                "to_thread": await asyncio.to_thread(in_thread),
                "run_in_executor": await loop.run_in_executor(None, in_thread),
                "own_pool": await loop.run_in_executor(pool, in_thread),
            }
            if sys.version_info >= (3, 11):
                async with asyncio.TaskGroup() as tg:
                    t = tg.create_task(in_task())
                out["task_group"] = t.result()
            pool.shutdown()
            return out

        async def main():
            outside = await spawn_all()
            with allocpolicy.task("request"):
                mine = here()
                inside = await spawn_all()
                # 5 MiB each, freed again: the instance charged them and got them back
                after = live(mine)
            return mine, outside, inside, after

        mine, outside, inside, after = run(main)
        report(mine=mine, outside=outside, inside=inside, after=after)
        """,
        tmp_path, mode, loop,
    )
    assert facts["mine"] != 0
    assert set(facts["inside"]) == {"create_task", "ensure_future", "gather", "to_thread",
                                    "run_in_executor", "own_pool", "task_group"}
    # Spawned outside any scope: the process
    assert all(inst == 0 for inst, _ in facts["outside"].values()), facts
    # Spawned inside: the spawning task's instance, on the loop or in a thread
    for how, (inst, ok) in facts["inside"].items():
        assert inst == facts["mine"], (how, facts)
        assert ok, how
    # Each child's 5 MiB came back to the instance (what stays is the loop's
    # and the thread pools' small bookkeeping made inside it)
    assert facts["after"] < 3 * MIB + SLACK


@both
@loops
def test_work_handed_to_threads_is_refused_in_the_task_scope(tmp_path, mode, loop):
    # A bomb in to_thread/run_in_executor counts against the awaiting task's
    # budget and comes back to it as AllocError
    facts = run_child(
        """
        def bomb():
            return bytearray(100 * MiB)

        async def main():
            out = {}
            loop = asyncio.get_running_loop()
            for how in ("to_thread", "run_in_executor"):
                try:
                    with allocpolicy.task("request"):
                        if how == "to_thread":
                            await asyncio.to_thread(bomb)
                        else:
                            await loop.run_in_executor(None, bomb)
                    out[how] = "granted"
                except allocpolicy.AllocError as err:
                    out[how] = [err.scope, err.size, err.reason]
            return out

        report(**run(main))
        """,
        tmp_path, mode, loop,
    )
    for how in ("to_thread", "run_in_executor"):
        assert facts[how] == ["request", 100 * MIB + 1, "budget"], facts


@both
@loops
def test_the_loop_between_steps_is_not_charged_to_a_request(tmp_path, mode, loop):
    # GIVEN a request holding 40 MiB while it waits
    # WHEN the loop runs a callback of its own (scheduled outside any scope)
    # that keeps 40 MiB, while the request is suspended
    facts = run_child(
        """
        kept = []

        def loop_work(seen):
            kept.append(bytearray(40 * MiB))
            seen.append(here())

        async def request(wake):
            with allocpolicy.task("request"):
                blob = bytearray(40 * MiB)
                await wake.wait()
                return live(here())

        async def main():
            wake = asyncio.Event()
            seen = []
            task = asyncio.create_task(request(wake))
            await asyncio.sleep(0.01)          # the request holds its 40 MiB and waits
            asyncio.get_running_loop().call_soon(loop_work, seen)
            await asyncio.sleep(0.01)
            wake.set()
            return await task, seen

        mine, seen = run(main)
        report(request_live=mine, callback_instance=seen, kept=len(kept))
        """,
        tmp_path, mode, loop,
    )
    # THEN the callback ran in the process scope and was granted, and the
    # request was charged only its own 40 MiB
    assert facts["callback_instance"] == [0]
    assert facts["kept"] == 1
    assert 40 * MIB <= facts["request_live"] < 40 * MIB + SLACK


@both
@loops
def test_decorated_coroutine_functions_async_with_and_bind(tmp_path, mode, loop):
    facts = run_child(
        """
        @allocpolicy.task("request")
        async def handler():
            blob = bytearray(30 * MiB)
            await asyncio.sleep(0.01)
            return live(here())

        @allocpolicy.task("request")
        async def bomb_handler():
            blob = bytearray(30 * MiB)
            await asyncio.sleep(0)
            more = bytearray(40 * MiB)

        async def where():
            await asyncio.sleep(0)
            return here()

        async def main():
            out = {"handlers": await asyncio.gather(handler(), handler(), handler())}
            try:
                await bomb_handler()
                out["bomb"] = "granted"
            except allocpolicy.AllocError as err:
                out["bomb"] = [err.scope, err.size]
            async with allocpolicy.task("request"):
                await asyncio.sleep(0)
                out["async_with"] = here() != 0
                bound = allocpolicy.bind(where)
                out["bound_instance"] = here()
            out["after"] = here()
            # A bound coroutine function runs in its instance in whichever task awaits it
            out["bound"] = await asyncio.create_task(bound())
            out["unbound"] = await where()
            return out

        report(**run(main))
        """,
        tmp_path, mode, loop,
    )
    for r in facts["handlers"]:
        assert 30 * MIB <= r < 30 * MIB + SLACK, facts
    assert facts["bomb"] == ["request", 40 * MIB + 1]
    assert facts["async_with"] is True
    assert facts["after"] == 0
    assert facts["bound"] == facts["bound_instance"] != 0
    assert facts["unbound"] == 0


@both
@loops
def test_anyio_task_groups_and_threads_and_starlette_threadpool_inherit(tmp_path, mode, loop):
    pytest.importorskip("anyio", reason="anyio is not installed (the `test` extra installs it)")
    facts = run_child(
        """
        import anyio, anyio.to_thread

        def in_thread():
            return here()

        async def child(out, key):
            await anyio.sleep(0)
            out[key] = here()

        async def main():
            out = {}
            with allocpolicy.task("request"):
                out["mine"] = here()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(child, out, "task_group")
                out["to_thread"] = await anyio.to_thread.run_sync(in_thread)
                try:
                    from starlette.concurrency import run_in_threadpool
                except ImportError:
                    out["run_in_threadpool"] = out["mine"]
                else:
                    out["run_in_threadpool"] = await run_in_threadpool(in_thread)
            out["outside"] = await anyio.to_thread.run_sync(in_thread)
            return out

        report(**anyio.run(main, backend="asyncio",
                           backend_options={"use_uvloop": LOOP == "uvloop"}))
        """,
        tmp_path, mode, loop,
    )
    assert facts["mine"] != 0
    for key in ("task_group", "to_thread", "run_in_threadpool"):
        assert facts[key] == facts["mine"], (key, facts)
    assert facts["outside"] == 0


@both
@loops
def test_nested_scopes_in_interleaved_tasks_each_keep_their_own_chain(tmp_path, mode, loop):
    # GIVEN two tasks, each in a request with a part nested in it, suspended
    # inside both while the other runs
    facts = run_child(
        """
        async def request(i):
            with allocpolicy.task("request"):
                outer = here()
                head = bytearray(20 * MiB)
                await asyncio.sleep(0.01)
                try:
                    with allocpolicy.task("part"):
                        inner = here()
                        piece = bytearray(10 * MiB)
                        await asyncio.sleep(0.01)
                        in_part = live(inner)
                        more = bytearray(10 * MiB)   # 20 MiB: over the part's 16
                except allocpolicy.AllocError as err:
                    refused = [err.scope, err.live]
                del piece
                # back in the request, in the same step as the part's exit
                back = here()
                tail = bytearray(20 * MiB)
                await asyncio.sleep(0.01)
                return {"outer": outer, "inner": inner, "back": back, "in_part": in_part,
                        "refused": refused, "request_live": live(outer)}

        async def main():
            return await asyncio.gather(request(0), request(1))

        results = run(main)
        s = allocpolicy.stats().scopes
        report(results=results, active=[s["request"].active, s["part"].active], loop=here())
        """,
        tmp_path, mode, loop,
    )
    for r in facts["results"]:
        assert r["inner"] not in (0, r["outer"]) and r["back"] == r["outer"], r
        assert 10 * MIB <= r["in_part"] < 10 * MIB + SLACK, r
        assert r["refused"][0] == "part" and 10 * MIB <= r["refused"][1] < 10 * MIB + SLACK, r
        # the request was charged its own 40 MiB (the part's 10 were freed with it)
        assert 40 * MIB <= r["request_live"] < 40 * MIB + SLACK, r
    # THEN every instance ended with its task, and the loop's thread is in none
    assert facts["active"] == [0, 0]
    assert facts["loop"] == 0


@both
def test_a_cancelled_task_leaves_its_scope(tmp_path, mode):
    facts = run_child(
        """
        async def request(entered):
            with allocpolicy.task("request"):
                blob = bytearray(30 * MiB)
                entered.set()
                await asyncio.sleep(3600)

        async def main():
            entered = asyncio.Event()
            task = asyncio.create_task(request(entered))
            await entered.wait()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            s = allocpolicy.stats().scopes["request"]
            facts = {"active": s.active, "escaped": s.escaped, "instances": s.instances,
                     "here": here()}
            del task   # its coroutine, and the blob in it, go
            gc.collect()
            facts["live_after"] = allocpolicy.stats().scopes["request"].live
            return facts

        report(**run(main))
        """,
        tmp_path, mode, "asyncio",
    )
    # The instance ended when the block exited on the cancellation; the blob
    # was still referenced by the coroutine then (escaped), and was credited
    # back when the coroutine went
    assert facts == {"active": 0, "escaped": 30 * MIB + 1, "instances": 1, "here": 0,
                     "live_after": 0}


@both
def test_a_plain_memory_error_is_not_blamed_on_another_tasks_refusal(tmp_path, mode):
    # GIVEN a task in a scope, and another task refused while the first waits
    # WHEN the first raises a MemoryError of its own (not the runtime's)
    facts = run_child(
        """
        async def victim(go):
            try:
                with allocpolicy.task("request"):
                    await go.wait()
                    raise MemoryError("not the runtime")
            except MemoryError as err:
                return type(err).__name__

        async def bomb(go):
            try:
                with allocpolicy.task("request"):
                    bytearray(100 * MiB)
            except allocpolicy.AllocError:
                pass
            go.set()

        async def main():
            go = asyncio.Event()
            return await asyncio.gather(victim(go), bomb(go))

        report(victim=run(main)[0])
        """,
        tmp_path, mode, "asyncio",
    )
    # THEN it stays a plain MemoryError
    assert facts["victim"] == "MemoryError"


@both
def test_eager_tasks_are_followed_too(tmp_path, mode):
    if sys.version_info < (3, 12):
        pytest.skip("asyncio.eager_task_factory is new in Python 3.12")
    facts = run_child(
        """
        async def request():
            with allocpolicy.task("request"):
                blob = bytearray(30 * MiB)   # in the eager first step
                await asyncio.sleep(0.01)
                return live(here())

        async def main():
            asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
            return await asyncio.gather(request(), request(), request())

        report(lives=run(main))
        """,
        tmp_path, mode, "asyncio",
    )
    for r in facts["lives"]:
        assert 30 * MIB <= r < 30 * MIB + SLACK, facts


@both
def test_a_task_the_loop_did_not_create_warns_once(tmp_path, mode):
    facts = run_child(
        """
        import warnings

        async def request():
            with allocpolicy.task("request"):
                return here()

        async def main():
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                # asyncio.Task() directly: no loop method is involved
                inst = await asyncio.Task(request())
                await asyncio.Task(request())
            return inst, [str(w.message) for w in seen if w.category is allocpolicy.AllocPolicyWarning]

        inst, seen = run(main)
        report(instance=inst, warnings=seen)
        """,
        tmp_path, mode, "asyncio",
    )
    # The scope still applies (to the thread, as before)
    assert facts["instance"] != 0
    assert len(facts["warnings"]) == 1
    assert "was not created by its loop's create_task()" in facts["warnings"][0]


@both
def test_a_pending_task_finalized_after_its_loop_closed_leaves_nothing_behind(tmp_path, mode):
    facts = run_child(
        """
        async def request(entered):
            with allocpolicy.task("request"):
                entered.set()
                await asyncio.sleep(3600)

        loop = asyncio.new_event_loop()
        entered = asyncio.Event()
        task = loop.create_task(request(entered))
        loop.run_until_complete(entered.wait())
        loop.close()           # the task is still pending
        del task
        gc.collect()           # its coroutine is closed here, outside any step
        after = here()
        with allocpolicy.task("request"):
            inside = here()
        report(after=after, inside_ok=inside != 0, back=here(),
               active=allocpolicy.stats().scopes["request"].active)
        """,
        tmp_path, mode, "asyncio",
    )
    assert facts == {"after": 0, "inside_ok": True, "back": 0, "active": 0}


@both
def test_a_task_spawned_in_a_scope_keeps_its_instance_until_it_finishes(tmp_path, mode):
    facts = run_child(
        """
        async def child(go):
            await go.wait()
            blob = bytearray(10 * MiB)
            return here(), live(here())

        async def main():
            go = asyncio.Event()
            with allocpolicy.task("request"):
                mine = here()
                spawned = asyncio.create_task(child(go))
            await asyncio.sleep(0)
            active_while_child_runs = allocpolicy.stats().scopes["request"].active
            go.set()
            inst, charged = await spawned
            active_after = allocpolicy.stats().scopes["request"].active
            return dict(same=inst == mine, charged=charged, during=active_while_child_runs,
                        after=active_after)

        report(**run(main))
        """,
        tmp_path, mode, "asyncio",
    )
    assert facts["same"] is True
    assert 10 * MIB <= facts["charged"] < 10 * MIB + SLACK
    assert facts["during"] == 1 and facts["after"] == 0


@both
@loops
def test_a_refusal_in_a_spawned_task_reaches_the_scope_as_alloc_error(tmp_path, mode, loop):
    # GIVEN a request that awaits a task it spawned (as Starlette's
    # BaseHTTPMiddleware runs the endpoint), and other requests running
    # WHEN the spawned task is refused, in its own step
    facts = run_child(
        """
        async def endpoint():
            await asyncio.sleep(0)
            return bytearray(100 * MiB)

        async def other():
            for _ in range(20):
                await asyncio.sleep(0)

        async def request():
            try:
                with allocpolicy.task("request"):
                    await asyncio.create_task(endpoint())
            except allocpolicy.AllocError as err:
                return [type(err).__name__, err.scope, err.size, err.task]
            except MemoryError as err:
                return [type(err).__name__]

        async def main():
            results = await asyncio.gather(request(), other(), other())
            return results[0]

        report(result=run(main))
        """,
        tmp_path, mode, loop,
    )
    # THEN the request's boundary reports it as that request's AllocError
    assert facts["result"] == ["AllocError", "request", 100 * MIB + 1, "request"]
