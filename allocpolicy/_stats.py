"""Counters of the runtime, as plain Python values, and as JSON.

The JSON form (:meth:`Stats.as_dict`, :meth:`Stats.to_json`) is what
``allocpolicy stats --json`` prints and what a process's stats socket serves;
:meth:`Stats.from_dict` reads it back, so the command can format another
process's counters exactly as that process would.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from . import _native

__all__ = ["stats", "Stats", "ScopeStats", "ProcessStats", "REFUSAL_REASONS", "STATS_FORMAT"]

#: Keys of the ``refusals`` mappings: why allocations were refused.
REFUSAL_REASONS = ("budget", "oom", "injected", "forbidden")

#: Version of the JSON document; bumped when a key changes meaning or goes.
#: New keys may appear without a bump, so readers must ignore unknown ones.
STATS_FORMAT = 1


def _no_refusals() -> dict[str, int]:
    return dict.fromkeys(REFUSAL_REASONS, 0)


@dataclass(frozen=True)
class ScopeStats:
    """One scope, summed over all of its instances (ended ones included)."""

    name: str
    mode: str  #: ``on_oom`` of the scope
    budget: int | None  #: per-instance budget in bytes
    total_budget: int | None
    live: int  #: bytes allocated in the scope and not yet freed
    peak: int  #: highest ``live`` seen
    allocations: int  #: allocations granted
    violations: int  #: allocations refused
    instances: int  #: instances entered so far
    active: int  #: instances not yet ended
    escaped: int  #: bytes still live when their instance ended (summed)
    grace_bytes: int  #: bytes granted from the unwind grace after a refusal
    max_instance_peak: int  #: the largest peak of a single instance
    reservations: int = 0  #: reservations granted in its instances
    refused_reservations: int = 0  #: reservations refused by a budget
    overdrafts: int = 0  #: allocations that went beyond a reservation
    overdraft_bytes: int = 0  #: bytes allocated beyond reservations
    forbidden: int = 0  #: offences seen in its forbid regions
    injected: int = 0  #: failures injected in its instances
    #: ``violations`` by reason: ``budget``, ``oom``, ``injected``, ``forbidden``
    refusals: dict[str, int] = field(default_factory=_no_refusals)

    def as_dict(self) -> dict:
        """The counters as a plain ``dict`` (JSON-ready)."""
        return asdict(self)


@dataclass(frozen=True)
class ProcessStats:
    """The whole process, as far as the runtime sees it."""

    preloaded: bool
    budget: int | None
    live: int
    peak: int
    allocations: int
    violations: int
    arenas_live: int  #: pymalloc arenas currently charged to some scope
    arena_hook: bool  #: whether Python's small objects are being counted
    foreign_frees: int  #: frees of blocks the runtime did not hand out
    grace: int  #: the unwind grace allowance, bytes
    #: ``violations`` by reason, over the whole process
    refusals: dict[str, int] = field(default_factory=_no_refusals)

    def as_dict(self) -> dict:
        """The counters as a plain ``dict`` (JSON-ready)."""
        return asdict(self)


def _known(cls, data: dict) -> dict:
    """The keys of ``data`` that ``cls`` has: a newer writer may add keys."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class Stats:
    """Result of :func:`stats`. ``active`` is False when no runtime is preloaded."""

    active: bool
    process: ProcessStats | None = None
    scopes: dict[str, ScopeStats] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Everything as plain ``dict``\\ s, lists and numbers, ready for :mod:`json`.

        The shape: ``{"format": 1, "active": ..., "process": {...} or None,
        "scopes": {name: {...}}}``, with the fields of :class:`ProcessStats`
        and :class:`ScopeStats` as keys. Sizes are bytes; ``None`` is "no limit".
        """
        return {
            "format": STATS_FORMAT,
            "active": self.active,
            "process": None if self.process is None else self.process.as_dict(),
            "scopes": {name: s.as_dict() for name, s in self.scopes.items()},
        }

    def to_json(self, **dumps_options) -> str:
        """:meth:`as_dict` as a JSON string; keyword arguments go to :func:`json.dumps`."""
        return json.dumps(self.as_dict(), **dumps_options)

    @classmethod
    def from_dict(cls, data: dict) -> "Stats":
        """The inverse of :meth:`as_dict` (keys this version does not know are ignored).

        Raises:
            ValueError: ``data`` is not a stats document of a format this
                version reads.
        """
        try:
            if data.get("format") != STATS_FORMAT:
                raise ValueError(f"unsupported stats format {data.get('format')!r} (expected {STATS_FORMAT})")
            process = data["process"]
            return cls(
                active=bool(data["active"]),
                process=None if process is None else ProcessStats(**_known(ProcessStats, process)),
                scopes={name: ScopeStats(**_known(ScopeStats, s)) for name, s in data["scopes"].items()},
            )
        except (AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"not a stats document: {exc!r}") from None

    def format(self) -> str:
        """A small fixed-width table, for logs and command-line output."""
        if not self.active or self.process is None:
            return "allocpolicy: runtime not active"
        from ._sizes import format_size

        def size(n):
            return "-" if n is None else format_size(n)

        p = self.process
        why = ", ".join(f"{reason} {n}" for reason, n in p.refusals.items() if n)
        lines = [
            f"process: live {size(p.live)}, peak {size(p.peak)}, budget {size(p.budget)}, "
            f"{p.allocations} allocations, {p.violations} refused" + (f" ({why})" if why else ""),
            f"{'scope':<12} {'mode':<8} {'budget':>10} {'live':>10} {'peak':>10} "
            f"{'inst.':>6} {'refused':>7} {'escaped':>10}",
        ]
        for s in self.scopes.values():
            lines.append(
                f"{s.name:<12} {s.mode:<8} {size(s.budget):>10} {size(s.live):>10} "
                f"{size(s.max_instance_peak):>10} {s.instances:>6} {s.violations:>7} "
                f"{size(s.escaped):>10}"
            )
        return "\n".join(lines)


def _refusals(s: _native.ScopeStatsC) -> dict[str, int]:
    return {reason: s.refused[_native.REASONS.index(reason)] for reason in REFUSAL_REASONS}


def _from_native(cls, struct, **special):
    """``cls`` with each field read from ``struct`` by name, but for ``special`` ones."""
    return cls(**{f.name: special[f.name] if f.name in special else getattr(struct, f.name) for f in fields(cls)})


def stats() -> Stats:
    """Per-scope and process counters.

    The calling thread's batched counters are published first, so its own
    allocations are exact; each other running thread may have a small batch of
    allocations or frees not yet published, at most 256 KiB and at most 1/32
    of the tightest budget it runs under.
    """
    rt = _native.runtime()
    if rt is None:
        return Stats(active=False)
    rt.flush()
    p = rt.process_stats()
    scopes = {}
    # Refusals are counted for the innermost scope; the process's are their sum.
    refusals = _no_refusals()
    for sid in range(p.scopes):
        s = rt.scope_stats(sid)
        if s is None:
            continue
        by_reason = _refusals(s)
        for reason, n in by_reason.items():
            refusals[reason] += n
        if sid == 0:
            continue
        name = s.name.decode("utf-8", "replace")
        scopes[name] = _from_native(
            ScopeStats,
            s,
            name=name,
            mode=_native.MODES[s.mode] if s.mode < len(_native.MODES) else str(s.mode),
            budget=s.budget or None,  # 0 is "no budget" in the ABI
            total_budget=s.total_budget or None,
            refusals=by_reason,
        )
    process = _from_native(
        ProcessStats,
        p,
        preloaded=bool(p.preloaded),
        budget=p.budget or None,
        arena_hook=bool(p.arena_hook),
        refusals=refusals,
    )
    return Stats(active=True, process=process, scopes=scopes)
