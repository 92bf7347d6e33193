"""Fault injection through the Python API, ALLOCPOLICY_INJECT and the policy's
[inject] table, in processes started by ``allocpolicy run``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

from runtime_run import check, run_python

# Each step of the task makes one malloc (a bytearray larger than pymalloc's
# 512-byte limit) of a size that names the step: 1000 + step bytes of data.
WORK = """
    import json, sys, traceback
    import allocpolicy

    def work(steps):
        blocks = []
        for step in range(steps):
            blocks.append(bytearray(1000 + step))
        return blocks

    def run_task(steps=40):
        done = []
        try:
            with allocpolicy.task("task"):
                for block in work(steps):
                    done.append(len(block))
        except allocpolicy.AllocError as err:
            frame = traceback.extract_tb(err.__traceback__)[-1]
            return {"reason": err.reason, "index": err.index, "size": err.size, "scope": err.scope,
                    "line": frame.line, "message": str(err), "replay": allocpolicy.replay_setting(err)}
        return {"done": len(done)}
"""


def last_json(proc) -> dict:
    return json.loads(check(proc).strip().splitlines()[-1])


def test_injected_failure_at_index_k_in_a_task_raises_alloc_error_at_the_boundary(tmp_path):
    # GIVEN failure #17 of the task scope injected through the API
    code = WORK + """
    with allocpolicy.inject(nth=17, scope="task"):
        print(json.dumps(run_task()))
    """
    first = last_json(run_python(code, None, tmp_path))
    # THEN the task boundary raises AllocError(reason="injected") carrying the
    # index, at the allocation it failed: the bytearray of the step whose
    # size (1000 + step, plus bytearray's terminating byte) the error reports
    assert first["reason"] == "injected"
    assert first["index"] == 17
    assert first["scope"] == "task"
    assert first["line"] == "blocks.append(bytearray(1000 + step))"
    assert 1001 <= first["size"] <= 1040
    assert first["message"].endswith("injected failure #17 (replay with nth=17)")
    assert first["replay"] == "scope=task,nth=17"
    # AND the same setting fails the same allocation in every run
    for _ in range(2):
        assert last_json(run_python(code, None, tmp_path)) == first


def test_environment_policy_table_and_api_number_the_same_allocations(tmp_path):
    # The same setting given three ways fails the same allocation: the
    # numbering belongs to the scope, not to when the setting was applied.
    api = last_json(run_python(WORK + """
    with allocpolicy.inject(nth=9, scope="task"):
        print(json.dumps(run_task()))
    """, None, tmp_path))
    env = last_json(run_python(WORK + "    print(json.dumps(run_task()))\n", None, tmp_path,
                               env={"ALLOCPOLICY_INJECT": "scope=task,nth=9"}))
    table = last_json(run_python(WORK + "    print(json.dumps(run_task()))\n", """
        version = 1

        [scopes.task]
        budget = "256 MiB"

        [inject]
        scope = "task"
        nth = 9
    """, tmp_path))
    assert api == env == table
    assert api["index"] == 9 and api["reason"] == "injected"


def test_seeded_probability_runs_replay_from_the_printed_seed(tmp_path):
    # GIVEN a probability run over many tasks, without a seed: one is drawn
    # and printed by `allocpolicy run`
    code = WORK + """
    results = [run_task(30) for _ in range(25)]
    print(json.dumps([r.get("index") for r in results]))
    """
    first = run_python(code, None, tmp_path, env={"ALLOCPOLICY_INJECT": "scope=task,probability=0.01"})
    printed = re.search(r"^allocpolicy: ALLOCPOLICY_INJECT=(scope=task,probability=0.01,seed=\d+) "
                        r"\(seed drawn for this run\)$", first.stderr, re.M)
    assert printed, first.stderr
    failed = last_json(first)
    assert len(failed) == 25
    # WHEN the printed setting runs again
    again = run_python(code, None, tmp_path, env={"ALLOCPOLICY_INJECT": printed[1]})
    # THEN every task fails at the same index (or not at all) as before
    assert last_json(again) == failed
    assert "seed drawn" not in again.stderr


def test_seeded_probability_from_the_api_keeps_its_seed(tmp_path):
    code = WORK + """
    injection = allocpolicy.inject(scope="task", probability=0.02, seed=SEED)
    results = [run_task(30) for _ in range(20)]
    stats = injection.stats()
    injection.restore()
    print(json.dumps({"settings": str(injection.settings), "indices": [r.get("index") for r in results],
                      "injected": stats.injected, "seen": stats.seen}))
    """
    drawn = last_json(run_python(code.replace("seed=SEED", ""), None, tmp_path))
    seed = int(re.fullmatch(r"scope=task,probability=0.02,seed=(\d+)", drawn["settings"])[1])
    replayed = last_json(run_python(code.replace("SEED", str(seed)), None, tmp_path))
    assert replayed == drawn
    assert drawn["injected"] == sum(1 for i in drawn["indices"] if i is not None)


ORDINARY_AND_INJECTED = WORK + """
    with allocpolicy.inject.off():
        print(json.dumps(run_task()))      # off for the block
    print(json.dumps(run_task()))          # ALLOCPOLICY_INJECT again
