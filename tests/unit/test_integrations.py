"""The integrations without a server: importing allocpolicy loads none of
them nor any framework; arguments are checked where they are given; the
refusal's facts, the chain search and the picklable task wrapper."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

import allocpolicy
from allocpolicy.integrations._http import RequestGuard, find_refusal, refusal_facts
from allocpolicy.integrations.futures import ScopedCall

FRAMEWORKS = ("flask", "werkzeug", "dask", "distributed", "starlette", "fastapi", "uvicorn", "gunicorn", "waitress")


@pytest.mark.parametrize("module", ["allocpolicy", "allocpolicy.integrations"])
def test_importing_loads_no_framework(module):
    code = (
        f"import sys, {module}; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r} "
        "or m.startswith('allocpolicy.integrations.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def refusal(**kw) -> allocpolicy.AllocError:
    facts = dict(scope="request", size=100, budget=64, live=10, reason="budget", limit="budget", task="request")
    facts.update(kw)
    return allocpolicy.AllocError(**facts)


def test_refusal_facts_are_the_errors_attributes():
    err = refusal()
    assert refusal_facts(err) == {
        "error": str(err), "scope": "request", "task": "request", "size": 100, "budget": 64, "live": 10,
        "reason": "budget", "limit": "budget",
    }
    with pytest.raises(TypeError, match="argument 'err' must be an AllocError"):
        refusal_facts(MemoryError())


def test_find_refusal_follows_wrapping_cause_and_context():
    err = refusal()

    class Wrapper(Exception):
        original_exception = err

    assert find_refusal(err) is err
    assert find_refusal(Wrapper()) is err
    try:
        try:
            raise err
        except allocpolicy.AllocError:
            raise RuntimeError("while handling")  # noqa: B904 - the context is the point
    except RuntimeError as outer:
        assert find_refusal(outer) is err
    assert find_refusal(ValueError("other")) is None and find_refusal(None) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"scope": 3}, TypeError, "argument 'scope' must be str"),
        ({"scope": ""}, ValueError, "argument 'scope' must not be empty"),
        ({"status": 200}, ValueError, "argument 'status' must be an HTTP error status"),
        ({"status": "507"}, TypeError, "argument 'status' must be an int"),
        ({"too_large_status": 99}, ValueError, "argument 'too_large_status'"),
        ({"max_body": -1}, ValueError, "argument 'max_body' must not be negative"),
        ({"max_body": "all"}, TypeError, "argument 'max_body' must be an int, 'budget' or None"),
    ],
)
def test_wrong_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        RequestGuard(**kwargs)


def test_a_declared_length_over_the_limit_is_caught_and_a_malformed_one_left_alone():
    guard = RequestGuard(max_body=1000)
    assert guard.too_large("1001") == 1000 and guard.too_large(b"1001") == 1000
    assert guard.too_large("1000") is None and guard.too_large("12abc") is None and guard.too_large(None) is None
    assert RequestGuard(max_body=None).too_large(str(1 << 40)) is None
    # "budget": the scope's per-instance budget in the active policy
    assert RequestGuard("request").body_limit() == allocpolicy.active_policy().scopes["request"].budget


def test_scoped_call_pickles_as_its_function_and_scope():
    call = ScopedCall(len, "job")
    again = pickle.loads(pickle.dumps(call))
    assert (again.fn, again.scope) == (len, "job")
    assert again([1, 2, 3]) == 3  # without the runtime: unscoped, with one warning
    with pytest.raises(TypeError, match="argument 'fn' must be callable"):
        ScopedCall(3)
