"""The one conversion of a refused allocation into :class:`~allocpolicy.AllocError`.

The runtime records every refusal on the thread that made the request (a
*violation*: scope, size, limit, live bytes, reason, and where the thread's
Python code was), numbered by a per-thread sequence number. Code that runs a unit of work notes the number at entry
(:func:`seq`); when an exception leaves the work, :func:`convert` decides from
the record whether the exception is the runtime's refusal and builds the
:class:`AllocError` that reports it. Every boundary uses this module: task
boundaries and ``bind()`` (``_scope``), scopes bound to modules
(``_modules``), reservations and the operations that lose nothing
(``_fallible``), and the integrations. Anything that must see each refusal
reported at a boundary belongs in :func:`convert`.
"""

from __future__ import annotations

import _thread
import opcode

from .. import _native
from .._errors import AllocError
from . import refusal_sites
from .names import scope_name
from .refusal_hooks import notify

__all__ = ["ANY", "seq", "from_violation", "since", "convert", "raise_converted", "release_frames", "Watch"]

_INJECTED = _native.REASONS.index("injected")

#: ``since_seq`` that accepts the thread's newest violation, whenever it was made
#: (for callers that established otherwise that a refusal happened).
ANY = -1

# An exception whose innermost traceback entry is one of these was made by the
# Python code there (``raise X``); otherwise the instruction itself failed:
# a call into C code, an operator, a subscript (see _carries).
_RAISE = opcode.opmap["RAISE_VARARGS"]
# Instructions that call: a refusal carried out as another exception type
# (RuntimeError: can't allocate lock, ssl.SSLError) is raised by C code that
# Python called.
_CALLS = frozenset(
    opcode.opmap[name]
    for name in ("CALL", "CALL_FUNCTION_EX", "CALL_KW", "PRECALL")
    if name in opcode.opmap
)


class _Reported(_thread._local):
    # The newest violation a boundary of this thread turned into AllocError:
    # once reported it labels nothing else (an outer boundary that sees an
    # unrelated MemoryError after the AllocError was caught inside it).
    seq = 0


_reported = _Reported()


def seq(rt: _native.Runtime) -> int:
    """The calling thread's newest violation number: note it where work starts."""
    return rt.last_violation().seq


def from_violation(
    rt: _native.Runtime, v: _native.Violation, *, task: str | None = None, size: int | None = None
) -> AllocError:
    """The :class:`AllocError` describing the violation record ``v``
    (``size``: the bytes asked for, when the caller knows them better)."""
    return AllocError(
        scope=scope_name(rt, v.scope),
        size=v.requested if size is None else size,
        budget=v.budget or None,
        live=v.live,
        reason=_native.REASONS[v.reason] if v.reason < len(_native.REASONS) else "budget",
        limit=_native.LIMITS[v.limit] if v.limit < len(_native.LIMITS) else None,
        task=task,
        index=v.index if v.reason == _INJECTED else None,
    )


def since(rt: _native.Runtime, since_seq: int, task: str | None = None) -> AllocError | None:
    """The AllocError for this thread's newest violation, if one happened
    after ``since_seq`` (:data:`ANY`: whenever); else ``None``."""
    v = rt.last_violation()
    if v.seq == since_seq:
        return None
    return from_violation(rt, v, task=task)


