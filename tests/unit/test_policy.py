"""The policy model: loading, every kind of mistake, compiling, percent budgets."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path

import pytest

from allocpolicy._errors import PolicyError, PolicyProblem
from allocpolicy._policy import (
    BUILTIN_SOURCE,
    ENV_POLICY,
    ENV_POLICY_TOML,
    ENV_TABLE,
    Policy,
    ProcessPolicy,
    ScopePolicy,
    default_policy,
    load_policy,
    memory_limit,
    policy_from_environment,
    policy_from_mapping,
    resolve_process_budget,
)
from allocpolicy._sizes import GiB, MiB, Percent


def write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[PolicyProblem]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return info.value.problems


def only_problem(path: Path) -> PolicyProblem:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


# --- valid policies --------------------------------------------------------------


def test_env_names():
    assert ENV_TABLE == "ALLOCPOLICY_TABLE"
    assert ENV_POLICY == "ALLOCPOLICY_POLICY"


def test_default_policy():
    policy = default_policy()
    assert policy.source == BUILTIN_SOURCE == "<built-in default>"
    assert policy.version == 1
    assert policy.process == ProcessPolicy(on_oom="raise", budget=None, grace=4 * MiB, report_fd=2)
    assert list(policy.scopes) == ["task", "request"]
    for name in ("task", "request"):
        assert policy.scopes[name] == ScopePolicy(name, on_oom="raise", budget=256 * MiB)
    assert policy.compile() == (
        "v=1;grace=4194304;fd=2;process=raise:0;scope=task:raise:268435456:0;scope=request:raise:268435456:0"
    )


def test_default_policy_file_is_shipped_and_commented():
    text = (Path(__file__).resolve().parents[2] / "allocpolicy" / "default_policy.toml").read_text()
    assert text.count("#") > 20  # it is the example users copy


def test_load_every_key(tmp_path):
    path = write(
        tmp_path,
        """
        version = 1

        [process]
        on_oom = "abort"
        budget = "8 GiB"
        grace = "1 MiB"
        report_fd = 5

        [scopes.request]
        on_oom = "raise"
        budget = "256 MiB"
        total_budget = "2GB"

        [scopes."image.decode"]
        on_oom = "fallible"
        budget = 1048576
        """,
    )
    policy = load_policy(path)
    assert policy.source == str(path)
    assert policy.process == ProcessPolicy(on_oom="abort", budget=8 * GiB, grace=MiB, report_fd=5)
    assert policy.scopes["request"] == ScopePolicy(
        "request", on_oom="raise", budget=256 * MiB, total_budget=2_000_000_000
    )
    assert policy.scopes["image.decode"] == ScopePolicy("image.decode", on_oom="fallible", budget=MiB)
    assert policy.compile() == (
        "v=1;grace=1048576;fd=5;process=abort:8589934592;"
        "scope=request:raise:268435456:2000000000;"
        "scope=image.decode:fallible:1048576:0"
    )


def test_minimal_file_gets_defaults(tmp_path):
    policy = load_policy(write(tmp_path, "version = 1\n"))
    assert policy.process == ProcessPolicy()
    assert dict(policy.scopes) == {}
    assert policy.compile() == "v=1;grace=4194304;fd=2;process=raise:0"


def test_total_budget_below_budget_is_allowed(tmp_path):
    policy = load_policy(
        write(tmp_path, 'version = 1\n[scopes.a]\nbudget = "1 GiB"\ntotal_budget = "1 MiB"\n')
    )
    assert policy.scopes["a"].total_budget == MiB


def test_compile_keeps_declaration_order(tmp_path):
    names = ["zeta", "alpha", "mid", "beta"]
    text = "version = 1\n" + "".join(f"[scopes.{n}]\n" for n in names)
    policy = load_policy(write(tmp_path, text))
    compiled = policy.compile()
    assert [entry.split(":")[0] for entry in compiled.split(";")[4:]] == [f"scope={n}" for n in names]
    assert policy.compile() == compiled


def test_policy_is_immutable_and_hashable(tmp_path):
    a = load_policy(write(tmp_path, 'version = 1\n[scopes.x]\nbudget = "1 MiB"\n'))
    b = load_policy(write(tmp_path, "version = 1\n[scopes.x]\nbudget = 1048576\n"))
    assert a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    with pytest.raises(TypeError):
        a.scopes["y"] = ScopePolicy("y")  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.source = "elsewhere"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        a.scopes._pairs = ()  # type: ignore[attr-defined]


def test_direct_construction_normalizes_and_checks():
    assert ScopePolicy("x", budget="1 MiB").budget == MiB  # type: ignore[arg-type]
    assert ProcessPolicy(budget="50%").budget == Percent(50)  # type: ignore[arg-type]
    policy = Policy(scopes={"x": ScopePolicy("x")})
    assert list(policy.scopes) == ["x"]
    assert Policy(scopes=[ScopePolicy("x")]) == policy  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'on_oom'"):
        ProcessPolicy(on_oom="explode")
    with pytest.raises(ValueError, match="reserved"):
        ScopePolicy("process")
    with pytest.raises(ValueError, match="'name'"):
        ScopePolicy("has space")
    with pytest.raises(ValueError, match="budget"):
        ScopePolicy("x", budget=-1)
    with pytest.raises(ValueError, match="holds a ScopePolicy named"):
        Policy(scopes={"x": ScopePolicy("y")})
    with pytest.raises(ValueError, match="version"):
        Policy(version=2)


# --- one mistake of each kind ----------------------------------------------------


def test_wrong_type(tmp_path):
    path = write(tmp_path, "version = 1\n[scopes.request]\nbudget = true\n")
    problem = only_problem(path)
    assert (problem.source, problem.table, problem.key) == (str(path), "scopes.request", "budget")
    assert "boolean" in problem.message and "expected" in problem.message


def test_float_budget_is_a_wrong_type(tmp_path):
    problem = only_problem(write(tmp_path, "version = 1\n[process]\nbudget = 1.5e9\n"))
    assert (problem.table, problem.key) == ("process", "budget")
    assert "float" in problem.message


def test_unknown_key_suggests(tmp_path):
    problem = only_problem(write(tmp_path, 'version = 1\n[scopes.request]\nbudgt = "1 MiB"\n'))
    assert (problem.table, problem.key) == ("scopes.request", "budgt")
    assert "did you mean 'budget'?" in problem.message
    assert "on_oom, budget, total_budget" in problem.message


def test_unknown_key_without_close_match_lists_allowed_keys(tmp_path):
    problem = only_problem(write(tmp_path, "version = 1\n[process]\nzzz = 1\n"))
    assert (problem.table, problem.key) == ("process", "zzz")
    assert "did you mean" not in problem.message
    assert "on_oom, budget, grace, report_fd" in problem.message


def test_unknown_top_level_table(tmp_path):
    problem = only_problem(write(tmp_path, "version = 1\n[scope.request]\nbudget = 1\n"))
    assert (problem.table, problem.key) == ("", "scope")
    assert "did you mean 'scopes'?" in problem.message


def test_scope_table_at_top_level_gets_a_hint(tmp_path):
    problem = only_problem(write(tmp_path, "version = 1\n[request]\nbudget = 1\n"))
    assert problem.key == "request"
    assert "[scopes.request]" in problem.message


def test_negative_budget(tmp_path):
    problem = only_problem(write(tmp_path, "version = 1\n[scopes.request]\nbudget = -5\n"))
    assert (problem.table, problem.key) == ("scopes.request", "budget")
    assert "negative" in problem.message


def test_zero_budget_is_refused_because_zero_means_no_limit(tmp_path):
    problem = only_problem(write(tmp_path, "version = 1\n[scopes.request]\ntotal_budget = 0\n"))
    assert problem.key == "total_budget"
    assert "greater than 0" in problem.message


def test_bad_size_string(tmp_path):
    problem = only_problem(write(tmp_path, 'version = 1\n[scopes.request]\nbudget = "256 MeB"\n'))
    assert (problem.table, problem.key) == ("scopes.request", "budget")
    assert "unknown unit 'MeB'" in problem.message
    assert "MiB" in problem.message


def test_percent_only_for_the_process_budget(tmp_path):
    assert load_policy(write(tmp_path, 'version = 1\n[process]\nbudget = "80%"\n')).process.budget == Percent(
        80
    )
    problem = only_problem(write(tmp_path, 'version = 1\n[scopes.a]\nbudget = "80%"\n'))
    assert (problem.table, problem.key) == ("scopes.a", "budget")
    assert "percentage is not allowed" in problem.message


def test_unknown_mode(tmp_path):
    problem = only_problem(write(tmp_path, 'version = 1\n[process]\non_oom = "abrot"\n'))
    assert (problem.table, problem.key) == ("process", "on_oom")
    assert "did you mean 'abort'?" in problem.message
    assert "'raise', 'abort', 'fallible'" in problem.message


def test_report_fd(tmp_path):
    problem = only_problem(write(tmp_path, "version = 1\n[process]\nreport_fd = -1\n"))
    assert (problem.table, problem.key) == ("process", "report_fd")
    problem = only_problem(write(tmp_path, 'version = 1\n[process]\nreport_fd = "2"\n'))
    assert "integer" in problem.message


def test_syntax_error_reports_line_and_column(tmp_path):
    path = write(tmp_path, "version = 1\n\n[scopes.request]\nbudget = 256 MiB\n")
    problem = only_problem(path)
    assert problem.source == str(path)
    assert problem.table == "scopes.request"
    assert "line 4, column" in problem.message
    assert "budget = 256 MiB" in problem.message


def test_duplicate_key_is_a_syntax_error(tmp_path):
    problem = only_problem(write(tmp_path, "version = 1\nversion = 1\n"))
    assert "line 2" in problem.message


def test_missing_version(tmp_path):
    problem = only_problem(write(tmp_path, '[process]\non_oom = "raise"\n'))
    assert (problem.table, problem.key) == ("", "version")
    assert "version = 1" in problem.message


@pytest.mark.parametrize(
    "value, words", [("2", "unsupported version 2"), ('"1"', "integer"), ("true", "integer")]
)
def test_unsupported_version(tmp_path, value, words):
    problem = only_problem(write(tmp_path, f"version = {value}\n"))
    assert problem.key == "version"
    assert words in problem.message


def test_unreadable_file(tmp_path):
    missing = tmp_path / "nope.toml"
    problem = only_problem(missing)
    assert problem.source == str(missing)
    assert "cannot read" in problem.message and "No such file" in problem.message
    assert "cannot read" in only_problem(tmp_path).message  # a directory


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"version = 1\n# caf\xe9\n")
    assert "UTF-8" in only_problem(path).message


def test_scope_names(tmp_path):
    path = write(
        tmp_path,
        """
        version = 1
        [scopes.process]
        [scopes."has space"]
        [scopes."9lives"]
        [scopes.ok_name-1]
        """,
    )
    problems = problems_of(path)
    assert [(p.table, p.key) for p in problems] == [
        ("scopes", "process"),
        ("scopes", "has space"),
        ("scopes", "9lives"),
    ]
    assert "reserved" in problems[0].message


def test_scope_must_be_a_table(tmp_path):
    problem = only_problem(write(tmp_path, "version = 1\n[scopes]\nrequest = 5\n"))
    assert (problem.table, problem.key) == ("scopes", "request")
    assert "expected a table" in problem.message


def test_process_must_be_a_table(tmp_path):
    problem = only_problem(write(tmp_path, 'version = 1\nprocess = "raise"\n'))
    assert (problem.table, problem.key) == ("", "process")


def test_every_mistake_is_reported_once(tmp_path):
    path = write(
        tmp_path,
        """
        [process]
        on_oom = "rasie"
        budget = "-1 GiB"
        grace = true

        [scopes.request]
        budgt = "256 MiB"
        total_budget = "lots"

        [scopes.task]
        on_oom = 3
        budget = "1 XB"
        """,
    )
    problems = problems_of(path)
    where = [(p.table, p.key) for p in problems]
    assert where == [
        ("", "version"),
        ("process", "on_oom"),
        ("process", "budget"),
        ("process", "grace"),
        ("scopes.request", "budgt"),
        ("scopes.request", "total_budget"),
        ("scopes.task", "on_oom"),
        ("scopes.task", "budget"),
    ]
    assert all(p.source == str(path) for p in problems)
    # The string form names file, table and key: what `allocpolicy check` prints.
    lines = str(PolicyError(problems)).splitlines()
    assert len(lines) == len(problems)
    assert lines[4].startswith(f"{path}: [scopes.request] key 'budgt': ")


def test_policy_error_is_a_value_error(tmp_path):
    with pytest.raises(ValueError):
        load_policy(tmp_path / "missing.toml")


# --- mappings (configure) ---------------------------------------------------------------


def test_policy_from_mapping():
    policy = policy_from_mapping({"version": 1, "scopes": {"job": {"budget": "1 GiB", "on_oom": "abort"}}})
    assert policy.source == "<configure>"
    assert policy.scopes["job"] == ScopePolicy("job", on_oom="abort", budget=GiB)


def test_policy_from_mapping_validates_the_same_way():
    with pytest.raises(PolicyError) as info:
        policy_from_mapping({"scopes": {"job": {"budgt": 1, "on_oom": "nope"}}}, source="<test>")
    assert [(p.source, p.table, p.key) for p in info.value.problems] == [
        ("<test>", "", "version"),
        ("<test>", "scopes.job", "budgt"),
        ("<test>", "scopes.job", "on_oom"),
    ]
    with pytest.raises(PolicyError):
        policy_from_mapping(["not", "a", "mapping"])  # type: ignore[arg-type]


def test_policy_from_mapping_version_optional_on_request():
    policy = policy_from_mapping({"process": {"budget": Percent(50)}}, require_version=False)
    assert policy.process.budget == Percent(50)


# --- environment ---------------------------------------------------------------------


def test_policy_from_environment(tmp_path):
    path = write(tmp_path, 'version = 1\n[scopes.env_scope]\nbudget = "1 MiB"\n')
    assert policy_from_environment({}) is None
    assert policy_from_environment({ENV_POLICY: BUILTIN_SOURCE}) == default_policy()
    assert list(policy_from_environment({ENV_POLICY: str(path)}).scopes) == ["env_scope"]
    # A file named and missing is a mistake to report, not a reason to run unbounded.
    with pytest.raises(PolicyError) as info:
        policy_from_environment({ENV_POLICY: str(tmp_path / "gone.toml")})
    assert str(info.value.problems[0]) == (
        f"{tmp_path / 'gone.toml'}: top level: cannot read the policy file: No such file or directory"
    )


def test_policy_from_environment_prefers_the_text_run_handed_over(tmp_path):
    # The file may have changed (or been a pipe): the text is what was compiled.
    path = write(tmp_path, 'version = 1\n[scopes.now]\n')
    text = 'version = 1\n[scopes.then]\nbudget = "1 MiB"\n'
    policy = policy_from_environment({ENV_POLICY: str(path), ENV_POLICY_TOML: text})
    assert policy.source == str(path)
    assert list(policy.scopes) == ["then"]


def test_policy_from_environment_reads_no_special_file(tmp_path):
    fifo = tmp_path / "policy.fifo"
    os.mkfifo(fifo)  # nobody writes: an open for reading would block
    for source in (str(fifo), "/dev/zero", str(tmp_path)):
        with pytest.raises(PolicyError) as info:
            policy_from_environment({ENV_POLICY: source})
        assert "not a regular file" in str(info.value), source


def test_policy_from_environment_reads_os_environ(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_POLICY, BUILTIN_SOURCE)
    assert policy_from_environment() is default_policy()
    monkeypatch.delenv(ENV_POLICY)
    assert policy_from_environment() is None


# --- percent budgets -------------------------------------------------------------------


def fake_system(
    tmp_path: Path,
    *,
    cgroup_lines: str = "0::/app.slice/worker\n",
    limits: dict[str, str] | None = None,
    mem_total_kb: int | None = 16 * 1024 * 1024,
) -> dict[str, str]:
    """A /proc and /sys/fs/cgroup look-alike; returns the roots to pass in."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup_lines)
    if mem_total_kb is not None:
        (proc / "meminfo").write_text(f"MemTotal:       {mem_total_kb} kB\nMemFree:        1000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    for rel, value in (limits or {}).items():
        file = cgroup / rel
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(value + "\n")
    return {"proc_root": str(proc), "cgroup_root": str(cgroup)}


def test_percent_of_cgroup_v2_limit(tmp_path):
    roots = fake_system(tmp_path, limits={"app.slice/worker/memory.max": str(4 * GiB)})
    assert memory_limit(**roots)[0] == 4 * GiB
    assert "app.slice/worker/memory.max" in memory_limit(**roots)[1]
    assert resolve_process_budget(Percent(50), **roots) == 2 * GiB
    assert resolve_process_budget(Percent(12.5), **roots) == GiB // 2


def test_percent_uses_the_lowest_ancestor_limit(tmp_path):
    roots = fake_system(
        tmp_path,
        limits={"app.slice/memory.max": str(2 * GiB), "app.slice/worker/memory.max": "max"},
    )
    assert resolve_process_budget(Percent(50), **roots) == GiB


def test_percent_falls_back_to_mem_total(tmp_path):
    roots = fake_system(tmp_path, limits={"app.slice/worker/memory.max": "max"}, mem_total_kb=8 * 1024 * 1024)
    total, basis = memory_limit(**roots)
    assert total == 8 * GiB and "MemTotal" in basis
    assert resolve_process_budget(Percent(25), **roots) == 2 * GiB


def test_percent_never_exceeds_physical_memory(tmp_path):
    roots = fake_system(
        tmp_path, limits={"app.slice/worker/memory.max": str(64 * GiB)}, mem_total_kb=8 * 1024 * 1024
    )
    assert resolve_process_budget(Percent(50), **roots) == 4 * GiB


def test_percent_with_cgroup_v1(tmp_path):
    roots = fake_system(
        tmp_path,
        cgroup_lines="4:memory:/docker/abc\n1:cpu:/\n0::/\n",
        limits={"memory/docker/abc/memory.limit_in_bytes": str(GiB)},
    )
    assert resolve_process_budget(Percent(50), **roots) == GiB // 2


def test_cgroup_v1_unlimited_is_ignored(tmp_path):
    roots = fake_system(
        tmp_path,
        cgroup_lines="4:memory:/\n",
        limits={"memory/memory.limit_in_bytes": "9223372036854771712"},
        mem_total_kb=1024 * 1024,
    )
    assert resolve_process_budget(Percent(50), **roots) == GiB // 2


def test_absolute_budgets_need_no_resolution(tmp_path):
    roots = {"proc_root": str(tmp_path / "none"), "cgroup_root": str(tmp_path / "none")}
    assert resolve_process_budget(None, **roots) is None
    assert resolve_process_budget(123, **roots) == 123


def test_unresolvable_percent(tmp_path):
    roots = {"proc_root": str(tmp_path / "none"), "cgroup_root": str(tmp_path / "none")}
    with pytest.raises(OSError):
        resolve_process_budget(Percent(50), **roots)
    policy = Policy(process=ProcessPolicy(budget=Percent(50)), source="p.toml")
    with pytest.raises(PolicyError) as info:
        policy.compile(**roots)
    [problem] = info.value.problems
    assert (problem.source, problem.table, problem.key) == ("p.toml", "process", "budget")
    assert "cannot resolve here" in policy.describe(**roots)


def test_compile_resolves_percent(tmp_path):
    roots = fake_system(tmp_path, limits={"app.slice/worker/memory.max": str(4 * GiB)})
    policy = Policy(process=ProcessPolicy(on_oom="abort", budget=Percent(75)))
    assert policy.compile(**roots) == f"v=1;grace={4 * MiB};fd=2;process=abort:{3 * GiB}"


# --- describe ------------------------------------------------------------------------------


def test_describe_shows_every_scope_and_key(tmp_path):
    roots = fake_system(tmp_path, limits={"app.slice/worker/memory.max": str(4 * GiB)})
    path = write(
        tmp_path,
        """
        version = 1
        [process]
        budget = "50%"
        [scopes.request]
        budget = "256 MiB"
        [scopes.batch]
        on_oom = "fallible"
        total_budget = "1 GiB"
        """,
    )
    text = load_policy(path).describe(**roots)
    assert str(path) in text
    for header in ("[process]", "[scopes.request]", "[scopes.batch]"):
        assert header in text
    for key in ("on_oom", "budget", "grace", "report_fd", "total_budget"):
        assert key in text
    assert "268435456 bytes (256 MiB)" in text
    assert "1073741824 bytes (1 GiB)" in text
    # The percent budget with what it means here.
    assert "50%" in text and f"{2 * GiB} bytes (2 GiB)" in text
    assert "fallible" in text
    assert "none (no limit)" in text


def test_describe_quotes_dotted_scope_names():
    policy = Policy(scopes=[ScopePolicy("image.decode")])  # type: ignore[arg-type]
    assert '[scopes."image.decode"]' in policy.describe()


def test_policy_from_mapping_none_means_not_set_for_optional_keys():
    policy = policy_from_mapping(
        {"version": 1, "process": {"budget": None}, "scopes": {"a": {"budget": None}}}
    )
    assert policy.process.budget is None and policy.scopes["a"].budget is None
    with pytest.raises(PolicyError) as info:
        policy_from_mapping({"version": 1, "process": {"on_oom": None}})
    assert [(p.table, p.key) for p in info.value.problems] == [("process", "on_oom")]


def test_forbid_options_without_forbid_are_mistakes():
    from allocpolicy._errors import PolicyError
    from allocpolicy._policy import policy_from_mapping

    with pytest.raises(PolicyError) as info:
        policy_from_mapping({"version": 1, "scopes": {"s": {"on_violation": "warn", "frees": True}}})
    assert [(p.table, p.key) for p in info.value.problems] == [("scopes.s", "on_violation"), ("scopes.s", "frees")]
    assert all("without `forbid = true`" in p.message for p in info.value.problems)
