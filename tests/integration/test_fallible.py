"""Reservations and the fallible operations, under the preloaded runtime."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from runtime_run import check, run_python

MACHINES = Path(__file__).resolve().parents[1] / "data" / "machine"

MiB = 1 << 20
# pymalloc charges whole 1 MiB arenas: "nothing changed" means within one.
ARENA_SLACK = MiB + 64 * 1024


def fallible_policy(overdraft: str) -> str:
    return f"""
    version = 1
    [scopes.batch]
    on_oom = "fallible"
    budget = "100 MiB"
    overdraft = "{overdraft}"
    """


# The scenario of the issue: a fallible scope of 100 MiB; a 200 MiB
# reservation is refused, a 50 MiB one granted; 40 MiB of work fits in it, and
# 80 MiB more is an overdraft.
RESERVATION_SCENARIO = """
import json, warnings, allocpolicy
MiB = 1 << 20
out = {}

def scope_stats():
    return allocpolicy.stats().scopes["batch"]

# Warm up outside the scope: the first calls import modules and read the
# machine's headroom, allocations that are not the point here.
allocpolicy.try_reserve(0).release()
scope_stats()

with allocpolicy.scope("batch"):
    before = scope_stats().live
    refused = allocpolicy.try_reserve(200 * MiB)
    out["refused_type"] = type(refused).__name__
    out["refused_reason"] = refused.reason
    out["refused_limit"] = refused.limit
    out["refused_budget"] = refused.budget
    out["live_change_after_refusal"] = scope_stats().live - before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with allocpolicy.reserve(50 * MiB) as res:
                out["granted_live_change"] = scope_stats().live - before
                work = bytearray(40 * MiB)
                out["left_after_40"] = res.left
                out["overdrafts_after_40"] = res.overdrafts
                try:
                    more = bytearray(80 * MiB)
                    out["overdraft"] = "granted"
                    out["overdraft_bytes"] = res.overdraft_bytes
                    del more
                except MemoryError as exc:
                    out["overdraft"] = type(exc).__name__
                    raise
                finally:
                    del work
        except allocpolicy.AllocError as err:
            out["block_raised"] = [err.reason, err.limit, err.budget, err.size]
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, allocpolicy.AllocPolicyWarning)]
    out["live_change_after_release"] = scope_stats().live - before
