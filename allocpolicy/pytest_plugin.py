"""pytest plugin: allocation budgets, no-allocation tests and OOM sweeps.

Registered through the ``pytest11`` entry point, so installing allocpolicy
makes it available to every pytest run; it does nothing unless a test asks for
it (a marker, a fixture, or one of the options below). What it does needs the
runtime, so run pytest under it::

    allocpolicy run -- python -m pytest --oom-sweep -k parser

A test that asks for it without the runtime is skipped, with a reason that
says how to run it (``allocpolicy_unavailable = fail`` in the ini file makes
it fail instead); the options refuse to start. The plugin does not re-execute
pytest under the preload itself: interposing ``malloc`` must happen before
the interpreter starts, and a second pytest session inside the first would
duplicate its output, its plugins and its exit status handling.

Markers
    ``alloc_budget(size, threads="current")``
        The test body runs in its own instance of the scope ``pytest`` with
        this budget, enforced at allocation time: the allocation that would
        cross it fails, and the test fails with :class:`~allocpolicy.AllocError`
        and the traceback of that allocation. ``threads="all"`` also bounds
        what every other thread allocates while the test runs (through the
        process budget: the process may grow by at most ``size``).
    ``no_alloc(frees=False, domains=None)``
        The test body must not allocate (:func:`allocpolicy.no_alloc`).
    ``oom_sweep(max_runs=None, stride=1, time_budget=None, persistent=False, allow=(), timeout=None,
    jobs=None, sample=None, seed=None)``
        Run the body once to count its allocations, then again failing
        allocation 1, 2, ... N in turn, each run in a forked child, up to
        ``jobs`` (default: one per CPU) at once. Allocations are numbered in
        every domain the runtime sees: Python's RAW, MEM and OBJ domains and
        NumPy's data handler always, native ``malloc`` under the preload.

Fixtures
    ``alloc_stats``: live, peak and count of the test body's allocations.
    ``no_alloc``: :func:`allocpolicy.no_alloc`, for regions inside a test.

The scope ``pytest`` is declared by the plugin (raise mode); its allocations
are what budgets, sweeps and statistics see. Fixtures run outside it.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import inspect
import json
import os
import select
import signal
import sys
import tempfile
import time
import traceback
import types
import zlib
from typing import Any, Iterator

import pytest

from . import _native

__all__ = ["SCOPE", "AllocStats"]

#: Name of the scope the plugin runs test bodies in.
SCOPE = "pytest"

_PLAN = pytest.StashKey["_Plan"]()
_STATS = pytest.StashKey["AllocStats"]()

_HOW_TO_RUN = "run pytest under the runtime: `allocpolicy run -- python -m pytest ...`"
_IN_PROCESS_NOTE = (
    "allocpolicy: runtime installed in this process (not preloaded): budgets, no_alloc and "
    "sweeps see Python's allocator domains and NumPy's data, not native allocations "
    "(malloc from C code); for those, `allocpolicy run -- python -m pytest ...`"
)
_INSTALLED = pytest.StashKey[bool]()  # the plugin installed the runtime in-process
_NO_RUNTIME = pytest.StashKey[str]()  # why it could not
_ARENAS_ONLY = 1 << _native.DOMAINS.index("py_arena")
# What a run keeps is compared with what a passing run keeps. Objects the
# garbage collector tracks (instances, containers) and malloc bytes compare
# exactly. The count of pymalloc blocks also moves with things no test
# controls (a dict table that grew and kept its size, depending on the hash
# seed, a string interned on the error path), by a few blocks: only more than
# this many is taken for a leak of objects the collector does not track.
_BLOCK_SLACK = 16
_COUNT = _native.ACTIONS.index("count")

_MARKERS = {
    "alloc_budget": (
        "alloc_budget(size, threads='current'): run the test body in its own allocpolicy "
        "scope with this budget (bytes or a string such as '64 MiB'), enforced at allocation "
        "time; threads='all' also bounds what other threads allocate meanwhile. "
        "alloc_budget(None) lifts the default set by --alloc-budget."
    ),
    "no_alloc": (
        "no_alloc(frees=False, domains=None): the test body must not allocate "
        "(allocpolicy.no_alloc); the first allocation fails and the test fails with "
        "AllocError(reason='forbidden')."
    ),
    "oom_sweep": (
        "oom_sweep(max_runs=None, stride=1, time_budget=None, persistent=False, allow=(), "
        "timeout=None, jobs=None, sample=None, seed=None): count the test body's allocations, then rerun it failing allocation "
        "1, 2, ... N in turn, each in a forked child (jobs at once, default one per CPU; "
        "stride, sample, max_runs and time_budget bound long sweeps); a crash, an exception other than "
        "MemoryError (or `allow`), or memory still held after the failure fails the test with "
        "the allocation index that reproduces it (--oom-replay=INDEX)."
    ),
}


# --- options ---------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("allocpolicy", "allocation budgets and OOM sweeps (allocpolicy)")
    group.addoption(
        "--alloc-budget", metavar="SIZE", default=None,
        help="budget of every test body (e.g. '256 MiB'), unless its alloc_budget marker says "
        "otherwise; default: the alloc_budget ini value, else none",
    )
    group.addoption(
        "--alloc-budget-threads", choices=("current", "all"), default=None,
        help="what the default budget counts: the test's thread (default) or every thread",
    )
    group.addoption(
        "--oom-sweep", action="store_true", default=False,
        help="OOM-sweep every selected test, as if marked oom_sweep",
    )
    group.addoption(
        "--oom-sweep-max-runs", metavar="N", type=int, default=None,
        help="fail at most N allocations per test (first N of the sweep)",
    )
    group.addoption(
        "--oom-sweep-stride", metavar="K", type=int, default=None,
        help="fail every Kth allocation only: 1, 1+K, 1+2K, ...",
    )
    group.addoption(
        "--oom-sweep-time", metavar="SECONDS", type=float, default=None,
        help="stop a test's sweep after this many seconds (what was covered is reported)",
    )
    group.addoption(
        "--oom-sweep-sample", metavar="N", type=int, default=None,
        help="fail N allocations drawn at random (after the stride), the same ones on every "
        "run unless --oom-sweep-seed changes them",
    )
    group.addoption(
        "--oom-sweep-seed", metavar="SEED", type=int, default=None,
        help="seed of --oom-sweep-sample (default: derived from each test's id)",
    )
    group.addoption(
        "--oom-sweep-jobs", metavar="N", type=int, default=None,
        help="forked runs at once (default: one per CPU this process may use)",
    )
    group.addoption(
        "--oom-replay", metavar="INDEX", type=int, default=None,
        help="run the selected tests once, in this process, with allocation INDEX of their "
        "body failing (the index an oom_sweep failure names)",
    )
    parser.addini(
        "alloc_budget", "budget of every test body unless marked otherwise (e.g. '256 MiB')", default=""
    )
    parser.addini(
        "alloc_budget_threads", "what the default budget counts: 'current' or 'all'", default="current"
    )
    parser.addini(
        "allocpolicy_unavailable",
        "what tests that need the allocpolicy runtime do without it: 'skip' or 'fail'",
        default="skip",
    )


def pytest_configure(config: pytest.Config) -> None:
    for name, text in _MARKERS.items():
        config.addinivalue_line("markers", text if text.startswith(name) else f"{name}: {text}")
    opt = config.option
    asked = [
        flag
        for flag, value in (
            ("--alloc-budget", opt.alloc_budget),
            ("--oom-sweep", opt.oom_sweep),
            ("--oom-replay", opt.oom_replay),
        )
        if value
    ]
    for flag, value in (
        ("--oom-sweep-max-runs", opt.oom_sweep_max_runs),
        ("--oom-sweep-stride", opt.oom_sweep_stride),
        ("--oom-sweep-sample", opt.oom_sweep_sample),
        ("--oom-sweep-jobs", opt.oom_sweep_jobs),
        ("--oom-replay", opt.oom_replay),
    ):
        if value is not None and value < 1:
            raise pytest.UsageError(f"{flag} must be at least 1, got {value}")
    if opt.oom_sweep_seed is not None and opt.oom_sweep_seed < 0:
        raise pytest.UsageError(f"--oom-sweep-seed must be at least 0, got {opt.oom_sweep_seed}")
    if opt.oom_sweep_time is not None and opt.oom_sweep_time <= 0:
        raise pytest.UsageError(f"--oom-sweep-time must be positive, got {opt.oom_sweep_time}")
    if opt.alloc_budget:
        _parse_budget(opt.alloc_budget, "--alloc-budget", pytest.UsageError)
    ini_budget = config.getini("alloc_budget").strip()
    if ini_budget:
        _parse_budget(ini_budget, "the alloc_budget ini value", pytest.UsageError)
    if config.getini("alloc_budget_threads") not in ("current", "all"):
        raise pytest.UsageError("the alloc_budget_threads ini value must be 'current' or 'all'")
    if config.getini("allocpolicy_unavailable") not in ("skip", "fail"):
        raise pytest.UsageError("the allocpolicy_unavailable ini value must be 'skip' or 'fail'")
    if asked or ini_budget:
        # Every test may need it: in place before the first one runs.
        if _runtime(config, say=False) is None:
            raise pytest.UsageError(
                f"{', '.join(asked) or 'the alloc_budget ini value'} needs the allocpolicy runtime, "
                f"which could not be installed in this process ({config.stash[_NO_RUNTIME]}); "
                f"{_HOW_TO_RUN}"
            )


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_INSTALLED, False):
        from . import _inprocess

        # A test that left a scope entered keeps the hooks in place, which
        # is harmless at exit; uninstall() says so by refusing.
        with contextlib.suppress(RuntimeError):
            _inprocess.uninstall()
        config.stash[_INSTALLED] = False


def pytest_report_header(config: pytest.Config) -> str | None:
    rt = _native.runtime()
    if rt is None:
        return None
    if config.stash.get(_INSTALLED, False):
        return _IN_PROCESS_NOTE
    return f"allocpolicy: runtime preloaded ({rt.path or 'in the executable'})"


def _runtime(config: pytest.Config, say: bool = True) -> _native.Runtime | None:
    """The runtime: the preloaded one, else installed into this process on
    first need (allocpolicy.install()); None if neither is possible.

    Installed, it sees what Python's allocator domains and NumPy's data
    handler allocate, not what native code takes from ``malloc`` directly;
    that is said once: by the report header when pytest_configure installs
    it (``say=False``), else on the terminal when a test first needs it.
    """
    rt = _native.runtime()
    if rt is not None or _NO_RUNTIME in config.stash:
        return rt
    from . import _inprocess
    from ._errors import RuntimeLoadError

    try:
        _inprocess.install()
    except RuntimeLoadError as exc:
        config.stash[_NO_RUNTIME] = str(exc)
        return None
    config.stash[_INSTALLED] = True
    if say:
        _say(config, _IN_PROCESS_NOTE)
    return _native.runtime()


def _parse_budget(value: object, where: str, error: type[Exception] = ValueError) -> int:
    from ._sizes import parse_size

    try:
        size = parse_size(value)
    except ValueError as exc:
        raise error(f"{where}: {exc}") from None
    if size == 0:
        raise error(f"{where}: a budget must be greater than 0")
    return size  # type: ignore[return-value]


# --- what a test asks for ---------------------------------------------------------


class _Sweep:
    __slots__ = ("max_runs", "stride", "time_budget", "persistent", "allow", "timeout", "jobs",
                 "sample", "seed")

    def __init__(self, max_runs=None, stride=1, time_budget=None, persistent=False, allow=(),
                 timeout=None, jobs=None, sample=None, seed=None):
        for name, value in (("max_runs", max_runs), ("stride", stride), ("jobs", jobs),
                            ("sample", sample)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"oom_sweep: argument {name!r} must be a whole number >= 1, got {value!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"oom_sweep: argument 'seed' must be a whole number >= 0, got {seed!r}")
        for name, value in (("time_budget", time_budget), ("timeout", timeout)):
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"oom_sweep: argument {name!r} must be a positive number of seconds")
        if isinstance(allow, type):
            allow = (allow,)
        if not all(isinstance(a, type) and issubclass(a, BaseException) for a in allow):
            raise ValueError("oom_sweep: argument 'allow' must be exception classes")
        self.max_runs = max_runs
        self.stride = stride or 1
        self.time_budget = time_budget
        self.persistent = bool(persistent)
        self.allow = (MemoryError, *tuple(allow))
        self.timeout = timeout
        self.jobs = jobs  # None: one child per core
        self.sample = sample
        self.seed = seed

    def indices(self, total: int, nodeid: str) -> tuple[list[int], str]:
        """The indices to fail, of ``total``, and how they were chosen ('' for all).

        The stride comes first, then the sample (drawn with ``seed``, by
        default one derived from the test's id, so that the same test samples
        the same indices on every run), then ``max_runs``.
        """
        indices = list(range(1, total + 1, self.stride))
        how = []
        if self.stride > 1:
            how.append(f"stride {self.stride}")
        if self.sample is not None and self.sample < len(indices):
            import random

            seed = self.seed if self.seed is not None else zlib.crc32(nodeid.encode())
            indices = sorted(random.Random(seed).sample(indices, self.sample))
            how.append(f"a sample of {self.sample}, seed {seed}")
        if self.max_runs is not None and self.max_runs < len(indices):
            indices = indices[: self.max_runs]
            how.append(f"max_runs {self.max_runs}")
        return indices, ", ".join(how)


def _cores() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Plan:
    __slots__ = ("budget", "default_budget", "threads", "no_alloc", "sweep", "replay", "stats")

    def __init__(self) -> None:
        self.budget: int | None = None
        self.default_budget = False  # the budget comes from the ini file or --alloc-budget
        self.threads = "current"
        self.no_alloc: dict | None = None
        self.sweep: _Sweep | None = None
        self.replay: int | None = None
        self.stats = False

    def wanted(self) -> bool:
        return bool(self.budget or self.no_alloc is not None or self.sweep or self.replay or self.stats)


def _wrong(item: pytest.Item, message: str) -> None:
    pytest.fail(f"{item.nodeid}: {message}", pytrace=False)


def _plan(item: pytest.Item) -> _Plan:
    config = item.config
    opt = config.option
    plan = _Plan()
    marker = item.get_closest_marker("alloc_budget")
    default = opt.alloc_budget or config.getini("alloc_budget").strip() or None
    plan.threads = opt.alloc_budget_threads or config.getini("alloc_budget_threads")
    if marker is not None:
        if len(marker.args) + ("size" in marker.kwargs) > 1 or set(marker.kwargs) - {"size", "threads"}:
            _wrong(item, "alloc_budget takes one size and threads='current' or 'all'")
        size = marker.args[0] if marker.args else marker.kwargs.get("size", default)
        plan.threads = marker.kwargs.get("threads", plan.threads)
        if plan.threads not in ("current", "all"):
            _wrong(item, "alloc_budget: threads must be 'current' or 'all'")
        try:
            plan.budget = None if size is None else _parse_budget(size, "alloc_budget")
        except ValueError as exc:
            _wrong(item, str(exc))
    elif default:
        plan.budget = _parse_budget(default, "alloc_budget")
        plan.default_budget = True
    marker = item.get_closest_marker("no_alloc")
    if marker is not None:
        if marker.args or set(marker.kwargs) - {"frees", "domains"}:
            _wrong(item, "no_alloc takes frees= and domains= only")
        plan.no_alloc = dict(marker.kwargs)
    marker = item.get_closest_marker("oom_sweep")
    if marker is not None or opt.oom_sweep:
        kwargs = dict(marker.kwargs) if marker is not None else {}
        if marker is not None and marker.args:
            _wrong(item, "oom_sweep takes keyword arguments only")
        for key, value in (
            ("max_runs", opt.oom_sweep_max_runs),
            ("stride", opt.oom_sweep_stride),
            ("time_budget", opt.oom_sweep_time),
            ("sample", opt.oom_sweep_sample),
            ("seed", opt.oom_sweep_seed),
            ("jobs", opt.oom_sweep_jobs),
        ):
            if value is not None:
                kwargs[key] = value  # the command line bounds every sweep of this run
        try:
            plan.sweep = _Sweep(**kwargs)
        except (TypeError, ValueError) as exc:
            _wrong(item, str(exc))
    plan.replay = opt.oom_replay
    plan.stats = "alloc_stats" in getattr(item, "fixturenames", ())
    if plan.replay is not None:
        plan.sweep = None  # replaying one index is what the sweep's report asks for
    return plan


def _unavailable(item: pytest.Item) -> None:
    why = item.config.stash.get(_NO_RUNTIME, "")
    message = (
        f"needs the allocpolicy runtime, which is not preloaded and could not be installed in "
        f"this process ({why}); {_HOW_TO_RUN}"
    )
    if item.config.getini("allocpolicy_unavailable") == "fail":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if not isinstance(item, pytest.Function):
        return
    plan = _plan(item)
    if not plan.wanted():
        return
    if _runtime(item.config) is None:
        _unavailable(item)
    item.stash[_PLAN] = plan
    item.stash[_STATS] = AllocStats()


# --- fixtures ------------------------------------------------------------------------


class AllocStats:
    """Allocations of the test body, in the plugin's scope (the test's thread,
    and threads bound to it with :func:`allocpolicy.bind`).

    Read while the body runs, the attributes are current; after it, they are
    what they were when it ended. Small Python objects are counted in 1 MiB
    arenas (see the internals page), everything else to the byte.
    """

    def __init__(self) -> None:
        self._instance: int | None = None
        self._final: tuple[int, int, int] = (0, 0, 0)

    def _read(self) -> tuple[int, int, int]:
        rt = _native.runtime()
        if self._instance is None or rt is None:
            return self._final
        rt.flush()
        st = rt.instance_stats(self._instance)
        if st is None:
            return self._final
        return st.live, st.peak, st.allocations

    def _close(self) -> None:
        self._final = self._read()
        self._instance = None

    @property
    def live(self) -> int:
        """Bytes allocated by the body and not freed yet."""
        return self._read()[0]

    @property
    def peak(self) -> int:
        """The highest ``live`` so far."""
        return self._read()[1]

    @property
    def count(self) -> int:
        """Allocations granted to the body."""
        return self._read()[2]

    def __repr__(self) -> str:
        live, peak, count = self._read()
        return f"AllocStats(live={live}, peak={peak}, count={count})"


@pytest.fixture
def alloc_stats(request: pytest.FixtureRequest) -> AllocStats:
    """Allocation statistics of this test's body: ``.live``, ``.peak``, ``.count``."""
    try:
        return request.node.stash[_STATS]
    except KeyError:
        _unavailable(request.node)
        raise  # unreachable: _unavailable skips or fails


