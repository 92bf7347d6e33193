"""The package imported from a source checkout builds and uses the checkout's
own library (allocpolicy/_checkout.py); an installed package without its
library says so. Each test works on a copy of the checkout, so that builds
and broken sources never touch the tree under test.

README step 1, verbatim from a fresh clone and virtual environment, is run by
.ci/run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns("__pycache__", "_lib", "build")


def copy_checkout(tmp_path: Path) -> Path:
    """allocpolicy/ and native/ as a checkout has them, never built."""
    checkout = tmp_path / "checkout"
    for part in ("allocpolicy", "native"):
        shutil.copytree(ROOT / part, checkout / part, ignore=IGNORE)
    return checkout


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("ALLOCPOLICY_") and k not in ("LD_PRELOAD", "PYTHONPATH")
    }
    env.update(extra)
    return env


def allocpolicy_cmd(cwd: Path, *args: str, env: dict[str, str] | None = None):
    """`python -m allocpolicy ARGS` in ``cwd``, which puts ``cwd`` first on sys.path."""
    return subprocess.run(
        [sys.executable, "-m", "allocpolicy", *args],
        cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=900,
    )


@pytest.mark.slow
def test_a_checkout_builds_its_library_when_missing_or_stale_and_runs_with_it(tmp_path):
    checkout = copy_checkout(tmp_path)
    library = checkout / "native" / "build" / "liballocpolicy.so"

    first = allocpolicy_cmd(checkout, "lib")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(library.resolve())
    assert "building the runtime library of the source checkout" in first.stderr
    assert library.is_file() and (library.parent / "liballocpolicy_inproc.so").is_file()

    again = allocpolicy_cmd(checkout, "lib")
    assert (again.returncode, again.stdout, again.stderr) == (0, first.stdout, "")

    # A source newer than the library: rebuilt before use. The libraries are
    # aged rather than the source moved into the future, which make would
    # take for clock skew (and a fast build would still end before it).
    source = checkout / "native" / "src" / "api.c"
    earlier = source.stat().st_mtime - 10
    for built in library.parent.glob("*.so"):
        os.utime(built, (earlier, earlier))
    rebuilt = allocpolicy_cmd(checkout, "lib")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "building the runtime library" in rebuilt.stderr
    assert library.stat().st_mtime > source.stat().st_mtime

    probe = "import ctypes; print(ctypes.CDLL(None).ap_is_preloaded())"
    run = allocpolicy_cmd(checkout, "run", "--", sys.executable, "-c", probe)
    assert (run.returncode, run.stdout.strip()) == (0, "1"), run.stderr


def test_without_make_the_error_names_the_checkout_and_what_is_missing(tmp_path):
    checkout = copy_checkout(tmp_path)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proc = allocpolicy_cmd(checkout, "lib", env=clean_env(PATH=str(empty)))
    assert proc.returncode == 1, proc
    assert f"source checkout {checkout / 'allocpolicy'}" in proc.stderr
    assert "current directory comes first on sys.path" in proc.stderr
    assert "lacks make" in proc.stderr
    assert "pip install" not in proc.stderr
    assert not (checkout / "native" / "build" / "liballocpolicy.so").exists()


def test_a_failing_build_shows_the_compiler_output(tmp_path):
    checkout = copy_checkout(tmp_path)
    with open(checkout / "native" / "src" / "api.c", "a") as f:
        f.write("\n#error broken_on_purpose\n")
    proc = allocpolicy_cmd(checkout, "lib")
    assert proc.returncode == 1, proc
    assert f"`make -C {checkout / 'native'}` failed" in proc.stderr
    assert "broken_on_purpose" in proc.stderr


def test_an_installed_package_without_its_library_says_to_reinstall(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(ROOT / "allocpolicy", site / "allocpolicy", ignore=IGNORE)
    proc = allocpolicy_cmd(tmp_path, "lib", env=clean_env(PYTHONPATH=str(site)))
    assert proc.returncode == 1, proc
    missing = site / "allocpolicy" / "_lib" / "liballocpolicy.so"
    assert f"the allocpolicy runtime library {missing} is missing" in proc.stderr
    assert "reinstall" in proc.stderr
    assert "source checkout" not in proc.stderr


def test_importing_the_package_at_interpreter_startup_imports_no_threading(run_preloaded):
    # Interpreters under the preload import allocpolicy at startup (the
    # installed allocpolicy-startup.pth); what that import drags in, every
    # program sees. CPython's test_threading checks that threading is not
    # imported before the program imports it.
    probe = "import sys; print(sorted({'allocpolicy', 'threading', 'subprocess'} & set(sys.modules)))"
    proc = run_preloaded([sys.executable, "-I", "-c", probe])
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.strip() == "[]":
        pytest.skip("allocpolicy is not installed with its startup line in this interpreter")
    assert proc.stdout.strip() == "['allocpolicy']", proc.stdout
