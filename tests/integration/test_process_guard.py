"""The suite's process guard (tests/conftest.py, tests/process_tree.py): a
process a test leaves running fails the session and is killed, even when it
left its parent's session and its parent exited."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

LEAVES_A_GRANDCHILD = textwrap.dedent('''
    import subprocess, sys

    def test_leaves_a_process_behind(tmp_path):
        # The child starts a grandchild in a session of its own and exits:
        # the grandchild is an orphan nobody waits for.
        code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
                "'import time; time.sleep(600)'], start_new_session=True, "
                "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout
        (tmp_path / "pid").write_text(out)
        print("ORPHAN", out.strip())
''')


def run_suite(tmp_path: Path, test_source: str) -> subprocess.CompletedProcess:
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("conftest.py", "process_tree.py"):
        shutil.copy(TESTS / name, suite / name)
    (suite / "test_it.py").write_text(test_source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-s",
         "--rootdir", str(suite), str(suite)],
        cwd=suite, env=env, capture_output=True, text=True, timeout=120,
    )


def test_an_orphan_left_running_fails_the_session_and_is_killed(tmp_path):
    proc = run_suite(tmp_path, LEAVES_A_GRANDCHILD)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "were still running when the session ended" in proc.stdout, proc.stdout
    pid = int(re.search(r"ORPHAN (\d+)", proc.stdout).group(1))
    assert f"{pid}: " in proc.stdout
    # Killed and reaped by the guard: the pid is gone.
    assert not Path(f"/proc/{pid}").exists()


def test_a_session_that_waits_for_its_processes_passes(tmp_path):
    proc = run_suite(tmp_path, textwrap.dedent('''
        import subprocess, sys

        def test_waits():
            subprocess.run([sys.executable, "-c", "pass"], check=True)
    '''))
    assert proc.returncode == 0, proc.stdout + proc.stderr
