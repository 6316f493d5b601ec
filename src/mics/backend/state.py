"""Everything one backend instance owns, wired explicitly (no module globals).

Several backends (and gateways) run in one test process, so each instance gets its own
directory, replay guard and metrics registry through one BackendState.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from mics.backend.config import BackendConfig
from mics.backend.directory import Directory
from mics.backend.replay import ReplayGuard, wall_clock_ms
from mics.observability.metrics import MetricsRegistry

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
