"""A collector of the runtime's metrics for ``prometheus_client``.

::

    from allocpolicy.metrics import prometheus
    prometheus.register()          # the default registry: start_http_server() serves it

Needs ``prometheus_client`` (``pip install 'allocpolicy[prometheus]'``).
"""

from __future__ import annotations

from typing import Callable, Iterator

try:
    from prometheus_client.core import REGISTRY, CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:
    raise type(exc)(
        f"allocpolicy.metrics.prometheus needs prometheus_client ({exc}): "
        "pip install 'allocpolicy[prometheus]'; allocpolicy.metrics.prometheus_text() needs nothing",
        name=exc.name,
    ) from exc

from .. import Stats
from .. import stats as _take_stats
from ._model import samples

__all__ = ["AllocPolicyCollector", "register"]

_FAMILIES = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}


class AllocPolicyCollector:
    """Reads :func:`allocpolicy.stats` at each scrape and yields every metric of
    :data:`allocpolicy.metrics.METRICS` (the same names as
    :func:`allocpolicy.metrics.prometheus_text`)."""

    def __init__(self, read: Callable[[], Stats] = _take_stats) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        for metric, values in samples(self._read()):
            if not values:
                continue  # as in prometheus_text: an unset budget is no family
            family = _FAMILIES[metric.kind](metric.name, metric.help, labels=list(metric.labels))
            for sample in values:
                family.add_metric([sample.labels[k] for k in metric.labels], sample.value)
            yield family

    def describe(self) -> Iterator[Metric]:
        # The names are fixed: registering needs no scrape of the runtime.
        for metric, _ in samples(Stats(active=False)):
            yield _FAMILIES[metric.kind](metric.name, metric.help, labels=list(metric.labels))


def register(registry: CollectorRegistry = REGISTRY) -> AllocPolicyCollector:
    """Register an :class:`AllocPolicyCollector` with ``registry`` (the default
    registry unless given) and return it; ``registry.unregister(it)`` undoes it.

    Raises:
        ValueError: the registry already has these metrics (``prometheus_client``'s
            "Duplicated timeseries").
    """
    collector = AllocPolicyCollector()
    registry.register(collector)
    return collector
