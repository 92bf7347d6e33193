"""No-allocation regions and allocation counting.

:func:`no_alloc` proves that a region allocates nothing (QADAPT's and
``assert_no_alloc``'s idea), in the three forms QADAPT offers: a context
manager, a decorator, and explicit :meth:`~no_alloc.enter` /
:meth:`~no_alloc.exit` calls. :func:`count_allocs` counts instead of
forbidding, for assertions such as "this hot path allocates zero times".

Both watch the calling thread through the runtime (``count_allocs`` can also
watch every thread), so they see every ``malloc`` of the process's native code
as well as Python's own allocators where the runtime hooks them. A watched
thread takes the runtime's slow path for each allocation: fine for a region
under test, not something to leave open around a whole program.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any, Callable, Iterable, TypeVar

from . import _native
from ._core.names import scope_name, warn_inactive
from ._core.refusal_hooks import notify
from ._errors import AllocError, AllocPolicyWarning

__all__ = ["no_alloc", "count_allocs", "RegionStats", "region_outcome", "raise_outcome"]

F = TypeVar("F", bound=Callable[..., Any])

_ACTIONS = {name: i for i, name in enumerate(_native.ACTIONS)}
#: Domains a region can watch, by the names users write.
DOMAIN_NAMES = {name: i for i, name in enumerate(_native.DOMAINS)}
_FORBIDDEN = _native.REASONS.index("forbidden")

# How many API regions (no_alloc, count_allocs) are open on each thread. The
# runtime closes the innermost one whichever object asks; this count lets an
# object check that it is the innermost before it closes anything.
_open = threading.local()


def _depth() -> int:
    return getattr(_open, "depth", 0)


#: Python's MEM and OBJ domains are seen through observing layers that are
#: installed the first time a region asks for them by name (not by default:
#: the calls into the runtime that open and close a region themselves make
#: a few small Python allocations, which would count).
_PY_DOMAINS = (1 << DOMAIN_NAMES["py_mem"]) | (1 << DOMAIN_NAMES["py_obj"])


#: What a region watches unless told otherwise: every allocation that reaches
#: malloc (native code, and Python's RAW domain and large objects) and
#: NumPy's data handler.
DEFAULT_DOMAINS = sum(1 << DOMAIN_NAMES[name] for name in ("libc", "py_raw", "numpy"))


def _watch_python_domains(rt: _native.Runtime, mask: int) -> None:
    if mask & _PY_DOMAINS:
        rt.install_domain_hooks()


def _domain_mask(domains: Iterable[str] | str | None, func: str) -> int:
    if domains is None:
        return DEFAULT_DOMAINS
    if isinstance(domains, str):
        domains = [domains]
    mask = 0
    for name in domains:
        if name not in DOMAIN_NAMES:
            raise ValueError(
                f"{func}(): argument 'domains': unknown domain {name!r}; "
                f"expected some of {', '.join(DOMAIN_NAMES)}"
            )
        mask |= 1 << DOMAIN_NAMES[name]
    return mask


class RegionStats:
    """What a region saw: allocation requests, frees and bytes, on one thread
    (or on every thread, for ``count_allocs(threads="all")``)."""

    __slots__ = ("allocations", "frees", "bytes", "bytes_freed", "first_size", "first_domain", "checked")

    def __init__(
        self,
        allocations: int = 0,
        frees: int = 0,
        bytes: int = 0,
        bytes_freed: int = 0,
        first_size: int = 0,
        first_domain: str | None = None,
        checked: bool = True,
    ) -> None:
        self.allocations = allocations
        self.frees = frees
        self.bytes = bytes
        self.bytes_freed = bytes_freed
        self.first_size = first_size
        self.first_domain = first_domain
        #: False when no runtime was there to watch (the numbers are then 0).
        self.checked = checked

    @classmethod
    def _from_region(cls, rec: _native.RegionC) -> RegionStats:
        seen = rec.allocations or rec.frees_seen
        return cls(
            allocations=rec.allocations,
            frees=rec.frees_seen,
            bytes=rec.bytes,
            bytes_freed=rec.bytes_freed,
            first_size=rec.first_size,
            first_domain=_native.DOMAINS[rec.first_domain] if seen else None,
        )

    def __repr__(self) -> str:
        return (
            f"RegionStats(allocations={self.allocations}, frees={self.frees}, bytes={self.bytes}, "
            f"bytes_freed={self.bytes_freed})"
        )


def region_outcome(
    rec: _native.RegionC, scope: str, since_seq: int, exc: BaseException | None, tb, stacklevel: int
) -> AllocError | None:
    """What leaving a region means: the AllocError to raise (``raise``
    regions with offences), a warning issued (``warn``), or nothing."""
    action = _native.ACTIONS[rec.action]
    offences = rec.allocations + (rec.frees_seen if rec.frees else 0)
    if not offences or action in ("count", "abort"):
        return None
    what = f"{rec.allocations} allocation(s)"
    if rec.frees:
        what += f" and {rec.frees_seen} free(s)"
    if action == "warn":
        first = (
            f"the first of {rec.first_size} bytes ({_native.DOMAINS[rec.first_domain]})"
            if rec.allocations
            else "the first a free"
        )
        warnings.warn(
            f"no-allocation region in scope {scope!r}: {what}; {first}",
            AllocPolicyWarning,
            stacklevel=stacklevel,
        )
        return None
    if exc is not None and not isinstance(exc, MemoryError):
        return None  # another error is already leaving the region; it wins
    rt = _native.runtime()
    v = rt.last_violation() if rt is not None else None
    from_refusal = v is not None and v.seq != since_seq and v.reason == _FORBIDDEN
    return AllocError(
        scope=scope,
        size=v.requested if from_refusal else rec.first_size,
        budget=None,
        live=v.live if from_refusal else 0,
        reason="forbidden",
        count=offences,
    )


def raise_outcome(err: AllocError | None, exc, tb) -> None:
    if err is None:
        return
    notify(err)  # a region's refusal, as raise_converted reports a boundary's
    try:
        if exc is not None:
            raise err.with_traceback(tb) from None
        raise err
    finally:
        err = exc = tb = None  # no cycle through this frame


class no_alloc:
    """A region that must not allocate.

    ``action`` says what an allocation in it does: ``"raise"`` refuses the
    first one (the code sees a ``MemoryError`` right there) and the region
    raises :class:`AllocError` with ``reason="forbidden"``, the size and the
    number of offences when it ends; ``"abort"`` prints the diagnostic and
    aborts at the first; ``"warn"`` lets them happen and warns once when the
    region ends, naming the first size; ``"count"`` only records (see
    :attr:`stats`). With ``frees=True`` frees are offences too (QADAPT's
    "allocation or drop"); they cannot be refused, so they surface at the end.
    ``domains`` chooses what is watched (``"libc"``, ``"py_arena"``,
    ``"py_raw"``, ``"py_mem"``, ``"py_obj"``, ``"numpy"``; default
    ``libc``, ``py_raw`` and ``numpy``: everything that reaches ``malloc``).
    Naming ``"py_mem"`` or ``"py_obj"`` installs observing layers on
    Python's allocator domains, so every Python object counts.

    Three forms, as QADAPT offers::

        with allocpolicy.no_alloc():
            hot_path()

        @allocpolicy.no_alloc
        def hot_path(): ...

        region = allocpolicy.no_alloc(action="count")
        region.enter()
        hot_path()
        stats = region.exit()

    Regions are per thread and nest; every open region sees every event, and
    the strictest action decides. Without a preloaded runtime the region
    checks nothing, after a one-time :class:`AllocPolicyWarning`.
    """

    def __init__(
        self,
        func: Callable | None = None,
        /,
        *,
        action: str = "raise",
        frees: bool = False,
        domains: Iterable[str] | str | None = None,
    ) -> None:
        if action not in _ACTIONS:
            raise ValueError(
                f"no_alloc(): argument 'action' must be one of "
                f"{', '.join(repr(a) for a in _ACTIONS)}, got {action!r}"
            )
        if not isinstance(frees, bool):
            raise TypeError(f"no_alloc(): argument 'frees' must be bool, not {type(frees).__name__}")
        self.action = action
        self.frees = frees
        self._mask = _domain_mask(domains, "no_alloc")
        self._local = threading.local()
        # Frames between __exit__ and the code a warning should point at,
        # beyond the caller's own (the decorator form adds its __call__).
        self._frames = 0
        #: What the region saw, once it ended (for the last thread that left it).
        self.stats: RegionStats | None = None
        self._func = None
        if func is not None:
            if not callable(func):
                raise TypeError(f"no_alloc(): argument must be callable, not {type(func).__name__}")
            self._func = func
            functools.update_wrapper(self, func)

    # -- the decorator form -----------------------------------------------------

    def __call__(self, *args, **kwargs):
        if self._func is None:
            # @no_alloc(action=...) applied to a function
            (func,) = args
            if not callable(func) or kwargs:
                raise TypeError("no_alloc(...) decorates one callable")
            return no_alloc(func, action=self.action, frees=self.frees, domains=self._domains_names())

        region = no_alloc(action=self.action, frees=self.frees, domains=self._domains_names())
        region._frames = 1  # this call sits between the region and the caller
        try:
            with region:
                return self._func(*args, **kwargs)
        finally:
            self.stats = region.stats

    def __get__(self, obj, objtype=None):
        # Decorating a method: bind like a function would.
        if obj is None or self._func is None:
            return self
        return functools.partial(self.__call__, obj)

    def _domains_names(self) -> list[str] | None:
        if not self._mask:
            return None
        return [name for name, bit in DOMAIN_NAMES.items() if self._mask & (1 << bit)]

    # -- the explicit form ------------------------------------------------------------

    def _stack(self) -> list:
        try:
            return self._local.stack
        except AttributeError:
            self._local.stack = []
            return self._local.stack

    def enter(self) -> None:
        """Open the region on the calling thread."""
        rt = _native.runtime()
        if rt is None:
            warn_inactive()
            self._stack().append(None)
            return
        # Bookkeeping happens outside the region: list growth is an allocation.
        stack = self._stack()
        depth = _depth()
        stack.append((rt.last_violation().seq, depth))
        try:
            _watch_python_domains(rt, self._mask)
            rt.region_enter(_ACTIONS[self.action], self.frees, self._mask)
        except BaseException:
            stack.pop()
            raise
        _open.depth = depth + 1

    def exit(self) -> RegionStats:
        """Close the region; returns what it saw. In a ``raise`` region with
        offences, raises :class:`AllocError` (``reason="forbidden"``)."""
        stats, err = self._close(None, None, stacklevel=3)
        raise_outcome(err, None, None)
        return stats

    def _close(self, exc, tb, stacklevel: int) -> tuple[RegionStats, AllocError | None]:
        stack = self._stack()
        if not stack:
            raise RuntimeError("no_alloc.exit(): the region is not open on this thread")
        if stack[-1] is None:
            stack.pop()
            self.stats = RegionStats(checked=False)
            return self.stats, None
        seq, depth = stack[-1]
        rt = _native.runtime()
        rec = rt.region_exit() if depth == _depth() - 1 else None
        if rec is None:
            raise RuntimeError(
                "no_alloc.exit(): another region (or a forbid scope) opened inside this one "
                "is still open; close regions innermost first"
            )
        _open.depth = depth
        stack.pop()
        self.stats = RegionStats._from_region(rec)
        instance, _ = rt.current()
        name = scope_name(rt, rt.instance_stats(instance).scope)
        return self.stats, region_outcome(rec, name, seq, exc, tb, stacklevel + 1)

    def __enter__(self) -> no_alloc:
        self.enter()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            _, err = self._close(exc, tb, stacklevel=3 + self._frames)
            raise_outcome(err, exc, tb)
            return False
        finally:
            exc = tb = None


class count_allocs:
    """Count the allocations, frees and bytes inside a block::

        with allocpolicy.count_allocs() as counted:
            hot_path()
        assert counted.allocations == 0

    ``threads="current"`` (the default) counts the calling thread only, exactly;
    ``threads="all"`` counts every thread of the process while the block runs
    (each allocation then costs one shared atomic increment). ``domains`` as
    for :class:`no_alloc` (current thread only). The counts are read at the
    end of the block; they are 0, with ``checked`` false, without a runtime.
    """

    def __init__(self, *, threads: str = "current", domains: Iterable[str] | str | None = None) -> None:
        if threads not in ("current", "all"):
            raise ValueError(f"count_allocs(): argument 'threads' must be 'current' or 'all', got {threads!r}")
        if threads == "all" and domains is not None:
            raise ValueError("count_allocs(): argument 'domains' applies to threads='current' only")
        self.threads = threads
        self._mask = _domain_mask(domains, "count_allocs")
        self.allocations = 0
        self.frees = 0
        self.bytes = 0
        self.bytes_freed = 0
        self.checked = False
        self._start: _native.CensusC | None = None
        self._depth = 0

    def __enter__(self) -> count_allocs:
        rt = _native.runtime()
        if rt is None:
            warn_inactive()
            return self
        if self.threads == "all":
            rt.census_open()
            self._start = rt.census_read()
        else:
            self._depth = _depth()
            _watch_python_domains(rt, self._mask)
            rt.region_enter(_ACTIONS["count"], True, self._mask)
            _open.depth = self._depth + 1
        self.checked = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.checked:
            return False
        rt = _native.runtime()
        if self.threads == "all":
            end = rt.census_read()
            rt.census_close()
            start = self._start
            self.allocations = end.allocations - start.allocations
            self.frees = end.frees - start.frees
            self.bytes = end.bytes - start.bytes
            self.bytes_freed = end.bytes_freed - start.bytes_freed
        else:
            rec = rt.region_exit() if self._depth == _depth() - 1 else None
            if rec is None:
                raise RuntimeError(
                    "count_allocs: a region opened inside this block is still open; "
                    "close regions innermost first"
                )
            _open.depth = self._depth
            self.allocations = rec.allocations
            self.frees = rec.frees_seen
            self.bytes = rec.bytes
            self.bytes_freed = rec.bytes_freed
        return False

    def __repr__(self) -> str:
        return (
            f"count_allocs(allocations={self.allocations}, frees={self.frees}, "
            f"bytes={self.bytes}, bytes_freed={self.bytes_freed})"
        )
