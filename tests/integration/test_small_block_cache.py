"""The per-thread cache of small blocks keeps allocation exact and safe."""

from __future__ import annotations

import shutil
import signal

import pytest


def test_double_free_of_a_cached_block_is_reported_and_aborts(build_c, run_preloaded):
    proc = run_preloaded([build_c("small_cache"), "double-free"])
    assert proc.returncode == -signal.SIGABRT
    assert "survived" not in proc.stdout
    assert "allocpolicy: double free of the block at 0x" in proc.stderr


@pytest.mark.parametrize("mode, word", [("calloc", "zeroed"), ("shrink", "shrunk")])
def test_cached_blocks_are_served_correctly(build_c, run_preloaded, mode, word):
    proc = run_preloaded([build_c("small_cache"), mode])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == word


def test_blocks_above_256_bytes_are_allocated_with_their_own_size(build_c, run_preloaded):
    # Their class's full capacity cost up to 63 bytes a block; a cached block
    # then only serves the requests of its class that fit it.
    proc = run_preloaded([build_c("small_cache"), "capacity"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "capacity"


def test_cached_blocks_go_back_when_threads_exit(build_c, run_preloaded):
    # 800 threads each cache up to 64 small blocks; memcheck sees every one
    # of them freed, since an exiting thread hands its cache to the backend.
    if not shutil.which("valgrind"):
        pytest.skip("valgrind is not installed")
    proc = run_preloaded(
        ["valgrind", "--soname-synonyms=somalloc=nouserintercepts", "--leak-check=full",
         "--errors-for-leak-kinds=definite", "--error-exitcode=9",
         build_c("small_cache"), "threads"],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "threads"
    assert "definitely lost: 0 bytes" in proc.stderr or "no leaks are possible" in proc.stderr
