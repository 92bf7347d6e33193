"""Dask distributed: every task in its own scope instance, and the worker's
process budget from Dask's ``memory_limit``, with one line::

    from allocpolicy.integrations.dask import AllocPolicyPlugin

    client.register_plugin(AllocPolicyPlugin(scope="task"))

Start the cluster under the runtime (``allocpolicy run -- python app.py`` for a
``LocalCluster``; ``allocpolicy run -- dask worker ...`` for each worker). A
task that the policy refuses memory fails alone with
:class:`allocpolicy.AllocError` (``client.gather`` raises it, with the scope,
size, budget and live bytes); the worker, its other tasks and its data stay.
Without the plugin, the worker's nanny sees the memory grow, kills the worker
and starts a new one, and every task and result on it is lost.

How it works: a worker runs each task through its executor; the plugin puts
a wrapper around the worker's task executors that runs each task in
:func:`allocpolicy.task`. Dask catches every exception of a task itself, so a
refused allocation first shows up in its task report as a ``MemoryError``;
the wrapper re-raises it inside the task boundary, which turns a refusal of
this runtime into ``AllocError`` (and leaves any other ``MemoryError`` as
Dask reported it), then reports that to the scheduler in Dask's own format.
The failed task's locals are cleared, so its error, which the worker keeps,
does not keep the memory.
"""

from __future__ import annotations

import traceback
import warnings
from concurrent.futures import Executor
from typing import Any, Callable

import dask.config
from distributed import WorkerPlugin
from distributed.core import error_message

import allocpolicy

from ._process_budget import set_process_budget
from .futures import _check_scope

__all__ = ["AllocPolicyPlugin"]

#: Executors of a worker that never run user tasks.
_INTERNAL_EXECUTORS = ("offload", "actor")


def _auto_fraction() -> float:
    """Just below the share of ``memory_limit`` at which the nanny kills the
    worker (``distributed.worker.memory.terminate``, 0.95 by default): a
    refused task is better than a lost worker, and the process holds more
    than the live bytes the runtime counts (the interpreter, fragmentation)."""
    terminate = dask.config.get("distributed.worker.memory.terminate", 0.95)
    return max(0.05, float(terminate) - 0.05) if terminate else 0.95


class TaskScopedThreadPoolExecutor(Executor):
    """Wraps a worker's thread pool: each task it runs, in a scope instance.

    Dask runs a task in the worker's thread-local state only when its
    executor's type name says ``ThreadPoolExecutor``; this class's name says so.
    Everything but ``submit`` is the wrapped pool's.
    """

    def __init__(self, inner: Executor, at_boundary: Callable[[Callable[[], Any]], Any]) -> None:
        self.inner = inner
        self.at_boundary = at_boundary

    def submit(self, fn, /, *args, **kwargs):
        return self.inner.submit(_run_in_scope, self.at_boundary, fn, args, kwargs)

    def shutdown(self, wait: bool = True, **kwargs) -> None:
        self.inner.shutdown(wait=wait, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _in_with_block(boundary: allocpolicy.task) -> Callable[[Callable[[], Any]], Any]:
    def run(attempt):
        with boundary:
            return attempt()

    return run


def _run_in_scope(at_boundary, fn, args, kwargs):
    reports: list = []

    def attempt():
        report = fn(*args, **kwargs)
        reports.append(report)
        exc = report.get("actual_exception") if isinstance(report, dict) else None
        if isinstance(exc, MemoryError) and not isinstance(exc, allocpolicy.AllocError):
            # Inside the boundary: a refusal of this runtime leaves as
            # AllocError (and is retried, with retries); another MemoryError
            # comes back unchanged.
            raise exc
        return report

    try:
        return at_boundary(attempt)
    except allocpolicy.AllocError as err:
        return _failure(reports[-1] if reports else None, err)
    except MemoryError:
        return reports[-1]


def _failure(report: dict | None, err: allocpolicy.AllocError) -> dict:
    failed = error_message(err)
    failed["op"] = "task-erred"
    failed["actual_exception"] = err
    for key in ("start", "stop", "thread"):
        if report is not None and key in report:
            failed[key] = report[key]
    # The worker keeps the error (and its traceback) with the task's state;
    # its frames' locals are the memory the task was refused more of.
    traceback.clear_frames(err.__traceback__)
    return failed


class AllocPolicyPlugin(WorkerPlugin):
    """A WorkerPlugin that runs every task in a new instance of ``scope`` and
    sets the worker's process budget from its ``memory_limit``.

    Args:
        scope: the scope each task runs in; the policy must declare it.
        memory_fraction: the share of the worker's ``memory_limit`` that
            becomes the process budget: ``"auto"`` (just below the nanny's
            ``terminate`` threshold), a float in (0, 1], or ``None`` to keep
            the policy's process budget. A worker without a memory limit keeps
            the policy's.
        retries: how many times a task that its own budget refused is run
            again, each time in a new instance with ``escalate`` times the
            budget that refused it (for that task only; see
            :class:`allocpolicy.task`).
        escalate: the factor by which each rerun's budget grows.
    """

    name = "allocpolicy"
    idempotent = True

    def __init__(self, scope: str = "task", *, memory_fraction: float | str | None = "auto",
                 retries: int = 0, escalate: float = 2.0) -> None:
        self.scope = _check_scope(scope)
        self.retries = retries
        self.escalate = escalate
        if retries:
            allocpolicy.task(self.scope, retries=retries, escalate=escalate)  # checks them
        if memory_fraction not in (None, "auto"):
            if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float)):
                raise TypeError(
                    "argument 'memory_fraction' must be a float, 'auto' or None, "
                    f"not {type(memory_fraction).__name__}"
                )
            if not 0 < memory_fraction <= 1:
                raise ValueError(f"argument 'memory_fraction' must be in (0, 1], got {memory_fraction}")
        self.memory_fraction = memory_fraction

    def setup(self, worker) -> None:
        if not allocpolicy.is_active():
            warnings.warn(
                f"worker {worker.address}: the allocpolicy runtime is not preloaded, so tasks run "
                "without budgets; start the worker under `allocpolicy run`",
                allocpolicy.AllocPolicyWarning,
                stacklevel=2,
            )
            return
        # Checked here, in the worker: the policy is the worker's.
        scopes = allocpolicy.active_policy().scopes
        if self.scope not in scopes:
            raise allocpolicy.UnknownScopeError(self.scope, list(scopes))
        limit = worker.memory_manager.memory_limit
        if self.memory_fraction is not None and limit:
            fraction = _auto_fraction() if self.memory_fraction == "auto" else self.memory_fraction
            set_process_budget(int(limit * fraction))
        for name, executor in list(worker.executors.items()):
            if name in _INTERNAL_EXECUTORS or isinstance(executor, TaskScopedThreadPoolExecutor):
                continue
            at_boundary = (
                allocpolicy.task(self.scope, retries=self.retries, escalate=self.escalate).run
                if self.retries else _in_with_block(allocpolicy.task(self.scope))
            )
            worker.executors[name] = TaskScopedThreadPoolExecutor(executor, at_boundary)

    def teardown(self, worker) -> None:
        for name, executor in list(worker.executors.items()):
            if isinstance(executor, TaskScopedThreadPoolExecutor):
                worker.executors[name] = executor.inner
