"""Prometheus metrics, one registry per service instance (no process globals).

Several gateways and backends run in one test process, so each owns a
CollectorRegistry and exposes it on its own /metrics endpoint.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# protocol.md section 10: histogram buckets in milliseconds.
MS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 150, 200, 250, 500, 1000, 2500, 5000, 10000)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The *_created series double the exposition size and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class MetricsRegistry:
    """Thin factory over a private CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, labels, registry=self.registry)

    def histogram_ms(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] = MS_BUCKETS,
    ) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample, 0.0 if absent (used by tests and health checks)."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value
