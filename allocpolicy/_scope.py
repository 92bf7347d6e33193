"""Scopes, task boundaries and carrying a scope instance into other threads."""

from __future__ import annotations

import functools
import threading
from contextlib import ContextDecorator
from typing import Any, Callable, TypeVar

from . import _native
from ._core import refusal
from ._core.instances import InstanceHandle
from ._core.names import scope_id, warn_inactive
from ._regions import raise_outcome, region_outcome

__all__ = ["scope", "task", "bind"]

F = TypeVar("F", bound=Callable[..., Any])

# Per-thread record of what each `with` entered, so that exits pair with
# entries even when one scope object is used by many threads at once.
_frames = threading.local()


def _stack() -> list:
    try:
        return _frames.stack
    except AttributeError:
        _frames.stack = []
        return _frames.stack


def _check_name(name: object, func: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{func}(): argument 'name' must be str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{func}(): argument 'name' must not be empty")
    return name


class scope(ContextDecorator):
    """Run a block (or a decorated function) in a new instance of scope ``name``.

    The innermost scope decides what a refused allocation does (its
    ``on_oom``); every enclosing scope's budget still applies. A scope is not a
    task boundary: a ``MemoryError`` passes through unchanged.

    Without a preloaded runtime the block runs unscoped and an
    :class:`AllocPolicyWarning` is issued once.
    """

    _func = "scope"

    def __init__(self, name: str) -> None:
        self.name = _check_name(name, self._func)

    def __call__(self, func: F) -> F:
        import inspect  # at decoration time only: it is a heavy import

        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"{self._func}(): cannot decorate the coroutine function {func.__qualname__}: "
                "the scope stack is per thread, and other coroutines would run inside the "
                "scope at every await"
            )
        return super().__call__(func)

    def __enter__(self) -> "scope":
        rt = _native.runtime()
        if rt is None:
            warn_inactive()
            _stack().append((False, 0))
            return self
        sid = scope_id(rt, self.name)
        # Recorded before entering: inside, the list's growth would be an
        # allocation of the scope (and refused in a forbid scope).
        stack = _stack()
        stack.append((True, refusal.seq(rt)))
        try:
            rt.enter(sid)
        except BaseException:
            stack.pop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack = _stack()
        entered, seq = stack[-1]
        if not entered:
            stack.pop()
            return False
        rt = _native.runtime()
        left_region = rt.exit() == _native.EXIT_REGION
        # Popped after leaving: shrinking the list may allocate (a forbid
        # scope would refuse it).
        stack.pop()
        try:
            if left_region:
                # A forbid scope: its region ended with it.
                raise_outcome(region_outcome(rt.region_last(), self.name, seq, exc, tb, stacklevel=3), exc, tb)
            return self._boundary(rt, seq, exc, tb)
        finally:
            # This frame ends up in the traceback of a raised AllocError; its
            # locals must not keep the failed task's frames (and their memory)
            # alive until the cyclic GC runs.
            exc = tb = None

    def _boundary(self, rt, seq, exc, tb) -> bool:
        return False


class task(scope):
    """A task boundary: a scope whose refused allocations become :class:`AllocError`.

    A ``MemoryError`` raised because this runtime refused an allocation inside
    the block (in this thread) leaves the block as :class:`AllocError`, carrying
    the scope, size, budget, live bytes and reason, with the traceback of the
    allocation that failed. A ``MemoryError`` raised for any other reason stays
    what it is. Use it around each unit of work the program can afford to lose
    (a request, a job), and catch ``AllocError`` there or just outside.
    """

    _func = "task"

    def __init__(self, name: str = "task") -> None:
        super().__init__(name)

    def _boundary(self, rt, seq, exc, tb) -> bool:
        err = refusal.convert(exc, rt, seq, self.name)
        try:
            if err is not None:
                refusal.raise_converted(err, exc)
            return False
        finally:
            err = exc = tb = None  # no cycle through this frame (see __exit__)


def bind(fn: F) -> F:
    """Return ``fn`` wrapped to run in the calling thread's current scope instance.

    Hand the result to another thread (a thread pool, a callback) and its
    allocations are charged to the same instance, under the same budgets, as if
    it ran inside the ``with`` block that called :func:`bind`; the instance stays
    alive for as long as the wrapper exists. A refused allocation in the bound
    call leaves it as :class:`AllocError`, as at a task boundary.
    Outside any scope, or without a preloaded runtime, ``fn`` is returned as is.
    """
    if not callable(fn):
        raise TypeError(f"bind(): argument 'fn' must be callable, not {type(fn).__name__}")
    rt = _native.runtime()
    if rt is None:
        return fn
    handle = InstanceHandle.current(rt)
    if handle is None:
        return fn

    @functools.wraps(fn)
    def bound(*args, **kwargs):
        # The wrapper holds the instance (through the handle, released when
        # the wrapper is garbage), so attaching only fails at capacity
        # (ScopeCapacityError), never silently.
        handle.attach()
        seq = refusal.seq(rt)
        try:
            return fn(*args, **kwargs)
        except MemoryError as exc:
            err = refusal.convert(exc, rt, seq, handle.scope)
            try:
                if err is not None:
                    refusal.raise_converted(err, exc)
                raise
            finally:
                err = exc = None  # no cycle through this frame
        finally:
            handle.detach()

    return bound  # type: ignore[return-value]
