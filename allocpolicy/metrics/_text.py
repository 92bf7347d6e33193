"""The Prometheus text exposition format (version 0.0.4), without any dependency."""

from __future__ import annotations

from .. import Stats
from .. import stats as _take_stats
from ._model import samples

__all__ = ["CONTENT_TYPE", "prometheus_text"]

#: The ``Content-Type`` of :func:`prometheus_text`'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def prometheus_text(stats: Stats | None = None) -> str:
    """The runtime's metrics in the Prometheus text format, ready to serve at ``/metrics``.

    ``stats`` defaults to :func:`allocpolicy.stats` taken now; pass one to
    render another process's counters (``allocpolicy stats PID --prometheus``
    does). Counters are named with ``_total``, as ``prometheus_client`` names
    them, so switching between this and :func:`allocpolicy.metrics.prometheus.register`
    changes no query. Without the runtime, only ``allocpolicy_runtime_active 0``.
    """
    if stats is None:
        stats = _take_stats()
    lines = []
    for metric, values in samples(stats):
        if not values:
            continue
        name = metric.name + "_total" if metric.kind == "counter" else metric.name
        lines.append(f"# HELP {name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {name} {metric.kind}")
        for sample in values:
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sample.labels.items())
            lines.append(f"{name}{{{labels}}} {sample.value}" if labels else f"{name} {sample.value}")
    return "\n".join(lines) + "\n"
