"""The examples of the documentation run, and print what the pages show.

Every script in docs/examples/ is run the way the pages tell readers to run it:
``allocpolicy run --policy ... -- python script.py``, in a child process. Where
a page includes a recorded output (``docs/examples/*.out``), the real output
must match it exactly, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import allocpolicy as allocpolicy_package

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
TIMEOUT = 300

# script -> policy file it runs under (None: the built-in default policy)
RUNS = {
    "quickstart_task.py": "quickstart_policy.toml",
    "nested_scopes.py": "nested_policy.toml",
    "bind_threads.py": "quickstart_policy.toml",
    "asyncio_requests.py": "quickstart_policy.toml",
    "configure_from_python.py": None,
    "fallible_mode.py": "fallible_policy.toml",
    "abort_mode.py": "abort_policy.toml",
    "module_scope.py": "module_scope.toml",
    "library_scope.py": "library_scope.toml",
    "reserve_fallible.py": "fallible_code_policy.toml",
    "try_extend.py": "fallible_code_policy.toml",
    "no_alloc_regions.py": "no_alloc_policy.toml",
    "inject_task.py": "inject_policy.toml",
    "task_boundaries.py": "nested_policy.toml",
    "task_retries.py": "quickstart_policy.toml",
    "web_flask.py": "web_policy.toml",
    "web_fastapi.py": "web_policy.toml",
    "web_django.py": "web_policy.toml",
    "task_runners.py": "tasks_policy.toml",
    "observe_refusals.py": "quickstart_policy.toml",
}

# Scripts whose page runs them with a plain `python`, no `allocpolicy run`.
PLAIN = ["inprocess_install.py"]
# Scripts started by a container or a systemd unit with a bare LD_PRELOAD,
# as docs/deployment.rst shows; their policy comes from ALLOCPOLICY_POLICY.
DEPLOYED = {"service.py": "service_policy.toml"}


def _env() -> dict[str, str]:
    """The caller's environment without anything that would change the runtime."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ALLOCPOLICY_") and k not in ("LD_PRELOAD", "PYTHONMALLOC")
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def allocpolicy(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``allocpolicy ARGS`` as a reader would type it, through ``python -m``."""
    return subprocess.run(
        [sys.executable, "-m", "allocpolicy", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
        cwd=str(cwd),
    )


def run_example(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    policy = RUNS[script]
    args = ["run"]
    if policy is not None:
        args += ["--policy", str(EXAMPLES / policy)]
    args += ["--", sys.executable, str(EXAMPLES / script)]
    # Run from an empty directory: the package imported is the installed one,
    # as for a reader, not whatever the current directory holds.
    return allocpolicy(*args, cwd=tmp_path)


def recorded(name: str) -> str:
    return (EXAMPLES / name).read_text()


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_every_example_script_is_run_here():
    # A new example without a case here would be included in a page untested.
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted([*RUNS, *PLAIN, *DEPLOYED])


def test_every_policy_file_in_the_examples_is_used_or_checked():
    used = {p for p in RUNS.values() if p} | {"broken_policy.toml", "full_policy.toml"} | set(DEPLOYED.values())
    assert sorted(p.name for p in EXAMPLES.glob("*.toml")) == sorted(used)


@pytest.mark.parametrize(
    "script",
    [
        "quickstart_task.py",
        "nested_scopes.py",
        "bind_threads.py",
        "asyncio_requests.py",
        "configure_from_python.py",
        "fallible_mode.py",
        "reserve_fallible.py",
        "try_extend.py",
        "no_alloc_regions.py",
        "library_scope.py",
        "inject_task.py",
        "web_flask.py",
        "web_fastapi.py",
        "web_django.py",
        "task_runners.py",
        "task_retries.py",
        "observe_refusals.py",
    ],
)
def test_example_prints_the_output_shown_in_the_docs(script, tmp_path):
    if script == "no_alloc_regions.py":
        pytest.importorskip("numpy")  # a test dependency; the example uses it
    needs = {"web_flask.py": ["flask", "waitress"], "web_fastapi.py": ["fastapi", "uvicorn"],
             "web_django.py": ["django", "waitress"],
             "task_runners.py": ["distributed"]}
    for needed in needs.get(script, []):
        pytest.importorskip(needed)  # test dependencies (the [test] extra)
    if script == "web_fastapi.py" and not hasattr(allocpolicy_package.task, "__aenter__"):
        pytest.skip("needs scope instances that follow asyncio tasks")
    # GIVEN an example script and the output recorded next to it for the docs
    # WHEN it runs under the runtime with its policy
    proc = run_example(script, tmp_path)
    # THEN it exits 0 and prints exactly the recorded output
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout == recorded(script.replace(".py", ".out")), explain(proc)


def test_module_scope_example_prints_the_output_shown_in_the_docs(tmp_path):
    # GIVEN a policy that binds the gzip module to a 16 MiB scope
    # WHEN the example decompresses a gzip bomb and then allocates outside gzip
    proc = run_example("module_scope.py", tmp_path)
    # THEN only the decompression fails, as the recorded output shows
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout == recorded("module_scope.out"), explain(proc)
    assert "unpack" not in (EXAMPLES / "module_scope.py").read_text().split('"""')[2]


def test_quickstart_request_fails_alone_with_alloc_error(tmp_path):
    proc = run_example("quickstart_task.py", tmp_path)
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[0] == "ok: processed 8 MiB"
    # The 500 MiB request is refused by its own 64 MiB budget, before allocating.
    assert lines[1] == (
        f"request dropped: {(500 << 20) + 1} bytes refused in scope 'request' "
        f"(reason 'budget', budget {64 << 20} bytes)"
    )
    assert lines[2] == "ok: processed 16 MiB"
    assert lines[3] == "the process is still here"
    assert "Traceback" not in proc.stderr


def test_in_process_example_prints_the_output_shown_in_the_docs(tmp_path):
    # GIVEN the in-process example, which its page runs with a plain `python`
    # WHEN it runs without `allocpolicy run` (no preload)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "inprocess_install.py")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
        cwd=str(tmp_path),
    )
    # THEN install() enforces the budget and the output is the recorded one
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout == recorded("inprocess_install.out"), explain(proc)


