"""Scopes, task boundaries and carrying a scope instance into other threads."""

from __future__ import annotations

import functools
import sys
import threading
import types
from contextlib import ContextDecorator
from typing import Any, Callable, TypeVar

from . import _native
from ._core import refusal, stepping
from ._core.instances import InstanceHandle
from ._core.names import scope_id, warn_inactive
from ._regions import raise_outcome, region_outcome

__all__ = ["scope", "task", "bind", "bind_handle"]

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

    In a coroutine the instance belongs to the asyncio task, not to the
    thread: it is charged only while that task runs, tasks spawned inside it
    and work handed to threads (``asyncio.to_thread``, ``run_in_executor``)
    inherit it, and ``async with`` works the same. A decorated ``async def``
    function runs each call in a new instance (see ``docs/asyncio.rst``).

    Without a preloaded runtime the block runs unscoped and an
    :class:`AllocPolicyWarning` is issued once.
    """

    _func = "scope"

    def __init__(self, name: str) -> None:
        self.name = _check_name(name, self._func)

    def __call__(self, func: F) -> F:
        if _is_coroutine_function(func):
            # Each call's coroutine runs its body in a new instance, which
            # follows the task that awaits it (_core/stepping.py).
            @functools.wraps(func)
            async def scoped(*args, **kwargs):
                with self._recreate_cm():
                    return await func(*args, **kwargs)

            return scoped  # type: ignore[return-value]
        if _is_async_generator_function(func):
            raise TypeError(
                f"{self._func}(): cannot decorate the async generator function {func.__qualname__}: "
                "between its yields, the code that consumes it would run inside the scope"
            )
        return super().__call__(func)

    async def __aenter__(self) -> "scope":
        return self.__enter__()

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        try:
            return self.__exit__(exc_type, exc, tb)
        finally:
            exc = tb = None  # see __exit__

    def _resolve(self, rt: _native.Runtime) -> int:
        """What _open() needs, looked up before anything is entered."""
        return scope_id(rt, self.name)

    def _open(self, rt: _native.Runtime, target: int) -> int:
        """Enter the block's instance on this thread; returns its id."""
        return rt.enter(target)

    def __enter__(self) -> "scope":
        rt = _native.runtime()
        if rt is None:
            warn_inactive()
            _stack().append((False, 0))
            return self
        target = self._resolve(rt)
        stepper = stepping.running_stepper()
        if stepper is not None:
            # In a task: the instance follows the task (_core/stepping.py).
            stepping.enter(rt, stepper, self, target)
            return self
        # Recorded before entering: inside, the list's growth would be an
        # allocation of the scope (and refused in a forbid scope).
        stack = _stack()
        stack.append((True, refusal.seq(rt)))
        try:
            self._open(rt, target)
        except BaseException:
            stack.pop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        frame = stepping.leaving(self)
        if frame is not None:
            rt = frame.rt
            left_region = rt.exit() == _native.EXIT_REGION
            # Popped after leaving, as below.
            seq = stepping.left(frame)
            frame = None
            return self._after_exit(rt, left_region, seq, exc, tb)
        stack = _stack()
        if not stack:
            # Entered in a task whose coroutine is being finalized elsewhere
            # (garbage collection, another task closing an async generator):
            # the instance was never attached here, and goes with the context.
            return False
        entered, seq = stack[-1]
        if not entered:
            stack.pop()
            return False
        rt = _native.runtime()
        left_region = rt.exit() == _native.EXIT_REGION
        # Popped after leaving: shrinking the list may allocate (a forbid
        # scope would refuse it).
        stack.pop()
        return self._after_exit(rt, left_region, seq, exc, tb)

    def _after_exit(self, rt, left_region, seq, exc, tb) -> bool:
        try:
            if left_region:
                # A forbid scope: its region ended with it.
                raise_outcome(region_outcome(rt.region_last(), self.name, seq, exc, tb, stacklevel=4), exc, tb)
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
    call leaves it as :class:`AllocError`, as at a task boundary. A coroutine
    function gives a coroutine function whose coroutines run in the instance,
    in whichever task awaits them.
    Outside any scope, or without a preloaded runtime, ``fn`` is returned as is.
    """
    if not callable(fn):
        raise TypeError(f"bind(): argument 'fn' must be callable, not {type(fn).__name__}")
    rt = _native.runtime()
    if rt is None:
        return fn
    return bind_handle(fn, InstanceHandle.current(rt))


class _Bound(task):
    """The block of a bound call: it attaches the held instance of ``handle``."""

    def __init__(self, handle: InstanceHandle) -> None:
        self.name = handle.scope
        self._handle = handle

    def _resolve(self, rt: _native.Runtime) -> int:
        return self._handle.instance

    def _open(self, rt: _native.Runtime, target: int) -> int:
        # The wrapper holds the instance (through the handle, released when
        # the wrapper is garbage), so attaching only fails at capacity
        # (ScopeCapacityError), never silently.
        self._handle.attach()
        return target


def bind_handle(fn: F, handle: InstanceHandle | None) -> F:
    """``fn`` wrapped to run in the instance ``handle`` holds (see
    :func:`bind`), for as long as the wrapper lives; ``fn`` itself for ``None``."""
    if handle is None:
        return fn
    block = _Bound(handle)

    if _is_coroutine_function(fn):

        @functools.wraps(fn)
        async def bound(*args, **kwargs):
            with block:
                return await fn(*args, **kwargs)

    else:

        @functools.wraps(fn)
        def bound(*args, **kwargs):
            with block:
                return fn(*args, **kwargs)

    return bound  # type: ignore[return-value]


_CO_COROUTINE = 0x80
_CO_ASYNC_GENERATOR = 0x200


def _code_flags(func: object) -> int:
    # What inspect looks at, without importing it (a heavy import, and bind()
    # is called at every hand-off).
    while isinstance(func, functools.partial):
        func = func.func
    func = getattr(func, "__func__", func)
    code = getattr(func, "__code__", None)
    return code.co_flags if isinstance(code, types.CodeType) else 0


def _is_coroutine_function(func: object) -> bool:
    inspect = sys.modules.get("inspect")
    if inspect is not None:  # it knows markcoroutinefunction() and the like
        return inspect.iscoroutinefunction(func)
    return bool(_code_flags(func) & _CO_COROUTINE)


def _is_async_generator_function(func: object) -> bool:
    return bool(_code_flags(func) & _CO_ASYNC_GENERATOR)
