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
from ._errors import AllocError, ScopeMismatchError
from ._regions import raise_outcome, region_outcome

__all__ = ["scope", "task", "bind", "bind_handle"]

F = TypeVar("F", bound=Callable[..., Any])

# Budgets are int64 in the runtime; an escalation stops growing there.
_MAX_BUDGET = 1 << 62

# Per-thread record of what each `with` entered, so that exits pair with
# entries even when one scope object is used by many threads at once.
_frames = threading.local()


class _Entry:
    """One entry of a scope object on this thread's stack."""

    __slots__ = ("owner", "seq", "abandoned")

    def __init__(self, owner: scope, seq: int | None) -> None:
        self.owner = owner
        # The thread's violation number at entry; None: nothing was entered
        # (no runtime).
        self.seq = seq
        # Its exit came while scopes entered after it were still active: it
        # was reported, and its instance is left when they are.
        self.abandoned = False


def _stack() -> list[_Entry]:
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

    def _open_noting(self, rt: _native.Runtime, target: int) -> int:
        """:meth:`_open`, returning the thread's violation number from before
        the entry instead (one native call)."""
        return rt.enter_noting(target)

    def __enter__(self) -> "scope":
        rt = _native.runtime()
        if rt is None:
            warn_inactive()
            _stack().append(_Entry(self, None))
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
        entry = _Entry(self, 0)
        stack.append(entry)
        try:
            entry.seq = self._open_noting(rt, target)
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
        if stack[-1].owner is not self:
            self._out_of_order(stack)
        seq = stack[-1].seq
        if seq is None:
            stack.pop()
            return False
        rt = _native.runtime()
        left_region = rt.exit() == _native.EXIT_REGION
        # Popped after leaving: shrinking the list may allocate (a forbid
        # scope would refuse it).
        stack.pop()
        if stack and stack[-1].abandoned:
            _leave_abandoned(rt, stack)
        if exc is None and not left_region:
            return False  # the common case: nothing to report
        return self._after_exit(rt, left_region, seq, exc, tb)

    def _out_of_order(self, stack: list[_Entry]) -> None:
        """An exit that is not of the innermost entry: say so, and leave the
        scopes entered after this one untouched (their instances are theirs)."""
        for entry in reversed(stack):
            if entry.owner is self and not entry.abandoned:
                break
        else:
            raise ScopeMismatchError(
                f"{self._func}({self.name!r}) exited on a thread where it is not active "
                "(exited twice, or entered on another thread)"
            )
        entry.abandoned = True
        inner = stack[-1].owner
        raise ScopeMismatchError(
            f"{self._func}({self.name!r}) exited while {inner._func}({inner.name!r}), entered "
            "after it on this thread, is still active: scopes must be left in the reverse order "
            "of their entries (generators or coroutines that each hold a scope across a yield "
            f"or an await interleave them); {self.name!r} is left when the scopes entered "
            "after it are"
        )

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

    An exception that leaves the block because this runtime refused an
    allocation inside it (in this thread) leaves as :class:`AllocError`,
    carrying the scope, size, budget, live bytes and reason, with the
    traceback of the allocation that failed: a ``MemoryError``, or whatever
    other exception C code raised for the refusal (``RuntimeError: can't
    allocate lock``), which becomes the AllocError's ``__cause__``. An
    exception raised for any other reason stays what it is, also after the
    block caught an earlier refusal and went on. The local variables of the
    frames that ended with the failure are cleared, so that a kept AllocError
    does not keep the task's memory alive. Use it around each unit of work the
    program can afford to lose (a request, a job), and catch ``AllocError``
    there or just outside.

    With ``retries``, a call that its own budget refused is run again, up to
    ``retries`` more times, each time in a new instance whose budget is
    ``escalate`` times the budget that refused the previous attempt (for that
    instance only: the scope's policy, other instances and every enclosing
    budget stay as they are). Refusals by another limit (``total_budget``, an
    enclosing scope, the process, the machine, an injected failure) are not
    retried: more room in this instance would not help. A ``with`` block
    cannot be run again, so retries need the decorator form or :meth:`run`;
    entering a task with retries in a ``with`` statement raises TypeError.
    """

    _func = "task"
    retries = 0
    escalate = 2.0

    def __init__(self, name: str = "task", *, retries: int = 0, escalate: float = 2.0) -> None:
        super().__init__(name)
        if isinstance(retries, bool) or not isinstance(retries, int):
            raise TypeError(f"task(): argument 'retries' must be int, not {type(retries).__name__}")
        if retries < 0:
            raise ValueError(f"task(): argument 'retries' must be 0 or more, got {retries}")
        if isinstance(escalate, bool) or not isinstance(escalate, (int, float)):
            raise TypeError(
                f"task(): argument 'escalate' must be a number, not {type(escalate).__name__}"
            )
        if not escalate > 1:
            raise ValueError(
                f"task(): argument 'escalate' must be greater than 1 (the factor by which "
                f"each rerun's budget grows), got {escalate!r}"
            )
        self.retries = retries
        self.escalate = float(escalate)

    def __enter__(self) -> "task":
        if self.retries:
            raise TypeError(
                f"task({self.name!r}, retries={self.retries}): a with block cannot be run "
                f"again; decorate the function (@allocpolicy.task(...)) or call "
                f"allocpolicy.task(...).run(fn, ...)"
            )
        return super().__enter__()

    def __call__(self, func: F) -> F:
        if not self.retries or _is_async_generator_function(func):
            return super().__call__(func)
        if _is_coroutine_function(func):

            @functools.wraps(func)
            async def retried(*args, **kwargs):
                budget = None  # the scope's own, for the first attempt
                attempt = 0
                while True:
                    try:
                        return await self._attempt_async(budget, func, args, kwargs)
                    except AllocError as err:
                        if attempt >= self.retries or not self._retryable(err):
                            raise
                        budget = self._escalated(err)
                        attempt += 1

        else:

            @functools.wraps(func)
            def retried(*args, **kwargs):
                return self.run(func, *args, **kwargs)

        return retried  # type: ignore[return-value]

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` in a new instance of the task's scope
        and return its result; a refusal leaves as :class:`AllocError`, after
        the reruns that ``retries`` allows (the error is the last attempt's)."""
        budget = None  # the scope's own, for the first attempt
        attempt = 0
        while True:
            try:
                return self._attempt(budget, fn, args, kwargs)
            except AllocError as err:
                if attempt >= self.retries or not self._retryable(err):
                    raise
                budget = self._escalated(err)
                attempt += 1

    def _retryable(self, err: AllocError) -> bool:
        # Only the instance's own budget: more room in it helps nothing else.
        return err.task == self.name and err.scope == self.name and err.limit == "budget" and bool(err.budget)

    def _escalated(self, err: AllocError) -> int:
        # The failed attempt's memory came back when its instance ended (the
        # error keeps no locals of the frames that failed).
        return min(int(err.budget * self.escalate), _MAX_BUDGET)

    def _enter_attempt(self, budget: int | None) -> None:
        scope.__enter__(self)
        if budget is not None:
            rt = _native.runtime()
            try:
                rt.set_budget(rt.current()[0], budget)
            except BaseException as exc:
                self.__exit__(type(exc), exc, exc.__traceback__)
                raise

    def _attempt(self, budget: int | None, fn, args, kwargs):
        self._enter_attempt(budget)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)  # raises the AllocError
            raise
        self.__exit__(None, None, None)
        return result

    async def _attempt_async(self, budget: int | None, fn, args, kwargs):
        self._enter_attempt(budget)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)  # raises the AllocError
            raise
        self.__exit__(None, None, None)
        return result

    def _boundary(self, rt, seq, exc, tb) -> bool:
        err = refusal.convert(exc, rt, seq, self.name)
        try:
            if err is not None:
                refusal.raise_converted(err, exc)
            return False
        finally:
            err = exc = tb = None  # no cycle through this frame (see __exit__)


def _leave_abandoned(rt: _native.Runtime, stack: list[_Entry]) -> None:
    """Leave the instances of entries whose exit came out of order, now that
    the scopes entered after them are gone (the exit reported the error)."""
    while stack and stack[-1].abandoned:
        if stack[-1].seq is not None:
            rt.exit()
        stack.pop()


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

    def _open_noting(self, rt: _native.Runtime, target: int) -> int:
        seq = refusal.seq(rt)
        self._open(rt, target)
        return seq


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
