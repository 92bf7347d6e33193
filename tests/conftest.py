"""Options, markers and guards of the whole test suite.

Options
    --quick        the development loop (`nox -s quick`): tests marked `slow` are
                   deselected, and tests marked `heavy` compare a small selection
                   (implies --heavy=quick)
    --heavy=MODE   `full` (the default) or `quick`: how much of other projects'
                   test suites the `heavy` tests run. CI runs `full` on one Python
                   and `quick` on the others (noxfile.py).

Markers (declared in pyproject.toml)
    slow      takes more than a few seconds
    heavy     runs other projects' test suites (CPython's, NumPy's); reads the
              `heavy_mode` fixture to choose its selection
    backend   needs an allocator backend package (jemalloc, mimalloc)

Fixtures
    heavy_mode   "full" or "quick"
    progress     progress("text"): writes a line to the terminal at once, while
                 the test runs and its output is captured; for tests that run
                 for minutes, so that a run is never silent for long
    processes    .children() -> pids of this process's live children;
                 .kill_new(before) kills and reaps every child not in `before`

Guard
    No process a test starts may outlive the test session. Every pytest process
    that runs tests is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): a
    descendant whose parent exits comes back to it instead of going to init.
    Whatever is still running when the session ends is listed, killed, and
    fails the run.
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import process_tree  # tests/process_tree.py
import pytest

HEAVY_MODES = ("full", "quick")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("allocpolicy-suite", "allocpolicy's own test suite")
    group.addoption(
        "--quick", action="store_true",
        help="the development loop: deselect tests marked slow; heavy tests run a "
             "small selection (implies --heavy=quick)",
    )
    group.addoption(
        "--heavy", choices=HEAVY_MODES, default=None,
        help="how much of other projects' test suites the heavy tests run "
             "(default: full, or quick with --quick)",
    )


def _heavy_mode(config: pytest.Config) -> str:
    return config.getoption("heavy") or ("quick" if config.getoption("quick") else "full")


def pytest_configure(config: pytest.Config) -> None:
    process_tree.become_subreaper()


def pytest_report_header(config: pytest.Config) -> list[str]:
    quick = " (--quick: slow tests deselected)" if config.getoption("quick") else ""
    return [f"allocpolicy: heavy tests run their {_heavy_mode(config)} selection{quick}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("quick"):
        keep, drop = [], []
        for item in items:
            (drop if item.get_closest_marker("slow") else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    # The longest tests first: with several workers (-n), the short ones then
    # fill the gaps instead of one worker finishing a heavy test alone.
    items.sort(key=lambda item: (item.get_closest_marker("heavy") is None,
                                 item.get_closest_marker("slow") is None))


@pytest.fixture(scope="session")
def heavy_mode(request: pytest.FixtureRequest) -> str:
    return _heavy_mode(request.config)


@pytest.fixture
def progress(request: pytest.FixtureRequest):
    capture = request.config.pluginmanager.getplugin("capturemanager")
    name = request.node.nodeid.rsplit("/", 1)[-1]
    started = time.monotonic()

    def say(text: str) -> None:
        elapsed = int(time.monotonic() - started)
        line = f"\n  [{elapsed // 60}m{elapsed % 60:02d}s] {name}: {text}\n"
        with capture.global_and_fixture_disabled():
            sys.stderr.write(line)
            sys.stderr.flush()

    return say


def live_children() -> set[int]:
    """Children of this process that still run."""
    return process_tree.running_children(os.getpid())


@pytest.fixture(scope="session")
def processes() -> SimpleNamespace:
    return SimpleNamespace(children=live_children, kill_new=process_tree.kill_new_children)


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_behind():
    before = live_children()
    yield
    # Give processes killed by their tests a moment to be reaped by them.
    deadline = time.monotonic() + 5
    while live_children() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    if live_children() - before:
        left = process_tree.kill_new_children(before)
        if left:
            pytest.fail(
                "processes started by the tests were still running when the session "
                "ended (killed now):\n  " + "\n  ".join(left),
                pytrace=False,
            )
