"""What every interpreter started under the runtime goes through: the
package imported at start (``_startup.pth``), the policy handed over by
``allocpolicy run`` or named in the environment, and the checks ``run``
makes before it starts the command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from runtime_run import check, run_python

MODULES_POLICY = """
    version = 1
    [scopes.job]
    on_oom = "raise"
    budget = "64 MiB"
    modules = ["json"]
"""


def test_startup_opens_no_text_file_without_an_encoding(tmp_path):
    # GIVEN -X warn_default_encoding with EncodingWarning as an error, in the
    # command and in `allocpolicy run` itself
    strict = {"PYTHONWARNDEFAULTENCODING": "1", "PYTHONWARNINGS": "error::EncodingWarning"}
    code = """
        import sys, warnings
        import allocpolicy
        assert sys.flags.warn_default_encoding
        assert "allocpolicy" in sys.modules and allocpolicy.is_active()
        allocpolicy.active_policy()
        allocpolicy.machine_headroom()
        import json  # bound to the scope `job` by the policy
        print("ok")
    """
    # WHEN the package is imported at start and used
    proc = run_python(code, MODULES_POLICY, tmp_path, env=strict)
    # THEN nothing warned (a warning would be an error, and printed)
    assert check(proc).split() == ["ok"]
    assert "EncodingWarning" not in proc.stderr, proc.stderr


def _clean_environment() -> dict[str, str]:
    """This process's environment without anything that starts the runtime."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ALLOCPOLICY_") and k != "LD_PRELOAD"}


def _bare_preload(lib: str, code: str, *, env: dict[str, str], stdin: str | None = None, timeout: float = 120):
    """``python -c code`` with only ``LD_PRELOAD`` set by hand (no ``allocpolicy
    run``), as a container entry point or a systemd unit starts a program; its
    address space is bounded, so a runaway read fails instead of filling memory."""
    import resource

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**_clean_environment(), "LD_PRELOAD": lib, "PYTHONUNBUFFERED": "1", **env},
        input=stdin, capture_output=True, text=True, timeout=timeout, preexec_fn=limits,
    )


# What MODULES_POLICY makes of a program: json's calls counted in `job`, and
# the scope's budget enforced.
USES_THE_JOB_SCOPE = """
    import json
    import allocpolicy
    json.dumps(list(range(10000)))
    print("bound:", allocpolicy.stats().scopes["job"].allocations > 0)
    try:
        with allocpolicy.task("job"):
            bytearray(100 << 20)
    except allocpolicy.AllocError as err:
        print("refused:", err.scope, err.budget)
"""

REPORT_POLICY = """
    import allocpolicy
    p = allocpolicy.active_policy()
    print(p.source, sorted(p.scopes))
"""


def test_non_ascii_table_is_one_warning_not_an_import_error(allocpolicy_lib):
    # GIVEN a table set by hand with a character the grammar does not have
    proc = _bare_preload(allocpolicy_lib, "import allocpolicy; print('imported')",
                         env={"ALLOCPOLICY_TABLE": "v=1;scope=caf\u00e9:raise:0:0"})
    # THEN the package still imports; the table is reported as ignored, once
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "imported\n"
    assert proc.stderr.count("ALLOCPOLICY_TABLE is malformed and was ignored") == 1, proc.stderr
    assert "UnicodeEncodeError" not in proc.stderr


def test_run_hands_on_a_policy_read_from_a_pipe(tmp_path):
    # GIVEN `allocpolicy run --policy /dev/fd/N` where N is a pipe, as `<(cat p.toml)` is
    read_end, write_end = os.pipe()
    os.write(write_end, textwrap.dedent(MODULES_POLICY).encode())
    os.close(write_end)
    code = textwrap.dedent("""
        import allocpolicy
        p = allocpolicy.active_policy()
        print(p.source, sorted(p.scopes), p.scopes["job"].modules)
    """) + textwrap.dedent(USES_THE_JOB_SCOPE)
    script = tmp_path / "snippet.py"
    script.write_text(textwrap.dedent(code))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "allocpolicy", "run", "--policy", f"/dev/fd/{read_end}", "--",
             sys.executable, str(script)],
            env=_clean_environment(), pass_fds=(read_end,), capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )
    finally:
        os.close(read_end)
    # THEN the command has the whole policy: its name, its scopes and its bindings
    assert check(proc).splitlines() == [
        f"/dev/fd/{read_end} ['job'] ('json',)",
        "bound: True",
        f"refused: job {64 << 20}",
    ]
    assert proc.stderr == ""


