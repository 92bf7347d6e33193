"""`allocpolicy check` warns about budgets that cannot be meant; misspelled
scope names get a suggestion."""

from __future__ import annotations

import textwrap

import pytest

from allocpolicy import UnknownScopeError, load_policy
from allocpolicy._budget_checks import budget_warnings
from test_cli_check import run_cli, write

GiB = 1 << 30


def machine(tmp_path, *, cgroup_limit: int | None, mem_total: int = 24 * GiB) -> dict:
    """A fake /proc and /sys/fs/cgroup: this process in cgroup /svc."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text("0::/svc\n")
    (proc / "meminfo").write_text(f"MemTotal:       {mem_total // 1024} kB\n")
    cgroup = tmp_path / "cgroup" / "svc"
    cgroup.mkdir(parents=True)
    (cgroup / "memory.max").write_text(f"{cgroup_limit if cgroup_limit is not None else 'max'}\n")
    return {"proc_root": str(proc), "cgroup_root": str(tmp_path / "cgroup")}


def warnings_for(tmp_path, text: str, **roots) -> list[str]:
    return [str(p) for p in budget_warnings(load_policy(write(tmp_path, text)), **roots)]


def test_a_sensible_policy_gets_no_warning(tmp_path):
    assert warnings_for(tmp_path, """
        version = 1
        [process]
        budget = "2 GiB"
        [scopes.request]
        budget = "256 MiB"
        total_budget = "1 GiB"
        """, **machine(tmp_path, cgroup_limit=4 * GiB)) == []


def test_each_budget_that_cannot_be_meant_gets_one_line(tmp_path):
    path = str(tmp_path / "policy.toml")
    limit_file = tmp_path / "cgroup" / "svc" / "memory.max"
    found = warnings_for(tmp_path, """
        version = 1
        [process]
        budget = "2 GiB"
        [scopes.request]
        budget = "8 GiB"
        [scopes.batch]
        budget = "512 MiB"
        total_budget = "256 MiB"
        [scopes.export]
        budget = "3 GiB"
        """, **machine(tmp_path, cgroup_limit=4 * GiB))
    assert found == [
        f"{path}: [scopes.request] key 'budget': 8589934592 bytes (8 GiB) is more than this machine can "
        f"give the process: 4294967296 bytes (4 GiB) (cgroup limit in {limit_file}); the budget can never "
        "be reached",
        f"{path}: [scopes.batch] key 'total_budget': 268435456 bytes (256 MiB) is smaller than the scope's "
        "budget of 536870912 bytes (512 MiB): no instance can ever use its budget",
        f"{path}: [scopes.export] key 'budget': 3221225472 bytes (3 GiB) is above the process budget of "
        "2147483648 bytes (2 GiB): the process budget refuses first",
    ]


def test_a_process_budget_above_physical_memory(tmp_path):
    found = warnings_for(tmp_path, """
        version = 1
        [process]
        budget = "64 GiB"
        """, **machine(tmp_path, cgroup_limit=None, mem_total=24 * GiB))
    assert len(found) == 1
    assert "[process] key 'budget': 68719476736 bytes (64 GiB) is more than this machine can give" in found[0]
    assert "MemTotal" in found[0]


def test_check_prints_warnings_on_stderr_and_exits_0(tmp_path):
    path = write(tmp_path, """
        version = 1
        # Covers the known offenders, whose presence check would warn about too.
        include = ["openblas"]
        [scopes.request]
        budget = "1 PiB"
        total_budget = "1 MiB"
        """)
    proc = run_cli("check", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"policy: {path}")
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"allocpolicy: warning: {path}: [scopes.request] key 'budget': ")
    assert "is smaller than the scope's budget" in lines[1]


def test_unknown_scope_error_suggests_the_closest_declared_name():
    err = UnknownScopeError("reqeust", ["request", "task"])
    assert str(err) == (
        "scope 'reqeust' is not declared in the active policy (did you mean 'request'?) "
        "(declared scopes: request, task)"
    )
    assert str(UnknownScopeError("zzz", ["request"])) == (
        "scope 'zzz' is not declared in the active policy (declared scopes: request)"
    )


@pytest.mark.parametrize("args, usage", [
    (("check", "policy.toml", "extra"), "usage: allocpolicy check"),
    (("stats", "1", "2"), "usage: allocpolicy stats"),
    (("lib", "--bogus"), "usage: allocpolicy lib"),
])
def test_extra_arguments_get_the_usage_of_their_subcommand(args, usage):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith(usage), proc.stderr
    assert "unrecognized arguments" in proc.stderr


def test_libs_output_error_names_the_libs_option(tmp_path):
    proc = run_cli("libs", "-o", str(tmp_path / "missing" / "x"), "--", "true")
    assert proc.returncode == 2
    assert proc.stderr == f"allocpolicy: error: libs: --output {tmp_path / 'missing' / 'x'}: No such file or directory\n"


def test_a_misspelled_injection_scope_gets_a_suggestion(tmp_path):
    # in the policy's [inject] table, as `check` reports it
    path = write(tmp_path, 'version = 1\n[scopes.request]\n[inject]\nscope = "reqeust"\nnth = 1\n')
    proc = run_cli("check", str(path))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"allocpolicy: error: {path}: [inject] key 'scope': scope 'reqeust' is not declared in this "
        "policy (did you mean 'request'?) (declared scopes: request; 'process' stands for every allocation)\n"
    )
    # and in `run --inject`, before the command starts
    path.write_text("version = 1\n[scopes.request]\n")
    proc = run_cli("run", "--policy", str(path), "--inject", "scope=reqeust,nth=1", "--", "true")
    assert proc.returncode == 2
    assert proc.stderr == (
        "allocpolicy: error: run: injection setting 'scope=reqeust,nth=1': scope 'reqeust' is not "
        "declared in the policy (did you mean 'request'?) (declared scopes: request)\n"
    )
