"""Fallible code: reservations, and operations on built-in containers that
fail cleanly instead of raising half way.

A reservation (:func:`reserve`, :func:`try_reserve`) claims budget up front,
before any work starts, in the calling thread's innermost scope instance. It is
granted only if that instance, every enclosing instance, their scopes' totals,
the process budget and the machine can all afford it; then the work inside
draws on it and is never refused for budget reasons. That is .NET's
``MemoryFailPoint`` and Rust's ``try_reserve``: refuse before the operation,
so nothing is left half done.

The ``try_*`` operations build on it. They work on the built-in types
themselves, not on wrapper types, and on failure return what they could not
store (an :class:`Unstored`) and leave the container valid, with everything
they report as stored still in it: RFC 2116's "recovering without data loss".
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

from . import _native
from ._core import refusal
from ._core.names import scope_name, warn_inactive
from ._errors import AllocError, AllocPolicyWarning

__all__ = [
    "Reservation",
    "Unstored",
    "reserve",
    "try_append",
    "try_bytearray",
    "try_bytes_join",
    "try_extend",
    "try_insert",
    "try_reserve",
]

_ACTION_CODES = {name: i for i, name in enumerate(_native.ACTIONS)}

# --- Reservations -------------------------------------------------------------------


def _check_size(value: object, func: str, arg: str = "nbytes") -> int:
    """A byte count for ``func``'s argument ``arg``: an int from 0 to
    ``sys.maxsize``, the largest size an object can have (as for
    ``bytearray(n)``). Sizes within that range that no allocation can serve
    are the runtime's to refuse, as an :class:`AllocError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{func}(): argument '{arg}' must be int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{func}(): argument '{arg}' must be >= 0, got {value}")
    if value > sys.maxsize:
        raise OverflowError(
            f"{func}(): argument '{arg}' must be at most sys.maxsize ({sys.maxsize}), got {value}"
        )
    return value


def _check_overdraft(overdraft: object, func: str) -> int:
    if overdraft is None:
        return _native.ACTION_FROM_SCOPE
    if overdraft not in _ACTION_CODES:
        choices = ", ".join(repr(a) for a in _native.ACTIONS)
        raise ValueError(
            f"{func}(): argument 'overdraft' must be one of {choices} or None, got {overdraft!r}"
        )
    return _ACTION_CODES[overdraft]  # type: ignore[index]