s = scope_stats()
out["stats"] = [s.reservations, s.refused_reservations, s.overdrafts, s.overdraft_bytes]
print(json.dumps(out))
"""


def run_scenario(tmp_path, overdraft: str):
    return run_python(RESERVATION_SCENARIO, fallible_policy(overdraft), tmp_path)


def assert_common(out: dict) -> None:
    # The refusal is a returned value, nothing was charged for it.
    assert out["refused_type"] == "AllocError"
    assert [out["refused_reason"], out["refused_limit"], out["refused_budget"]] == [
        "budget",
        "budget",
        100 * MiB,
    ]
    assert abs(out["live_change_after_refusal"]) < ARENA_SLACK
    # The granted reservation is counted as live at once.
    assert 50 * MiB <= out["granted_live_change"] < 50 * MiB + ARENA_SLACK
    # 40 MiB of work drew on it without an overdraft.
    assert out["overdrafts_after_40"] == 0
    assert 10 * MiB - 64 * 1024 < out["left_after_40"] <= 10 * MiB
    # Unused reservation came back: live is where it started.
    assert abs(out["live_change_after_release"]) < ARENA_SLACK


def test_overdraft_count_allows_and_records(tmp_path):
    out = json.loads(check(run_scenario(tmp_path, "count")))
    assert_common(out)
    assert out["overdraft"] == "granted"
    # 80 MiB (+1: bytearray's NUL) asked, ~10 MiB of the reservation left.
    assert 70 * MiB < out["overdraft_bytes"] <= 70 * MiB + 64 * 1024 + 1
    assert out["warnings"] == []
    reservations, refused, overdrafts, overdraft_bytes = out["stats"]
    assert (reservations, refused, overdrafts) == (1, 1, 1)
    assert overdraft_bytes == out["overdraft_bytes"]
    assert "block_raised" not in out


def test_overdraft_warn_warns_once_at_release(tmp_path):
    out = json.loads(check(run_scenario(tmp_path, "warn")))
    assert_common(out)
    assert out["overdraft"] == "granted"
    assert len(out["warnings"]) == 1
    assert f"asked for {80 * MiB + 1} bytes" in out["warnings"][0]
    assert out["stats"][2] == 1


def test_overdraft_raise_refuses_and_the_block_raises_alloc_error(tmp_path):
    out = json.loads(check(run_scenario(tmp_path, "raise")))
    assert_common(out)
    assert out["overdraft"] == "MemoryError"
    assert out["block_raised"] == ["budget", "reservation", 50 * MiB, 80 * MiB + 1]
    assert out["stats"][2] == 1


def test_overdraft_abort_dies_with_the_diagnostic(tmp_path):
    proc = run_scenario(tmp_path, "abort")
    assert proc.returncode == -signal.SIGABRT, proc.stderr
    assert "reservation of scope 'batch'=52428800" in proc.stderr
    assert f"requested={80 * MiB + 1}" in proc.stderr
    # the reservation's rule aborted, not the scope's mode (fallible)
    assert "; an overdraft of the reservation (overdraft=abort), aborting" in proc.stderr
    assert "mode=abort" not in proc.stderr


def test_reservation_respects_every_enclosing_budget_and_returns_on_scope_exit(tmp_path):
    policy = """
    version = 1
    [scopes.outer]
    budget = "32 MiB"
    [scopes.inner]
    on_oom = "fallible"
    budget = "1 GiB"
    """
    out = json.loads(
        check(
            run_python(
                """
                import json, allocpolicy
                MiB = 1 << 20
                out = {}
                allocpolicy.try_reserve(0).release(); allocpolicy.stats()  # warm up (imports)
                with allocpolicy.scope("outer"):
                    with allocpolicy.scope("inner"):
                        r = allocpolicy.try_reserve(64 * MiB)
                        out["refusal"] = [r.scope, r.limit, r.budget]
                        try:
                            allocpolicy.reserve(48 * MiB)
                        except allocpolicy.AllocError as err:
                            out["reserve_raised"] = err.scope
                        kept = allocpolicy.try_reserve(16 * MiB)
                        out["granted"] = type(kept).__name__
                        out["outer_live"] = allocpolicy.stats().scopes["outer"].live
                    # the inner instance ended without releasing: its
                    # reservation went back with it
                    out["outer_live_after"] = allocpolicy.stats().scopes["outer"].live
                    kept.release()  # harmless now
                    out["released"] = kept.released
                print(json.dumps(out))
                """,
                policy,
                tmp_path,
            )
        )
    )
    assert out["refusal"] == ["outer", "budget", 32 * MiB]
    assert out["reserve_raised"] == "outer"
    assert out["granted"] == "Reservation"
    assert 16 * MiB <= out["outer_live"] < 16 * MiB + ARENA_SLACK
    assert out["outer_live_after"] < 1 * MiB
    assert out["released"] is True


def test_nested_reservations_draw_on_the_outer_one(tmp_path):
    out = json.loads(
        check(
            run_python(
                """
                import json, allocpolicy
                MiB = 1 << 20
                allocpolicy.try_reserve(0).release(); allocpolicy.stats()  # warm up (imports)
                with allocpolicy.scope("batch"):
                    base = allocpolicy.stats().scopes["batch"].live
                    with allocpolicy.reserve(30 * MiB) as outer:
                        with allocpolicy.reserve(20 * MiB) as inner:
                            # no new charge: the inner one came out of the outer one
                            nested_live = allocpolicy.stats().scopes["batch"].live - base
                            left_outer_during = None
                        left_outer_after = outer.left
                    after = allocpolicy.stats().scopes["batch"].live - base
                print(json.dumps([nested_live, left_outer_after, after]))
                """,
                fallible_policy("count"),
                tmp_path,
            )
        )
    )
    nested_live, left_outer_after, after = out
    assert 30 * MiB <= nested_live < 30 * MiB + ARENA_SLACK
    assert left_outer_after == 30 * MiB  # the inner one gave its unused bytes back
    assert abs(after) < ARENA_SLACK


def test_machine_too_small_refuses_reservations_beyond_the_headroom(tmp_path):
    # A margin that leaves only 64 MiB of the machine's headroom usable makes
    # the machine look small without exhausting anything. The machine is a
    # fake cgroup tree (tests/data/machine) with a fixed headroom: the real
    # one's free memory moves with whatever else the machine runs.
    fake = MACHINES / "v2_leaf"
    room = json.loads((fake / "expected.json").read_text(encoding="utf-8"))["headroom"]
    policy = f"""
    version = 1
    [process]
    reserve_margin = {room - 64 * MiB}
    """
    out = json.loads(
        check(
            run_python(
                """
                import json, allocpolicy
                MiB = 1 << 20
                big = allocpolicy.try_reserve(512 * MiB)
                small = allocpolicy.try_reserve(1 * MiB)
                print(json.dumps([type(big).__name__, big.reason, big.limit, big.budget,
                                  type(small).__name__]))
                small.release()
                """,
                policy,
                tmp_path,
                env={"ALLOCPOLICY_MACHINE_ROOT": str(fake / "root")},
            )
        )
    )
    assert out == ["AllocError", "oom", "machine", 64 * MiB, "Reservation"]


def test_reserve_arguments_are_checked(tmp_path):
    out = check(
        run_python(
            """
            import allocpolicy
            for call in (lambda: allocpolicy.reserve(-1), lambda: allocpolicy.reserve("1 MiB"),
                         lambda: allocpolicy.reserve(1, overdraft="explode")):
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
    assert lines[0] == "ValueError reserve(): argument 'nbytes' must be >= 0, got -1"
    assert lines[1] == "TypeError reserve(): argument 'nbytes' must be int, not str"
    assert lines[2].startswith("ValueError reserve(): argument 'overdraft' must be one of")