def _innermost(exc: BaseException) -> tuple[int, int] | None:
    """(opcode, oparg) of the instruction where ``exc`` was raised, if known."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code.co_code
    at = tb.tb_lasti
    if not 0 <= at < len(code) - 1:
        return None
    return code[at], code[at + 1]


def _carries(exc: BaseException, memory_error: bool) -> bool:
    """Whether ``exc`` was raised by an operation that failed (rather than by
    a ``raise`` statement of Python code), or chains to an exception that was:
    the judgement when the record does not say where the refusal was made
    (an operation that failed for another reason after a caught refusal
    cannot be told from it then).

    Python code that raises an exception of its own after a refusal was
    caught is not reporting the refusal, unless it raises while handling it
    (the refusal is then its ``__context__``, or its ``__cause__``). An
    exception of another type than MemoryError carries a refusal only when
    C code that Python called raised it.
    """
    seen = 0
    while exc is not None and seen < 32:
        seen += 1
        where = _innermost(exc)
        if where is None:
            return False
        op, arg = where
        if not (op == _RAISE and arg):
            if isinstance(exc, MemoryError) or (not memory_error and op in _CALLS):
                return True
        exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__
        memory_error = isinstance(exc, MemoryError)
    return False


def convert(
    exc: BaseException | None,
    rt: _native.Runtime,
    since_seq: int,
    task: str | None = None,
    *,
    limit: str | None = None,
    violation: _native.Violation | None = None,
) -> AllocError | None:
    """The :class:`AllocError` that ``exc``, leaving work that started at
    violation number ``since_seq``, stands for; ``None`` when ``exc`` does not
    carry a refusal of the runtime.

    It does when the thread's newest violation was made after the work
    started and no boundary reported it yet, and ``exc``, or an exception it
    chains to (raised while handling it), was raised where the refusal was
    made (the code object and instruction the record names, see
    refusal_sites): a ``MemoryError`` (CPython's own report of a failed
    allocation), or any other exception that C code raised for it
    (``RuntimeError: can't allocate lock``, ``ssl.SSLError: malloc
    failure``), which becomes the AllocError's ``__cause__``. A record that
    names no place (an interpreter whose layout is not known) is judged by
    how ``exc`` was raised instead (:func:`_carries`). Never an
    exception that is not an ``Exception`` (KeyboardInterrupt, SystemExit,
    GeneratorExit), nor an AllocError already. With ``limit``, only a refusal
    by that limit (a reservation reports its own overdrafts and lets the
    others pass to the boundary around it). ``violation``: a record kept
    from earlier instead of the thread's newest (a refusal in an earlier step
    of a task, see stepping.py).
    """
    if not isinstance(exc, Exception) or isinstance(exc, AllocError):
        return None
    v = rt.last_violation() if violation is None else violation
    if v.seq == since_seq or v.seq == _reported.seq:
        return None
    if limit is not None and (v.limit >= len(_native.LIMITS) or _native.LIMITS[v.limit] != limit):
        return None
    carried = refusal_sites.raised_at(exc, v)
    if carried is None:  # the record does not say where: judge by how exc was raised
        carried = _carries(exc, isinstance(exc, MemoryError))
    if not carried:
        return None
    _reported.seq = v.seq
    err = from_violation(rt, v, task=task)
    if not isinstance(exc, MemoryError):
        err.__cause__ = exc
    return err


# Clearing the frame of a suspended generator or coroutine finalizes it on
# 3.11 and 3.12 (3.13 refuses with RuntimeError). A traceback holds such a
# frame when a coroutine caught the error and went on to await something
# (asgiref re-raises a thread's exception in the coroutine awaiting it, which
# then awaits its error handling: Django under ASGI). Suspended, the frame's
# last instruction is a yield; a finished one (the error went through it)
# stopped elsewhere, and is cleared.
_RESUMABLE = 0x20 | 0x80 | 0x100 | 0x200  # GENERATOR, COROUTINE, ITERABLE_COROUTINE, ASYNC_GENERATOR
_YIELD = opcode.opmap["YIELD_VALUE"]


def _suspended(frame) -> bool:
    if not frame.f_code.co_flags & _RESUMABLE:
        return False
    code = frame.f_code.co_code
    return 0 <= frame.f_lasti < len(code) and code[frame.f_lasti] == _YIELD


def release_frames(tb) -> None:
    """Clear the locals of the finished frames in ``tb``: the traceback of a
    kept AllocError (a Future's exception, a log record, a response) must not
    keep the failed work's objects, and its memory, alive. Frames still
    running (the boundary's own caller) refuse and keep theirs, and those of
    suspended generators and coroutines are left alone (see above)."""
    while tb is not None:
        frame = tb.tb_frame
        if not _suspended(frame):
            try:
                frame.clear()
            except RuntimeError:
                pass
        tb = tb.tb_next


def raise_converted(err: AllocError, exc: BaseException) -> None:
    """Raise ``err`` in place of ``exc``, with the traceback of the allocation that failed.

    Every boundary raises its conversion here, so this is where the
    :func:`~allocpolicy.on_refusal` callbacks hear of it: once per refusal
    that the program sees as an AllocError.
    """
    notify(err)
    tb = exc.__traceback__
    release_frames(tb)
    try:
        if err.__cause__ is not None:
            raise err.with_traceback(tb)
        raise err.with_traceback(tb) from None
    finally:
        # This frame ends up in the traceback of the AllocError: its locals
        # must not keep the failed work's frames (and their memory) alive
        # until the cyclic GC runs.
        err = exc = tb = None


class Watch:
    """The start of a unit of work whose exception a framework hands to a hook
    (Django's ``process_exception``, a ``got_request_exception`` receiver)
    instead of letting it leave a ``with`` block.

    Make it where the work starts, on the thread that runs the work;
    :meth:`convert`, on that thread, is the boundary's conversion: the
    :class:`AllocError` the exception stands for, or ``None``.
    """

    __slots__ = ("_rt", "_seq", "task")

    def __init__(self, task: str | None = None) -> None:
        self._rt = _native.runtime()
        self._seq = seq(self._rt) if self._rt is not None else ANY
        self.task = task

    def convert(self, exc: BaseException | None) -> AllocError | None:
        """The refusal ``exc`` carries, as :func:`convert` decides, reported
        to the :func:`~allocpolicy.on_refusal` callbacks as a boundary
        reports it; the finished frames of its traceback are cleared (the
        error is kept for a response and a log line, its locals are not)."""
        if self._rt is None or exc is None:
            return None
        err = convert(exc, self._rt, self._seq, self.task)
        if err is None:
            return None
        notify(err)
        release_frames(exc.__traceback__)
        return err.with_traceback(exc.__traceback__)
