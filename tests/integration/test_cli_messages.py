"""What the command says when asked for something it cannot do, and the
libraries report of a process tree: each report says whose it is."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import allocpolicy
from allocpolicy._core import names


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCPOLICY_") and k != "LD_PRELOAD"}
    return subprocess.run([sys.executable, "-m", "allocpolicy", *args], capture_output=True, text=True,
                          env=env, cwd=str(cwd), timeout=120)


def test_running_a_directory_says_it_is_a_directory(tmp_path):
    (tmp_path / "somedir").mkdir()
    proc = _cli("run", "--", "./somedir", cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (126, "allocpolicy: error: cannot execute ./somedir: is a directory\n")
    # found on PATH the same way
    proc = _cli("run", "--", "env", f"PATH={tmp_path}", sys.executable, "-c", "pass", cwd=tmp_path)
    assert proc.returncode == 0
    # a file without execute permission is still "permission denied"
    (tmp_path / "data.txt").write_text("not a program\n")
    proc = _cli("run", "--", "./data.txt", cwd=tmp_path)
    assert (proc.returncode, proc.stderr) == (126, "allocpolicy: error: permission denied: ./data.txt\n")


def test_each_process_of_a_tree_writes_a_libraries_report_that_names_it(tmp_path):
    # The default target, standard error, is one that child processes inherit.
    code = "import subprocess as s, sys; s.run([sys.executable, '-c', 'import zlib'])"
    proc = _cli("libs", "--", sys.executable, "-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    titles = [l for l in proc.stderr.splitlines() if l.startswith("allocpolicy: allocations by")]
    assert len(titles) == 2, proc.stderr
    prefix = "allocpolicy: allocations by shared object (the caller of malloc) in process "
    assert all(t.startswith(prefix) for t in titles)
    # the child exits first; each title carries the pid and the command line
    child, parent = (t[len(prefix):].split(" ", 1) for t in titles)
    assert child[1] == f"({sys.executable} -c import zlib)"
    assert parent[1] == f"({sys.executable} -c {code})"
    assert child[0].isdigit() and parent[0].isdigit() and child[0] != parent[0]


@pytest.mark.skipif(allocpolicy.is_active(), reason="needs a process without the runtime")
def test_without_the_runtime_warnings_point_at_the_callers_line(monkeypatch):
    for use in (lambda: allocpolicy.reserve(10), lambda: allocpolicy.try_reserve(10),
                lambda: allocpolicy.scope("x").__enter__()):
        monkeypatch.setattr(names, "_warned_inactive", False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            use()
        assert [w.filename for w in caught] == [__file__]
        assert caught[0].category is allocpolicy.AllocPolicyWarning


def test_a_misspelled_scope_gets_a_suggestion_under_the_runtime(tmp_path):
    from runtime_run import check, run_python

    out = check(run_python(
        """
        import allocpolicy
        try:
            with allocpolicy.task("reqeust"):
                pass
        except allocpolicy.UnknownScopeError as err:
            print(err)
        """, None, tmp_path))
    assert out == ("scope 'reqeust' is not declared in the active policy (did you mean 'request'?) "
                   "(declared scopes: request, task)\n")
