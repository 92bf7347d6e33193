"""Driving a generator or coroutine one step at a time, with something around each step.

Two mechanisms, one idea: code that runs in a scope must be in it while it
runs and out of it while it is suspended, because other code runs on the
thread then.

- :func:`drive` and :class:`Stepped` wrap one generator or coroutine, calling
  ``enter()`` before each of its steps (the first, each resumption by
  ``send``/``throw``, and ``close``) and ``leave(token, exc)`` right after it,
  with what ``enter`` returned and the exception that ended the step, if any.
  ``leave`` may raise in place of that exception (a boundary converting it).
  Module-bound scopes use them for generator and coroutine functions.
- :class:`TaskStepper` wraps the whole coroutine of an asyncio task, so that
  the scope instances entered anywhere in that task follow it: they live in a
  context variable (each task runs in a context of its own, which the tasks it
  spawns and the work it hands to threads copy), and each step of the task
  attaches them to the thread and detaches them when the step yields. Between
  steps the thread is back in whatever it was in before, so other tasks and
  the loop's own work are never charged to them. How the loops come to create
  steppers is in ``_loops.py``; the reasoning in ``docs/internals.rst``
  (Scopes in coroutines).
"""

from __future__ import annotations

import _thread
import ctypes
import warnings
from contextvars import ContextVar
from typing import TYPE_CHECKING

from .. import _native
from .._errors import AllocPolicyWarning, ScopeCapacityError

if TYPE_CHECKING:  # collections.abc is not loaded at startup; this module may be
    from collections.abc import Callable, Generator
    from typing import Any

    Enter = Callable[[], Any]
    Leave = Callable[[Any, BaseException | None], None]

__all__ = [
    "drive",
    "Stepped",
    "Frame",
    "TaskStepper",
    "SpawnedStepper",
    "stepper_for",
    "current",
    "enter",
    "leaving",
    "left",
    "running_stepper",
    "use_asyncio",
]


def drive(inner, enter: Enter, leave: Leave) -> Generator:
    """``yield from inner``, with ``enter()``/``leave(token, exc)`` around each step."""
    value = None
    error = None
    while True:
        token = enter()
        try:
            if error is None:
                item = inner.send(value)
            else:
                item = inner.throw(error)
        except StopIteration as stop:
            leave(token, None)
            return stop.value
        except BaseException as exc:
            leave(token, exc)
            raise
        finally:
            # Not kept across the suspension: the value or error of one step
            # must not stay alive while other code runs.
            error = value = None
        leave(token, None)
        try:
            value = yield item
        except GeneratorExit:
            token = enter()
            try:
                inner.close()
            except BaseException as exc:
                leave(token, exc)
                raise
            leave(token, None)
            raise
        except BaseException as exc:
            error = exc


class Stepped:
    """An awaitable running each step of the coroutine ``inner`` between
    ``enter()`` and ``leave(token, exc)`` (see :func:`drive`)."""

    __slots__ = ("inner", "enter", "leave")

    def __init__(self, inner, enter: Enter, leave: Leave) -> None:
        self.inner = inner
        self.enter = enter
        self.leave = leave

    def __await__(self):
        return drive(self.inner, self.enter, self.leave)


# --- Tasks: scope instances that follow the asyncio task -----------------------------

#: The innermost scope instance entered (or bound) in the running context.
_frames: ContextVar["Frame | None"] = ContextVar("allocpolicy_scope_frames", default=None)
_get = _frames.get

# Set once asyncio is imported (by _loops): until then no task can run.
_running_loop: Callable[[], Any] | None = None
_current_task: Callable[[Any], Any] | None = None

_warned_unfollowed = False


def use_asyncio(running_loop: Callable[[], Any], current_task: Callable[[Any], Any]) -> None:
    """Tell this module how to find the task running on this thread."""
    global _running_loop, _current_task
    _running_loop, _current_task = running_loop, current_task


