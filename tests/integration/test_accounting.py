"""Accounting that never lies: what other threads see after frees, instances
that end with memory still live, and what `total_budget` counts.

Every case runs in a child process under the preloaded runtime.
"""

from __future__ import annotations

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
