"""Per-tenant hook policy resolution (protocol.md 4.3).

For each setting the first available source wins: the tenant's runtime config (from
its last successful /auth), then the per-tenant environment map (concurrency only),
then the node-wide environment default. The winner is then clamped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mics.protocol.pb import mics_hook_pb2 as hook_pb

DEFAULT_MAX_CONCURRENCY = 32
DEFAULT_QUEUE_TIMEOUT_MS = 10
DEFAULT_BREAKER_FAILURE_THRESHOLD = 5
DEFAULT_BREAKER_OPEN_MS = 5000
DEFAULT_TIMEOUT_MS = 150

MAX_QUEUE_TIMEOUT_MS = 10_000
MIN_BREAKER_FAILURE_THRESHOLD = 1
MAX_BREAKER_FAILURE_THRESHOLD = 100
MAX_BREAKER_OPEN_MS = 60_000

_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class HookDefaults:
    """Node-wide settings (environment, protocol.md 11)."""

    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    queue_timeout_ms: int = DEFAULT_QUEUE_TIMEOUT_MS
    breaker_failure_threshold: int = DEFAULT_BREAKER_FAILURE_THRESHOLD
    breaker_open_ms: int = DEFAULT_BREAKER_OPEN_MS
    sign_required: bool = False
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    # TENANT_HOOK_MAX_CONCURRENCY; not hashable, so excluded from the hash.
    tenant_max_concurrency: Mapping[str, int] = field(default_factory=lambda: _EMPTY, hash=False)


@dataclass(frozen=True, slots=True)
class HookPolicy:
    """The effective settings for one tenant's hooks (each hook has its own state)."""

    max_concurrency: int
    queue_timeout_ms: int
    breaker_failure_threshold: int
    breaker_open_ms: int
    sign_required: bool
    timeout_ms: int


def _clamp(value: int, low: int, high: int) -> int:
    return low if value < low else high if value > high else value


def resolve_policy(
    defaults: HookDefaults,
    tenant_id: str,
    runtime: hook_pb.TenantRuntimeConfig | None,
) -> HookPolicy:
    # Max concurrency: runtime (> 0), tenant map, global; <= 0 -> 32.
    if (
        runtime is not None
        and runtime.HasField("hook_max_concurrency")
        and runtime.hook_max_concurrency > 0
    ):
        concurrency = runtime.hook_max_concurrency
    else:
        concurrency = defaults.tenant_max_concurrency.get(tenant_id, defaults.max_concurrency)
    if concurrency <= 0:
        concurrency = DEFAULT_MAX_CONCURRENCY

    # Queue timeout: runtime (any value, clamped), global; 0..10000.
    if runtime is not None and runtime.HasField("hook_queue_timeout_ms"):
        queue_timeout = runtime.hook_queue_timeout_ms
    else:
        queue_timeout = defaults.queue_timeout_ms
    queue_timeout = _clamp(queue_timeout, 0, MAX_QUEUE_TIMEOUT_MS)

    # Breaker threshold: runtime (> 0), global; 1..100.
    if (
        runtime is not None
        and runtime.HasField("hook_breaker_failure_threshold")
        and runtime.hook_breaker_failure_threshold > 0
    ):
        threshold = runtime.hook_breaker_failure_threshold
    else:
        threshold = defaults.breaker_failure_threshold
    threshold = _clamp(threshold, MIN_BREAKER_FAILURE_THRESHOLD, MAX_BREAKER_FAILURE_THRESHOLD)

    # Breaker open time: runtime (any value, clamped), global; 0..60000.
    if runtime is not None and runtime.HasField("hook_breaker_open_ms"):
        open_ms = runtime.hook_breaker_open_ms
    else:
        open_ms = defaults.breaker_open_ms
    open_ms = _clamp(open_ms, 0, MAX_BREAKER_OPEN_MS)

    if runtime is not None and runtime.HasField("hook_sign_required"):
        sign_required = runtime.hook_sign_required
    else:
        sign_required = defaults.sign_required

    return HookPolicy(
        max_concurrency=concurrency,
        queue_timeout_ms=queue_timeout,
        breaker_failure_threshold=threshold,
        breaker_open_ms=open_ms,
        sign_required=sign_required,
        timeout_ms=defaults.timeout_ms,
    )