@pytest.fixture(name="no_alloc")
def no_alloc_fixture(request: pytest.FixtureRequest):
    """:func:`allocpolicy.no_alloc`, for regions inside a test::

        def test_hot_path(no_alloc):
            data = prepare()
            with no_alloc():
                hot_path(data)
    """
    if _runtime(request.config) is None:
        _unavailable(request.node)
    import allocpolicy

    return allocpolicy.no_alloc


# --- running the body ------------------------------------------------------------------


def _declare_scope(rt: _native.Runtime, budget: int | None) -> None:
    # A one-scope table changes only that scope; the budget is copied into
    # each instance when it is entered.
    rt.configure(f"v=1;scope={SCOPE}:raise:{budget or 0}:0")


@contextlib.contextmanager
def _process_budget(rt: _native.Runtime, budget: int) -> Iterator[None]:
    """Bound what the whole process may grow by while the body runs."""
    from ._config import active_policy

    rt.flush()
    before = rt.process_stats()
    mode = _native.MODES[rt.scope_stats(0).mode]
    overdraft = getattr(active_policy().process, "overdraft", "count")
    option = "" if overdraft == "count" else f":overdraft={overdraft}"
    limit = before.live + budget
    if before.budget:
        limit = min(limit, before.budget)
    rt.configure(f"v=1;process={mode}:{limit}{option}")
    try:
        yield
    finally:
        rt.configure(f"v=1;process={mode}:{before.budget}{option}")