def test_quickstart_refuses_to_run_without_the_runtime(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart_task.py")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
        cwd=str(tmp_path),
    )
    assert proc.returncode == 1
    assert "allocpolicy run" in proc.stderr


def test_abort_mode_prints_the_diagnostic_and_the_python_traceback(tmp_path):
    # GIVEN a scope with on_oom = "abort" and a 32 MiB budget
    # WHEN the script goes over it
    proc = run_example("abort_mode.py", tmp_path)
    # THEN the process dies of SIGABRT (run exec()s: the status is the script's)
    assert proc.returncode == -signal.SIGABRT, explain(proc)
    assert proc.stdout == "loading\n"
    first = proc.stderr.splitlines()[0]
    assert first.startswith("allocpolicy: allocation refused in scope 'ingest' (instance "), explain(proc)
    assert "reason=budget" in first
    assert f"budget of scope 'ingest'={32 << 20} live=" in first
    assert first.endswith("; mode=abort, aborting")
    # faulthandler follows with the Python traceback
    assert "Fatal Python error: Aborted" in proc.stderr
    assert "in load_rows" in proc.stderr
    assert "abort_mode.py" in proc.stderr


def test_check_reports_every_mistake_of_the_broken_policy():
    # Run from docs/examples with a relative path, as the page shows it.
    proc = allocpolicy("check", "broken_policy.toml", cwd=EXAMPLES)
    assert proc.returncode == 2, explain(proc)
    assert proc.stdout == ""
    assert proc.stderr == recorded("broken_policy.check.out")
    assert len(proc.stderr.splitlines()) == 4


def test_check_describes_the_quickstart_policy():
    proc = allocpolicy("check", "quickstart_policy.toml", cwd=EXAMPLES)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout == recorded("quickstart_policy.check.out")


def test_check_accepts_the_policy_with_every_key():
    proc = allocpolicy("check", "full_policy.toml", cwd=EXAMPLES)
    assert proc.returncode == 0, explain(proc)
    out = proc.stdout
    # The percentage is resolved against this machine; only its shape is fixed.
    assert re.search(r"^  budget +=  ?80% of ", out, re.M), out
    for table in ("[scopes.request]", "[scopes.thumbnail]", "[scopes.nightly_import]", '[scopes."model.load"]'):
        assert table in out
    assert "total_budget = 2147483648 bytes (2 GiB)  over all live instances" in out
    assert "budget       = 1610612736 bytes (1.5 GiB)  per instance" in out


