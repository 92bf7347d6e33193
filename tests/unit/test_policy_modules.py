"""The ``modules`` key of [scopes.NAME]: patterns, their mistakes, conflicts between scopes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from allocpolicy._errors import PolicyError, PolicyProblem
from allocpolicy._policy import (
    Policy,
    ScopePolicy,
    load_policy,
    module_patterns_overlap,
    policy_from_mapping,
)
from allocpolicy._sizes import MiB


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[PolicyProblem]:
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    return info.value.problems


def test_modules_are_loaded_as_a_tuple_in_order(tmp_path):
    policy = load_policy(
        write(
            tmp_path,
            """
            version = 1
            [scopes.images]
            budget = "256 MiB"
            modules = ["PIL.*", "myapp.thumbnails", "PIL.*"]
            """,
        )
    )
    sc = policy.scopes["images"]
    # A repeated pattern is harmless and kept once.
    assert sc.modules == ("PIL.*", "myapp.thumbnails")
    assert sc == ScopePolicy("images", budget=256 * MiB, modules=("PIL.*", "myapp.thumbnails"))


def test_scopes_without_modules_bind_nothing():
    assert ScopePolicy("request").modules == ()
    policy = policy_from_mapping({"version": 1, "scopes": {"request": {}}})
    assert policy.scopes["request"].modules == ()


def test_binding_lives_on_the_python_side_only():
    # The native table has no notion of modules: the compiled form is the same.
    bound = policy_from_mapping({"version": 1, "scopes": {"images": {"budget": 1024, "modules": ["PIL.*"]}}})
    plain = policy_from_mapping({"version": 1, "scopes": {"images": {"budget": 1024}}})
    assert bound.compile() == plain.compile()
    assert bound != plain


def test_direct_construction_normalizes_and_validates():
    assert ScopePolicy("images", modules=["PIL.*"]).modules == ("PIL.*",)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ScopePolicy\(\): argument 'modules': 'PI\*L'"):
        ScopePolicy("images", modules=("PI*L",))


@pytest.mark.parametrize(
    "value, message",
    [
        ('"PIL.*"', "expected an array of module names such as"),
        ("3", "expected an array of module names such as"),
        ("[3]", "expected a module name, got an integer (3)"),
        ('[""]', "an empty string is not a module name"),
        ('["PIL*"]', "'*' must stand for a whole name segment: 'PIL*' mixes it with letters"),
        ('["PIL.Im*"]', "'*' must stand for a whole name segment"),
        ('["PIL..Image"]', "empty name segment"),
        ('[".PIL"]', "empty name segment"),
        ('["PIL."]', "empty name segment"),
        ('["9lives"]', "'9lives' is not a valid module name segment"),
        ('["my-app"]', "'my-app' is not a valid module name segment"),
        ('["*"]', "would bind every module"),
        ('["*.*"]', "would bind every module"),
        ('["allocpolicy._scope"]', "allocpolicy's own modules cannot be bound"),
    ],
)
def test_bad_modules_name_the_file_table_and_key(tmp_path, value, message):
    path = write(tmp_path, f"version = 1\n[scopes.images]\nmodules = {value}\n")
    problems = problems_of(path)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert (problem.source, problem.table, problem.key) == (str(path), "scopes.images", "modules")
    assert message in problem.message


def test_every_bad_pattern_of_a_list_is_reported_at_once(tmp_path):
    path = write(tmp_path, 'version = 1\n[scopes.images]\nmodules = ["PIL.*", "a b", "x*", "ok.name"]\n')
    (problem,) = problems_of(path)
    assert "'a b'" in problem.message and "'x*'" in problem.message
    assert "'PIL.*'" not in problem.message and "ok.name" not in problem.message


def test_a_module_claimed_by_two_scopes_names_both(tmp_path):
    path = write(
        tmp_path,
        """
        version = 1
        [scopes.images]
        modules = ["PIL.*"]
        [scopes.thumbs]
        modules = ["myapp.thumbnails", "PIL.Image"]
        """,
    )
    (problem,) = problems_of(path)
    assert (problem.table, problem.key) == ("scopes.thumbs", "modules")
    assert "'PIL.Image' and 'PIL.*' of scope 'images'" in problem.message
    assert "claimed by scopes 'images' and 'thumbs'" in problem.message
    assert "such as 'PIL.Image'" in problem.message


def test_the_same_pattern_in_two_scopes_is_a_conflict(tmp_path):
    path = write(
        tmp_path,
        'version = 1\n[scopes.a]\nmodules = ["x.y"]\n[scopes.b]\nmodules = ["x.y"]\n[scopes.c]\nmodules = ["x.z"]\n',
    )
    (problem,) = problems_of(path)
    assert problem.table == "scopes.b"
    assert "scopes 'a' and 'b'" in problem.message


def test_conflicts_are_reported_with_other_mistakes(tmp_path):
    path = write(
        tmp_path,
        'version = 1\n[scopes.a]\nmodules = ["x.*"]\nbudget = -1\n[scopes.b]\nmodules = ["*.y"]\n',
    )
    problems = problems_of(path)
    assert [(p.table, p.key) for p in problems] == [("scopes.a", "budget"), ("scopes.b", "modules")]
    assert "such as 'x.y'" in problems[1].message


def test_policy_built_directly_refuses_conflicts():
    with pytest.raises(ValueError, match="claimed by scopes 'a' and 'b'"):
        Policy(scopes=[ScopePolicy("a", modules=("pkg.*",)), ScopePolicy("b", modules=("pkg.sub.deep",))])


def test_disjoint_patterns_in_two_scopes_are_fine():
    policy = Policy(
        scopes=[
            ScopePolicy("a", modules=("PIL.*",)),
            ScopePolicy("b", modules=("PIL",)),  # the package itself is not under "PIL.*"
            ScopePolicy("c", modules=("myapp.*.thumbnails",)),
            ScopePolicy("d", modules=("myapp.thumbnails",)),
        ]
    )
    assert [sc.modules for sc in policy.scopes.values()] == [
        ("PIL.*",),
        ("PIL",),
        ("myapp.*.thumbnails",),
        ("myapp.thumbnails",),
    ]


@pytest.mark.parametrize(
    "a, b, witness",
    [
        ("PIL.*", "PIL.Image", "PIL.Image"),
        ("PIL.*", "PIL.Image.sub", "PIL.Image.sub"),
        ("PIL.*", "PIL", None),  # "*" at the end stands for one or more segments
        ("a.*", "*.b", "a.b"),
        ("a.*.c", "a.b.*", "a.b.c"),
        ("a.*.c", "a.b", None),  # a "*" inside stands for exactly one segment
        ("a.*.c", "a.b.c.d", None),
        ("a.*", "a.*.c", "a.mod.c"),
        ("a.b", "a.b", "a.b"),
        ("a.b", "a.c", None),
        ("x.*", "y.*", None),
    ],
)
def test_pattern_overlap(a, b, witness):
    assert module_patterns_overlap(a, b) == witness
    assert module_patterns_overlap(b, a) == witness


def test_describe_shows_the_modules_of_a_scope():
    policy = policy_from_mapping(
        {"version": 1, "scopes": {"images": {"modules": ["PIL.*", "myapp.thumbnails"]}, "request": {}}}
    )
    text = policy.describe()
    images = text.split("[scopes.images]")[1].split("[scopes.request]")[0]
    assert '  modules      = ["PIL.*", "myapp.thumbnails"]  (code of these modules' in images
    # A scope without modules shows no such row: nothing is bound to it.
    assert "modules" not in text.split("[scopes.request]")[1]
