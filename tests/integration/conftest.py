"""Shared fixtures of the integration tests: the runtime library, C test
programs built on demand, and running a child process under the preload.

Fixtures
    allocpolicy_lib   path of the runtime library (str)
    build_c           build_c("stress") -> path of tests/integration/native/stress.c, compiled
                      (a .cpp of that name with the C++ compiler);
                      build_c("oomlib", shared=True) -> a shared library, for ctypes
    run_preloaded     run_preloaded(argv, table=..., preload=[...]) -> CompletedProcess
    backend_library   backend_library("jemalloc") -> path, or skip when not installed
    child_process     helpers for tests that start children themselves (Popen):
                      .env(preload, table), .preexec_fn, .permissive_table
"""

from __future__ import annotations

import glob
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Mapping, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[2]
NATIVE_TESTS = Path(__file__).resolve().parent / "native"
INCLUDE = ROOT / "native" / "include"

# Generous: a hang must fail the test, never stall the CI run.
DEFAULT_TIMEOUT = 120

# The table every child gets unless a test passes its own: never denies.
PERMISSIVE_TABLE = "v=1;process=raise:0"

BACKENDS = {
    "jemalloc": "libjemalloc.so.2",
    "mimalloc": "libmimalloc.so.2",
}


@pytest.fixture(scope="session")
def allocpolicy_lib() -> str:
    """The library the package loads: ALLOCPOLICY_LIBRARY, the installed
    package's, or (imported from the checkout, as `python -m pytest` in its
    root does) native/build/, rebuilt first if a source is newer."""
    from allocpolicy import _native
    from allocpolicy._errors import RuntimeLoadError

    try:
        return _native.library_path()
    except RuntimeLoadError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def build_c(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """Compile tests/integration/native/<name>.c (or <name>.cpp, with the C++
    compiler) once per session."""
    out_dir = tmp_path_factory.mktemp("native-tests")
    built: dict[tuple[str, bool], str] = {}

    def build(name: str, shared: bool = False) -> str:
        if (name, shared) not in built:
            cxx = (NATIVE_TESTS / f"{name}.cpp").is_file()
            source = NATIVE_TESTS / (f"{name}.cpp" if cxx else f"{name}.c")
            exe = out_dir / (f"lib{name}.so" if shared else name)
            if cxx:
                compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
                if not compiler:
                    pytest.skip(f"no C++ compiler (c++) to build {source.name}")
                # The allocations are the point: never elide a new/delete pair.
                dialect = ["-std=c++17", "-fno-allocation-dce"]
            else:
                compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
                if not compiler:
                    pytest.skip("no C compiler (cc) to build the test programs")
                # The checks call the allocator for its side effects and its
                # failures; builtin knowledge of malloc would fold them away.
                dialect = ["-std=gnu11", "-fno-builtin"]
            cmd = [
                compiler, *dialect, "-O1", "-g", "-pthread",
                "-Wall", "-Wextra", "-Wno-alloc-size-larger-than", "-Wno-use-after-free",
                "-Wno-deprecated-declarations", "-Wno-unknown-warning-option",
                f"-I{INCLUDE}", str(source), "-o", str(exe), "-ldl",
            ] + (["-shared", "-fPIC"] if shared else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEFAULT_TIMEOUT)
            if proc.returncode != 0:
                pytest.fail(f"building {source.name} failed:\n{' '.join(cmd)}\n{proc.stderr}")
            built[name, shared] = str(exe)
        return built[name, shared]

    return build


def _no_core_dumps() -> None:
    # Abort-mode tests kill children with SIGABRT on purpose; a core file per
    # child would be slow to write and litter the working directory.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def child_env(
    preload: Sequence[str] | None,
    table: str | None = PERMISSIVE_TABLE,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment of a child: our settings only, nothing inherited that alters them."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("ALLOCPOLICY_") and k not in ("LD_PRELOAD", "PYTHONMALLOC")
    }
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    if table is not None:
        env["ALLOCPOLICY_TABLE"] = table
    if extra:
        env.update(extra)
    return env


def run_child(
    argv: Sequence[str],
    *,
    preload: Sequence[str] | None,
    table: str | None = PERMISSIVE_TABLE,
    env: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    **kwargs,
) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(
        list(argv),
        env=child_env(preload, table, env),
        timeout=timeout,
        preexec_fn=_no_core_dumps,
        **kwargs,
    )


@pytest.fixture(scope="session")
def run_preloaded(allocpolicy_lib: str) -> Callable[..., subprocess.CompletedProcess]:
    """run_preloaded(argv, table=PERMISSIVE_TABLE, preload=None, env=None, timeout=...)

    `preload` lists what comes after the runtime in LD_PRELOAD (a backend);
    pass preload=False to run with no preload at all, for a baseline.
    """

    def run(
        argv: Sequence[str],
        *,
        table: str | None = PERMISSIVE_TABLE,
        preload: Iterable[str] | bool | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        **kwargs,
    ) -> subprocess.CompletedProcess:
        if preload is False:
            chain = None
        else:
            chain = [allocpolicy_lib, *(preload or [])]
        return run_child(argv, preload=chain, table=table, env=env, timeout=timeout, **kwargs)

    return run


def find_backend(name: str) -> str | None:
    soname = BACKENDS[name]
    patterns = [
        f"/usr/lib/*-linux-gnu/{soname}",
        f"/usr/lib64/{soname}",
        f"/usr/lib/{soname}",
        f"/usr/local/lib/{soname}",
    ]
    for pattern in patterns:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


@pytest.fixture(scope="session")
def backend_library() -> Callable[[str], str]:
    def lookup(name: str) -> str:
        path = find_backend(name)
        if path is None:
            pytest.skip(
                f"{BACKENDS[name]} is not installed (Debian: apt-get install "
                f"{'libjemalloc2' if name == 'jemalloc' else 'libmimalloc2.0'}; "
                "see .ci/system-deps.sh)"
            )
        return path

    return lookup


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def child_process() -> SimpleNamespace:
    return SimpleNamespace(
        env=child_env, preexec_fn=_no_core_dumps, permissive_table=PERMISSIVE_TABLE
    )
