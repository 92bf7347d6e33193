"""Run Python code in a child process under the preloaded runtime.

Every test that needs the runtime runs its code in a subprocess started by
``allocpolicy run``: the runtime must be preloaded before the interpreter
starts, and abort-mode cases must be able to die without taking pytest along.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(
    code: str,
    policy: str | None,
    tmp_path: Path,
    *,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 300,
    preload: bool = True,
    run_options: tuple[str, ...] = (),
    table: str | None = None,
) -> subprocess.CompletedProcess:
    """Run ``code`` with ``policy`` (TOML text, or None for the built-in default).

    ``run_options`` go to ``allocpolicy run``; ``table`` replaces the compiled
    policy in the child's environment (to test a table set by hand).
    """
    script = tmp_path / "snippet.py"
    script.write_text(textwrap.dedent(code))
    cmd = [sys.executable, "-m", "allocpolicy", "run", *run_options]
    if policy is not None:
        policy_file = tmp_path / "policy.toml"
        policy_file.write_text(textwrap.dedent(policy))
        cmd += ["--policy", str(policy_file)]
    if table is not None:
        cmd += ["--", "env", f"ALLOCPOLICY_TABLE={table}"]
    else:
        cmd += ["--"]
    cmd += [sys.executable, str(script), *args]
    if not preload:
        cmd = [sys.executable, str(script), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(tmp_path)
    )


def check(proc: subprocess.CompletedProcess) -> str:
    """The child's stdout, after asserting it exited 0 (with its stderr on failure)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout
