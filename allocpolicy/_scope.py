"""Scopes, task boundaries and carrying a scope instance into other threads."""

from __future__ import annotations

import _thread
import functools
import os
import sys
import threading
import types
from typing import Any, Callable, TypeVar

from . import _native
from ._core import refusal, stepping
from ._core.instances import InstanceHandle
from ._core import names
from ._core.names import scope_id, scope_name, warn_inactive
from ._errors import AllocError, ScopeMismatchError
from ._regions import raise_outcome, region_outcome

__all__ = ["scope", "task", "bind", "bind_handle"]

F = TypeVar("F", bound=Callable[..., Any])

# Budgets are int64 in the runtime; an escalation stops growing there.
_MAX_BUDGET = 1 << 62
# A task's default escalation factor (compared by identity in task()).
_ESCALATE = 2.0

# Ids of the scopes entered by name, filled by scope_id() (ids never change).
_ids = names.scope_ids
_OK = _native.OK
_EXIT_REGION = _native.EXIT_REGION
_NOT_INNERMOST = _native.EXIT_NOT_INNERMOST


# Per-thread record of what each `with` entered, so that exits pair with
# entries even when one scope object is used by many threads at once.
#
# A thread's record is a flat list, two slots per entry (no object is made
# per entry): the scope object, then the thread's violation number at entry
# (``None``: nothing was entered, no runtime). An entry whose exit came while
# scopes entered after it were still active has its first slot replaced by
# _ABANDONED: the exit was reported, and its instance is left when theirs are.
#
# The lists are found by thread id, which costs a fraction of a
# threading.local attribute on every entry and exit; a thread's list is
# dropped when the thread ends (its _Forget, in thread-local storage, goes
# then), and the other threads' in a forked child, before any new thread
# could reuse their ids.
_stacks: dict[int, list[Any]] = {}
_get_ident = _thread.get_ident
_forgetters = threading.local()
_ABANDONED = object()


class _Forget:
    """Drops a thread's list from _stacks when the thread's storage goes."""

    # The dict is its own reference: at interpreter shutdown this module's
    # globals may be gone by the time the main thread's storage is cleared.
    __slots__ = ("stacks", "ident", "stack")

    def __init__(self, ident: int, stack: list[Any]) -> None:
        self.stacks = _stacks
        self.ident = ident
        self.stack = stack

    def __del__(self) -> None:
        if self.stacks.get(self.ident) is self.stack:
            del self.stacks[self.ident]


def _new_stack() -> list[Any]:
    """The calling thread's list, made at its first entry."""
    ident = _get_ident()
    stack = _stacks.get(ident)
    if stack is None:
        stack = _stacks[ident] = []
        _forgetters.forget = _Forget(ident, stack)
    return stack


def _forget_other_threads() -> None:
    mine = _stacks.get(_get_ident())
    _stacks.clear()
    if mine is not None:
        _stacks[_get_ident()] = mine


os.register_at_fork(after_in_child=_forget_other_threads)