class Frame:
    """One scope instance of a coroutine: the innermost of its context.

    ``chain`` lists the coroutine's instances outermost first, as a ready C
    array: every step attaches it. A frame holds its instance (``ap_hold``)
    while its block is open, and after that for as long as tasks spawned in
    it (``users``, counted on every frame of their chain) still run; work
    handed to threads holds the instance itself (``_loops.carry``). Other
    copies of the context (the callback of a cancelled timer, say) neither
    keep the instance alive nor step into it: a frame found released is
    treated as no frame.
    """

    __slots__ = (
        "rt", "instance", "parent", "levels", "chain", "chain_at", "owner", "seq", "stepper", "thread",
        "held", "closed", "users", "refusal",
    )

    def __init__(self, rt: _native.Runtime, parent: "Frame | None", owner: object, seq: int, stepper: "TaskStepper") -> None:
        self.rt = rt
        self.instance = 0
        self.parent = parent
        self.levels = parent.levels + 1 if parent is not None else 1
        if self.levels > _native.MAX_DEPTH:
            raise ScopeCapacityError(
                f"cannot enter another scope: nesting is limited to {_native.MAX_DEPTH} per task"
            )
        self.chain = (ctypes.c_uint32 * self.levels)(*(parent.chain if parent is not None else ()))
        self.chain_at = ctypes.addressof(self.chain)  # what step_enter takes
        self.owner = owner
        self.seq = seq
        self.stepper: TaskStepper | None = stepper
        self.thread = _thread.get_ident()
        self.held = False
        self.closed = False
        self.users = 0
        #: The last refusal recorded in a step run inside this frame (by its
        #: task or one spawned in it), for its boundary (see left()).
        self.refusal = None

    def use(self) -> None:
        """A task spawned in this frame's context starts: keep its chain held."""
        frame = self
        while frame is not None:
            frame.users += 1
            frame = frame.parent

    def unuse(self) -> None:
        """That task finished."""
        frame = self
        while frame is not None:
            frame.users -= 1
            if frame.closed and not frame.users:
                frame._release()
            frame = frame.parent

    def close(self) -> None:
        """Its block exited."""
        self.closed = True
        if not self.users:
            self._release()

    def _release(self) -> None:
        if self.held:
            self.held = False
            self.rt.release(self.instance)

    def __del__(self) -> None:
        # A block that never exited (its coroutine was never finalized).
        self._release()


def current() -> Frame | None:
    """The innermost scope frame of the running context (any thread), if its
    instance is still held."""
    frame = _get()
    return frame if frame is not None and frame.held else None


def running_stepper() -> "TaskStepper | None":
    """The stepper of the task running on this thread, if that task is stepped.

    ``None`` outside tasks (no running loop, or between steps), and for a task
    whose coroutine is not stepped (created with ``asyncio.Task(...)``
    directly, or before the runtime followed its loop): there a scope stays
    with the thread, and a warning says so once.
    """
    global _warned_unfollowed
    if _running_loop is None:
        return None
    loop = _running_loop()
    if loop is None:
        return None
    task = _current_task(loop)
    if task is None:
        return None
    coro = task.get_coro()
    if type(coro) is TaskStepper or type(coro) is SpawnedStepper:
        return coro
    if not _warned_unfollowed:
        _warned_unfollowed = True
        warnings.warn(
            f"allocpolicy: the task {task.get_name()!r} was not created by its loop's "
            "create_task() after the runtime was active, so a scope entered in it stays with "
            "the thread and applies to whatever else runs on it until the scope exits",
            AllocPolicyWarning,
            stacklevel=4,
        )
    return None


