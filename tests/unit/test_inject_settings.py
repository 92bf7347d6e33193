"""Injection settings without the runtime: the keys, their checks, the
ALLOCPOLICY_INJECT form, the policy's [inject] table and its compiled entry."""

from __future__ import annotations

import pickle

import pytest

import allocpolicy
from allocpolicy._inject_settings import InjectSettings
from allocpolicy._policy import Policy, ScopePolicy, policy_from_mapping


def test_string_form_round_trips_and_is_canonical():
    text = "nth=17,scope=task,domains=py_mem+libc,persistent,max_size=4 KiB"
    s = InjectSettings.from_string(text)
    assert (s.scope, s.nth, s.domains, s.persistent, s.max_size) == ("task", 17, ("libc", "py_mem"), True, 4096)
    # Written back in one fixed order, sizes in bytes: printing is stable.
    assert str(s) == "scope=task,nth=17,max_size=4096,domains=libc+py_mem,persistent"
    assert InjectSettings.from_string(str(s)) == s
    assert hash(InjectSettings.from_string(str(s))) == hash(s)
    assert pickle.loads(pickle.dumps(s)) == s


def test_probability_without_seed_draws_one_and_keeps_it():
    a = InjectSettings(probability=0.25)
    assert a.seed is not None
    # The printed form carries the seed: it replays the same run.
    again = InjectSettings.from_string(str(a))
    assert (again.probability, again.seed) == (0.25, a.seed)
    assert InjectSettings(probability="2.5%").probability == pytest.approx(0.025)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nth=0", "key 'nth': expected an allocation index from 1 to 2**62 - 1, got 0"),
        ("nth=x", "key 'nth': expected an allocation index"),
        ("start=9,stop=3", "key 'stop': the window [start, stop) is empty"),
        ("probability=1.5", "key 'probability': expected a probability greater than 0 and at most 1"),
        ("seed=4", "key 'seed': a seed only matters with a probability"),
        ("min_size=2K,max_size=1K", "key 'max_size': max_size (1024) is smaller than min_size (2048)"),
        ("domains=libc+gpu", "key 'domains': unknown allocator domain 'gpu'"),
        ("nht=3", "unknown key 'nht'"),
        ("nth=3,nth=4", "key 'nth' is given twice"),
        ("nth", "key 'nth' needs a value"),
        ("scope=a b", "key 'scope': invalid scope name 'a b'"),
    ],
)
def test_mistakes_name_the_key(text, message):
    with pytest.raises(ValueError) as info:
        InjectSettings.from_string(text)
    assert message in str(info.value)


def test_api_mistakes_name_the_argument():
    with pytest.raises(ValueError, match="inject\\(\\): argument 'every'"):
        InjectSettings(every=-1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nht'"):
        allocpolicy.inject(nht=3)
    with pytest.raises(TypeError, match="either a setting or keyword arguments"):
        allocpolicy.inject("nth=3", every=2)


def test_replay_keeps_the_filters_and_fails_one_index():
    s = InjectSettings.from_string("scope=task,probability=0.01,seed=9,min_size=64,domains=libc")
    assert str(s.replay(417)) == "scope=task,nth=417,min_size=64,domains=libc"
    err = allocpolicy.AllocError(scope="task", size=80, budget=None, live=0, reason="injected", index=417)
    assert allocpolicy.replay_setting(err, settings=s) == "scope=task,nth=417,min_size=64,domains=libc"
    budget = allocpolicy.AllocError(scope="task", size=80, budget=10, live=0, reason="budget")
    with pytest.raises(ValueError, match="not injected"):
        allocpolicy.replay_setting(budget, settings=s)


def test_table_entry_matches_the_native_grammar():
    s = InjectSettings.from_string("scope=task,start=5,every=3,probability=0.5,seed=11,domains=libc,persistent")
    assert s.to_table() == "inject=scope=task,every=3,start=5,stop=4611686018427387904,p=2147483648,seed=11,domains=1,persist=1"
    assert InjectSettings(scope="task").to_table() == "inject=scope=task"
    assert InjectSettings().to_table() == "inject=nth=0"


def test_policy_inject_table_is_validated_compiled_and_described():
    policy = policy_from_mapping(
        {
            "version": 1,
            "scopes": {"task": {"budget": "1 MiB"}},
            "inject": {"scope": "task", "probability": 0.01, "min_size": "1 KiB"},
        }
    )
    # A file's probability has a fixed default seed: every process that reads
    # the file must agree on it.
    assert policy.inject == InjectSettings(scope="task", probability=0.01, seed=0, min_size=1024)
    assert policy.compile().endswith(";scope=task:raise:1048576:0;inject=scope=task,min=1024,p=42949673,seed=0")
    text = policy.describe()
    assert "[inject]" in text
    assert "setting     = scope=task,probability=0.01,seed=0,min_size=1024  (as ALLOCPOLICY_INJECT takes it)" in text


def test_policy_inject_mistakes_name_table_and_key():
    with pytest.raises(allocpolicy.PolicyError) as info:
        policy_from_mapping({"version": 1, "inject": {"scope": "nope", "nth": 0, "every": "x", "flaky": 1}})
    problems = {(p.table, p.key): p.message for p in info.value.problems}
    assert set(problems) == {("inject", "scope"), ("inject", "nth"), ("inject", "every"), ("inject", "flaky")}
    assert "scope 'nope' is not declared in this policy" in problems[("inject", "scope")]
    assert "unknown key 'flaky'" in problems[("inject", "flaky")]
    with pytest.raises(allocpolicy.PolicyError, match=r"\[inject\]"):
        policy_from_mapping({"version": 1, "inject": 3})


def test_policy_built_directly_checks_the_injection_scope():
    with pytest.raises(ValueError, match="argument 'inject': scope 'x' is not declared"):
        Policy(inject=InjectSettings(scope="x", nth=1))
    ok = Policy(scopes=[ScopePolicy("x")], inject=InjectSettings(scope="x", nth=1))
    assert ok.compile().endswith(";inject=scope=x,nth=1")
    assert Policy(inject=InjectSettings(scope="process", every=2)).compile().endswith(";inject=scope=process,every=2")