def test_run_refuses_an_endless_policy_source(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "allocpolicy", "run", "--policy", "/dev/zero", "--", "true"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr == "allocpolicy: error: /dev/zero: top level: the policy file is larger than 1 MiB\n"


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/stdin"])
def test_policy_in_the_environment_must_be_a_regular_file(allocpolicy_lib, tmp_path, kind):
    # GIVEN ALLOCPOLICY_POLICY naming something that is not a regular file
    if kind == "fifo":
        source = str(tmp_path / "policy.fifo")
        os.mkfifo(source)  # nobody writes: opening it for reading would block
    else:
        source = kind
    code = textwrap.dedent(REPORT_POLICY) + "import sys; print('stdin:', sys.stdin.read().strip())\n"
    # WHEN a program starts with it, under a bare preload and under a table
    for table in ({}, {"ALLOCPOLICY_TABLE": "v=1;process=raise:0;scope=job:raise:0:0"}):
        proc = _bare_preload(allocpolicy_lib, code, env={"ALLOCPOLICY_POLICY": source, **table},
                             stdin="the program's input\n")
        # THEN start-up neither blocks nor reads it: one warning says why, the
        # program keeps its input, and the policy in force is reported truly
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == ("<built-in default> ['request', 'task']" if not table else "<runtime> ['job']")
        assert lines[1] == "stdin: the program's input"
        assert proc.stderr.count("AllocPolicyWarning") == 1, proc.stderr
        assert f"{source}: top level: not a regular file" in proc.stderr


def test_bare_preload_enforces_the_policy_it_reports(allocpolicy_lib):
    # GIVEN only LD_PRELOAD, as `export LD_PRELOAD="$(allocpolicy lib)"` sets it
    code = textwrap.dedent(REPORT_POLICY) + textwrap.dedent("""
        try:
            with allocpolicy.task("request"):
                bytearray(300 << 20)
        except allocpolicy.AllocError as err:
            print("refused:", err.scope, err.reason, err.budget)
    """)
    proc = _bare_preload(allocpolicy_lib, code, env={})
    # THEN the built-in default policy is reported and enforced alike
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "<built-in default> ['request', 'task']",
        f"refused: request budget {256 << 20}",
    ]
    assert proc.stderr == ""


def test_bare_preload_with_a_policy_file_and_a_child_process(allocpolicy_lib, tmp_path):
    # GIVEN LD_PRELOAD and ALLOCPOLICY_POLICY set by hand (a container, a unit)
    policy = tmp_path / "service.toml"
    policy.write_text(textwrap.dedent(MODULES_POLICY))
    code = textwrap.dedent(REPORT_POLICY) + textwrap.dedent(USES_THE_JOB_SCOPE) + textwrap.dedent("""
        import subprocess, sys
        if len(sys.argv) == 1:  # and a child started by the service has it too
            sys.stdout.flush()
            subprocess.run([sys.executable, "-c", CODE, "child"], check=True)
    """)
    code = f"CODE = {code!r}\n" + code
    proc = _bare_preload(allocpolicy_lib, code, env={"ALLOCPOLICY_POLICY": str(policy)})
    assert proc.returncode == 0, proc.stderr
    once = [f"{policy} ['job']", "bound: True", f"refused: job {64 << 20}"]
    assert proc.stdout.splitlines() == once + once
    assert proc.stderr == ""