class Reservation:
    """A granted reservation. Use it as a context manager, or call
    :meth:`release` when the work is done; unused bytes go back then (and at
    the latest when the scope instance it was made in ends).

    Reservations are per thread and nest: release them innermost first.
    """

    __slots__ = ("size", "scope", "_serial", "_thread", "_released", "_final", "_seq")

    def __init__(self, size: int, scope: str, serial: int, seq: int) -> None:
        self.size = size
        self.scope = scope
        self._serial = serial
        self._thread = threading.get_ident()
        self._released = False
        self._final: _native.ReservationC | None = None
        self._seq = seq

    def _record(self) -> _native.ReservationC | None:
        if self._final is not None:
            return self._final
        rt = _native.runtime()
        if rt is None or threading.get_ident() != self._thread:
            return None
        rec = rt.reservation()
        return rec if rec is not None and rec.serial == self._serial else None

    @property
    def left(self) -> int:
        """Bytes of the reservation not in use now."""
        rec = self._record()
        return rec.left if rec is not None else 0

    @property
    def peak_used(self) -> int:
        """The most of the reservation that was in use at once."""
        rec = self._record()
        return rec.peak_used if rec is not None else 0

    @property
    def overdrafts(self) -> int:
        """Allocations that went beyond the reservation."""
        rec = self._record()
        return rec.overdrafts if rec is not None else 0

    @property
    def overdraft_bytes(self) -> int:
        """Bytes allocated beyond the reservation."""
        rec = self._record()
        return rec.overdraft_bytes if rec is not None else 0

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give back what is unused. Releasing twice is harmless.

        Raises:
            RuntimeError: called from another thread, or while a reservation
                made after this one (on this thread) is still active; nothing
                changes then.
        """
        if self._released:
            return
        if threading.get_ident() != self._thread:
            raise RuntimeError("Reservation.release(): a reservation belongs to the thread that made it")
        rt = _native.runtime()
        rec = rt.reservation() if rt is not None else None
        if rec is None or rec.serial < self._serial:
            # Released with its scope instance already (ap_exit gives the
            # reservations made in an instance back when it is left).
            self._released = True
            return
        if rec.serial != self._serial:
            raise RuntimeError(
                "Reservation.release(): a reservation made after this one is still active; "
                "release reservations innermost first"
            )
        self._final = rt.unreserve()
        self._released = True
        final = self._final
        if final is not None and final.overdrafts and final.action == _ACTION_CODES["warn"]:
            warnings.warn(
                f"reservation of {self.size} bytes in scope {self.scope!r} was overdrawn "
                f"{final.overdrafts} time(s) by {final.overdraft_bytes} bytes; the first "
                f"allocation beyond it asked for {final.first_overdraft} bytes",
                AllocPolicyWarning,
                stacklevel=3,
            )

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.release()
            rt = _native.runtime()
            err = refusal.convert(exc, rt, self._seq, limit="reservation") if rt is not None else None
            if err is not None:
                refusal.raise_converted(err, exc)
            return False
        finally:
            err = exc = tb = None  # no cycle through this frame

    def __repr__(self) -> str:
        state = "released" if self._released else f"left={self.left}"
        return f"<Reservation {self.size} bytes in scope {self.scope!r}, {state}>"


def try_reserve(nbytes: int, *, overdraft: str | None = None) -> Reservation | AllocError:
    """Reserve ``nbytes`` of budget now; never raises for a refusal.

    Returns a :class:`Reservation` if every budget on the way up and the
    machine can take it, else the :class:`AllocError` that :func:`reserve`
    would raise (not raised): ``reason`` ``"budget"`` with the refusing
    ``limit``, ``"oom"`` with ``limit="machine"`` when the machine's headroom
    minus the policy's ``reserve_margin`` is too small, or ``"injected"``.
    Nothing is charged and nothing is allocated on a refusal.

    ``overdraft`` (``"raise"``, ``"abort"``, ``"warn"``, ``"count"``) overrides
    the scope's ``overdraft`` setting for this reservation.

    Without a preloaded runtime every reservation is granted (and governs
    nothing), after a one-time :class:`AllocPolicyWarning`.
    """
    return _try_reserve(nbytes, overdraft, "try_reserve")


def _try_reserve(nbytes: int, overdraft: str | None, func: str) -> Reservation | AllocError:
    nbytes = _check_size(nbytes, func)
    action = _check_overdraft(overdraft, func)
    rt = _native.runtime()
    if rt is None:
        warn_inactive()
        return Reservation(nbytes, "process", 0, 0)
    seq = refusal.seq(rt)
    refused = rt.reserve(nbytes, action)
    if refused is not None:
        return refusal.from_violation(rt, refused, size=nbytes)
    instance, _ = rt.current()
    name = scope_name(rt, rt.instance_stats(instance).scope)
    return Reservation(nbytes, name, rt.reservation().serial, seq)


def reserve(nbytes: int, *, overdraft: str | None = None) -> Reservation:
    """Reserve ``nbytes`` of budget, or raise :class:`AllocError` before any
    work starts. Use it as a context manager::

        with allocpolicy.reserve(50 * 2**20):
            build_the_index()     # never refused for budget reasons

    Works in every mode: in ``raise`` and ``abort`` scopes it is an early,
    clean refusal rather than a failure half way. Allocations inside draw on
    the reservation; going beyond it is an overdraft, counted in
    :func:`allocpolicy.stats` and handled by ``overdraft`` (the scope's setting
    unless given here): ``"raise"`` refuses the allocation (the block raises
    :class:`AllocError` with ``limit="reservation"``), ``"abort"`` aborts,
    ``"warn"`` allows it and warns when the block ends, ``"count"`` allows it.
    """
    result = _try_reserve(nbytes, overdraft, "reserve")
    if isinstance(result, AllocError):
        raise result
    return result


# --- Operations that lose nothing ---------------------------------------------------


class Unstored:
    """What a ``try_*`` operation could not store, and why.

    Attributes:
        item: the value that was not stored (for :func:`try_insert`, the
            ``(key, value)`` pair; for a bytes-like :func:`try_extend` of a
            ``bytearray``, the whole data).
        rest: for :func:`try_extend` of an iterator, the iterator itself,
            positioned just after ``item``; ``None`` otherwise.
        error: the :class:`AllocError` that refused it.

    An ``Unstored`` is always true; the operations return ``None`` on success.
    """

    __slots__ = ("item", "rest", "error")

    def __init__(self, item: Any, rest: Iterator[Any] | None, error: AllocError) -> None:
        self.item = item
        self.rest = rest
        self.error = error

    def __bool__(self) -> bool:
        return True

    def __iter__(self):
        return iter((self.item, self.rest, self.error))

    def __repr__(self) -> str:
        return f"Unstored(item={self.item!r:.60}, rest={self.rest!r}, error={self.error})"


_PTR = 8  # bytes per slot of a list on 64-bit builds
_LIST_EMPTY = sys.getsizeof([])


def _list_capacity(lst: list) -> int:
    return (sys.getsizeof(lst) - _LIST_EMPTY) // _PTR


def _list_growth_bytes(lst: list, extra: int) -> int:
    """Bytes a list must allocate to hold ``extra`` more items: CPython's
    over-allocation (Objects/listobject.c, list_resize) applied to the new
    size. A resize reallocates the item array; the whole new array is
    reserved, since realloc may have to move it."""
    need = len(lst) + extra
    if need <= _list_capacity(lst):
        return 0
    new = (need + (need >> 3) + 6) & ~3
    if need - len(lst) > new - need:
        new = (need + 3) & ~3
    return new * _PTR


def _guarded(nbytes: int, op, *args):
    """Run ``op(*args)`` inside a reservation of ``nbytes`` whose overdrafts
    are refused, so that a wrong estimate still fails cleanly inside ``op``
    (CPython's container operations leave the container unchanged when an
    allocation fails). Returns None, or the AllocError that refused."""
    rt = _native.runtime()
    if rt is None:
        op(*args)
        return None
    res = None
    if nbytes:
        res = try_reserve(nbytes, overdraft="raise")
        if isinstance(res, AllocError):
            return res
    seq = refusal.seq(rt)
    try:
        op(*args)
    except MemoryError as exc:
        if isinstance(exc, AllocError):
            return exc
        err = refusal.convert(exc, rt, seq)
        if err is None:
            raise
        return err
    finally:
        if res is not None:
            res.release()
    return None


def try_append(lst: list, item: Any) -> Unstored | None:
    """Append ``item`` to the list ``lst`` if the budget allows.

    Returns ``None`` when stored. Otherwise returns :class:`Unstored` with
    ``item`` and leaves ``lst`` exactly as it was. The check is made before
    the list grows, against the bytes its growth needs.
    """
    if not isinstance(lst, list):
        raise TypeError(f"try_append(): argument 'lst' must be a list, not {type(lst).__name__}")
    err = _guarded(_list_growth_bytes(lst, 1), lst.append, item)
    return None if err is None else Unstored(item, None, err)


def try_extend(target: list | bytearray, iterable: Iterable[Any]) -> Unstored | None:
    """Extend a list (or a ``bytearray``) from ``iterable`` while the budget allows.

    For a list, items are taken one at a time. If the list cannot grow for
    the next item, returns :class:`Unstored` whose ``item`` is that item
    (already taken from the iterator) and whose ``rest`` is the iterator,
    positioned just after it: ``target[len_before:] + [item] + list(rest)`` is
    exactly what ``iterable`` would have produced. Everything before ``item``
    stays stored. Exceptions raised by the iterable itself propagate, with
    what was stored before them still in the list.

    For a ``bytearray`` and bytes-like data, the extension is all or nothing:
    on failure ``item`` is the data and the ``bytearray`` is unchanged. An
    iterable of ints is taken one at a time, as for a list.
    """
    if isinstance(target, bytearray):
        if isinstance(iterable, (bytes, bytearray, memoryview)):
            data = iterable
            need = len(target) + len(memoryview(data).cast("B"))
            # bytearray over-allocates by 1/8 when it grows (bytearray_resize).
            nbytes = need + (need >> 3) + 64 if need > len(target) else 0
            err = _guarded(nbytes, target.extend, data)
            return None if err is None else Unstored(data, None, err)
        append = target.append
        growth = lambda: len(target) + 1 + ((len(target) + 1) >> 3) + 64  # noqa: E731
    elif isinstance(target, list):
        append = target.append
        growth = lambda: _list_growth_bytes(target, 1)  # noqa: E731
    else:
        raise TypeError(
            f"try_extend(): argument 'target' must be a list or a bytearray, not {type(target).__name__}"
        )
    it = iter(iterable)
    for item in it:
        err = _guarded(growth(), append, item)
        if err is not None:
            return Unstored(item, it, err)
    return None


def _dict_growth_bytes(d: dict) -> int:
    """An upper bound of what inserting a new key can allocate: a resize
    builds a new table for up to 3x the used entries (dictobject.c,
    GROWTH_RATE), about as large as the dict is now, times three."""
    return 3 * sys.getsizeof(d) + 64


def try_insert(mapping: MutableMapping, key: Any, value: Any) -> Unstored | None:
    """``mapping[key] = value`` if the budget allows.

    Returns ``None`` when stored; otherwise :class:`Unstored` with ``item``
    ``(key, value)``, and ``mapping`` as it was (replacing the value of an
    existing key allocates nothing and always succeeds for a ``dict``).
    ``key`` must be hashable (TypeError otherwise, as for ``dict``).
    """
    if not isinstance(mapping, MutableMapping):
        raise TypeError(
            f"try_insert(): argument 'mapping' must be a mutable mapping, not {type(mapping).__name__}"
        )
    hash(key)
    if isinstance(mapping, dict) and type(mapping).__setitem__ is dict.__setitem__:
        nbytes = 0 if key in mapping else _dict_growth_bytes(mapping)
    else:
        nbytes = 3 * sys.getsizeof(mapping) + 64  # a mapping type we cannot see into
    err = _guarded(nbytes, mapping.__setitem__, key, value)
    return None if err is None else Unstored((key, value), None, err)


def try_bytearray(n: int) -> bytearray | AllocError:
    """A zeroed ``bytearray`` of ``n`` bytes, or the :class:`AllocError` that
    refused it (returned, not raised)."""
    n = _check_size(n, "try_bytearray", "n")
    out: list[bytearray] = []
    # The object's header on top; a reservation of sys.maxsize is refused anyway.
    err = _guarded(min(n + 64, sys.maxsize), lambda: out.append(bytearray(n)))
    return err if err is not None else out[0]


def try_bytes_join(parts: Iterable[bytes], sep: bytes = b"") -> bytes | AllocError:
    """``sep.join(parts)``, or the :class:`AllocError` that refused it
    (returned, not raised). ``parts`` is read once; a non-sequence is first
    collected into a list, outside the check."""
    if not isinstance(parts, (list, tuple)):
        parts = list(parts)
    sep_len = len(sep)
    total = sum(len(memoryview(p).cast("B")) for p in parts) + sep_len * max(len(parts) - 1, 0)
    out: list[bytes] = []
    err = _guarded(total + 64, lambda: out.append(sep.join(parts)))
    return err if err is not None else out[0]
