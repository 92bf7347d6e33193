"""`allocpolicy check`, `--version` and usage errors, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import allocpolicy._cli as cli
from allocpolicy._policy import _SCOPE_KEYS

# The package these tests imported; the child must run the same one.
PACKAGE_ROOT = str(Path(cli.__file__).resolve().parents[1])


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCPOLICY_") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "allocpolicy", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_check_valid_file(tmp_path):
    path = write(
        tmp_path,
        """
        version = 1
        # Covers the known offenders, whose presence check would warn about.
        include = ["openblas"]
        [process]
        on_oom = "abort"
        [scopes.request]
        budget = "64 MiB"
        total_budget = "1 GiB"
        """,
    )
    proc = run_cli("check", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert str(path) in out
    assert "[process]" in out and "[scopes.request]" in out
    assert "abort" in out
    assert "67108864 bytes (64 MiB)" in out
    assert "1073741824 bytes (1 GiB)" in out


def test_check_default_policy():
    proc = run_cli("check")
    assert proc.returncode == 0, proc.stderr
    assert "<built-in default>" in proc.stdout
    assert "[scopes.task]" in proc.stdout and "[scopes.request]" in proc.stdout


def test_check_reports_every_mistake_one_line_each(tmp_path):
    path = write(
        tmp_path,
        """
        version = 1
        [process]
        on_oom = "rasie"
        [scopes.request]
        budgt = "256 MiB"
        budget = "-3 MiB"
        total_budget = "12 parsecs"
        """,
    )
    proc = run_cli("check", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines == [
        f"allocpolicy: error: {path}: [process] key 'on_oom': unknown mode 'rasie' "
        "(did you mean 'raise'?); expected one of 'raise', 'abort', 'fallible'",
        f"allocpolicy: error: {path}: [scopes.request] key 'budgt': unknown key 'budgt' "
        "(did you mean 'budget'?); allowed keys: " + ", ".join(_SCOPE_KEYS),
        f"allocpolicy: error: {path}: [scopes.request] key 'budget': sizes cannot be negative, got '-3 MiB'",
        lines[3],
    ]
    assert lines[3].startswith(
        f"allocpolicy: error: {path}: [scopes.request] key 'total_budget': unknown unit"
    )
    assert "Traceback" not in proc.stderr


def test_check_syntax_error(tmp_path):
    path = write(tmp_path, "version = 1\n[scopes.request]\nbudget = 256 MiB\n")
    proc = run_cli("check", str(path))
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(
        f"allocpolicy: error: {path}: [scopes.request]: TOML syntax error at line 3, column"
    )


def test_check_missing_file(tmp_path):
    proc = run_cli("check", str(tmp_path / "absent.toml"))
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert "absent.toml" in line and "No such file or directory" in line
    assert "Traceback" not in proc.stderr


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("allocpolicy ")
    assert proc.stdout.split()[1][0].isdigit()


@pytest.mark.parametrize("args", [(), ("frobnicate",), ("run", "--report-fd", "-1", "--", "true")])
def test_usage_errors(args):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "usage: allocpolicy" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_without_command():
    proc = run_cli("run")
    assert proc.returncode == 2
    assert proc.stderr.startswith("allocpolicy: error: run: no command given")


def test_run_missing_policy_file_needs_no_library(tmp_path):
    # The policy is checked before anything else, so this fails the same way
    # whether or not the runtime library was built.
    proc = run_cli("run", "--policy", str(tmp_path / "absent.toml"), "--", "true")
    assert proc.returncode == 2
    assert "absent.toml" in proc.stderr and "cannot read the policy file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_main_in_process(tmp_path, capsys):
    path = write(tmp_path, "version = 1\n[scopes.x]\nbudget = 5\n")
    assert cli.main(["check", str(path)]) == 0
    assert "[scopes.x]" in capsys.readouterr().out
    assert cli.main(["check", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err.startswith("allocpolicy: error: ")


# --- pieces of `run` that need no library ----------------------------------------------


def test_preload_order():
    assert cli._preload("/lib/ours.so", None, "") == "/lib/ours.so"
    assert cli._preload("/lib/ours.so", "/lib/je.so", "") == "/lib/ours.so /lib/je.so"
    # Ours first, then the backend, then what was there; no repeats.
    assert (
        cli._preload("/lib/ours.so", "/lib/je.so", "/lib/other.so:/lib/ours.so /lib/je.so")
        == "/lib/ours.so /lib/je.so /lib/other.so"
    )


def test_find_backend_system_is_none():
    assert cli.find_backend("system") is None


def test_find_backend_missing_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_library_dirs", lambda: [str(tmp_path)])
    monkeypatch.setattr(cli.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(cli.UserError) as info:
        cli.find_backend("jemalloc")
    assert "libjemalloc2" in str(info.value) and info.value.code == 2
    with pytest.raises(cli.UserError) as info:
        cli.find_backend("mimalloc")
    assert "libmimalloc2.0" in str(info.value)


def test_find_backend_in_library_dirs(monkeypatch, tmp_path):
    (tmp_path / "libmimalloc.so.2").write_bytes(b"")
    monkeypatch.setattr(cli, "_library_dirs", lambda: [str(tmp_path / "empty"), str(tmp_path)])
    assert cli.find_backend("mimalloc") == str(tmp_path / "libmimalloc.so.2")
