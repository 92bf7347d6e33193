"""The README's first command: the shipped task server under the default policy."""

from __future__ import annotations

import re
import subprocess
import sys

from runtime_run import REPO


def test_task_server_survives_its_bombs_under_the_default_policy():
    proc = subprocess.run(
        [sys.executable, "-m", "allocpolicy", "run", "--", sys.executable,
         str(REPO / "examples" / "task_server.py"), "--tasks", "12"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "policy <built-in default>" in out
    # every bomb failed alone, at its own boundary, with the scope's facts
    for bomb in ("bomb_one_huge_buffer", "bomb_small_objects", "bomb_doubling"):
        line = next(l for l in out.splitlines() if bomb in l)
        assert re.search(r"AllocError\s+[\d.]+s\s+budget: \d+ bytes refused in scope 'task' "
                         r"\(budget 268435456, live \d+\)", line), line
    assert len(re.findall(r" normal\s+ok ", out)) == 12
    assert "12/12 ordinary tasks completed, 3/3 bombs stopped with AllocError" in out
    # the stats table reports the scope
    assert re.search(r"^task\s+raise\s+256 MiB", out, re.M)


def test_task_server_refuses_to_run_without_the_runtime():
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "task_server.py")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "allocpolicy run -- python examples/task_server.py" in proc.stderr
