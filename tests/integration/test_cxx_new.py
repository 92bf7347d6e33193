"""C++ operator new and delete under the preload, over every backend.

jemalloc and mimalloc export their own operator new/delete, which a program
finds before libstdc++'s; the runtime exports the whole family itself, so a
budget governs C++ allocations whatever the backend. The checks run inside
tests/integration/native/cxx_new.cpp (see its modes) and
tests/integration/native/cxx_plugin.cpp.
"""

from __future__ import annotations

import signal

import pytest

from runtime_run import check, run_python

# Raise mode, a 4 MiB budget, no unwind grace: every over-budget request is
# refused, not just the first.
TABLE = "v=1;process=raise:0;grace=0;scope=work:raise:4194304:0"
BACKENDS = [
    "glibc",
    pytest.param("jemalloc", marks=pytest.mark.backend),
    pytest.param("mimalloc", marks=pytest.mark.backend),
]
MODES = ["accounting", "refusal", "handler"]


@pytest.fixture(scope="module")
def cxx_new(build_c):
    return build_c("cxx_new")


@pytest.fixture(params=BACKENDS)
def backend_chain(request, backend_library):
    """What follows the runtime in LD_PRELOAD: nothing for glibc."""
    return [] if request.param == "glibc" else [backend_library(request.param)]


def assert_ok(proc, mode):
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, detail
    assert f"ok {mode}\n" in proc.stdout, detail
    assert "FAIL" not in proc.stdout, detail


@pytest.mark.parametrize("mode", MODES)
def test_operator_new_is_governed(cxx_new, run_preloaded, backend_chain, mode):
    # accounting: each of the 8 forms of new is charged exactly its size and
    # each of the 12 forms of delete credits it back to 0; refusal: the
    # throwing forms throw std::bad_alloc, the nothrow forms return NULL;
    # handler: std::new_handler is called and the allocation retried.
    proc = run_preloaded([cxx_new, mode], table=TABLE, preload=backend_chain)
    assert_ok(proc, mode)


@pytest.mark.parametrize("mode", ["raise", "fallible"])
def test_impossible_new_throws_in_every_mode_but_abort(cxx_new, run_preloaded, backend_chain,
                                                       mode):
    # 2^50 bytes: no budget matter, a failure the program sees (a fallible
    # scope aborted the process here before).
    table = f"v=1;process=raise:0;grace=0;scope=work:{mode}:4194304:0"
    proc = run_preloaded([cxx_new, "impossible"], table=table, preload=backend_chain)
    assert_ok(proc, "impossible")


def test_small_block_cache_works_in_a_cxx_program(cxx_new, run_preloaded):
    # libstdc++ allocates in its constructor, before the runtime's, and the
    # thread then never registered: its small-block cache stayed off (a
    # 64-byte pair cost 243 instructions instead of 128). A block deleted
    # twice shows the cache is on: it is found in it, reported, and aborts.
    proc = run_preloaded([cxx_new, "double-free"], table=TABLE)
    assert proc.returncode == -signal.SIGABRT, proc.stdout + proc.stderr
    assert "survived" not in proc.stdout
    assert "allocpolicy: double free of the block at 0x" in proc.stderr


def test_bad_alloc_is_thrown_by_a_runtime_loaded_locally(build_c, run_preloaded, python_exe,
                                                        backend_chain):
    # Python loads C++ code with RTLD_LOCAL, and itself has no C++ runtime:
    # the plugin's libstdc++ is then outside the global symbol scope, and the
    # refusal must find it through the calling object.
    plugin = build_c("cxx_plugin", shared=True)
    code = (
        "import ctypes, sys\n"
        f"lib = ctypes.CDLL({plugin!r})\n"
        "sys.stdout.flush()\n"
        "print('result', lib.cxx_plugin_refusal(), flush=True)\n"
    )
    proc = run_preloaded([python_exe, "-c", code], table=TABLE, preload=backend_chain)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "result 1" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("backend", ["system", *BACKENDS[1:]])
def test_library_scope_binds_the_cxx_code_that_calls_new(build_c, backend_library, tmp_path,
                                                         backend):
    # GIVEN the C++ plugin bound to a 4 MiB raise scope WHEN it asks for 8 MiB
    # with new THEN it gets std::bad_alloc, while the rest of the program
    # allocates as much freely (over jemalloc and mimalloc, whose own
    # operator new used to take the request past every scope).
    if backend != "system":
        backend_library(backend)  # skips when not installed
    plugin = build_c("cxx_plugin", shared=True)
    out = check(
        run_python(
            f"""
            import ctypes
            lib = ctypes.CDLL({plugin!r})
            lib.cxx_plugin_try_new.argtypes = [ctypes.c_size_t]
            print("plugin 8 MiB:", lib.cxx_plugin_try_new(8 << 20))
            print("plugin 1 MiB:", lib.cxx_plugin_try_new(1 << 20))
            print("python 8 MiB:", len(bytearray(8 << 20)))
            """,
            """
            version = 1
            [scopes.plugin]
            on_oom = "raise"
            budget = "4 MiB"
            libraries = ["libcxx_plugin.so"]
            """,
            tmp_path,
            run_options=("--backend", backend),
        )
    )
    assert out.splitlines() == ["plugin 8 MiB: 0", "plugin 1 MiB: 1", "python 8 MiB: 8388608"]
