"""Accounting that never lies: what other threads see after frees, instances
that end with memory still live, and what `total_budget` counts.

Every case runs in a child process under the preloaded runtime.
"""

from __future__ import annotations

import pytest
from runtime_run import check, run_python

MiB = 1 << 20

PROCESS_600 = """
version = 1
[process]
budget = "600 MiB"
"""


def test_a_large_free_on_an_idle_thread_is_seen_by_the_others(tmp_path):
    # GIVEN a pool worker that allocated 550 MiB, freed it, and went idle
    # WHEN the main thread asks for 100 MiB under a 600 MiB process budget
    # THEN it is granted: the worker's free was published, not kept back.
    out = check(
        run_python(
            """
            import concurrent.futures
            import allocpolicy

            def churn():
                block = bytearray(550 << 20)
                del block

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(churn).result()
                # The worker is alive and idle: nothing else publishes for it.
                live = allocpolicy.stats().process.live
                block = bytearray(100 << 20)
                print("granted", live < (64 << 20), len(block) >> 20)
            """,
            PROCESS_600,
            tmp_path,
        )
    )
    assert out.split() == ["granted", "True", "100"]


def test_a_bound_thread_sees_the_room_its_owner_freed(tmp_path):
    # GIVEN a 64 MiB task whose thread allocated 63 MiB and freed it
    # WHEN a thread bound into that task asks for 10 MiB
    # THEN it is granted: the owner's free reached the instance's counters.
    out = check(
        run_python(
            """
            import threading
            import allocpolicy

            with allocpolicy.task("job"):
                go, result = threading.Event(), []

                def work():
                    go.wait()
                    result.append(len(bytearray(10 << 20)) >> 20)

                # The bound thread is already waiting: nothing the owner does
                # after the free (thread start, bind) can publish it.
                t = threading.Thread(target=allocpolicy.bind(work))
                t.start()
                block = bytearray(63 << 20)
                del block
                go.set()
                t.join()
                print("bound thread got", *result)
            """,
            """
            version = 1
            [scopes.job]
            on_oom = "raise"
            budget = "64 MiB"
            """,
            tmp_path,
        )
    )
    assert out.split() == ["bound", "thread", "got", "10"]


def test_stats_from_another_thread_show_a_large_free(tmp_path):
    # GIVEN a thread that freed 200 MiB and stays alive (blocked on an event)
    # WHEN the main thread reads the process statistics
    # THEN the freed bytes are no longer counted as live.
    out = check(
        run_python(
            """
            import threading
            import allocpolicy

            freed, done = threading.Event(), threading.Event()

            def work():
                block = bytearray(200 << 20)
                del block
                freed.set()
                done.wait()

            t = threading.Thread(target=work)
            t.start()
            freed.wait()
            print("live MiB below 32:", allocpolicy.stats().process.live < (32 << 20))
            done.set()
            t.join()
            """,
            None,
            tmp_path,
        )
    )
    assert out.strip().endswith("True"), out


ESCAPES_TABLE = (
    "v=1;process=raise:0;scope=server:raise:0:0;scope=request:raise:1048576:0;"
    "scope=sub:raise:0:0;scope=inner:raise:0:0;scope=leaf:raise:0:0"
)


def test_instances_that_keep_memory_never_fill_the_table(build_c, run_preloaded):
    # GIVEN a server whose requests each keep a 600-byte result past their end
    # WHEN it serves more requests than the instance table has slots, at the
    # process root and then inside one long-lived server instance
    # THEN every entry succeeds, `escaped` counts every kept byte, the scope's
    # live total (live instances only) stays 0, the server instance and the
    # process hold the kept blocks, and frees from another thread bring every
    # count back to its baseline.
    proc = run_preloaded([build_c("escapes"), "keep", "70000"], table=ESCAPES_TABLE)
    detail = f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "MISMATCH" not in proc.stdout, detail
    assert "RESULT failures=0" in proc.stdout and proc.returncode == 0, detail
    for check in (
        "root request escaped 42000000 expected 42000000 ok",
        "root process live after free 0 expected 0 ok",
        "server instance live 42000000 expected 42000000 ok",
        "server instance live after free 0 expected 0 ok",
    ):
        assert f"check {check}" in proc.stdout, detail


def test_results_kept_from_instances_nested_in_ended_ones_never_fill_the_table(
    build_c, run_preloaded
):
    # GIVEN requests that each enter a nested scope and keep a block made
    # there past the end of both (a sub-task's result cached by the server)
    # WHEN there are more of them than the instance table has slots
    # THEN every entry succeeds and the counts stay exact, frees included.
    proc = run_preloaded([build_c("escapes"), "nested", "70000"], table=ESCAPES_TABLE)
    detail = f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "MISMATCH" not in proc.stdout, detail
    assert "RESULT failures=0" in proc.stdout and proc.returncode == 0, detail
    for check in (
        "nested sub escaped 42000000 expected 42000000 ok",
        "nested request live 0 expected 0 ok",
        "nested process live at the end 0 expected 0 ok",
    ):
        assert f"check {check}" in proc.stdout, detail


