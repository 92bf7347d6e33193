"""The malloc family under the preload, one entry point at a time.

tests/integration/native/entrypoints.c does the checking from inside a C
process; each test runs one of its modes in a child under LD_PRELOAD and reads
its "ok"/"FAIL" lines. The portable modes also run with no preload, so a
failure that glibc itself shows is visible as such.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

PORTABLE = [
    "malloc",
    "free",
    "calloc",
    "calloc_overflow",
    "realloc_null",
    "realloc_zero",
    "realloc_shrink",
    "realloc_grow",
    "realloc_aligned_usable",
    "realloc_huge",
    "reallocarray",
    "posix_memalign_einval",
    "posix_memalign",
    "huge_alignment",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
    "malloc_usable_size",
]

# A scope with a small budget that refuses without a grace allowance, so every
# over-budget request in it is refused, not just the first one.
SMALL_WORK = "v=1;process=raise:0;grace=0;scope=work:raise:65536:0"
DIAGNOSTIC = "allocpolicy: allocation refused in scope 'strict'"


@pytest.fixture(scope="module")
def entrypoints(build_c):
    return build_c("entrypoints")


def assert_ok(proc, mode):
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, detail
    assert f"ok {mode}\n" in proc.stdout, detail
    assert "FAIL" not in proc.stdout, detail


def test_program_lists_every_portable_mode(entrypoints, run_preloaded):
    proc = run_preloaded([entrypoints, "list"], preload=False)
    assert proc.stdout.split() == PORTABLE


@pytest.mark.parametrize("mode", PORTABLE)
def test_entry_point_under_preload(entrypoints, run_preloaded, mode):
    assert_ok(run_preloaded([entrypoints, mode]), mode)


@pytest.mark.parametrize("mode", PORTABLE)
def test_entry_point_inside_a_scope(entrypoints, run_preloaded, mode):
    # Inside a scope instance with a budget the checks never reach, under a
    # process budget: the checks must behave the same when budget checks are
    # live on every call, not only when no limit is set.
    proc = run_preloaded(
        [entrypoints, "enter:work", mode],
        table="v=1;process=raise:2147483648;scope=work:raise:1073741824:0",
    )
    assert_ok(proc, mode)


def test_same_output_as_glibc(entrypoints, run_preloaded):
    bare = run_preloaded([entrypoints, "all"], preload=False)
    ours = run_preloaded([entrypoints, "all"])
    assert bare.returncode == 0, bare.stdout + bare.stderr
    assert ours.returncode == bare.returncode
    assert ours.stdout == bare.stdout


def test_realloc_failure_leaves_old_block(entrypoints, run_preloaded):
    proc = run_preloaded([entrypoints, "realloc_fail"], table=SMALL_WORK)
    assert_ok(proc, "realloc_fail")


def test_budget_refusal_raise_mode_continues(entrypoints, run_preloaded):
    # After the refusals the program goes on to run every other check.
    proc = run_preloaded([entrypoints, "budget_raise", "all"], table=SMALL_WORK)
    assert_ok(proc, "budget_raise")
    for mode in PORTABLE:
        assert f"ok {mode}\n" in proc.stdout
    assert DIAGNOSTIC not in proc.stderr


def test_fallible_scope_grants_ordinary_allocations(entrypoints, run_preloaded):
    proc = run_preloaded(
        [entrypoints, "fallible", "all"], table="v=1;process=raise:0;scope=loose:fallible:65536:0"
    )
    assert_ok(proc, "fallible")
    assert "allocpolicy:" not in proc.stderr


def test_aligned_blocks_are_accounted_exactly(entrypoints, run_preloaded):
    # Every alignment up to 2^33 is charged its requested size and credited
    # in full by realloc and free (2^32 and more were refused before).
    proc = run_preloaded(
        [entrypoints, "aligned_accounting"], table="v=1;process=raise:0;scope=work:raise:0:0"
    )
    assert_ok(proc, "aligned_accounting")


def test_process_budget(entrypoints, run_preloaded):
    proc = run_preloaded([entrypoints, "process_budget"], table="v=1;process=raise:67108864")
    assert_ok(proc, "process_budget")


def test_budget_refusal_abort_mode(entrypoints, run_preloaded):
    proc = run_preloaded(
        [entrypoints, "budget_abort"], table="v=1;process=raise:0;scope=strict:abort:65536:0"
    )
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stdout, proc.stderr)
    assert "before refusal" in proc.stdout
    assert "FAIL" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("allocpolicy:")]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(DIAGNOSTIC)
    assert "reason=budget" in line
    assert "requested=8388608" in line
    assert "=65536" in line  # the budget that refused
    assert "mode=abort" in line


def test_abort_diagnostic_goes_to_report_fd(entrypoints, run_preloaded, tmp_path):
    report = tmp_path / "report.txt"
    fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = run_preloaded(
            [entrypoints, "budget_abort"],
            table=f"v=1;process=raise:0;fd={fd};scope=strict:abort:65536:0",
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stdout, proc.stderr)
    assert DIAGNOSTIC not in proc.stderr
    written = report.read_text()
    assert written.startswith(DIAGNOSTIC), written
    assert written.count("\n") == 1
    assert "mode=abort" in written


def test_malformed_table_keeps_defaults(entrypoints, run_preloaded):
    # A table set by hand that does not parse leaves the permissive defaults:
    # nothing is refused and the program runs normally.
    proc = run_preloaded([entrypoints, "all"], table="v=1;process=raise:12;scope=work:bogus:1:0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_entry_points_under_valgrind(entrypoints, run_preloaded):
    # Memcheck as the backend sees every header write and every block the
    # runtime hands back; `nouserintercepts` keeps the runtime the interposer.
    proc = run_preloaded(
        [
            "valgrind", "-q", "--error-exitcode=99", "--soname-synonyms=somalloc=nouserintercepts",
            entrypoints, "all", "realloc_fail", "budget_raise",
        ],
        table=SMALL_WORK,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert proc.stdout.count("ok ") == len(PORTABLE) + 2, proc.stdout
