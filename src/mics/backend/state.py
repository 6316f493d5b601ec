"""Everything one backend instance owns, wired explicitly (no module globals).

Several backends (and gateways) run in one test process, so each instance gets its own
directory, replay guard, metrics registry, offline store, ingestor and nudger through one
BackendState. Building a state does no I/O: the store opens on first use or in
BackendServer.start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from mics.backend.config import BackendConfig
from mics.backend.directory import Directory
from mics.backend.ingest import OfflineIngestor, default_filters, default_priority_rules
from mics.backend.nudge import Nudger
from mics.backend.replay import ReplayGuard, wall_clock_ms
from mics.backend.store.engine import Store
from mics.observability.metrics import MetricsRegistry

# Buckets of offline_message_query_count (messages per page; pages hold 1..1000).
PAGE_SIZE_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000)

# Values of the ``result`` label of mics_backend_hook_requests_total.
RESULT_OK = "ok"  # served (for /auth and /check-message: accepted / allowed)
RESULT_DENIED = "denied"  # served, answer is no (invalid token, blocked word, ...)
RESULT_BAD_SIGN = "bad_sign"
RESULT_STALE = "stale"
RESULT_REPLAYED = "replayed"
RESULT_BAD_REQUEST = "bad_request"
RESULT_UNKNOWN_TENANT = "unknown_tenant"
RESULT_ERROR = "error"  # unexpected exception (HTTP 500)


class BackendMetrics:
    """The backend's Prometheus metrics, in its own registry."""

    def __init__(self, registry: MetricsRegistry | None = None) -> None:
        self.registry = registry or MetricsRegistry()
        # Exposed as mics_backend_hook_requests_total (prometheus_client adds _total).
        self.hook_requests: Counter = self.registry.counter(
            "mics_backend_hook_requests",
            "Hook requests served by the backend, by outcome",
            ("tenant", "op", "result"),
        )
        self.hook_duration_ms: Histogram = self.registry.histogram_ms(
            "mics_backend_hook_duration_ms",
            "Time to serve one hook request, in milliseconds",
            ("op",),
        )

        # -- offline path (offline-design.md section 6; the names are a contract) --
        self.query_total: Counter = self.registry.counter(
            "offline_message_query",
            "/get-offline-messages pages served",
            ("tenant",),
        )
        self.query_duration_ms: Histogram = self.registry.histogram_ms(
            "offline_message_query_duration_ms",
            "Database time of one /get-offline-messages page, in milliseconds",
            ("tenant",),
        )
        self.query_count: Histogram = Histogram(
            "offline_message_query_count",
            "Messages returned by one /get-offline-messages page",
            ("tenant",),
            buckets=PAGE_SIZE_BUCKETS,
            registry=self.registry.registry,
        )
        self.delivered: Counter = self.registry.counter(
            "offline_message_delivered",
            "Offline messages marked delivered, by ack or on fetch (v1 gateways)",
            ("tenant", "via"),
        )
        self.consumed: Counter = self.registry.counter(
            "offline_message_consumed",
            "OFFLINE_MESSAGE events read (signature not yet checked)",
            ("tenant",),
        )
        self.stored: Counter = self.registry.counter(
            "offline_message_stored", "Offline messages newly stored", ("tenant",)
        )
        self.duplicates: Counter = self.registry.counter(
            "offline_message_duplicate",
            "Offline messages already stored (redelivered events)",
            ("tenant",),
        )
        self.store_failed: Counter = self.registry.counter(
            "offline_message_store_failed",
            "Offline messages whose store transaction failed (they are retried)",
            ("tenant",),
        )
        self.store_duration_ms: Histogram = self.registry.histogram_ms(
            "offline_message_store_duration_ms",
            "Time of one store transaction (one consumed batch), in milliseconds",
        )
        self.invalid_sign: Counter = self.registry.counter(
            "offline_message_invalid_sign",
            "OFFLINE_MESSAGE events dropped because their signature is missing or wrong",
            ("tenant",),
        )
        self.skipped: Counter = self.registry.counter(
            "offline_message_skipped",
            "Events not stored, by reason (unparsable, invalid_data, filtered, ...)",
            ("tenant", "reason"),
        )
        self.events: Counter = self.registry.counter(
            "offline_consumer_events",
            "Events read by the offline consumer, by event type",
            ("tenant", "event_type"),
        )
        self.consumer_lag: Gauge = self.registry.gauge(
            "kafka_consumer_lag",
            "High watermark minus committed offset, per assigned partition",
            ("tenant", "partition"),
        )
        self.consumer_offset: Gauge = self.registry.gauge(
            "kafka_consumer_offset",
            "Last committed offset (next offset to read), per assigned partition",
            ("tenant", "partition"),
        )
        self.consumer_commit_failed: Counter = self.registry.counter(
            "kafka_consumer_commit_failed",
            "Offset commits that failed after the batch was stored (it is redelivered)",
            ("group",),
        )
        self.nudges: Counter = self.registry.counter(
            "offline_nudge",
            "POST /v1/offline-available calls to the gateway, by result",
            ("tenant", "result"),
        )
        self.reconcile_diff_ratio: Gauge = self.registry.gauge(
            "offline_message_reconcile_diff_ratio",
            "Last reconciliation: |expected - stored rows| / expected, per tenant",
            ("tenant",),
        )
        self.cleanup_deleted: Counter = self.registry.counter(
            "offline_message_cleanup_deleted",
            "Delivered offline messages deleted by the retention cleanup",
        )

    def render(self) -> bytes:
        return self.registry.render()


@dataclass
class BackendState:
    """Config (immutable), directory (mutable), replay guard and metrics of one backend."""

    config: BackendConfig
    directory: Directory
    replay: ReplayGuard
    metrics: BackendMetrics = field(default_factory=BackendMetrics)
    # TenantRuntimeConfig.hook_base_url. Set from the config; BackendServer.start fills
    # in the bound port when the config leaves public_url unset.
    public_url: str = ""
    # False once shutdown began: /readyz answers 503 so load balancers stop routing here.
    ready: bool = True
    # The offline path, built from the config in __post_init__. Replace
    # ``ingestor.filters`` / ``ingestor.priority_rules`` to plug in other rules.
    store: Store = field(init=False)
    nudger: Nudger = field(init=False)
    ingestor: OfflineIngestor = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.store = Store(
            config.database_url,
            auto_migrate=config.database_auto_migrate,
            pool_size=config.database_pool_size,
            max_overflow=config.database_max_overflow,
        )
        self.nudger = Nudger(
            config.gateway_urls,
            self.tenant_secret,
            self.metrics,
            debounce_s=config.nudge_debounce_ms / 1000,
        )
        self.ingestor = OfflineIngestor(
            config,
            self.store,
            self.metrics,
            filters=default_filters(config, self.directory),
            priority_rules=default_priority_rules(config),
            nudger=self.nudger,
        )

    def tenant_secret(self, tenant_id: str) -> str | None:
        tenant = self.config.tenants.get(tenant_id)
        return tenant.secret if tenant is not None else None

    @classmethod
    def from_config(
        cls,
        config: BackendConfig,
        *,
        clock: Callable[[], int] = wall_clock_ms,
        metrics: BackendMetrics | None = None,
    ) -> BackendState:
        return cls(
            config=config,
            directory=Directory.from_config(config),
            replay=ReplayGuard(window_ms=config.clock_skew_seconds * 1000, clock=clock),
            metrics=metrics or BackendMetrics(),
            public_url=config.resolved_public_url(config.port),
        )