def enter(rt: _native.Runtime, stepper: "TaskStepper", owner: Any, target: int) -> Frame:
    """Enter ``owner``'s instance (``owner._open(rt, target)``) in the running task."""
    parent = _get()
    # Everything that allocates comes before the native entry: inside, it
    # would be the scope's (and refused in a forbid scope).
    frame = Frame(rt, parent, owner, rt.last_violation().seq, stepper)
    token = _frames.set(frame)
    try:
        instance = owner._open(rt, target)  # undone there if it fails once entered
    except BaseException:
        _frames.reset(token)
        raise
    try:
        frame.instance = instance
        frame.chain[frame.levels - 1] = instance
        # The frame's own hold: the instance outlives this thread's exit for
        # as long as some context still refers to the frame.
        frame.held = rt.hold(instance)
    except BaseException:
        # Refused inside the new instance (the hold's call, say): the entry
        # is undone, as if it had failed.
        rt.exit()
        _frames.reset(token)
        raise
    return frame


def leaving(owner: object) -> Frame | None:
    """The frame an exit of ``owner`` closes: the running context's innermost,
    if ``owner`` entered it on this thread; else ``None`` (a thread's scope)."""
    frame = _get()
    if frame is None or frame.owner is not owner or frame.thread != _thread.get_ident():
        return None
    return frame


def left(frame: Frame) -> tuple[int, _native.Violation | None]:
    """After the native exit of ``frame``'s instance: pop it from the context.

    Returns the violation count from which a refusal belongs to this block:
    the later of its entry and the start of the current step (another task's
    steps in between may have recorded violations of their own); and the last
    refusal recorded in a step run inside the frame (its task's earlier
    steps, or a task spawned in it), or ``None``.
    """
    _frames.set(frame.parent)
    frame.close()
    stepper, frame.stepper = frame.stepper, None
    if stepper is not None and stepper._seq is not None and stepper._seq.value > frame.seq:
        return stepper._seq.value, frame.refusal
    return frame.seq, frame.refusal


