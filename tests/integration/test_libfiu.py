"""allocpolicy side by side with libfiu's fiu-run on the same C program.

``alloc_steps`` builds a list with one malloc per step and stops at the first
failure, printing the step; both injectors interpose the same malloc calls, so
a failure of the same call gives the same output. libfiu fails calls at random
(repeatable only with FIU_PRNG_SEED and the very same sequence of calls);
each failure it finds is replayed by allocpolicy from the index alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import allocpolicy

pytestmark = pytest.mark.skipif(
    shutil.which("fiu-run") is None,
    reason="fiu-run is not installed (Debian package fiu-utils; .ci/system-deps.sh installs it)",
)

PACKAGE_ROOT = str(Path(allocpolicy.__file__).resolve().parents[1])
TIMEOUT = 120
FIU_RANDOM = "enable_random name=libc/mm/malloc,probability=0.02"
STEP_RE = re.compile(r"step (\d+): malloc of (\d+) bytes failed\n")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LD_PRELOAD", "FIU_PRNG_SEED", "FIU_ENABLE", "FIU_CTRL_FIFO")
        and (not k.startswith("ALLOCPOLICY_") or k == "ALLOCPOLICY_LIBRARY")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def fiu(program: str, *commands: str, seed: int | None = None) -> subprocess.CompletedProcess:
    args = ["fiu-run", "-x", "-f", ""]  # -f "": no remote-control fifo left behind
    for command in commands:
        args += ["-c", command]
    env = _env({"FIU_PRNG_SEED": str(seed)} if seed is not None else None)
    return subprocess.run([*args, program], capture_output=True, text=True, env=env, timeout=TIMEOUT)


def allocpolicy_run(program: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "allocpolicy", "run", *options, "--", program],
        capture_output=True, text=True, env=_env(), timeout=TIMEOUT,
    )


def failed_step(proc: subprocess.CompletedProcess) -> int:
    match = STEP_RE.search(proc.stderr)
    assert proc.returncode == 3 and match, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return int(match[1])


def same_run(a: subprocess.CompletedProcess, b: subprocess.CompletedProcess) -> bool:
    return (a.returncode, a.stdout, STEP_RE.findall(a.stderr)) == (b.returncode, b.stdout, STEP_RE.findall(b.stderr))


@pytest.fixture(scope="module")
def program(build_c) -> str:
    path = build_c("alloc_steps")
    plain = subprocess.run([path], capture_output=True, text=True, timeout=TIMEOUT)
    assert (plain.returncode, plain.stdout) == (0, "built 200 records\n")
    return path


@pytest.mark.parametrize("seed", [2, 3, 7, 42])
def test_a_seeded_fiu_failure_is_replayed_by_its_index(program, seed):
    # GIVEN a run of libfiu's random mode that made the program fail
    found = fiu(program, FIU_RANDOM, seed=seed)
    step = failed_step(found)
    # (libfiu repeats it only with the same seed: its PRNG advances once per call)
    assert same_run(fiu(program, FIU_RANDOM, seed=seed), found)
    # WHEN allocpolicy fails that one allocation, by its index
    replay = allocpolicy_run(program, "--inject", f"nth={step}")
    # THEN the program fails at the same step, the same way
    assert same_run(replay, found), (found.stderr, replay.stderr)


def test_fiu_deterministic_modes_match_allocpolicy_triggers(program):
    # libfiu's "fail once" is allocpolicy's nth=1 ...
    once = fiu(program, "enable name=libc/mm/malloc,onetime=1")
    assert failed_step(once) == 1
    assert same_run(allocpolicy_run(program, "--inject", "nth=1"), once)
    # ... and "always fail" is a window open from the first allocation on.
    always = fiu(program, "enable name=libc/mm/malloc")
    assert failed_step(always) == 1
    assert same_run(allocpolicy_run(program, "--inject", "start=1"), always)
    assert same_run(allocpolicy_run(program, "--inject", "nth=1,persistent"), always)


def test_an_allocpolicy_probability_run_replays_from_its_printed_seed(program):
    # GIVEN a probability run without a seed: `run` draws one and prints it
    first = allocpolicy_run(program, "--inject", "probability=0.02")
    printed = re.search(r"^allocpolicy: ALLOCPOLICY_INJECT=(\S+) \(seed drawn for this run\)$",
                        first.stderr, re.M)
    assert printed, first.stderr
    # WHEN the printed setting is used again
    again = allocpolicy_run(program, "--inject", printed[1])
    # THEN the same allocations fail (the decision is a hash of seed and
    # index, not a generator's state)
    assert same_run(again, first)
    if first.returncode == 3:
        assert same_run(allocpolicy_run(program, "--inject", f"nth={failed_step(first)}"), first)


def test_the_policy_inject_table_applies_from_the_first_allocation(program, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text(textwrap.dedent("""\
        version = 1

        [inject]
        every = 50
    """))
    proc = allocpolicy_run(program, "--policy", str(policy))
    assert failed_step(proc) == 50
    # ALLOCPOLICY_INJECT (here through --inject) takes the place of the table.
    assert failed_step(allocpolicy_run(program, "--policy", str(policy), "--inject", "nth=7")) == 7