def test_unknown_scope_error_never_contradicts_itself(allocpolicy_lib, tmp_path):
    # GIVEN a runtime enforcing a table set by hand (scope `other`) and a policy
    # file in the environment that declares `request`, which the table does not
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\n[scopes.request]\nbudget = "1 MiB"\n')
    code = """
        import allocpolicy
        print(sorted(allocpolicy.active_policy().scopes))
        try:
            allocpolicy.task("request").__enter__()
        except allocpolicy.UnknownScopeError as err:
            print(err.known, err)
    """
    proc = _bare_preload(allocpolicy_lib, code, env={
        "ALLOCPOLICY_TABLE": "v=1;process=raise:0;scope=other:raise:0:0",
        "ALLOCPOLICY_POLICY": str(policy),
    })
    assert proc.returncode == 0, proc.stderr
    # THEN the policy reported is the one enforced, the error agrees with it,
    # and one warning says why the file was set aside
    assert proc.stdout.splitlines() == [
        "['other']",
        "['other'] scope 'request' is not declared in the active policy (declared scopes: other)",
    ]
    assert proc.stderr.count("AllocPolicyWarning") == 1, proc.stderr
    assert f"the policy {policy} (ALLOCPOLICY_POLICY) declares scopes that ALLOCPOLICY_TABLE does not (request)" in proc.stderr


def test_run_refuses_a_policy_too_large_to_hand_over(tmp_path):
    # The text goes through the environment, where one string has at most 128 KiB.
    policy = tmp_path / "p.toml"
    policy.write_text("version = 1\n" + "# padding\n" * 14000)
    proc = subprocess.run(
        [sys.executable, "-m", "allocpolicy", "run", "--policy", str(policy), "--", "true"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_clean_environment(),
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"allocpolicy: error: run: --policy {policy}: the policy is ")
    assert proc.stderr.endswith("bytes, more than the 128 KiB that the environment can hand to the command\n")


def test_bare_preload_with_a_policy_that_cannot_be_put_in_force(allocpolicy_lib, tmp_path):
    # GIVEN a valid policy whose percentage budget cannot be resolved on this
    # machine (one where neither a cgroup limit nor /proc/meminfo can be read)
    policy = tmp_path / "service.toml"
    policy.write_text('version = 1\n[process]\nbudget = "50%"\n[scopes.job]\nbudget = "1 MiB"\n')
    empty = tmp_path / "machine"
    empty.mkdir()
    env = {"ALLOCPOLICY_POLICY": str(policy), "ALLOCPOLICY_MACHINE_ROOT": str(empty)}
    proc = _bare_preload(allocpolicy_lib, REPORT_POLICY, env=env)
    # THEN the program starts under the built-in default, which it reports,
    # and one warning says why
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "<built-in default> ['request', 'task']\n"
    assert proc.stderr.count("AllocPolicyWarning") == 1, proc.stderr
    assert f"the policy {policy} could not be put in force; the built-in default policy applies instead" in proc.stderr
    assert "[process] key 'budget': cannot resolve 50%" in proc.stderr


def test_a_subinterpreter_starts_without_the_package(tmp_path):
    # GIVEN a program under the runtime that starts a subinterpreter (site
    # runs the startup line there too; the package and faulthandler cannot
    # load in an isolated one, and a second copy must not configure the runtime)
    module = "_interpreters" if sys.version_info >= (3, 13) else "_xxsubinterpreters"
    code = f"""
        import sys, {module} as interpreters
        assert "allocpolicy" in sys.modules
        iid = interpreters.create()
        interpreters.run_string(iid, "import sys; print('sub', 'allocpolicy' in sys.modules)")
        print("main", "allocpolicy" in sys.modules)
    """
    # WHEN it runs
    proc = run_python(code, None, tmp_path)
    # THEN the subinterpreter starts cleanly without the package, the main
    # interpreter keeps it, and nothing is written to standard error
    assert check(proc).split() == ["sub", "False", "main", "True"]
    assert proc.stderr == ""