"""


def test_the_context_manager_puts_the_previous_setting_back(tmp_path):
    proc = run_python(ORDINARY_AND_INJECTED, None, tmp_path, env={"ALLOCPOLICY_INJECT": "scope=task,nth=3"})
    inside, after = (json.loads(line) for line in check(proc).strip().splitlines()[-2:])
    assert inside == {"done": 40}
    assert after["index"] == 3


# --- native code, called from Python --------------------------------------------------------

NATIVE = """
    import ctypes, json, os, threading
    import allocpolicy

    lib = ctypes.CDLL(os.environ["OOMLIB"])
    lib.oomlib_failures.restype = ctypes.c_uint64
    lib.oomlib_failures.argtypes = [ctypes.c_int, ctypes.c_size_t]

    def failed(rounds=20, size=256):
        # Which of the library's malloc calls returned NULL, by call number.
        mask = lib.oomlib_failures(rounds, size)
        return [i + 1 for i in range(rounds) if mask >> i & 1]

    def in_task(**injection):
        with allocpolicy.inject(scope="task", **injection) as inj:
            with allocpolicy.task("task"):
                result = failed(**injection.pop("call", {}))
            return result, inj.stats().seen
"""


def native(code: str, tmp_path, build_c) -> dict:
    return last_json(run_python(NATIVE + code, None, tmp_path, env={"OOMLIB": build_c("oomlib", shared=True)}))


def test_injection_reaches_malloc_in_a_c_library_called_through_ctypes(tmp_path, build_c):
    # _testcapi.set_nomemory hooks Python's allocator domains only; the
    # library's malloc calls are out of its reach, but not of the preload's.
    out = native("""
    results = {}
    results["count"] = in_task()
    results["nth"] = in_task(nth=5)
    results["window"] = in_task(start=3, stop=6)
    results["every"] = in_task(every=4)
    results["persistent"] = in_task(nth=17, persistent=True)
    with allocpolicy.inject(scope="task", every=1, min_size=1000):
        with allocpolicy.task("task"):
            results["sizes"] = [failed(size=100), failed(size=4000)]
    print(json.dumps(results))
    """, tmp_path, build_c)
    # The library's 20 calls are the only allocations numbered in the task.
    assert out["count"] == [[], 20]
    assert out["nth"][0] == [5]
    assert out["window"][0] == [3, 4, 5]
    assert out["every"][0] == [4, 8, 12, 16, 20]
    assert out["persistent"][0] == [17, 18, 19, 20]
    assert out["sizes"] == [[], list(range(1, 21))]


def test_injection_stays_in_its_scope(tmp_path, build_c):
    # GIVEN every allocation of the task scope failing
    out = native("""
    outside = []
    stop = threading.Event()

    def elsewhere():
        # Another thread, outside any scope, allocating all the while.
        while not stop.is_set():
            outside.extend(failed())

    with allocpolicy.inject(scope="task", every=1):
        thread = threading.Thread(target=elsewhere)
        thread.start()
        before = failed()
        with allocpolicy.task("task"):
            inside = [failed() for _ in range(50)]
        after = failed()
        stop.set()
        thread.join()
    print(json.dumps({"before": before, "inside": inside, "after": after, "outside": outside}))
    """, tmp_path, build_c)
    # THEN inside the scope every call fails, and outside it none ever does
    assert out["inside"] == [list(range(1, 21))] * 50
    assert out["before"] == out["after"] == []
    assert out["outside"] == []


def test_unknown_scope_and_bad_environment_are_reported(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent("""
        import allocpolicy
        try:
            allocpolicy.inject(nth=1, scope="nope")
        except allocpolicy.UnknownScopeError as err:
            print("unknown:", err.name)
        print(allocpolicy.inject_stats().active)
    """))
    # A setting made by hand after `allocpolicy run` (which checks its own)
    # is checked when the package activates: a warning, nothing injected.
    proc = subprocess.run(
        [sys.executable, "-m", "allocpolicy", "run", "--",
         "env", "ALLOCPOLICY_INJECT=scope=task,nth=zero", sys.executable, str(script)],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
    )
    assert check(proc).splitlines() == ["unknown: nope", "False"]
    assert "ALLOCPOLICY_INJECT='scope=task,nth=zero' was ignored, nothing is injected: key 'nth'" in proc.stderr
    # `allocpolicy run` refuses a bad setting outright.
    proc = run_python("print('not reached')", None, tmp_path, env={"ALLOCPOLICY_INJECT": "scope=nope,nth=1"})
    assert proc.returncode == 2
    assert "scope 'nope' is not declared in the policy" in proc.stderr
