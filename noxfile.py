"""Development sessions: tests on every supported Python, docs, benchmarks.

    nox -s tests docs sanitize   # what CI runs
    nox -s tests-3.12 -- -k budget
    nox -s bench
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
PYTHONS = ["3.11", "3.12", "3.13"]

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


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Build, install and run the test suite."""
    _system_deps(session)
    session.install(".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


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
