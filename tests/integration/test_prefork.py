"""Pre-fork servers: with the post_fork hook each gunicorn worker gets
1/workers of the process budget; without it each gets the whole (the
problem the hook solves)."""

from __future__ import annotations

import sys

import pytest

from web_load import APPS, Server

pytestmark = [pytest.mark.server, pytest.mark.slow]

pytest.importorskip("gunicorn")
pytest.importorskip("flask")

WORKERS = 3


def budgets(config: list[str]) -> dict[int, int]:
    command = [sys.executable, "-m", "gunicorn", "--no-control-socket", "-b", "127.0.0.1:{port}",
               "-w", str(WORKERS), *config, "flask_app:app"]
    with Server(command, policy=APPS / "prefork_policy.toml") as srv:
        return {pid: facts["process_budget"] for pid, facts in srv.stats(WORKERS, attempts=200).items()}


def test_post_fork_hook_divides_the_process_budget():
    whole = budgets([])
    shared = budgets(["-c", str(APPS / "gunicorn_shared.conf.py")])
    assert len(whole) == len(shared) == WORKERS
    (undivided,) = set(whole.values())  # every worker inherited the same budget
    assert undivided > 0
    assert set(shared.values()) == {undivided // WORKERS}


SHARE_TWICE = r"""
import os, allocpolicy
from allocpolicy.integrations.prefork import share_process_budget
whole = allocpolicy.stats().process.budget
first = share_process_budget(4)           # in the master (e.g. gunicorn --preload)
pid = os.fork()
if pid == 0:                               # and again in the worker's post_fork
    again = share_process_budget()         # from ALLOCPOLICY_WORKERS
    os._exit(0 if again == whole // 4 == allocpolicy.stats().process.budget else 1)
_, status = os.waitpid(pid, 0)
print(whole, first, os.waitstatus_to_exitcode(status))
"""


def test_a_share_is_taken_of_the_whole_never_of_a_share():
    import subprocess

    from web_load import child_env

    proc = subprocess.run(
        [sys.executable, "-m", "allocpolicy", "run", "--policy", str(APPS / "prefork_policy.toml"), "--",
         sys.executable, "-c", SHARE_TWICE],
        env={**child_env(), "ALLOCPOLICY_WORKERS": "4"}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    whole, first, child_status = map(int, proc.stdout.split())
    assert first == whole // 4 and child_status == 0