@contextlib.contextmanager
def _body_scope(rt: _native.Runtime, plan: _Plan, stats: AllocStats) -> Iterator[None]:
    """The test body's scope instance, with the plan's budget and region."""
    import allocpolicy

    _declare_scope(rt, plan.budget)
    with contextlib.ExitStack() as stack:
        if plan.budget and plan.threads == "all":
            stack.enter_context(_process_budget(rt, plan.budget))
        stack.enter_context(allocpolicy.task(SCOPE))
        stats._instance = rt.current()[0]
        stack.callback(stats._close)
        if plan.no_alloc is not None:
            stack.enter_context(allocpolicy.no_alloc(**plan.no_alloc))
        yield


def _run_body(
    rt: _native.Runtime,
    plan: _Plan,
    stats: AllocStats,
    item: pytest.Function,
    config: _native.InjectConfigC | None = None,
) -> None:
    """The test body in its scope, its allocations numbered under ``config``.

    What pytest's own pytest_pyfunc_call does, minus its checks of the result:
    an ordinary run, the sweep's children and a replay run the very same code.
    Numbering starts right before the call and stops right after it, so that
    only the body's allocations (and those of its error path) are counted
    and failed, never the plugin's own bookkeeping inside the scope.

    A coroutine function runs on an event loop of its own, made for the call
    outside the scope. The scope is entered inside the test's task, so it
    follows that task (``_core/stepping.py``): the loop's own work between the
    task's steps is neither charged nor numbered, and the tasks the body
    spawns are, as they inherit its context.
    """
    funcargs = item.funcargs
    kwargs = {arg: funcargs[arg] for arg in item._fixtureinfo.argnames}
    body = item.obj
    if not inspect.iscoroutinefunction(body):
        with _body_scope(rt, plan, stats):
            if config is not None:
                rt.inject_set(config)
            try:
                body(**kwargs)
            finally:
                if config is not None:
                    rt.inject_set(None)
        return
    import asyncio

    async def in_its_task() -> None:
        with _body_scope(rt, plan, stats):
            if config is not None:
                rt.inject_set(config)
            try:
                await body(**kwargs)
            finally:
                if config is not None:
                    rt.inject_set(None)

    with asyncio.Runner() as runner:
        runner.run(in_its_task())