class TaskStepper:
    """A task's coroutine, stepped inside the scope instances of its context.

    Everything but ``send``, ``throw`` and ``close`` is the wrapped coroutine's
    (``cr_frame``, ``cr_await``, ``__qualname__``...), so tracebacks, task
    reprs, ``Task.get_stack()`` and ``inspect.getcoroutinestate()`` see it.
    It is a :class:`collections.abc.Coroutine` by its methods (the ABC checks
    for them), without importing that module at startup.
    """

    __slots__ = ("_coro", "_seq", "_seq_ref", "_inherited")

    def __init__(self, coro) -> None:
        self._inherited = None
        self._coro = coro
        self._seq = None
        self._seq_ref = None

    # No frame is ever kept in a local variable of send() or throw(): an
    # exception that ends the task carries their frames in its traceback, and
    # the task keeps the exception, which would keep the instances held.

    def send(self, value):
        attached = _get() is not None
        if attached:
            failed = self._attach_or_error()
            if failed is not None:
                return self._resume_failed(failed)
        # Outside any scope this is the whole cost: one context-variable read
        # on each side of the step.
        try:
            return self._coro.send(value)
        finally:
            if _get() is not None:  # in scopes now, entered before or during the step
                self._end_step(attached)

    def throw(self, *args):
        attached = _get() is not None
        if attached:
            failed = self._attach_or_error()
            if failed is not None:
                return self._resume_failed(failed)
        try:
            return self._coro.throw(*args)
        finally:
            if _get() is not None:
                self._end_step(attached)

    def _resume_failed(self, error: BaseException):
        # Thrown into the coroutine where the step would have resumed it; the
        # task goes on outside its scopes (nothing was attached).
        _frames.set(None)
        try:
            return self._coro.throw(error)
        finally:
            error = None
            if _get() is not None:
                self._end_step(False)

    def _end_step(self, attached: bool) -> None:
        """Detach the context's instances at the end of a step (``attached``:
        since its start, so _seq holds the violation count of that start;
        else the innermost frame was entered during the step)."""
        end = _get()
        try:
            if not attached:
                # Entered during the step: what the thread recorded since
                # that entry is the step's.
                if self._seq_ref is None:
                    self._seq = ctypes.c_uint64()
                    self._seq_ref = ctypes.addressof(self._seq)
                self._seq.value = end.seq
            status = end.rt.step_leave(end.instance, end.levels, self._seq_ref)
        except MemoryError:
            # Refused before the call ran (its buffer, made on first use,
            # or its address; the call itself and its status make nothing): the
            # instances are still attached, and the step's result must not
            # be lost to the runtime's own bookkeeping. Left one level at a
            # time by calls that take no arguments, so allocate nothing.
            _leave_levels(end.rt._exit, end.levels)
            status = _native.OK
        if status == _native.STEP_REFUSED:
            # Kept on every frame of the chain: the MemoryError may reach the
            # boundary in a later step, when the thread's record is another's.
            kept = type(end.rt.last_violation()).from_buffer_copy(end.rt.last_violation())
            frame = end
            while frame is not None:
                frame.refusal = kept
                frame = frame.parent
        elif status != _native.OK:
            raise RuntimeError(
                f"allocpolicy: a step of {self._coro!r} left this thread's scope stack "
                "unbalanced (a scope entered without its exit, or exited twice)"
            )

    def _attach_or_error(self) -> BaseException | None:
        """:meth:`_enter_step`, a refusal of its own allocations included in
        what it returns: nothing is attached then (step_enter attaches all
        or nothing, and its status comes back without allocating), and the
        MemoryError is the task's, where it awaited."""
        try:
            return self._enter_step()
        except MemoryError as exc:
            return exc

    def _enter_step(self) -> BaseException | None:
        frame = _get()
        if not frame.held:
            # A copy of a context whose scopes have all ended: none.
            _frames.set(None)
            return None
        ref = self._seq_ref
        if ref is None:
            self._seq = ctypes.c_uint64()
            ref = self._seq_ref = ctypes.addressof(self._seq)
        status = frame.rt.step_enter(frame.chain_at, frame.levels, ref)
        if status == _native.OK:
            return None
        if status == _native.EFULL:
            return ScopeCapacityError(
                f"cannot resume the task in its {frame.levels} scopes: nesting is limited to "
                f"{_native.MAX_DEPTH} per thread"
            )
        return RuntimeError(f"allocpolicy: cannot attach the task's scope instances (status {status})")

    def close(self):
        return self._coro.close()

    def __await__(self):
        return self._coro.__await__()

    def __getattr__(self, name):
        return getattr(self._coro, name)

    def __repr__(self) -> str:
        return repr(self._coro)


def _leave_levels(exit_one, levels: int) -> None:
    """Call ``exit_one()`` ``levels`` times, allocating nothing (no range,
    no argument tuples: small ints and a call without arguments)."""
    while levels:
        exit_one()
        levels -= 1


class SpawnedStepper(TaskStepper):
    """The stepper of a task created inside a scope: it keeps that scope's
    instances held (its context, copied from there, refers to them) until its
    coroutine finishes. A class of its own so that the tasks created outside
    scopes, most of them, do not pay for catching the end of every task."""

    __slots__ = ()

    def send(self, value):
        try:
            return TaskStepper.send(self, value)
        except BaseException:
            # The coroutine returned (StopIteration) or raised: it is done.
            self._finished()
            raise

    def throw(self, *args):
        try:
            return TaskStepper.throw(self, *args)
        except BaseException:
            self._finished()
            raise

    def close(self):
        try:
            return self._coro.close()
        finally:
            self._finished()

    def _finished(self) -> None:
        frame, self._inherited = self._inherited, None
        if frame is not None:
            frame.unuse()

    def __del__(self) -> None:
        self._finished()


def stepper_for(coro) -> TaskStepper:
    """The stepper for a task about to be created with ``coro``, in the running context."""
    frame = _get()
    if frame is None or not frame.held:
        return TaskStepper(coro)
    stepper = SpawnedStepper(coro)
    frame.use()
    stepper._inherited = frame
    return stepper
