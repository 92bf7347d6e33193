"""The ``libraries`` key of [scopes.NAME] and ``raise_only_from`` ([process] and
per scope): patterns, their mistakes, conflicts, the compiled table, describe."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from allocpolicy._errors import PolicyError, PolicyProblem
from allocpolicy._policy import (
    NULL_CHECKING_DEFAULT,
    Policy,
    ProcessPolicy,
    ScopePolicy,
    load_policy,
    policy_from_mapping,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[PolicyProblem]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return info.value.problems


def test_libraries_load_as_a_tuple_and_compile_to_lib_options(tmp_path):
    policy = load_policy(write(tmp_path, """
        version = 1
        [scopes.zlib]
        budget = 65536
        libraries = ["libz.so*", "libpng16.so.?", "libz.so*"]
    """))
    assert policy.scopes["zlib"].libraries == ("libz.so*", "libpng16.so.?")
    assert policy.compile().endswith(";scope=zlib:raise:65536:0:lib=libz.so*:lib=libpng16.so.?")
    assert ScopePolicy("x").libraries == ()
    assert ScopePolicy("x").raise_only_from is None


@pytest.mark.parametrize(
    "value, message",
    [
        ('"libz.so*"', "expected an array of shared object file name patterns"),
        ("[3]", "expected a file name pattern, got an integer (3)"),
        ('[""]', "an empty string is not a file name pattern"),
        ('["/usr/lib/libz.so.1"]', "patterns match the file name only"),
        ('["lib z.so"]', "only letters, digits and"),
        ('["*"]', "would match every shared object"),
        ('["*?*"]', "would match every shared object"),
        (f'["{"a" * 64}"]', "longer than 63 characters"),
    ],
)
def test_bad_libraries_name_the_file_table_and_key(tmp_path, value, message):
    path = write(tmp_path, f"version = 1\n[scopes.zlib]\nlibraries = {value}\n")
    (problem,) = problems_of(path)
    assert (problem.source, problem.table, problem.key) == (str(path), "scopes.zlib", "libraries")
    assert message in problem.message


def test_a_pattern_claimed_by_two_scopes_is_an_error(tmp_path):
    path = write(tmp_path, """
        version = 1
        [scopes.a]
        libraries = ["libz.so*"]
        [scopes.b]
        libraries = ["libpng*", "libz.so*"]
    """)
    (problem,) = problems_of(path)
    assert (problem.table, problem.key) == ("scopes.b", "libraries")
    assert "'libz.so*' is bound to scope 'a' already" in problem.message
    with pytest.raises(ValueError, match="libraries: 'libz.so\\*' is bound to scope 'a'"):
        Policy(scopes=[ScopePolicy("a", libraries=("libz.so*",)), ScopePolicy("b", libraries=("libz.so*",))])


def test_forbid_scopes_cannot_bind_libraries(tmp_path):
    path = write(tmp_path, 'version = 1\n[scopes.a]\nforbid = true\nlibraries = ["libz.so*"]\n')
    (problem,) = problems_of(path)
    assert (problem.table, problem.key) == ("scopes.a", "libraries")
    assert "forbid scope cannot be bound to libraries" in problem.message


def test_raise_only_from_compiles_with_the_null_checking_defaults():
    policy = policy_from_mapping({
        "version": 1,
        "process": {"raise_only_from": ["libfoo.so*"]},
        "scopes": {"a": {"raise_only_from": []}, "b": {}},
    })
    table = policy.compile()
    defaults = "".join(f":raise_only={p}" for p in NULL_CHECKING_DEFAULT)
    assert f"process=raise:0{defaults}:raise_only=libfoo.so*;" in table
    assert f"scope=a:raise:0:0{defaults};" in table
    assert table.endswith("scope=b:raise:0:0")
    # Unset, nothing is compiled: every caller gets NULL in raise mode.
    assert ":raise_only=" not in Policy().compile()
    assert "python*" in NULL_CHECKING_DEFAULT and "libpython*" in NULL_CHECKING_DEFAULT


def test_bad_raise_only_from_names_the_table_and_key(tmp_path):
    path = write(tmp_path, 'version = 1\n[process]\nraise_only_from = "libz"\n')
    (problem,) = problems_of(path)
    assert (problem.table, problem.key) == ("process", "raise_only_from")
    with pytest.raises(ValueError, match="ProcessPolicy\\(\\): argument 'raise_only_from'"):
        ProcessPolicy(raise_only_from=("a/b",))


def test_describe_shows_libraries_and_raise_only_from():
    policy = policy_from_mapping({
        "version": 1,
        "process": {"raise_only_from": ["libfoo.so*"]},
        "scopes": {"zlib": {"libraries": ["libz.so*"], "raise_only_from": ["libz.so*"]}},
    })
    text = policy.describe()
    assert 'libraries    = ["libz.so*"]' in text
    assert 'raise_only_from = ["libfoo.so*"]  (in raise mode only these and "python*"' in text
    assert text.count("raise_only_from") == 2
    assert "raise_only_from = not set" in Policy().describe()