def _observe_python(rt: _native.Runtime) -> None:
    """Number the requests of Python's MEM and OBJ domains too.

    Small objects come from pymalloc's pools, which never call ``malloc``:
    without these observing layers (native/src/hooks_pymem.c) a sweep would
    see only what reaches ``malloc`` and Python's RAW domain, and miss most
    of what ordinary Python code allocates. Installed once, before any child
    is forked, so that every child inherits them; put back if a tool such as
    tracemalloc took them off.
    """
    rt.install_domain_hooks()


def _injection(rt: _native.Runtime, index: int | None, persistent: bool) -> _native.InjectConfigC:
    """The runtime's setting that numbers the body's allocations (and fails ``index``)."""
    from ._inject import InjectSettings

    settings = InjectSettings(scope=SCOPE, nth=index, persistent=persistent if index else False)
    return settings._struct(rt)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    plan = pyfuncitem.stash.get(_PLAN, None)
    if plan is None:
        return None  # pytest calls the test as usual
    if inspect.isasyncgenfunction(pyfuncitem.obj):
        pytest.fail(
            "allocpolicy's markers and fixtures need a test function or a coroutine function, "
            "not an async generator function",
            pytrace=False,
        )
    rt = _native.runtime()
    stats = pyfuncitem.stash[_STATS]
    if plan.sweep is not None:
        problems = _Sweeper(pyfuncitem, plan, rt).run()
        if problems:
            pytest.fail(problems, pytrace=False)
    if plan.replay is None:
        _run_body(rt, plan, stats, pyfuncitem)
        return True
    from . import _inject

    marker = pyfuncitem.get_closest_marker("oom_sweep")
    persistent = bool(marker is not None and marker.kwargs.get("persistent"))
    _cache_bytecode()
    gc.collect()
    gc.freeze()
    _prepare(rt, plan, pyfuncitem)
    AllocStats()
    _declare_scope(rt, plan.budget)
    config = _injection(rt, plan.replay, persistent)
    previous = _inject.current()
    _held_before(rt)
    try:
        _run_body(rt, plan, stats, pyfuncitem, config)
    finally:
        rt.region_exit()
        gc.unfreeze()
        seen = rt.inject_stats()
        _inject.reapply(rt, previous)
        _say(pyfuncitem.config, f"[oom_replay] {pyfuncitem.nodeid}: allocation #{plan.replay} "
             + ("failed" if seen.injected else f"was not reached (the body made {seen.seen})"))
    return True


