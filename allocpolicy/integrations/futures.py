"""``concurrent.futures`` executors whose every task runs in its own scope
instance, and the picklable wrapper they use::

    from allocpolicy.integrations.futures import ScopedThreadPoolExecutor

    with ScopedThreadPoolExecutor(max_workers=8, scope="task") as pool:
        futures = [pool.submit(handle, job) for job in jobs]

A task that the policy refuses memory fails alone: its future raises
:class:`allocpolicy.AllocError` (with the scope, size, budget and live bytes),
the other tasks and the workers go on. :class:`ScopedProcessPoolExecutor` does
the same in worker processes (started under the same preload, so every
worker enforces the policy); the error is pickled back to the caller.

:class:`ScopedCall` is the wrapper on its own, for any runner that takes a
callable (``loop.run_in_executor``, a job queue): it pickles when the
function does.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import process as _process
from typing import Any

import allocpolicy

__all__ = ["ScopedCall", "ScopedThreadPoolExecutor", "ScopedProcessPoolExecutor"]


def _check_scope(scope: object) -> str:
    if not isinstance(scope, str):
        raise TypeError(f"argument 'scope' must be str, not {type(scope).__name__}")
    if not scope:
        raise ValueError("argument 'scope' must not be empty")
    return scope


class ScopedCall:
    """``fn`` called in a new instance of ``scope``, as a task boundary.

    Calling it runs ``with allocpolicy.task(scope): return fn(*args, **kwargs)``;
    with ``retries``, ``allocpolicy.task(scope, retries=retries,
    escalate=escalate).run(fn, *args, **kwargs)``: a call that its own budget
    refused runs again in a new instance with ``escalate`` times the budget,
    for that call only. When it raises :class:`allocpolicy.AllocError`, the
    locals of the failed call's frames are cleared before the error goes on,
    so that a result holder (a future) does not keep the failed task's memory
    alive. It pickles as its function, scope name and retry settings, so a
    process pool can send it to its workers (the scope is looked up in the
    worker's policy).
    """

    __slots__ = ("fn", "scope", "retries", "escalate", "_task")

    def __init__(self, fn: Callable[..., Any], scope: str = "task", *, retries: int = 0,
                 escalate: float = 2.0) -> None:
        if not callable(fn):
            raise TypeError(f"argument 'fn' must be callable, not {type(fn).__name__}")
        self.fn = fn
        self.scope = _check_scope(scope)
        self.retries = retries
        self.escalate = escalate
        # Built here so that task() checks the retry settings where they are given.
        self._task = allocpolicy.task(self.scope, retries=retries, escalate=escalate) if retries else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._task is not None:
                return self._task.run(self.fn, *args, **kwargs)
            with allocpolicy.task(self.scope):
                return self.fn(*args, **kwargs)
        except allocpolicy.AllocError as err:
            # The error is kept by whoever collects the result (a Future, for
            # as long as the caller holds it); through its traceback it would
            # keep the failed task's locals, the very memory that was refused
            # more of. The traceback keeps its lines; the locals go now.
            traceback.clear_frames(err.__traceback__)
            raise

    def __reduce__(self):
        return _scoped_call, (self.fn, self.scope, self.retries, self.escalate)

    def __repr__(self) -> str:
        retries = f", retries={self.retries}, escalate={self.escalate}" if self.retries else ""
        return f"ScopedCall({self.fn!r}, scope={self.scope!r}{retries})"


def _scoped_call(fn, scope, retries=0, escalate=2.0) -> ScopedCall:
    return ScopedCall(fn, scope, retries=retries, escalate=escalate)


def scoped(fn: Callable[..., Any], scope: str, retries: int = 0, escalate: float = 2.0) -> ScopedCall:
    """``fn`` as a :class:`ScopedCall` in ``scope``, unless it already is one
    (a task must not run in two nested instances of its scope)."""
    return fn if isinstance(fn, ScopedCall) else ScopedCall(fn, scope, retries=retries, escalate=escalate)


class _Retries:
    """The ``scope``, ``retries`` and ``escalate`` of a runner, checked once."""

    def _set_scope(self, scope: str, retries: int, escalate: float) -> None:
        self.scope = _check_scope(scope)
        self.retries = retries
        self.escalate = escalate
        if retries:
            allocpolicy.task(self.scope, retries=retries, escalate=escalate)  # checks them

    def _scoped(self, fn) -> ScopedCall:
        return scoped(fn, self.scope, self.retries, self.escalate)


class ScopedThreadPoolExecutor(_Retries, ThreadPoolExecutor):
    """A :class:`~concurrent.futures.ThreadPoolExecutor` whose every task
    (``submit``, ``map``) runs in a new instance of ``scope``, rerun up to
    ``retries`` times with an escalated budget (see :class:`ScopedCall`)."""

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "",
                 initializer=None, initargs=(), *, scope: str = "task", retries: int = 0,
                 escalate: float = 2.0) -> None:
        self._set_scope(scope, retries, escalate)
        super().__init__(max_workers, thread_name_prefix, initializer, initargs)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return super().submit(self._scoped(fn), *args, **kwargs)


class ScopedProcessPoolExecutor(_Retries, ProcessPoolExecutor):
    """A :class:`~concurrent.futures.ProcessPoolExecutor` whose every task
    runs in a new instance of ``scope`` in its worker process, rerun up to
    ``retries`` times with an escalated budget; with ``map(..., chunksize=N)``
    each item of a chunk still gets its own."""

    def __init__(self, max_workers: int | None = None, mp_context=None, initializer=None,
                 initargs=(), *, scope: str = "task", retries: int = 0, escalate: float = 2.0,
                 **kwargs) -> None:
        self._set_scope(scope, retries, escalate)
        super().__init__(max_workers, mp_context, initializer, initargs, **kwargs)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if _is_chunk(fn):
            # From map() below: the chunk's items are scoped one by one.
            return super().submit(fn, *args, **kwargs)
        return super().submit(self._scoped(fn), *args, **kwargs)

    def map(self, fn, *iterables, **kwargs):
        return super().map(self._scoped(fn), *iterables, **kwargs)


def _is_chunk(fn: object) -> bool:
    """ProcessPoolExecutor.map submits ``partial(_process_chunk, fn)`` per chunk."""
    return (
        isinstance(fn, functools.partial)
        and fn.func is getattr(_process, "_process_chunk", None)
        and bool(fn.args)
        and isinstance(fn.args[0], ScopedCall)
    )
