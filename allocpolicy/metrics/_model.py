"""What is exported: one table of metrics, read from one :class:`~allocpolicy.Stats`.

The Prometheus text, the ``prometheus_client`` collector and the
OpenTelemetry instruments are all made from this table, so that the three say
the same thing under the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from .. import ProcessStats, ScopeStats, Stats

__all__ = ["Metric", "Sample", "METRICS", "samples"]


@dataclass(frozen=True)
class Sample:
    """One value of a metric, with its labels."""

    labels: dict[str, str]
    value: int


@dataclass(frozen=True)
class Metric:
    """One metric family.

    ``name`` is the Prometheus name; a counter's samples are named
    ``name + "_total"`` in the Prometheus text, as ``prometheus_client`` does.
    ``otel_name`` and ``unit`` are its OpenTelemetry instrument's.
    """

    name: str
    kind: str  #: ``"gauge"`` or ``"counter"``
    help: str
    otel_name: str
    unit: str
    labels: tuple[str, ...]
    read: Callable[[Stats], Iterator[Sample]]


def _scopes(value: Callable[[ScopeStats], int | None]) -> Callable[[Stats], Iterator[Sample]]:
    def read(stats: Stats) -> Iterator[Sample]:
        for s in stats.scopes.values():
            v = value(s)
            if v is not None:  # a budget that is not set is no sample, not 0
                yield Sample({"scope": s.name}, v)

    return read


def _scope_refusals(stats: Stats) -> Iterator[Sample]:
    for s in stats.scopes.values():
        for reason, n in s.refusals.items():
            yield Sample({"scope": s.name, "reason": reason}, n)


def _process(value: Callable[[ProcessStats], int | None]) -> Callable[[Stats], Iterator[Sample]]:
    def read(stats: Stats) -> Iterator[Sample]:
        if stats.process is not None:
            v = value(stats.process)
            if v is not None:
                yield Sample({}, v)

    return read


def _process_refusals(stats: Stats) -> Iterator[Sample]:
    if stats.process is not None:
        for reason, n in stats.process.refusals.items():
            yield Sample({"reason": reason}, n)


def _active(stats: Stats) -> Iterator[Sample]:
    yield Sample({}, int(stats.active))


def _scope(name, kind, help, otel, unit, value) -> Metric:
    return Metric(f"allocpolicy_scope_{name}", kind, help, f"allocpolicy.scope.{otel}", unit, ("scope",), _scopes(value))


def _proc(name, kind, help, otel, unit, value) -> Metric:
    return Metric(f"allocpolicy_process_{name}", kind, help, f"allocpolicy.process.{otel}", unit, (), _process(value))


#: Every metric exported, in the order they are written.
METRICS: tuple[Metric, ...] = (
    Metric("allocpolicy_runtime_active", "gauge", "1 when the allocpolicy runtime is preloaded in this process, else 0.",
           "allocpolicy.runtime.active", "1", (), _active),
    _proc("live_bytes", "gauge", "Bytes allocated through the runtime and not yet freed.", "live", "By",
          lambda p: p.live),
    _proc("peak_bytes", "gauge", "Highest live bytes of the process so far.", "peak", "By", lambda p: p.peak),
    _proc("budget_bytes", "gauge", "The process budget (absent when there is none).", "budget", "By",
          lambda p: p.budget),
    _proc("allocations", "counter", "Allocations granted in the whole process.", "allocations", "{allocation}",
          lambda p: p.allocations),
    Metric("allocpolicy_process_refusals", "counter", "Allocations refused in the whole process, by reason.",
           "allocpolicy.process.refusals", "{refusal}", ("reason",), _process_refusals),
    _proc("foreign_frees", "counter", "Frees of blocks the runtime did not hand out.", "foreign_frees", "{free}",
          lambda p: p.foreign_frees),
    _scope("live_bytes", "gauge", "Bytes allocated in the scope (all its instances) and not yet freed.", "live",
           "By", lambda s: s.live),
    _scope("peak_bytes", "gauge", "Highest live bytes of the scope, all instances together.", "peak", "By",
           lambda s: s.peak),
    _scope("instance_peak_bytes", "gauge", "Largest peak of a single instance of the scope.", "instance_peak",
           "By", lambda s: s.max_instance_peak),
    _scope("budget_bytes", "gauge", "Per-instance budget of the scope (absent when there is none).", "budget",
           "By", lambda s: s.budget),
    _scope("total_budget_bytes", "gauge", "Budget of all live instances together (absent when there is none).",
           "total_budget", "By", lambda s: s.total_budget),
    _scope("allocations", "counter", "Allocations granted in the scope.", "allocations", "{allocation}",
           lambda s: s.allocations),
    Metric("allocpolicy_scope_refusals", "counter",
           "Allocations refused in the scope (the innermost one), by reason.", "allocpolicy.scope.refusals",
           "{refusal}", ("scope", "reason"), _scope_refusals),
    _scope("instances", "counter", "Instances of the scope entered.", "instances", "{instance}",
           lambda s: s.instances),
    _scope("active_instances", "gauge", "Instances of the scope not yet ended.", "active_instances", "{instance}",
           lambda s: s.active),
    _scope("escaped_bytes", "counter", "Bytes still live when their instance ended, summed.", "escaped", "By",
           lambda s: s.escaped),
    _scope("grace_bytes", "counter", "Bytes granted from the unwind grace after a refusal.", "grace", "By",
           lambda s: s.grace_bytes),
    _scope("reservations", "counter", "Reservations granted in the scope.", "reservations", "{reservation}",
           lambda s: s.reservations),
    _scope("refused_reservations", "counter", "Reservations refused in the scope.", "refused_reservations",
           "{reservation}", lambda s: s.refused_reservations),
    _scope("overdrafts", "counter", "Allocations that went beyond a reservation.", "overdrafts", "{allocation}",
           lambda s: s.overdrafts),
)


def samples(stats: Stats) -> Iterator[tuple[Metric, list[Sample]]]:
    """Each metric of :data:`METRICS` with its samples in ``stats``."""
    for metric in METRICS:
        yield metric, list(metric.read(stats))
