"""Development sessions: tests on every supported Python, docs, benchmarks.

    nox -s tests docs sanitize     # what CI runs (README step 2): ~15 min on 2 idle cores
    nox -s quick                   # the development loop: 2-3 min
    nox -s quick -- -k budget      # arguments after -- go to pytest
    nox -s tests-3.12 -- -k budget
    nox -s bench

Test sessions run pytest with one worker per core (pytest-xdist; `-- -n 0`
turns that off). The `heavy` tests, which run CPython's and NumPy's own test
suites under the preload, run their full selection on HEAVY_PYTHON and a quick
one on the other Pythons (`-- --heavy=full` runs the full one anywhere). A
pytest run that collects no test exits 5, and fails its session like any
other status but 0.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYTHONS = ["3.11", "3.12", "3.13"]
#: The Python on which the heavy tests run in full (about 4 minutes of a
#: 2-core machine); NumPy's tests there too, since NumPy's C code is the
#: same on every interpreter.
HEAVY_PYTHON = "3.11"
#: Every worker is a process, and most tests wait on children of their own.
WORKERS = ["-n", "auto"]

nox.options.sessions = ["tests", "docs", "sanitize"]
nox.options.reuse_venv = "yes"

# pyenv keeps interpreters out of PATH unless selected; make every installed
# 3.11+ visible so nox can find python3.X without pyenv's shims.
for bindir in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[1-9]*/bin"))):
    if bindir not in os.environ.get("PATH", ""):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def _system_deps(session: nox.Session) -> None:
    """Allocator backends and tools the tests use (Debian packages)."""
    session.run("bash", str(ROOT / ".ci" / "system-deps.sh"), external=True)


def _pytest(session: nox.Session, *args: str) -> None:
    """pytest with the suite's defaults; the session's own arguments come last
    and so win."""
    _system_deps(session)
    session.install(".[test]")
    session.run("python", "-m", "pytest", *WORKERS, "--durations=10", *args, *session.posargs)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Build, install and run the test suite."""
    heavy = "full" if session.python == HEAVY_PYTHON else "quick"
    _pytest(session, f"--heavy={heavy}")


@nox.session(python=HEAVY_PYTHON)
def quick(session: nox.Session) -> None:
    """The development loop: slow tests left out, heavy tests on a small selection."""
    _pytest(session, "--quick")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the Sphinx site with warnings as errors."""
    session.install(".[docs]")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html",
        *session.posargs,
    )


@nox.session(python="3.11")
def sanitize(session: nox.Session) -> None:
    """The runtime and its native stress programs under ThreadSanitizer, then ASan+UBSan."""
    _system_deps(session)
    session.run("python", "tests/sanitize.py", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks, side by side in one run; prints a table and writes JSON."""
    _system_deps(session)
    session.install(".[test]", "memray")
    session.run("python", "benchmarks/run.py", *session.posargs)