def _check_name(name: object, func: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{func}(): argument 'name' must be str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{func}(): argument 'name' must not be empty")
    return name


class scope:
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

    # Made for every unit of work: no instance dict to make. _on_thread is
    # set by every entry that marks a level on a thread, the fast path's or
    # _enter()'s (see _not_innermost()).
    __slots__ = ("name", "_on_thread", "__weakref__")

    _func = "scope"
    # Whether __enter__ may take its fast path: entered by name, no retries.
    _fast = True

    def __init__(self, name: str) -> None:
        if name.__class__ is not str or not name:
            _check_name(name, self._func)
        self.name = name

    def __call__(self, func: F) -> F:
        if _is_coroutine_function(func):
            # Each call's coroutine runs its body in a new instance, which
            # follows the task that awaits it (_core/stepping.py).
            @functools.wraps(func)
            async def scoped(*args, **kwargs):
                with self:
                    return await func(*args, **kwargs)

            return scoped  # type: ignore[return-value]
        if _is_async_generator_function(func):
            raise TypeError(
                f"{self._func}(): cannot decorate the async generator function {func.__qualname__}: "
                "between its yields, the code that consumes it would run inside the scope"
            )

        @functools.wraps(func)
        def scoped(*args, **kwargs):
            with self:
                return func(*args, **kwargs)

        return scoped  # type: ignore[return-value]

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
        # The fast path, taken by every entry by name on a thread that no
        # asyncio task is running on, once the name's id is known: one
        # native call, nothing made. The runtime marks the level as this
        # scope's `with` entry, and the exit pairs with it there (see
        # _exit()); no record is kept here. The rest is _enter(), which
        # decides the same things step by step.
        enter = _native.enter_marked
        running_loop = stepping._running_loop
        if enter is None or not self._fast or (running_loop is not None and running_loop() is not None):
            return self._enter()
        try:
            sid = _ids[self.name]
        except KeyError:
            return self._enter()
        # The level is marked with this object (the low 32 bits of its
        # address, the same for every thread that enters it), by which its
        # exit names it. The call makes nothing, and its status comes back
        # without allocating: a MemoryError cannot follow the entry here.
        self._on_thread = True
        status = enter(sid, self)
        if status:
            _native.check(status, "ap_enter", sid)
        return self

    def _enter(self) -> "scope":
        rt = _native.runtime()
        if rt is None:
            warn_inactive()
            _new_stack().extend((self, None))
            return self
        target = self._resolve(rt)
        stepper = stepping.running_stepper()
        if stepper is not None:
            # In a task: the instance follows the task (_core/stepping.py).
            stepping.enter(rt, stepper, self, target)
            return self
        if self._fast:
            self._on_thread = True  # as in __enter__
            status = rt.enter_marked(target, self)
            if status:
                _native.check(status, "ap_enter", target)
            return self
        # Entered otherwise (an attached instance): recorded here, before
        # entering, since inside, the list's growth would be an allocation
        # of the scope (and refused in a forbid scope).
        stack = _new_stack()
        stack += (self, 0)
        try:
            stack[-1] = self._open_noting(rt, target)
        except BaseException:
            del stack[-2:]
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        # The fast path: the thread's innermost level is this block's entry
        # (the runtime checks its tag, and leaves it only then). A task's
        # scope is never that: its levels are attached for each step, and
        # what it entered is left by _exit().
        leave = _native.exit_tagged
        if leave is not None:
            # Leaves the innermost level only if this block's entry marked
            # it; the call, like the entry's, makes nothing.
            status = leave(self)
            if status == _OK:
                if exc is None:
                    return False  # the common case: nothing to report
                rt = _native._runtime
                return self._after_exit(rt, False, rt.exited_seq(), exc, tb)
            if status == _EXIT_REGION:
                rt = _native._runtime
                return self._after_exit(rt, True, rt.exited_seq(), exc, tb)
        return self._exit(exc, tb)

    def _exit(self, exc, tb) -> bool:
        frame = stepping.leaving(self)
        if frame is not None:
            rt = frame.rt
            left_region = rt.exit() == _EXIT_REGION
            # Popped after leaving, as below.
            seq, kept = stepping.left(frame)
            frame = None
            return self._after_exit(rt, left_region, seq, exc, tb, kept)
        stack = _stacks.get(_get_ident())
        if not stack or stack[-2] is not self:
            if stack and self in stack[::2]:
                self._out_of_order(stack)
            return self._not_innermost(bool(stack))
        seq = stack[-1]
        if seq is None:
            del stack[-2:]
            return False
        rt = _native.runtime()
        status = rt.exit_unmarked()
        if status == _NOT_INNERMOST:
            # A `with` of another scope, entered after this one, is still
            # active: this level is left with it.
            del stack[-2:]
            rt.abandon(0, 0)
            raise self._mismatch(rt)
        left_region = status == _EXIT_REGION
        del stack[-2:]  # after leaving, as in __exit__
        if stack and stack[-2] is _ABANDONED:
            _leave_abandoned(rt, stack)
        if exc is None and not left_region:
            return False
        return self._after_exit(rt, left_region, seq, exc, tb)

    def _not_innermost(self, recorded: bool) -> bool:
        """The exit of a block whose entry is not the thread's innermost
        level: a scope entered after it is still active (its level is then
        left with that scope's), or it was never entered on this thread
        (``recorded``: the thread has entries recorded here)."""
        rt = _native.runtime()
        on_thread = getattr(self, "_on_thread", False)
        if rt is not None and on_thread and rt.abandon(id(self), 1) == _native.OK:
            raise self._mismatch(rt)
        if not on_thread and not recorded:
            # Entered in a task whose coroutine is being finalized elsewhere
            # (garbage collection, another task closing an async generator):
            # the instance was never attached here, and goes with the context.
            return False
        raise ScopeMismatchError(
            f"{self._func}({self.name!r}) exited on a thread where it is not active "
            "(exited twice, or entered on another thread)"
        )

    def _mismatch(self, rt: _native.Runtime) -> ScopeMismatchError:
        instance = rt.current()[0]
        inner = scope_name(rt, rt.instance_stats(instance).scope) if instance else "the process"
        return ScopeMismatchError(
            f"{self._func}({self.name!r}) exited while scope {inner!r}, entered after it on this "
            "thread, is still active: scopes must be left in the reverse order of their entries "
            "(generators or coroutines that each hold a scope across a yield or an await "
            f"interleave them); {self.name!r} is left when the scopes entered after it are"
        )

    def _out_of_order(self, stack: list[Any]) -> None:
        """An exit that is not of the innermost entry: say so, and leave the
        scopes entered after this one untouched (their instances are theirs)."""
        for i in range(len(stack) - 2, -1, -2):
            if stack[i] is self:
                break
        else:
            raise ScopeMismatchError(
                f"{self._func}({self.name!r}) exited on a thread where it is not active "
                "(exited twice, or entered on another thread)"
            )
        # Nothing is made here: the scopes entered after it may refuse it.
        stack[i] = _ABANDONED
        inner = stack[-2]
        raise ScopeMismatchError(
            f"{self._func}({self.name!r}) exited while {inner._func}({inner.name!r}), entered "
            "after it on this thread, is still active: scopes must be left in the reverse order "
            "of their entries (generators or coroutines that each hold a scope across a yield "
            f"or an await interleave them); {self.name!r} is left when the scopes entered "
            "after it are"
        )

    def _after_exit(self, rt, left_region, seq, exc, tb, kept=None) -> bool:
        try:
            if left_region:
                # A forbid scope: its region ended with it.
                raise_outcome(region_outcome(rt.region_last(), self.name, seq, exc, tb, stacklevel=4), exc, tb)
            return self._boundary(rt, seq, exc, tb, kept)
        finally:
            # This frame ends up in the traceback of a raised AllocError; its
            # locals must not keep the failed task's frames (and their memory)
            # alive until the cyclic GC runs.
            exc = tb = None

    def _boundary(self, rt, seq, exc, tb, kept=None) -> bool:
        """``kept``: a refusal recorded in an earlier step inside the block
        (a coroutine's, or a task's it spawned), for when the thread's own
        record is not it."""
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

    # Set only for retries or a factor given (_set_retries): a task made
    # with the defaults, for every unit of work, sets its name and nothing else.
    __slots__ = ("_retries", "_escalate")

    _func = "task"

    def __init__(self, name: str = "task", *, retries: int = 0, escalate: float = _ESCALATE) -> None:
        # The defaults are checked at a glance (the factor by identity: a
        # 2.0 given explicitly takes _set_retries, which compares).
        if name.__class__ is not str or not name:
            _check_name(name, "task")
        self.name = name
        if retries or escalate is not _ESCALATE or retries.__class__ is not int:
            self._set_retries(retries, escalate)

    @property
    def retries(self) -> int:
        """How many more times a call refused by its own budget is run (0: never)."""
        try:
            return self._retries
        except AttributeError:
            return 0

    @property
    def escalate(self) -> float:
        """The factor by which each rerun's budget grows."""
        try:
            return self._escalate
        except AttributeError:
            return _ESCALATE

    def _set_retries(self, retries: int, escalate: float) -> None:
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
        self._retries = retries
        self._escalate = float(escalate)
        if retries:
            # A with block cannot be run again: its entry must take _enter(),
            # which refuses it, and the fast path looks at the class only.
            self.__class__ = _retried_class(type(self))

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
        self._enter()
        _set_attempt_budget(self, budget)

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

    def _boundary(self, rt, seq, exc, tb, kept=None) -> bool:
        err = refusal.convert(exc, rt, seq, self.name)
        if err is None and kept is not None:
            err = refusal.convert(exc, rt, refusal.ANY, self.name, violation=kept)
        try:
            if err is not None:
                refusal.raise_converted(err, exc)
            return False
        finally:
            err = exc = tb = None  # no cycle through this frame (see __exit__)


def _leave_abandoned(rt: _native.Runtime, stack: list[Any]) -> None:
    """Leave the instances of entries whose exit came out of order, now that
    the scopes entered after them are gone (the exit reported the error)."""
    while stack and stack[-2] is _ABANDONED:
        if stack[-1] is not None:
            rt.exit()
        del stack[-2:]


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


class _Retried:
    """What a task with retries adds to its class: its ``with`` entry is
    refused (a block cannot be run again)."""

    __slots__ = ()
    _fast = False

    def _enter(self) -> "task":
        raise TypeError(
            f"task({self.name!r}, retries={self.retries}): a with block cannot be run "
            f"again; decorate the function (@allocpolicy.task(...)) or call "
            f"allocpolicy.task(...).run(fn, ...)"
        )

    def _enter_attempt(self, budget: int | None) -> None:
        # An attempt of run() or of the decorator: entered as any task.
        scope._enter(self)
        _set_attempt_budget(self, budget)

    def __reduce__(self):
        # Made again by its constructor: the class itself is made at run time.
        return _remade, (type(self).__bases__[1], self.name, self.retries, self.escalate)


def _remade(cls: type, name: str, retries: int, escalate: float) -> "task":
    return cls(name, retries=retries, escalate=escalate)


_retried_classes: dict[type, type] = {}


def _retried_class(cls: type) -> type:
    """``cls`` (task or a subclass of it) with _Retried's behaviour, made once:
    the same layout, so that a task's class can become it."""
    if issubclass(cls, _Retried):
        return cls
    made = _retried_classes.get(cls)
    if made is None:
        made = _retried_classes[cls] = type(cls.__name__, (_Retried, cls), {
            "__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__ + "._Retried"})
    return made


def _set_attempt_budget(block: "task", budget: int | None) -> None:
    """Give the attempt just entered the escalated budget of its own."""
    if budget is not None:
        rt = _native.runtime()
        try:
            rt.set_budget(rt.current()[0], budget)
        except BaseException as exc:
            block.__exit__(type(exc), exc, exc.__traceback__)
            raise


class _Bound(task):
    """The block of a bound call: it attaches the held instance of ``handle``."""

    # Never by name: _enter() attaches the handle's instance.
    _fast = False

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
