"""Small blocks from the runtime's spans: no header, the owner recorded per
span, and still every free credits exactly the instance and the bytes that
were charged (tests/integration/native/span_blocks.c)."""

from __future__ import annotations

import signal

import pytest

TABLE = "v=1;process=raise:0;scope=work:raise:0:0"


@pytest.fixture(scope="module")
def span_blocks(build_c):
    return build_c("span_blocks")


def run_checks(run_preloaded, span_blocks, *args):
    proc = run_preloaded([span_blocks, *args], table=TABLE)
    detail = f"rc={proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, detail
    assert "RESULT failures=0" in proc.stdout, detail
    assert "MISMATCH" not in proc.stdout, detail
    return proc


def test_instances_used_in_turn_on_one_thread_each_hold_their_own_bytes(run_preloaded, span_blocks):
    # The second instance finds the thread's spans holding the first one's
    # blocks: its blocks must still be charged to it, and freeing the first
    # one's from another thread must leave it alone.
    run_checks(run_preloaded, span_blocks, "alternate", "40")


def test_blocks_of_an_exited_thread_are_credited_when_freed_elsewhere(run_preloaded, span_blocks):
    proc = run_checks(run_preloaded, span_blocks, "orphans", "5000")
    assert "check orphans round 39 after frees 0 expected 0 ok" in proc.stdout


def test_realloc_of_small_blocks_charges_as_malloc_and_free_would(run_preloaded, span_blocks):
    run_checks(run_preloaded, span_blocks, "realloc")


def test_small_blocks_are_aligned_and_packed_without_a_header(run_preloaded, span_blocks):
    run_checks(run_preloaded, span_blocks, "layout")


def test_the_pages_of_emptied_spans_go_back_to_the_kernel(run_preloaded, span_blocks):
    # 1 million 24-byte blocks (32 MB of spans) held, then freed: the spans
    # go to the pool, and all but 16 give back every page but their first
    # (the span header). glibc alone keeps all of it in its free lists.
    run_checks(run_preloaded, span_blocks, "giveback", "1000000")


def test_free_of_a_pointer_into_a_block_aborts_with_a_report(run_preloaded, span_blocks):
    proc = run_preloaded([span_blocks, "interior"], table=TABLE)
    assert proc.returncode == -signal.SIGABRT
    assert "survived" not in proc.stdout
    assert "allocpolicy: free of 0x" in proc.stderr
    assert "which is not the start of a block" in proc.stderr


def test_over_another_backend_small_blocks_stay_with_it(run_preloaded, span_blocks, backend_library):
    # jemalloc is preloaded for its own small-block allocator: the runtime
    # leaves those blocks to it (with their header), so they are not packed.
    proc = run_preloaded([span_blocks, "layout"], table=TABLE, preload=[backend_library("jemalloc")])
    assert "layout packed pairs 999 of 999" not in proc.stdout, proc.stdout
    assert "check layout misaligned blocks 0 expected 0 ok" in proc.stdout, proc.stdout
    assert "check layout usable sizes off" in proc.stdout
