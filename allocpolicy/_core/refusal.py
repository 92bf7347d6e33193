"""The one conversion of a refused allocation into :class:`~allocpolicy.AllocError`.

The runtime records every refusal on the thread that made the request (a
*violation*: scope, size, limit, live bytes, reason), numbered by a per-thread
sequence number. Code that runs a unit of work notes the number at entry
(:func:`seq`); when an exception leaves the work, :func:`convert` decides from
the record whether the exception is the runtime's refusal and builds the
:class:`AllocError` that reports it. Every boundary uses this module: task
boundaries and ``bind()`` (``_scope``), scopes bound to modules
(``_modules``), reservations and the operations that lose nothing
(``_fallible``), and the integrations. Anything that must see each refusal
reported at a boundary belongs in :func:`convert`.
"""

from __future__ import annotations

from .. import _native
from .._errors import AllocError
from .names import scope_name
from .refusal_hooks import notify

__all__ = ["seq", "from_violation", "since", "convert", "raise_converted"]

_INJECTED = _native.REASONS.index("injected")

#: ``since_seq`` that accepts the thread's newest violation, whenever it was made
#: (for callers that established otherwise that a refusal happened).
ANY = -1


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


def convert(
    exc: BaseException | None, rt: _native.Runtime, since_seq: int, task: str | None = None
) -> AllocError | None:
    """The :class:`AllocError` that ``exc``, leaving work that started at
    violation number ``since_seq``, stands for; ``None`` when ``exc`` is not
    the runtime's refusal (no exception, another error, an AllocError already,
    or a ``MemoryError`` the runtime did not cause)."""
    if not isinstance(exc, MemoryError) or isinstance(exc, AllocError):
        return None
    return since(rt, since_seq, task)


def raise_converted(err: AllocError, exc: BaseException) -> None:
    """Raise ``err`` in place of ``exc``, with the traceback of the allocation that failed.

    Every boundary raises its conversion here, so this is where the
    :func:`~allocpolicy.on_refusal` callbacks hear of it: once per refusal
    that the program sees as an AllocError.
    """
    notify(err)
    try:
        raise err.with_traceback(exc.__traceback__) from None
    finally:
        # This frame ends up in the traceback of the AllocError: its locals
        # must not keep the failed work's frames (and their memory) alive
        # until the cyclic GC runs.
        err = exc = None