def test_sizes_no_allocation_can_serve_are_refused_as_alloc_error(tmp_path):
    # GIVEN sizes from 2^48 (past what a block header records) to sys.maxsize
    # WHEN they are reserved THEN the refusal is an AllocError (reason oom,
    # limit machine) and nothing changes; sizes past sys.maxsize are
    # impossible arguments: OverflowError naming the argument, nothing granted.
    out = json.loads(
        check(
            run_python(
                """
                import json, sys, allocpolicy
                out = {"refused": [], "overflow": []}
                allocpolicy.try_reserve(0).release()  # warm up: imports, headroom
                def counts():
                    s = allocpolicy.stats().scopes["batch"]
                    return [s.reservations, s.refused_reservations]
                with allocpolicy.scope("batch"):
                    live = allocpolicy.stats().scopes["batch"].live
                    before = counts()
                    for n in (2**48, 2**48 + 5, 2**50, sys.maxsize):
                        r = allocpolicy.try_reserve(n)
                        out["refused"].append([type(r).__name__, r.reason, r.limit, r.size == n])
                        try:
                            allocpolicy.reserve(n)
                        except allocpolicy.AllocError as err:
                            out["refused"].append(["raised", err.reason, err.limit, err.size == n])
                        b = allocpolicy.try_bytearray(n)
                        out["refused"].append([type(b).__name__, b.reason, b.limit, True])
                    out["counts"] = [a - b for a, b in zip(counts(), before)]
                    out["live_change"] = allocpolicy.stats().scopes["batch"].live - live
                    for call in (lambda: allocpolicy.reserve(2**64 + 5 * 2**20),
                                 lambda: allocpolicy.try_reserve(sys.maxsize + 1),
                                 lambda: allocpolicy.try_bytearray(2**64)):
                        try:
                            got = call()
                            out["overflow"].append(["granted", repr(got)])
                        except OverflowError as exc:
                            out["overflow"].append(str(exc))
                print(json.dumps(out))
                """,
                fallible_policy("count"),
                tmp_path,
            )
        )
    )
    per_size = [
        ["AllocError", "oom", "machine", True],
        ["raised", "oom", "machine", True],
        ["AllocError", "oom", "machine", True],
    ]
    assert out["refused"] == per_size * 4
    assert out["counts"] == [0, 12]  # nothing granted, every refusal counted
    assert abs(out["live_change"]) < ARENA_SLACK
    maxsize = 2**63 - 1
    assert out["overflow"] == [
        f"reserve(): argument 'nbytes' must be at most sys.maxsize ({maxsize}), "
        f"got {2**64 + 5 * 2**20}",
        f"try_reserve(): argument 'nbytes' must be at most sys.maxsize ({maxsize}), "
        f"got {maxsize + 1}",
        f"try_bytearray(): argument 'n' must be at most sys.maxsize ({maxsize}), got {2**64}",
    ]