@pytest.mark.parametrize(
    ("requests", "depth", "fanout"),
    [(70_000, 3, 1), (70_000, 4, 1), (40_000, 3, 3)],
    ids=["three-levels", "four-levels", "three-levels-three-sub-tasks"],
)
def test_results_kept_from_any_depth_of_ended_instances_never_fill_the_table(
    build_c, run_preloaded, requests, depth, fanout
):
    # GIVEN requests that each run `fanout` sub-tasks, one after the other,
    # each nesting scopes down to `depth` levels and keeping a small block
    # made in the innermost past every end
    # WHEN the requests enter more instances than the table has slots
    # THEN every entry succeeds, every level's `escaped` counts every kept
    # byte, and the blocks freed from another thread while a new chain of the
    # same scopes is active leave that chain exactly its own bytes.
    proc = run_preloaded(
        [build_c("escapes"), "nested", str(requests), str(depth), str(fanout)],
        table=ESCAPES_TABLE,
    )
    detail = f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "MISMATCH" not in proc.stdout, detail
    assert "RESULT failures=0" in proc.stdout and proc.returncode == 0, detail
    kept = requests * fanout * 600
    innermost = ("request", "sub", "inner", "leaf")[depth - 1]
    for check in (
        f"nested {innermost} escaped {kept} expected {kept} ok",
        f"nested request escaped {kept} expected {kept} ok",
        f"nested active {innermost} live after free 600 expected 600 ok",
        "nested process live after free 600 expected 600 ok",
        "nested process live at the end 0 expected 0 ok",
    ):
        assert f"check {check}" in proc.stdout, detail


def test_a_stale_id_of_a_zero_byte_block_names_no_later_instance(build_c, run_preloaded):
    # GIVEN an instance whose only block is malloc(0), ended, its slot now
    # serving an instance of another scope
    # THEN its id is not taken for the later instance, and freeing the block
    # leaves the later instance's counts alone.
    proc = run_preloaded([build_c("escapes"), "zero"], table=ESCAPES_TABLE)
    detail = f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert "check zero slot reused yes" in proc.stdout, detail
    assert "MISMATCH" not in proc.stdout and proc.returncode == 0, detail


def test_a_python_server_keeps_a_result_per_request_forever(tmp_path):
    # The server: more requests than instance slots, each keeping a
    # result in a cache. No ScopeCapacityError, and clearing the cache gives
    # every kept byte back to the process.
    out = check(
        run_python(
            """
            import allocpolicy
            N = 70_000
            cache = [None] * N
            for i in range(N):
                with allocpolicy.task("request"):
                    cache[i] = bytes(600)
            st = allocpolicy.stats()
            before = st.process.live
            print(st.scopes["request"].escaped >= N * 600, st.scopes["request"].live)
            cache.clear()
            print(before - allocpolicy.stats().process.live >= N * 600)
            """,
            """
            version = 1
            [scopes.request]
            on_oom = "raise"
            budget = "1 MiB"
            """,
            tmp_path,
        )
    )
    assert out.split() == ["True", "0", "True"]


def test_total_budget_caps_live_instances_not_what_escaped_ended_ones(tmp_path):
    # GIVEN three ended tasks that each kept a 40 MiB result
    # WHEN a fourth task asks for 10 MiB under a 100 MiB total_budget
    # THEN it is granted: no instance is active, so nothing counts against the
    # total (the kept results are still live in the process).
    out = check(
        run_python(
            """
            import allocpolicy
            kept = []
            for _ in range(3):
                with allocpolicy.task("job"):
                    kept.append(bytearray(40 << 20))
            st = allocpolicy.stats()
            print(st.scopes["job"].live, st.process.live >= 120 << 20)
            with allocpolicy.task("job"):
                print(len(bytearray(10 << 20)) >> 20)
            """,
            """
            version = 1
            [scopes.job]
            on_oom = "raise"
            budget = "64 MiB"
            total_budget = "100 MiB"
            """,
            tmp_path,
        )
    )
    assert out.split() == ["0", "True", "10"]


def test_total_budget_still_caps_live_instances_together(tmp_path):
    # Two live instances of 40 MiB each leave no room for a third's 40 MiB
    # under a 100 MiB total.
    out = check(
        run_python(
            """
            import threading
            import allocpolicy

            held, release = threading.Barrier(3), threading.Event()

            def hold():
                with allocpolicy.task("job"):
                    block = bytearray(40 << 20)
                    held.wait()
                    release.wait()

            threads = [threading.Thread(target=hold) for _ in range(2)]
            for t in threads:
                t.start()
            held.wait()
            try:
                with allocpolicy.task("job"):
                    bytearray(40 << 20)
                print("granted")
            except allocpolicy.AllocError as err:
                print(err.limit)
            release.set()
            for t in threads:
                t.join()
            """,
            """
            version = 1
            [scopes.job]
            on_oom = "raise"
            budget = "64 MiB"
            total_budget = "100 MiB"
            """,
            tmp_path,
        )
    )
    assert out.split() == ["total_budget"]
