"""task(retries=..., escalate=...): a refused task reruns with more room, alone."""

from __future__ import annotations

import json

from runtime_run import check, run_python

POLICY = """
version = 1
[scopes.job]
on_oom = "raise"
budget = "64 MiB"
total_budget = "1 GiB"
"""

PRELUDE = """
import json, threading, allocpolicy
from allocpolicy import _native

rt = _native.runtime()

def instance_budget():
    return rt.instance_stats(rt.current()[0]).budget >> 20
"""


def test_a_refused_job_reruns_with_an_escalated_budget(tmp_path):
    out = check(
        run_python(
            PRELUDE
            + """
budgets = []

@allocpolicy.task("job", retries=2, escalate=2.0)
def build(mib):
    budgets.append(instance_budget())
    return len(bytearray(mib << 20)) >> 20

print(json.dumps([build(100), budgets]))
""",
            POLICY,
            tmp_path,
        )
    )
    # GIVEN a 64 MiB job that needs 100 MiB: refused once, then run at 128 MiB
    assert json.loads(out) == [100, [64, 128]]


def test_escalation_is_for_the_rerun_instance_only(tmp_path):
    out = check(
        run_python(
            PRELUDE
            + """
inside, done = threading.Event(), threading.Event()
seen = {}

@allocpolicy.task("job", retries=1)
def big():
    held = bytearray(100 << 20)  # refused at 64 MiB, granted at 128 MiB
    inside.set()
    done.wait(60)
    return len(held)

def other():
    inside.wait(60)
    # WHEN another job of the same scope runs while the rerun holds 100 MiB
    try:
        with allocpolicy.task("job"):
            seen["budget"] = instance_budget()
            bytearray(100 << 20)
        seen["other"] = "granted"
    except allocpolicy.AllocError as err:
        seen["other"] = f"refused at {err.budget >> 20} MiB"
    done.set()

t = threading.Thread(target=other)
t.start()
result = big()
t.join()
with allocpolicy.task("job"):
    after = instance_budget()
print(json.dumps([result >> 20, seen, after, allocpolicy.stats().scopes["job"].budget >> 20]))
""",
            POLICY,
            tmp_path,
        )
    )
    result, seen, after, policy_budget = json.loads(out)
    # THEN it keeps the scope's budget, as do the jobs after, and the policy is unchanged
    assert result == 100
    assert seen == {"budget": 64, "other": "refused at 64 MiB"}
    assert after == 64 and policy_budget == 64


def test_retries_run_out_and_the_last_refusal_is_raised(tmp_path):
    out = check(
        run_python(
            PRELUDE
            + """
attempts = []

def huge():
    attempts.append(instance_budget())
    held = bytearray(b"\\1") * (40 << 20)
    more = bytearray(1 << 30)

try:
    allocpolicy.task("job", retries=2, escalate=3).run(huge)
except allocpolicy.AllocError as err:
    print(json.dumps([attempts, err.budget >> 20, err.limit, err.task]))
print(allocpolicy.stats().scopes["job"].live < 2 << 20)
""",
            POLICY,
            tmp_path,
        )
    )
    first, second = out.splitlines()
    assert json.loads(first) == [[64, 192, 576], 576, "budget", "job"]
    # Every attempt's memory came back.
    assert second == "True"


def test_refusals_by_other_limits_are_not_retried(tmp_path):
    out = check(
        run_python(
            PRELUDE
            + """
def attempts_for(fn):
    calls = []
    def counted():
        calls.append(1)
        fn()
    try:
        allocpolicy.task("job", retries=3).run(counted)
    except allocpolicy.AllocError as err:
        return [len(calls), err.reason, err.limit]

def injected():
    with allocpolicy.inject(scope="job", nth=1):
        bytearray(1 << 20)

holding, release = threading.Event(), threading.Event()

def another_job():
    with allocpolicy.task("job"):
        held = bytearray(b"\\1") * (60 << 20)
        holding.set()
        release.wait(60)

t = threading.Thread(target=another_job)
t.start()
holding.wait(60)

def over_the_total():
    bytearray(50 << 20)  # fits the instance's 64 MiB, not the scope's 96 MiB in all

outcomes = [attempts_for(injected), attempts_for(over_the_total)]
release.set()
t.join()
print(json.dumps(outcomes))

def plain_error():
    raise ValueError("not a refusal")

try:
    allocpolicy.task("job", retries=3).run(plain_error)
except ValueError as exc:
    print(exc)
""",
            POLICY.replace('total_budget = "1 GiB"', 'total_budget = "96 MiB"'),
            tmp_path,
        )
    )
    first, second = out.splitlines()
    injected, over_total = json.loads(first)
    # Only a refusal by the instance's own budget is retried.
    assert injected[:2] == [1, "injected"], injected
    assert over_total == [1, "budget", "total_budget"], over_total
    assert second == "not a refusal"
