"""concurrent.futures executors and multiprocessing pools whose every task
runs in a scope, under ``allocpolicy run``: bombs among ordinary tasks fail
alone with AllocError (pickled back from worker processes), the workers live
on, and the task scope's live bytes come back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from web_load import APPS, child_env

pytestmark = [pytest.mark.server]

ARENA = 1 << 20  # pymalloc's arena size on 64-bit CPython 3.10+


def live_slack(arenas: int) -> int:
    """What the task scope may still hold after its tasks: each pymalloc arena
    that surviving objects keep in use stays charged to the instance that
    allocated it (whole), plus unpublished per-thread batches. One leaked
    bomb would leave at least 56 MiB."""
    return arenas * ARENA + (2 << 20)

RUNNERS = ["thread", "process-fork", "process-spawn", "pool-fork", "pool-forkserver"]


def run(which: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "allocpolicy", "run", "--policy", str(APPS / "task_policy.toml"), "--",
         sys.executable, str(APPS / "task_runners.py"), which],
        cwd=str(APPS), env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("which", RUNNERS)
def test_bombs_fail_alone(which):
    out = run(which)
    results = out["results"]
    normal = [r for r in results if r["kind"] == "normal"]
    bombs = [r for r in results if r["kind"] != "normal"]
    assert len(normal) == 60 and len(bombs) == 10
    assert all("value" in r for r in normal), [r for r in normal if "value" not in r][:3]
    for r in bombs:
        assert r["error"] == "AllocError", r
        assert (r["scope"], r["task"], r["reason"], r["budget"]) == ("task", "task", "budget", 64 << 20), r
    # the mapped chunks ran, item by item, to the end
    assert len(out["mapped"]["value"]) == 8
    if which.startswith(("process", "pool")):
        # no worker died and was replaced: two workers did every task
        pids = {r["value"][0] for r in normal} | {pid for pid, _, _ in out["lives"]}
        assert len(pids) <= 2, pids
        # a worker's task scope is back near its baseline
        assert all(live < live_slack(arenas) for _, live, arenas in out["lives"]), out["lives"]
    else:
        (_, live_before, arenas_before), (_, live_after, arenas_after) = out["live_before"], out["live_after"]
        assert live_after - live_before < live_slack(arenas_after - arenas_before), out
    if which.startswith("pool"):
        assert out["starred"] == {"value": [3, 7]}
        assert out["unordered"]["error"] == "AllocError"


def _task_has_retries() -> bool:
    import inspect

    import allocpolicy

    return "retries" in inspect.signature(allocpolicy.task).parameters


@pytest.mark.skipif(not _task_has_retries(), reason="needs allocpolicy.task(..., retries=N)")
def test_runners_rerun_a_refused_task_with_an_escalated_budget():
    out = run("retries")
    for runner in ("thread", "process"):
        # without retries the 100 MiB job is refused by its 64 MiB budget
        assert out[f"{runner}-0"][0]["error"] == "AllocError", out
        # with one rerun at twice the budget (128 MiB) it completes
        assert out[f"{runner}-1"][0] == {"value": 100}, out
    assert out["pool-1"][0] == {"value": 100}, out
    # a bomb is refused by the escalated budget too, and reports it
    for key in ("thread-1", "process-1", "pool-1"):
        bomb = out[key][1]
        assert bomb["error"] == "AllocError" and bomb["budget"] == 128 << 20, out
