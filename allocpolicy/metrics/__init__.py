"""The runtime's counters as metrics: Prometheus and OpenTelemetry.

Three ways to export the same metrics (the table is :data:`METRICS`):

- :func:`prometheus_text`: the Prometheus text format, with no dependency,
  for a ``/metrics`` handler of any web framework;
- :mod:`allocpolicy.metrics.prometheus`: a collector for the registry of
  ``prometheus_client`` (``pip install 'allocpolicy[prometheus]'``);
- :mod:`allocpolicy.metrics.otel`: observable instruments on an OpenTelemetry
  meter (``pip install 'allocpolicy[otel]'``).

Importing this package imports neither ``prometheus_client`` nor OpenTelemetry;
only their own modules do.
"""

from ._model import METRICS, Metric, Sample, samples
from ._text import CONTENT_TYPE, prometheus_text

__all__ = ["CONTENT_TYPE", "METRICS", "Metric", "Sample", "prometheus_text", "samples"]
