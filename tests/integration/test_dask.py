"""Dask distributed under ``allocpolicy run``: a LocalCluster of two worker
processes with AllocPolicyPlugin; bomb tasks among ordinary ones fail alone
with AllocError, no worker is restarted, each worker's process budget follows
its memory_limit, and the task scope's live bytes come back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_task_runners import _task_has_retries, live_slack
from web_load import APPS, child_env

pytestmark = [pytest.mark.server, pytest.mark.slow]

pytest.importorskip("distributed")

MEMORY_LIMIT = 1 << 30  # apps/dask_cluster.py


def run_cluster(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "allocpolicy", "run", "--policy", str(APPS / "task_policy.toml"), "--",
         sys.executable, str(APPS / "dask_cluster.py"), *args],
        cwd=str(APPS), env=child_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_bomb_tasks_fail_alone_and_no_worker_restarts():
    out = run_cluster()
    results = out["results"]
    normal = [r for r in results if r["kind"] == "normal"]
    bombs = [r for r in results if r["kind"] != "normal"]
    assert len(normal) == 80 and len(bombs) == 10
    assert all(r.get("ok") for r in normal), [r for r in normal if not r.get("ok")][:3]
    for r in bombs:
        assert (r["error"], r["scope"], r["reason"], r["budget"]) == ("AllocError", "task", "budget", 64 << 20), r
    # the same two worker processes before and after: none was killed and restarted
    assert out["before"] == out["after"] and len(out["after"]) == 2, (out["before"], out["after"])
    # each worker's process budget is just below the nanny's terminate threshold
    assert out["budgets"] == [int(MEMORY_LIMIT * 0.9)] * 2
    assert all(live < live_slack(arenas) for _, live, arenas in out["lives"]), out["lives"]


@pytest.mark.skipif(not _task_has_retries(), reason="needs allocpolicy.task(..., retries=N)")
def test_the_plugin_reruns_a_refused_task_with_an_escalated_budget():
    out = run_cluster("--retries")
    reruns = [r for r in out["results"] if r["kind"] == "needs_mib"]
    assert len(reruns) == 10 and all(r.get("ok") and r["value"] == 100 for r in reruns), reruns
    bombs = [r for r in out["results"] if r["kind"] not in ("normal", "needs_mib")]
    assert all(r["error"] == "AllocError" and r["budget"] == 128 << 20 for r in bombs), bombs
    assert out["before"] == out["after"]
