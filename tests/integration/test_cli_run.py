"""`allocpolicy run`: the environment the command gets, and exit statuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import allocpolicy._cli as cli
from allocpolicy._errors import RuntimeLoadError
from allocpolicy._policy import BUILTIN_SOURCE, default_policy, load_policy

PACKAGE_ROOT = str(Path(cli.__file__).resolve().parents[1])

SHOW_ENV = (
    "import json, os; print(json.dumps({k: os.environ.get(k) for k in "
    "('LD_PRELOAD', 'ALLOCPOLICY_TABLE', 'ALLOCPOLICY_POLICY')}))"
)


@pytest.fixture
def run_cli(allocpolicy_lib):
    """Run `python -m allocpolicy ARGS` with the library the other tests use."""

    def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, **kwargs):
        base = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCPOLICY_") and k != "LD_PRELOAD"}
        base["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, base.get("PYTHONPATH")]))
        base["ALLOCPOLICY_LIBRARY"] = allocpolicy_lib
        base.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "allocpolicy", *args],
            capture_output=True,
            text=True,
            env=base,
            cwd=cwd,
            timeout=120,
            **kwargs,
        )

    return run


def child_env(proc: subprocess.CompletedProcess) -> dict[str, str | None]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_run_default_policy(run_cli, allocpolicy_lib):
    seen = child_env(run_cli("run", "--", sys.executable, "-c", SHOW_ENV))
    assert seen["LD_PRELOAD"] == allocpolicy_lib
    assert seen["ALLOCPOLICY_TABLE"] == default_policy().compile()
    assert seen["ALLOCPOLICY_POLICY"] == BUILTIN_SOURCE


def test_run_policy_file(run_cli, tmp_path):
    (tmp_path / "p.toml").write_text(
        textwrap.dedent(
            """
            version = 1
            [process]
            on_oom = "abort"
            [scopes.job]
            budget = "32 MiB"
            """
        )
    )
    # A relative path: the command may change directory, so it gets an absolute one.
    with open(tmp_path / "report.log", "wb") as report:
        fd = report.fileno()
        seen = child_env(
            run_cli(
                "run",
                "--policy",
                "p.toml",
                "--report-fd",
                str(fd),
                "--",
                sys.executable,
                "-c",
                SHOW_ENV,
                cwd=tmp_path,
                pass_fds=(fd,),
            )
        )
    assert seen["ALLOCPOLICY_POLICY"] == str(tmp_path / "p.toml")
    assert seen["ALLOCPOLICY_TABLE"] == f"v=1;grace=4194304;fd={fd};process=abort:0;scope=job:raise:33554432:0"
    assert load_policy(tmp_path / "p.toml").compile().replace("fd=2", f"fd={fd}") == seen["ALLOCPOLICY_TABLE"]


def test_run_keeps_previous_preload_after_ours(run_cli, allocpolicy_lib):
    # libm is harmless to preload. Ours must come first so that its
    # dlsym(RTLD_NEXT) reaches the real allocator, and must not appear twice.
    seen = child_env(
        run_cli(
            "run", "--", sys.executable, "-c", SHOW_ENV, env={"LD_PRELOAD": f"libm.so.6:{allocpolicy_lib}"}
        )
    )
    assert seen["LD_PRELOAD"] == f"{allocpolicy_lib} libm.so.6"


def test_run_with_backend(run_cli, allocpolicy_lib, backend_library):
    jemalloc = backend_library("jemalloc")
    seen = child_env(run_cli("run", "--backend", "jemalloc", "--", sys.executable, "-c", SHOW_ENV))
    ours, backend = seen["LD_PRELOAD"].split()
    assert ours == allocpolicy_lib
    assert os.path.realpath(backend) == os.path.realpath(jemalloc)


def test_child_python_sees_the_policy(run_cli, tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\n[scopes.job]\nbudget = "32 MiB"\n')
    code = (
        "import allocpolicy; p = allocpolicy.active_policy(); "
        "print(allocpolicy.is_active(), p.source, sorted(p.scopes))"
    )
    proc = run_cli("run", "--policy", str(policy), "--", sys.executable, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", str(policy), "['job']"]


def test_exit_status_is_the_commands(run_cli):
    proc = run_cli("run", "--", sys.executable, "-c", "import sys; sys.exit(7)")
    assert proc.returncode == 7


def test_signals_are_the_commands(run_cli):
    # exec, not a child process: the signal kills the process we started.
    proc = run_cli(
        "run", "--", sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    )
    assert proc.returncode == -signal.SIGTERM


def test_command_not_found(run_cli):
    proc = run_cli("run", "--", "no-such-command-allocpolicy-test")
    assert proc.returncode == 127
    assert proc.stderr == "allocpolicy: error: command not found: no-such-command-allocpolicy-test\n"


def test_command_not_executable(run_cli, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    proc = run_cli("run", "--", str(script))
    assert proc.returncode == 126
    assert "permission denied" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_policy_file(run_cli, tmp_path):
    proc = run_cli("run", "--policy", str(tmp_path / "absent.toml"), "--", "true")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"allocpolicy: error: {tmp_path / 'absent.toml'}: ")
    assert "Traceback" not in proc.stderr


def test_invalid_policy_file(run_cli, tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\n[scopes.job]\nbudget = "lots"\non_oom = "panic"\n')
    proc = run_cli("run", "--policy", str(policy), "--", "true")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 2
    assert "[scopes.job] key 'budget'" in proc.stderr and "[scopes.job] key 'on_oom'" in proc.stderr


def test_lib_prints_the_library(run_cli, allocpolicy_lib):
    proc = run_cli("lib")
    assert proc.returncode == 0
    assert proc.stdout.strip() == allocpolicy_lib


def test_library_missing_exits_1(monkeypatch, capsys):
    from allocpolicy import _native

    def missing() -> str:
        raise RuntimeLoadError("the allocpolicy runtime library was not found")

    monkeypatch.setattr(_native, "library_path", missing)
    assert cli.main(["run", "--", "true"]) == 1
    assert capsys.readouterr().err == "allocpolicy: error: the allocpolicy runtime library was not found\n"
    assert cli.main(["lib"]) == 1


ABORT_POLICY = 'version = 1\n[process]\non_oom = "abort"\nbudget = "64 MiB"\n'
BLOW_BUDGET = "x = bytearray(128 * 1024 * 1024)"


def test_report_fd_not_open_is_refused_at_start(run_cli, tmp_path):
    # GIVEN descriptor 9 closed in `run` (subprocess closes what it does not pass)
    policy = tmp_path / "p.toml"
    policy.write_text(ABORT_POLICY)
    # WHEN the command would abort and report to it
    proc = run_cli("run", "--policy", str(policy), "--report-fd", "9", "--", sys.executable, "-c", BLOW_BUDGET)
    # THEN run refuses to start it, instead of an abort nobody hears of
    assert proc.returncode == 2, proc
    assert proc.stderr == (
        "allocpolicy: error: run: --report-fd 9: descriptor 9 is not open, so diagnostics would be "
        "lost; open it for the command (for example `9>>report.log`) or choose another\n"
    )


def test_report_fd_of_the_policy_is_checked_too(run_cli, tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text(ABORT_POLICY + "report_fd = 9\n")
    proc = run_cli("run", "--policy", str(policy), "--", "true")
    assert proc.returncode == 2
    assert f"run: report_fd = 9 in {policy} [process]: descriptor 9 is not open" in proc.stderr


def test_report_fd_open_for_reading_only_is_refused(run_cli, tmp_path):
    readable = os.open(os.devnull, os.O_RDONLY)
    try:
        proc = run_cli("run", "--report-fd", str(readable), "--", "true", pass_fds=(readable,))
    finally:
        os.close(readable)
    assert proc.returncode == 2
    assert f"descriptor {readable} is open for reading only" in proc.stderr


def test_report_fd_open_gets_the_abort_diagnostic(run_cli, tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text(ABORT_POLICY)
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as report:
        with os.fdopen(write_end, "wb") as writer:
            proc = run_cli(
                "run", "--policy", str(policy), "--report-fd", str(writer.fileno()), "--",
                sys.executable, "-c", BLOW_BUDGET, pass_fds=(writer.fileno(),),
            )
        diagnostic = report.read().decode()
    assert proc.returncode == -signal.SIGABRT
    assert "mode=abort" in diagnostic, diagnostic