def test_command_exit_statuses_are_the_documented_ones(tmp_path):
    assert allocpolicy("run", "--", "no-such-command-here", cwd=tmp_path).returncode == 127
    not_executable = tmp_path / "data.txt"
    not_executable.write_text("not a program\n")
    assert allocpolicy("run", "--", str(not_executable), cwd=tmp_path).returncode == 126
    assert allocpolicy("run", cwd=tmp_path).returncode == 2
    assert allocpolicy("check", str(tmp_path / "missing.toml"), cwd=tmp_path).returncode == 2
    lib = allocpolicy("lib", cwd=tmp_path)
    assert lib.returncode == 0 and Path(lib.stdout.strip()).is_file(), explain(lib)


# --- deployment: a bare LD_PRELOAD, set by a Dockerfile or a systemd unit ----------


def _root_path(root: Path, path: str) -> Path:
    """``path`` of the deployed system, inside ``root``."""
    return root / path.lstrip("/")


def _install_library_link(root: Path, link: str) -> None:
    # The Dockerfile's `ln -s "$(allocpolicy lib)" LINK`, with this installation's library.
    library = allocpolicy("lib", cwd=root).stdout.strip()
    assert Path(library).is_file(), library
    target = _root_path(root, link)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(library)


def _deployed(root: Path, environment: dict[str, str], command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` of the deployed system with exactly its ``environment``
    (paths taken inside ``root``), the way the container or the unit starts it."""
    env = _env()
    env.update({key: str(_root_path(root, value)) for key, value in environment.items()})
    argv = [sys.executable if Path(command[0]).name.startswith("python") else command[0]]
    argv += [str(_root_path(root, arg)) if arg.startswith("/") else arg for arg in command[1:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=str(root))


def test_dockerfile_recipe_runs_the_service_under_its_policy(tmp_path):
    # GIVEN the image the documented Dockerfile builds: its COPY steps, its
    # library link and its ENV lines, taken from the file itself
    environment: dict[str, str] = {}
    command: list[str] = []
    for line in (EXAMPLES / "service.Dockerfile").read_text().splitlines():
        word, _, rest = line.partition(" ")
        if word == "COPY":
            source, dest = rest.split()
            _root_path(tmp_path, dest).parent.mkdir(parents=True, exist_ok=True)
            _root_path(tmp_path, dest).write_bytes((EXAMPLES / source).read_bytes())
        elif word == "RUN" and rest.startswith("ln -s"):
            _install_library_link(tmp_path, rest.split()[-1])
        elif word == "ENV":
            key, _, value = rest.partition("=")
            environment[key] = value
        elif word == "CMD":
            command = json.loads(rest)
    assert set(environment) == {"LD_PRELOAD", "ALLOCPOLICY_POLICY"}
    # WHEN the container starts its command: no `allocpolicy run` anywhere
    proc = _deployed(tmp_path, environment, command)
    # THEN the policy named in the environment is in force, modules and all
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout == recorded("service.out"), explain(proc)
    assert proc.stderr == ""


def test_systemd_unit_recipe_runs_the_service_under_its_policy(tmp_path):
    # GIVEN the files installed where the unit expects them
    _install_library_link(tmp_path, "/usr/local/lib/liballocpolicy.so")
    for source, dest in (("service_policy.toml", "/etc/allocpolicy/service.toml"),
                         ("service.py", "/opt/service/service.py")):
        _root_path(tmp_path, dest).parent.mkdir(parents=True, exist_ok=True)
        _root_path(tmp_path, dest).write_bytes((EXAMPLES / source).read_bytes())
    environment: dict[str, str] = {}
    command: list[str] = []
    for line in (EXAMPLES / "service.service").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            name, _, setting = value.partition("=")
            environment[name] = setting
        elif key == "ExecStart":
            command = value.split()
    # WHEN systemd starts ExecStart with the unit's Environment= lines
    proc = _deployed(tmp_path, environment, command)
    # THEN it runs as in the container
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout == recorded("service.out"), explain(proc)
