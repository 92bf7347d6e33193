"""Exact accounting with eight threads, cross-thread frees and ended instances.

tests/integration/native/stress.c does the work and the bookkeeping; it
prints one "check ..." line per comparison and a RESULT line. Runs are bounded
by iteration counts, never by time.
"""

from __future__ import annotations

import re
import shutil

import pytest

TABLE = (
    "v=1;process=raise:0;grace=0;"
    "scope=work:raise:0:0;scope=nested:raise:0:0;scope=shared:raise:0:0;"
    "scope=tight:raise:262144:0"
)
# Instance ids come from a fixed table of this many; runs that enter more
# instances than this also cover reclaiming and reusing ids.
MAX_INSTANCES = 65536


@pytest.fixture(scope="module")
def stress(build_c):
    return build_c("stress")


def parse_result(proc):
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-4000:]}"
    match = re.search(
        r"^RESULT mismatches=(\d+) corrupt=(\d+) api_errors=(\d+) entered=(\d+)$",
        proc.stdout,
        re.M,
    )
    assert match, detail
    mismatches, corrupt, api_errors, entered = map(int, match.groups())
    return detail, mismatches, corrupt, api_errors, entered


def assert_exact(proc):
    detail, mismatches, corrupt, api_errors, entered = parse_result(proc)
    assert "MISMATCH" not in proc.stdout, detail
    assert (mismatches, corrupt, api_errors) == (0, 0, 0), detail
    assert proc.returncode == 0, detail
    # Each phase compared the process, every scope and every instance.
    for phase in ("kept", "ended", "freed"):
        assert f"check {phase} process live" in proc.stdout, detail
        for scope in ("process", "work", "nested", "shared", "tight"):
            assert re.search(rf"^check {phase} scope {scope} live .* ok$", proc.stdout, re.M), detail
    return detail, entered


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_threads_accounting_is_exact(stress, run_preloaded, seed):
    proc = run_preloaded([stress, "300000", str(seed)], table=TABLE)
    detail, entered = assert_exact(proc)
    # The refusals in `tight` were counted there and nowhere else.
    assert re.search(r"^check violations refused (\d+) elsewhere 0 .* ok$", proc.stdout, re.M), detail
    refused = int(re.search(r"^check violations refused (\d+)", proc.stdout, re.M).group(1))
    assert refused > 0, "the tight scope never refused: the budget check went unexercised\n" + detail
    assert entered > MAX_INSTANCES, detail
    # Everything freed: the process is back at its baseline exactly.
    freed = re.search(
        r"^check freed process live (-?\d+) expected (-?\d+) \(baseline (-?\d+) \+ kept 0\) ok$",
        proc.stdout,
        re.M,
    )
    assert freed and freed.group(1) == freed.group(3), detail


@pytest.mark.parametrize("seed", [1, 2])
def test_instance_churn_reuses_ids_exactly(stress, run_preloaded, seed):
    # One allocation per instance, freed by another thread after the instance
    # ended: every free reclaims an instance while others take over ids.
    proc = run_preloaded([stress, "40000", str(seed), "churn"], table=TABLE)
    detail, entered = assert_exact(proc)
    assert entered > 4 * MAX_INSTANCES, detail


def test_stress_needs_the_runtime(stress, run_preloaded):
    # Without the preload the program refuses to run instead of passing vacuously.
    proc = run_preloaded([stress, "10"], preload=False)
    assert proc.returncode == 2
    assert "RESULT" not in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
@pytest.mark.parametrize("args", [["40000", "7"], ["20000", "8", "churn"]], ids=["mixed", "churn"])
def test_stress_under_valgrind(stress, run_preloaded, args):
    # Memcheck replaces malloc in every library that defines it unless told
    # not to; the runtime must stay the interposer and valgrind the backend,
    # or frees and allocations would be served by different allocators.
    proc = run_preloaded(
        [
            "valgrind", "-q", "--error-exitcode=99", "--soname-synonyms=somalloc=nouserintercepts",
            # Everything is freed at the end: a definite leak is a lost block.
            "--leak-check=full", "--errors-for-leak-kinds=definite",
            "--fair-sched=yes", stress, *args,
        ],
        table=TABLE,
        timeout=600,
    )
    detail, _ = assert_exact(proc)
    assert "Invalid" not in proc.stderr and "uninitialised" not in proc.stderr, detail