@pytest.mark.parametrize("mode", ["fallible", "raise"])
def test_an_impossible_allocation_is_a_catchable_failure(tmp_path, mode):
    # bytearray(2**50) is a MemoryError without allocpolicy; inside a
    # fallible scope it aborted the process. It is a failure the code sees in
    # every mode but abort, recorded as an out-of-memory violation.
    out = json.loads(
        check(
            run_python(
                f"""
                import json, allocpolicy
                out = {{}}
                with allocpolicy.scope("work"):
                    try:
                        bytearray(2**50)
                        out["result"] = "granted"
                    except MemoryError as exc:
                        out["result"] = "MemoryError"
                    kept = bytearray(1 << 20)  # the scope still serves what fits
                try:
                    with allocpolicy.task("work"):
                        bytearray(2**50)
                except allocpolicy.AllocError as err:
                    out["task"] = [err.scope, err.reason, err.size]
                out["violations"] = allocpolicy.stats().scopes["work"].violations
                print(json.dumps(out))
                """,
                f"""
                version = 1
                [scopes.work]
                on_oom = "{mode}"
                budget = "100 MiB"
                """,
                tmp_path,
            )
        )
    )
    assert out == {"result": "MemoryError", "task": ["work", "oom", 2**50 + 1], "violations": 2}


def test_an_impossible_allocation_aborts_in_an_abort_scope(tmp_path):
    proc = run_python(
        """
        import allocpolicy
        with allocpolicy.scope("work"):
            bytearray(2**50)
        print("survived")
        """,
        """
        version = 1
        [scopes.work]
        on_oom = "abort"
        budget = "100 MiB"
        """,
        tmp_path,
    )
    assert proc.returncode == -signal.SIGABRT, proc.stdout + proc.stderr
    assert "survived" not in proc.stdout
    assert "reason=oom requested=1125899906842625" in proc.stderr


# --- the try_* operations ------------------------------------------------------------

TIGHT = """
version = 1
[scopes.tight]
on_oom = "raise"
budget = "4 MiB"
"""


def test_try_operations_return_what_they_could_not_store(tmp_path):
    out = json.loads(
        check(
            run_python(
                """
                import json, allocpolicy
                MiB = 1 << 20
                res = {}
                allocpolicy.try_reserve(0).release(); allocpolicy.stats()  # warm up (imports)
                with allocpolicy.scope("tight"):
                    # a list whose next append must grow its array (by ~600 KiB)
                    lst = [None] * 70000
                    d = {i: i for i in range(5460)}   # the next new key resizes it
                    ba = bytearray(b"abc")
                    before = list(lst)
                    snapshot = dict(d)
                    data = bytes(1 * MiB)
                    parts = [bytes(300 * 1024)] * 4
                    live = allocpolicy.stats().scopes["tight"].live
                    filler = bytearray(4 * MiB - live - 256 * 1024)   # leaves ~256 KiB
                    left = allocpolicy.try_append(lst, "x")
                    res["append"] = [bool(left), left.item, left.rest, left.error.reason, lst == before]
                    left = allocpolicy.try_insert(d, "new", 1)
                    res["insert"] = [left.item, d == snapshot, allocpolicy.try_insert(d, 0, "replaced"),
                                     d[0]]
                    left = allocpolicy.try_extend(ba, data)
                    res["bytearray_extend"] = [len(left.item), ba.decode()]
                    big = allocpolicy.try_bytearray(2 * MiB)
                    res["try_bytearray"] = [type(big).__name__, big.reason]
                    joined = allocpolicy.try_bytes_join(parts)
                    res["join_refused"] = type(joined).__name__
                    del filler, data, parts, left   # (left.item held the data)
                    # with room again, every one of them succeeds
                    res["ok"] = [allocpolicy.try_append(lst, "x"), lst[-1],
                                 allocpolicy.try_insert(d, "new", 1), d["new"],
                                 allocpolicy.try_extend(ba, b"def"), ba.decode(),
                                 len(allocpolicy.try_bytearray(1 * MiB)),
                                 allocpolicy.try_bytes_join([b"a", b"b"], b"-").decode()]
                print(json.dumps(res))
                """,
                TIGHT,
                tmp_path,
            )
        )
    )
    assert out["append"] == [True, "x", None, "budget", True]
    assert out["insert"] == [["new", 1], True, None, "replaced"]
    assert out["bytearray_extend"] == [1 * MiB, "abc"]
    assert out["try_bytearray"] == ["AllocError", "budget"]
    assert out["join_refused"] == "AllocError"
    assert out["ok"] == [None, "x", None, 1, None, "abcdef", 1 * MiB, "a-b"]


