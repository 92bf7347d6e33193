"""The runtime's metrics as OpenTelemetry observable instruments.

::

    from allocpolicy.metrics import otel
    otel.instrument()              # on the global MeterProvider

Needs ``opentelemetry-api`` and, to export anything, ``opentelemetry-sdk``
with an exporter (``pip install 'allocpolicy[otel]'``).
"""

from __future__ import annotations

from typing import Callable, Iterable

try:
    from opentelemetry import metrics as _otel_metrics
    from opentelemetry.metrics import CallbackOptions, Instrument, MeterProvider, Observation
except ImportError as exc:
    raise type(exc)(
        f"allocpolicy.metrics.otel needs opentelemetry-api ({exc}): pip install 'allocpolicy[otel]'",
        name=exc.name,
    ) from exc

from .. import Stats, __version__
from .. import stats as _take_stats
from ._model import METRICS, Metric

__all__ = ["instrument", "ATTRIBUTES"]

#: Label of the Prometheus metric -> attribute of the OpenTelemetry observation.
ATTRIBUTES = {"scope": "allocpolicy.scope", "reason": "allocpolicy.reason"}


def _callback(metric: Metric, read: Callable[[], Stats]):
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(sample.value, {ATTRIBUTES[k]: v for k, v in sample.labels.items()})
            for sample in metric.read(read())
        ]

    return observe


def instrument(meter_provider: MeterProvider | None = None) -> list[Instrument]:
    """Create one observable instrument per metric of :data:`allocpolicy.metrics.METRICS`
    on the meter ``allocpolicy`` of ``meter_provider`` (the global one unless
    given), and return them.

    Gauges become observable gauges, counters observable (monotonic, cumulative)
    counters; each reads :func:`allocpolicy.stats` when the SDK collects. Names
    are dotted (``allocpolicy.scope.refusals``), units are UCUM (``By``), labels
    become the attributes in :data:`ATTRIBUTES`. Call it once per provider.
    """
    provider = meter_provider if meter_provider is not None else _otel_metrics.get_meter_provider()
    meter = provider.get_meter("allocpolicy", __version__)
    made = []
    for metric in METRICS:
        create = meter.create_observable_counter if metric.kind == "counter" else meter.create_observable_gauge
        made.append(
            create(metric.otel_name, callbacks=[_callback(metric, _take_stats)], unit=metric.unit,
                   description=metric.help)
        )
    return made