# --- the sweep --------------------------------------------------------------------------


def _say(config: pytest.Config, line: str) -> None:
    """A progress line on the terminal, even while output is captured."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or config.option.verbose < 0:
        return
    capman = config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        reporter.ensure_newline()
        reporter.write_line(line)


#: How a report names the entry point each allocator domain stands for.
_ENTRY_POINTS = {
    "libc": "malloc",
    "py_raw": "PyMem_RawMalloc",
    "py_mem": "PyMem_Malloc",
    "py_obj": "PyObject_Malloc",
    "numpy": "NumPy's data allocator",
    "py_arena": "a pymalloc arena",
}


def _what_failed(run: "_Run") -> str:
    """'56 bytes from PyObject_Malloc': the failed request and where it came in."""
    where = _ENTRY_POINTS.get(run.first_domain, run.first_domain)
    return f"{run.first_size} bytes from {where}" if where else f"{run.first_size} bytes"


class _Child:
    """A forked run still going: what the parent keeps of it."""

    __slots__ = ("run", "pid", "rfd", "out", "started", "deadline", "data")

    def __init__(self, run: "_Run", pid: int, rfd: int, out: Any, started: float, deadline: float) -> None:
        self.run = run
        self.pid = pid
        self.rfd = rfd
        self.out = out  # the file its stdout and stderr go to
        self.started = started
        self.deadline = deadline
        self.data = bytearray()  # what it wrote to its pipe


class _Run:
    """What one forked run of the body did."""

    __slots__ = ("index", "status", "outcome", "exc_type", "message", "frames", "allowed", "seen",
                 "injected", "objects", "blocks", "net_bytes", "output", "seconds", "first_size",
                 "first_domain", "ended")

    def __init__(self, index: int | None) -> None:
        self.index = index
        self.status: int | None = None  # waitpid status; None: killed after the timeout
        self.outcome = "none"  # passed | raised | none (never reported)
        self.exc_type = self.message = ""
        self.frames: list[str] = []
        self.allowed = False
        self.seen = self.injected = self.objects = self.blocks = self.net_bytes = self.first_size = 0
        self.first_domain = ""  # the allocator domain the failed allocation came through
        self.ended = ""  # how the body ended (raised | returned), once the child said so
        self.output = ""
        self.seconds = 0.0

    @property
    def signal(self) -> int | None:
        if self.status is not None and os.WIFSIGNALED(self.status):
            return os.WTERMSIG(self.status)
        return None


def _judged(exc: BaseException) -> BaseException:
    """The exception a run is judged by: the body's own, when the task
    boundary converted it to AllocError because it carries the refusal (a
    MemoryError turned into a ValueError by the code under test is that
    ValueError, as the body raised it)."""
    from ._errors import AllocError

    cause = exc.__cause__
    if isinstance(exc, AllocError) and cause is not None and not isinstance(cause, MemoryError):
        return cause
    return exc


def _describe(exc: BaseException, allow: tuple, body: object) -> dict[str, Any]:
    exc = _judged(exc)
    # The frames are read by hand: the traceback module registers every file
    # it sees in linecache, which would look like memory the run kept.
    entries = []
    tb = exc.__traceback__
    while tb is not None:
        entries.append((tb.tb_frame.f_code, tb.tb_lineno))
        tb = tb.tb_next
    # From the test function on: the frames of the plugin and of the task
    # boundary above it say nothing about the failure.
    body_code = getattr(body, "__code__", None)
    start = next((i for i, (code, _) in enumerate(entries) if code is body_code), 0)
    frames = [f"{code.co_filename}:{line} in {code.co_name}" for code, line in entries[start:]]
    from ._core import stepping

    if isinstance(exc, MemoryError) and entries and entries[-1][0].co_filename == stepping.__file__:
        # The failed allocation was the runtime's own, attaching or detaching
        # the test task's scope between two of its steps (inside the scope, so
        # numbered); the body never saw it and the task's scopes are left as
        # that failure left them. Not a finding about the test.
        return {"outcome": "stepping"}
    return {
        "outcome": "raised",
        "exc_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc)[:500],
        "frames": frames,
        "allowed": isinstance(exc, allow),
    }


def _cache_bytecode() -> None:
    """Make CPython cache the bytecode of every function's code, once.

    Turning a refused allocation into AllocError reads the bytecode of the
    innermost frame (``code.co_code``, in ``_core/refusal.py``), and CPython
    caches that copy on the code object at the first read. Read first in a
    child, it would look like memory the run kept; read here, before the
    first child is forked (and before a replay, which must start from the
    same state), it is part of every run's starting point. About 40 ms and
    1.6 MB for the 8,000 code objects of a pytest session.
    """
    seen: set[int] = set()
    todo = [f.__code__ for f in gc.get_objects() if isinstance(f, types.FunctionType)]
    while todo:
        code = todo.pop()
        if id(code) in seen:
            continue
        seen.add(id(code))
        code.co_code  # noqa: B018 - read for its side effect, the cache
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))


def _prepare(rt: _native.Runtime, plan: _Plan, item: pytest.Function) -> None:
    """What a sweep does once before its first child, and a replay before its run.

    Resolved here, once: the error path of every child would otherwise fill
    these caches, and look like it kept memory. So are the modules the
    children use, and the runtime's per-thread buffers: made in each child,
    they would count as memory its run kept. A replay does the same, so that
    it starts from the state the sweep's children started from.
    """
    from . import _inject, _regions, _scope  # noqa: F401
    if inspect.iscoroutinefunction(item.obj):
        import asyncio  # noqa: F401 - once, not in every child
    from ._core.names import scope_id, scope_name

    _declare_scope(rt, plan.budget)
    _observe_python(rt)
    scope_name(rt, scope_id(rt, SCOPE))
    rt.last_violation()
    rt.region_enter(_COUNT, True, _ARENAS_ONLY)
    rt.region_exit()
    _refuse_once(rt)


def _refuse_once(rt: _native.Runtime) -> None:
    """Take the whole path of one injected refusal, here: what it sets up the
    first time (the runtime's report buffers, the loader's state of the
    unwinder it may load, the converted error's caches) then exists before
    every run, instead of looking like memory the first failing run kept."""
    import allocpolicy

    rt.inject_set(_injection(rt, 1, False))
    try:
        with allocpolicy.task(SCOPE):
            bytearray(4096)
    except MemoryError:
        pass
    finally:
        rt.inject_set(None)


def _held_before(rt: _native.Runtime) -> tuple[int, int, int]:
    """Bring the process to the state every numbered run starts from, and
    measure what it holds: (objects the collector tracks, pymalloc blocks,
    live bytes). Leaves a region open that counts pymalloc's arena events.

    A sweep's child and a replay both start here, so that the same index
    names the same allocation in both: a full collection also empties
    CPython's free lists (tuples, lists, dicts, floats), and which requests
    a free list answers without allocating decides the numbering.
    """
    # An exception caught in the caller gives its frame a frame object, which
    # lives as long as the frame: make it exist in every run.
    sys._getframe(1)
    gc.collect()
    # Everything alive now is out of the collector's sight until the run
    # ends (gc.unfreeze): its collections during the body and the counts
    # below then cost what the run made, not what the whole session holds.
    gc.freeze()
    objects = len(gc.get_objects())
    blocks = sys.getallocatedblocks()
    rt.flush()
    live = rt.process_stats().live
    # What the run keeps of native memory is the change of the process's
    # live bytes, less pymalloc's arenas (1 MiB at a time, opened and
    # released as Python objects come and go, which the block count already
    # sees): a region counting arena events gives those.
    rt.region_enter(_COUNT, True, _ARENAS_ONLY)
    return objects, blocks, live


class _Sweeper:
    def __init__(self, item: pytest.Function, plan: _Plan, rt: _native.Runtime) -> None:
        self.item = item
        self.plan = plan
        self.sweep = plan.sweep
        self.rt = rt

    # -- parent side --

    def run(self) -> str | None:
        """Sweep; a failure report, or None if every run behaved."""
        # Each child's first full collection would walk every object of the
        # session, and touch (copy) every page that holds one: once here,
        # and frozen, each child collects only what its run makes.
        _cache_bytecode()
        gc.collect()
        gc.freeze()
        try:
            return self.sweep_all()
        finally:
            gc.unfreeze()

    def sweep_all(self) -> str | None:
        item, sweep = self.item, self.sweep
        started = time.monotonic()
        self.stopped: str | None = None
        _prepare(self.rt, self.plan, item)
        baseline = self.run_one(None, timeout=sweep.timeout or 600)
        if baseline.outcome == "raised":
            # The body does not pass as it is: the ordinary run that
            # follows reports that, with pytest's own traceback.
            return None
        broken = self.judge(baseline, baseline)
        if broken:
            return (
                f"oom_sweep: the counting run (no failure injected) {broken}; a forked copy "
                "of this process cannot run the test body\n"
                + "\n".join(f"    | {text}" for text in baseline.output.strip().splitlines()[:16])
            )
        total = baseline.seen
        indices, chosen = sweep.indices(total, item.nodeid)
        timeout = sweep.timeout or max(60.0, 20 * baseline.seconds)
        jobs = min(sweep.jobs or _cores(), max(1, len(indices)))
        _say(item.config, f"[oom_sweep] {item.nodeid}: {total} allocations in the test body; "
             f"failing {len(indices)} of them in turn" + (f" ({chosen})" if chosen else "")
             + (f", {jobs} at a time" if jobs > 1 else ""))
        problems: list[tuple[_Run, str]] = []
        done = stepping = 0
        last_report = time.monotonic()
        by_domain: dict[str, int] = {}
        for result in self.runs(indices, timeout, jobs, started):
            done += 1
            if result.first_domain:
                by_domain[result.first_domain] = by_domain.get(result.first_domain, 0) + 1
            if result.outcome == "stepping":
                stepping += 1
                continue
            problem = self.judge(result, baseline)
            if problem:
                problems.append((result, problem))
            if time.monotonic() - last_report > 5:
                last_report = time.monotonic()
                _say(item.config, f"[oom_sweep] {item.nodeid}: {done}/{len(indices)} runs, "
                     f"{len(problems)} problem(s)")
        problems.sort(key=lambda pair: pair[0].index)
        elapsed = time.monotonic() - started
        covered = f"{done} of {total} allocations failed in turn"
        if self.stopped:
            covered += f" ({self.stopped}, {len(indices) - done} not run)"
        elif chosen:
            covered += f" ({chosen})"
        if by_domain:
            covered += " [" + ", ".join(
                f"{_ENTRY_POINTS.get(name, name)}: {n}" for name, n in sorted(by_domain.items())
            ) + "]"
        if stepping:
            covered += (f"; {stepping} of them were allocpolicy's own, between the task's steps, "
                        "and are not judged")
        rate = f", {done / elapsed:.1f} runs/s" if elapsed > 0 and done else ""
        _say(item.config, f"[oom_sweep] {item.nodeid}: {covered}, {len(problems)} problem(s), "
             f"{elapsed:.1f} s{rate}")
        if not problems:
            return None
        return self.report(problems, covered, baseline)

    def judge(self, run: _Run, baseline: _Run) -> str | None:
        where = f" at {run.frames[-1]}" if run.frames else ""
        if run.status is None:
            return f"hung: killed after {run.seconds:.0f} s"
        sig = run.signal
        if sig is not None:
            crashed = f"crashed with {signal.Signals(sig).name}"
            if not run.ended:
                return crashed
            how = f"raised {run.exc_type}" if run.outcome == "raised" else run.ended
            return (f"{crashed} after the body {how}: the failure left the process broken, and "
                    "the code that ran next (the sweep's own) crashed on it")
        if run.outcome == "none":
            code = os.WEXITSTATUS(run.status) if os.WIFEXITED(run.status) else run.status
            return f"the process exited (status {code}) before the body returned"
        if run.outcome == "raised" and not run.allowed:
            return f"raised {run.exc_type}: {run.message}{where} (expected a MemoryError)"
        leaked = []
        if run.objects > baseline.objects:
            leaked.append(f"{run.objects - baseline.objects} Python object(s)")
        elif run.blocks > baseline.blocks + _BLOCK_SLACK:
            leaked.append(f"{run.blocks - baseline.blocks} blocks of Python's small-object allocator")
        if run.net_bytes > baseline.net_bytes:
            leaked.append(f"{run.net_bytes - baseline.net_bytes} bytes of malloc memory")
        if leaked:
            return (
                "leaked on the error path: " + " and ".join(leaked)
                + " still held after the failure, beyond what a passing run keeps"
            )
        return None

    def report(self, problems: list[tuple[_Run, str]], covered: str, baseline: _Run) -> str:
        nodeid = self.item.nodeid
        lines = [f"oom_sweep: {len(problems)} run(s) went wrong ({covered}; the test body makes "
                 f"{baseline.seen} allocations in scope {SCOPE!r})"]
        for run, problem in problems[:10]:
            lines.append("")
            size = f" ({_what_failed(run)})" if run.first_size else ""
            lines.append(f"allocation #{run.index}{size} failed: {problem}")
            if run.outcome == "raised" and run.frames:
                lines.append(f"  the body raised {run.exc_type}: {run.message}")
                lines += [f"    {frame}" for frame in run.frames[-6:]]
            if run.signal is not None or run.outcome == "none":
                # faulthandler writes the innermost frames first.
                excerpt = run.output.strip().splitlines()[:16]
                lines += [f"    | {text}" for text in excerpt]
            lines.append(f"  replay: pytest --oom-replay={run.index} '{nodeid}'")
        if len(problems) > 10:
            rest = [str(run.index) for run, _ in problems[10:]]
            lines.append("")
            lines.append(f"... and {len(problems) - 10} more, at allocations {', '.join(rest[:40])}"
                         + (" ..." if len(rest) > 40 else ""))
        return "\n".join(lines)

    def runs(self, indices: list[int], timeout: float, jobs: int, started: float) -> Iterator[_Run]:
        """The run of each index, as they end, with up to ``jobs`` children at once.

        Sets ``self.stopped`` when the time budget ran out before every index
        was started; children already running are waited for.
        """
        pending = iter(indices)
        flying: dict[int, _Child] = {}  # by the read end of each child's pipe
        budget = self.sweep.time_budget
        try:
            while True:
                while not self.stopped and len(flying) < jobs:
                    if budget is not None and time.monotonic() - started > budget:
                        self.stopped = f"stopped by the time budget ({budget:g} s)"
                        break
                    index = next(pending, None)
                    if index is None:
                        break
                    child = self.start(index, timeout, flying)
                    flying[child.rfd] = child
                if not flying:
                    return
                wait = max(0.0, min(c.deadline for c in flying.values()) - time.monotonic())
                ready, _, _ = select.select(list(flying), [], [], wait)
                for rfd in ready:
                    chunk = os.read(rfd, 65536)
                    if chunk:
                        flying[rfd].data += chunk
                    else:
                        yield self.finish(flying.pop(rfd), killed=False)
                now = time.monotonic()
                for rfd in [rfd for rfd, c in flying.items() if now >= c.deadline]:
                    child = flying.pop(rfd)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGKILL)
                    yield self.finish(child, killed=True)
        finally:
            # Interrupted (Ctrl-C, an error in the parent): no child outlives it.
            for child in flying.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                self.finish(child, killed=True)

    def run_one(self, index: int | None, timeout: float) -> _Run:
        child = self.start(index, timeout, {})
        ready = True
        while ready:
            left = child.deadline - time.monotonic()
            ready = left > 0 and bool(select.select([child.rfd], [], [], left)[0])
            if ready:
                chunk = os.read(child.rfd, 65536)
                if not chunk:
                    return self.finish(child, killed=False)
                child.data += chunk
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGKILL)
        return self.finish(child, killed=True)

    def start(self, index: int | None, timeout: float, others: dict[int, _Child]) -> _Child:
        out = tempfile.TemporaryFile()
        sys.stdout.flush()
        sys.stderr.flush()
        rfd, wfd = os.pipe()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child never returns
            code = 70
            try:
                os.close(rfd)
                for fd in others:  # the other children's pipes are theirs
                    os.close(fd)
                self.child(index, wfd, out)
                code = 0
            except BaseException:  # noqa: BLE001 - the harness itself failed
                with contextlib.suppress(BaseException):
                    os.write(2, traceback.format_exc().encode())
            finally:
                os._exit(code)
        os.close(wfd)
        return _Child(_Run(index), pid, rfd, out, started, started + timeout)

    def finish(self, child: _Child, killed: bool) -> _Run:
        """Collect a child that closed its pipe (or was killed)."""
        os.close(child.rfd)
        status = 0
        while True:
            try:
                _, status = os.waitpid(child.pid, 0)
                break
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ECHILD:
                    break
                raise
        run = child.run
        run.seconds = time.monotonic() - child.started
        run.status = None if killed else status
        for line in bytes(child.data).splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                for key, value in record.items():
                    setattr(run, key, value)
        with child.out:
            child.out.seek(0)
            run.output = child.out.read(1 << 20).decode("utf-8", "replace")
        return run

    # -- child side --

    def say_ended(self, index: int | None, wfd: int, how: bytes) -> None:
        """The child's first words after the body: how it ended, and which
        allocation failed.

        Said before anything else runs, with bytes formatting and no other
        Python code: the body's failure can leave the interpreter broken for
        whatever runs next (on CPython 3.12 and 3.13 a failed function
        creation frees a code object still in use, docs/testing.rst), and the
        next code is this module's, which then crashes. The parent tells such
        a crash as one after the body ended, with the allocation that did it.
        """
        line = b'{"ended": "%s"' % how
        if index is not None:
            v = self.rt.last_violation()
            if v.index == index:
                line += b', "first_size": %d, "first_domain": "%s"' % (
                    v.requested, _native.DOMAINS[v.domain].encode())
        os.write(wfd, line + b"}\n")

    def child(self, index: int | None, wfd: int, out: Any) -> None:
        """Run the body once in this forked child and write what happened to ``wfd``."""
        rt = self.rt
        # Output of this run goes to a file the parent reads back, not into
        # the test's captured output (which would repeat it once per run).
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.stdout = sys.stderr = open(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        # pytest's faulthandler writes to its own copy of the terminal.
        import faulthandler

        faulthandler.enable(file=2, all_threads=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        stats = AllocStats()
        sweep = self.sweep
        _declare_scope(rt, self.plan.budget)
        config = _injection(rt, index, sweep.persistent)
        objects, blocks, live = _held_before(rt)
        record: dict[str, Any] = {"outcome": "passed"}
        try:
            _run_body(rt, self.plan, stats, self.item, config)
        except BaseException as exc:  # noqa: BLE001 - judged by the parent
            self.say_ended(index, wfd, b"raised")
            record = _describe(exc, sweep.allow, self.item.obj)
            del exc
        else:
            self.say_ended(index, wfd, b"returned")
        s = rt.inject_stats()
        record.update(seen=s.seen, injected=s.injected)
        # Written now, so that a crash while measuring still reports it.
        line = json.dumps(record).encode() + b"\n"
        del record
        os.write(wfd, line)
        del line
        gc.collect()
        arenas = rt.region_exit()
        rt.flush()
        measured = {
            "objects": len(gc.get_objects()) - objects,
            "blocks": sys.getallocatedblocks() - blocks,
            "net_bytes": rt.process_stats().live - live - (arenas.bytes - arenas.bytes_freed),
        }
        os.write(wfd, json.dumps(measured).encode() + b"\n")
        sys.stdout.flush()
