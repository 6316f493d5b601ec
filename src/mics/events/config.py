"""Event-path settings: the dispatcher's bounds and the Kafka producer's knobs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class EventConfigError(ValueError):
    """A malformed event-path setting; raised at startup, never at publish time."""


def parse_bootstrap(servers: str) -> list[str]:
    """Validate a Kafka bootstrap string (``host:port[,host:port...]``)."""
    entries = [s.strip() for s in servers.split(",")]
    if not servers.strip() or any(not e for e in entries):
        raise EventConfigError(f"bootstrap servers must be host:port[,host:port]: {servers!r}")
    for entry in entries:
        match = _HOST_PORT.match(entry.removeprefix("PLAINTEXT://"))
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise EventConfigError(f"bad Kafka bootstrap server {entry!r} (want host:port)")
    return entries


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    queue_capacity: int = 50_000  # KAFKA_QUEUE_CAPACITY: events queued, all tenants
    max_pending_per_tenant: int = 10_000  # KAFKA_MAX_PENDING_PER_TENANT
    max_attempts: int = 3  # KAFKA_MAX_ATTEMPTS on the event topic
    retry_backoff_ms: int = 50  # KAFKA_RETRY_BACKOFF_MS, doubled per attempt, capped
    retry_backoff_cap_ms: int = 5_000
    # Produce calls outstanding per tenant: a tenant whose topic is slow or failing
    # fills its own window, not the shared producer buffer.
    max_inflight_per_tenant: int = 1_000

    def __post_init__(self) -> None:
        for name in ("queue_capacity", "max_pending_per_tenant", "max_attempts"):
            if getattr(self, name) < 1:
                raise EventConfigError(f"{name} must be >= 1")
        if self.max_inflight_per_tenant < 1:
            raise EventConfigError("max_inflight_per_tenant must be >= 1")


@dataclass(frozen=True, slots=True)
class TopicSettings:
    """Topic provisioning (the design's values; every one configurable)."""

    partitions: int = 32
    replication_factor: int = 3
    retention_ms: int = 7 * 24 * 3600 * 1000
    compression_type: str = "lz4"


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap_servers: str
    client_id: str = "mics"
    # The offline path's durable ack waits on this, unless its events have a producer
    # of their own (mics.gateway.wiring, KAFKA_OFFLINE_LINGER_MS).
    linger_ms: int = 5
    compression_type: str = "lz4"
    # librdkafka gives up on a message after this long; the dispatcher then retries.
    message_timeout_ms: int = 30_000
    provision_topics: bool = False
    # How delivery reports reach the event loop: "fd" (librdkafka wakes the loop
    # through a pipe; falls back to "thread" where that cannot be set up) or "thread".
    report_wakeup: str = "fd"
    topics: TopicSettings = field(default_factory=TopicSettings)
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_bootstrap(self.bootstrap_servers)
        if self.compression_type not in ("none", "gzip", "snappy", "lz4", "zstd"):
            raise EventConfigError(f"unknown compression type {self.compression_type!r}")
        if self.report_wakeup not in ("fd", "thread"):
            raise EventConfigError(
                f"unknown report wakeup {self.report_wakeup!r} (want 'fd' or 'thread')"
            )

    def producer_config(self) -> dict[str, str | int | bool]:
        conf: dict[str, str | int | bool] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": self.compression_type,
            "linger.ms": self.linger_ms,
            "message.timeout.ms": self.message_timeout_ms,
        }
        conf.update(self.extra)
        return conf
