"""``include = [...]`` in a policy: the fragments for libraries that do not
check for NULL (the known-offenders table), their mistakes, and which
offenders a policy leaves uncovered."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from allocpolicy._errors import PolicyError
from allocpolicy._offenders import KNOWN_OFFENDERS, FRAGMENTS, advice, uncovered
from allocpolicy._policy import load_policy


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_include_adds_the_offender_as_a_fallible_library_scope(tmp_path):
    policy = load_policy(write(tmp_path, """
        version = 1
        include = ["openblas"]
        [scopes.request]
        budget = "64 MiB"
    """))
    assert list(policy.scopes) == ["request", "openblas"]
    blas = policy.scopes["openblas"]
    assert blas.on_oom == "fallible"
    assert blas.libraries == FRAGMENTS["openblas"].patterns
    assert "scope=openblas:fallible:0:0" in policy.compile()
    assert uncovered(policy.scopes) == []


def test_a_policy_without_the_fragment_leaves_openblas_uncovered(tmp_path):
    policy = load_policy(write(tmp_path, """
        version = 1
        [scopes.request]
        budget = "64 MiB"
    """))
    assert [o.fragment for o in uncovered(policy.scopes)] == ["openblas"]


def test_binding_openblas_to_a_raise_scope_does_not_cover_it(tmp_path):
    policy = load_policy(write(tmp_path, """
        version = 1
        [scopes.blas]
        budget = "64 MiB"
        libraries = ["libopenblas*.so*", "libscipy_openblas*.so*"]
    """))
    assert [o.fragment for o in uncovered(policy.scopes)] == ["openblas"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["openblass"]', "unknown fragment 'openblas' (did you mean"),
        ('"openblas"', "expected an array of fragment names, got a string"),
        ("[1]", "expected an array of fragment names"),
    ],
)
def test_include_mistakes_name_the_key(tmp_path, value, message):
    path = write(tmp_path, f"version = 1\ninclude = {value}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    (problem,) = info.value.problems
    assert (problem.source, problem.table, problem.key) == (str(path), "", "include")
    assert message.replace("'openblas' (did", "'openblass' (did") in problem.message


def test_a_fragment_scope_declared_already_is_a_mistake(tmp_path):
    path = write(tmp_path, """
        version = 1
        include = ["openblas"]
        [scopes.openblas]
        budget = "1 MiB"
    """)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    (problem,) = info.value.problems
    assert problem.key == "include" and "declares the scope 'openblas', which is declared already" in problem.message


def test_every_offender_has_a_fragment_and_advice_names_it():
    for o in KNOWN_OFFENDERS:
        assert FRAGMENTS[o.fragment] is o and o.patterns
        assert f'include = ["{o.fragment}"]' in advice(o, "libx.so")


def test_check_warns_about_an_offender_present_and_uncovered(tmp_path):
    from allocpolicy._offenders import found_in_environment
    from test_cli_check import run_cli

    present = found_in_environment(KNOWN_OFFENDERS)
    if not present:
        pytest.skip("no known offender (OpenBLAS) in this environment")
    bare = run_cli("check", str(write(tmp_path, 'version = 1\n[scopes.request]\nbudget = "64 MiB"\n')))
    assert bare.returncode == 0, bare.stderr
    (offender, path), *_ = present
    assert f"warning: {offender.name} ({path}) {offender.on_null}" in bare.stderr
    assert f'include = ["{offender.fragment}"]' in bare.stderr
    covered = run_cli("check", str(write(tmp_path, 'version = 1\ninclude = ["openblas"]\n')))
    assert covered.returncode == 0 and covered.stderr == "", covered.stderr