# try_extend over a generator, failing at every growth point of the list in
# turn. Injection numbers the fallible call sites of a fallible scope (the
# reservations try_extend makes when the list must grow), so nth=k fails the
# k-th growth; the property must hold for each of them.
TRY_EXTEND_EVERY_POSITION = """
import json, allocpolicy
from allocpolicy import _native
rt = _native.runtime()
sid = rt.scope_id("batch")
results = []
for n_items in (0, 1, 5, 17, 100, 1000):
    growths = None
    for k in range(1, 40):
        data = [("item", i) for i in range(n_items)]
        gen = (x for x in data)
        lst = ["already", "there"]
        rt.inject_set(_native.InjectConfigC(nth=k, scope=sid))
        with allocpolicy.scope("batch"):
            left = allocpolicy.try_extend(lst, gen)
        seen = rt.inject_stats().seen
        rt.inject_set(None)
        stored = lst[2:]
        if left is None:
            ok = stored == data
            results.append([n_items, k, None, ok, lst[:2] == ["already", "there"]])
            break   # fewer than k growth points: every position was covered
        rebuilt = stored + [left.item] + list(left.rest)
        results.append([n_items, k, len(stored), rebuilt == data, lst[:2] == ["already", "there"],
                        left.error.reason, left.error.index])
print(json.dumps(results))
"""


def test_try_extend_loses_nothing_at_any_failure_position(tmp_path):
    results = json.loads(
        check(run_python(TRY_EXTEND_EVERY_POSITION, fallible_policy("count"), tmp_path))
    )
    by_size: dict[int, list] = {}
    for row in results:
        by_size.setdefault(row[0], []).append(row)
    for n_items, rows in by_size.items():
        *failures, last = rows
        # the last run had no failure left to inject, and stored everything
        assert last[2] is None and last[3] and last[4], last
        positions = []
        for _, k, stored, rebuilt_ok, prefix_ok, reason, index in failures:
            assert rebuilt_ok and prefix_ok, (n_items, k)
            assert (reason, index) == ("injected", k)
            positions.append(stored)
        # each injected growth failed at a later item than the one before
        assert positions == sorted(set(positions)), positions
        if n_items >= 17:
            assert len(positions) >= 3


TRY_EXTEND_PROPERTY = """
import json, sys, allocpolicy
from hypothesis import given, settings, strategies as st, HealthCheck

MiB = 1 << 20
failures_seen = []
allocpolicy.try_reserve(0).release(); allocpolicy.stats()  # warm up (imports)

# Rooms and list sizes well above pymalloc's 1 MiB arena granularity, so
# the failure position is decided by the list's growth, not by an arena.
@settings(max_examples=int(sys.argv[1]), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(n=st.integers(min_value=0, max_value=600_000),
       extra=st.lists(st.integers() | st.text(max_size=20) | st.binary(max_size=600), max_size=20),
       room=st.integers(min_value=0, max_value=4 * MiB))
def prop(n, extra, room):
    items = extra + list(range(n))
    lst = [0, 1]
    with allocpolicy.scope("tight"):
        live = allocpolicy.stats().scopes["tight"].live
        filler = bytearray(max(64 * MiB - live - room, 0))
        left = allocpolicy.try_extend(lst, iter(items))
        del filler
    assert lst[:2] == [0, 1]
    stored = lst[2:]
    if left is None:
        assert stored == items
    else:
        failures_seen.append(len(stored))
        assert stored + [left.item] + list(left.rest) == items
        assert left.error.reason == "budget"

prop()
print(json.dumps(sorted(set(failures_seen))))
"""


@pytest.mark.slow
def test_try_extend_property_under_a_budget_that_runs_out(tmp_path):
    # GIVEN random inputs and a random amount of room left in a 4 MiB budget
    # (fallible: only try_extend's own checks can fail; hypothesis itself
    # allocates inside the scope too)
    policy = """
    version = 1
    [scopes.tight]
    on_oom = "fallible"
    budget = "64 MiB"
    """
    out = check(run_python(TRY_EXTEND_PROPERTY, policy, tmp_path, args=("120",)))
    positions = json.loads(out)
    # THEN failures happened, at many different positions (and the property
    # held for every example, or the child would have failed)
    assert len(positions) >= 5, positions
