"""Gateway configuration: environment variables (protocol.md section 11) or a TOML file.

Names follow the MICS v1 environment variables (case-insensitive), so an existing
deployment's environment works unchanged. Values are clamped to the spec's ranges in
validators rather than at every use.
"""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    host: str = "0.0.0.0"
    port: int = 8080
    node_id: str = Field(default_factory=socket.gethostname)
    public_endpoint: str = ""

    tenant_auth_map: dict[str, str] = Field(default_factory=dict)
    tenant_hook_secrets: dict[str, str] = Field(default_factory=dict)

    hook_sign_required: bool = False
    hook_max_concurrency: int = 32
    hook_queue_timeout_ms: int = 10
    tenant_hook_max_concurrency: dict[str, int] = Field(default_factory=dict)
    hook_breaker_failure_threshold: int = 5
    hook_breaker_open_ms: int = 5000
    # MICS v1 fixes the hook timeout at 150 ms; this project lets operators tune it.
    hook_timeout_ms: int = 150

    ws_keepalive_interval_seconds: int = 30
    max_message_bytes: int = 1_048_576
    # Per-connection messages processed concurrently (section 9.9 "Order from one sender").
    max_inflight_per_connection: int = 32
    # Frames queued to one socket beyond this many bytes mark the client as too slow.
    max_send_buffer_bytes: int = 8 * 1_048_576

    offline_buffer_max_messages_per_user: int = 128
    offline_buffer_max_bytes_per_user: int = 1_048_576
    offline_buffer_max_users_per_tenant: int = 50_000

    group_route_chunk_size: int = 256
    group_offline_buffer_max_users: int = 1024
    group_members_max_users: int = 200_000

    dedup_ttl_seconds: int = 600
    dedup_max_entries: int = 1_000_000

    # Events (MQ hook). MICS v1: an empty KAFKA__BOOTSTRAP_SERVERS disables Kafka.
    kafka_bootstrap_servers: str = Field(
        default="",
        validation_alias=AliasChoices("kafka__bootstrap_servers", "kafka_bootstrap_servers"),
    )
    # "kafka" (when bootstrap servers are set), "inprocess" (mics dev) or "none".
    event_bus: str = ""
    kafka_max_attempts: int = 3
    kafka_queue_capacity: int = 50_000
    kafka_max_pending_per_tenant: int = 10_000
    kafka_retry_backoff_ms: int = 50
    kafka_max_inflight_per_tenant: int = 1_000
    kafka_linger_ms: int = 5
    # linger.ms of a second producer for the OFFLINE_MESSAGE events whose confirmation
    # the sender's ack waits for (the others keep KAFKA_LINGER_MS); -1, or the same
    # value as KAFKA_LINGER_MS: one producer for all. 0: librdkafka waits in whole
    # milliseconds, so any linger adds ~1.1 ms to every offline ack; under load the
    # requests fill up on their own while earlier ones are in flight (docs/benchmarks.md).
    kafka_offline_linger_ms: int = 0
    kafka_compression_type: str = "lz4"
    # "fd": librdkafka wakes the event loop through a pipe when delivery reports are
    # ready (falls back to "thread" where that cannot be set up); "thread": a thread
    # of the producer's own waits for them.
    kafka_report_wakeup: str = "fd"
    kafka_message_timeout_ms: int = 30_000
    kafka_provision_topics: bool = False
    kafka_topic_partitions: int = 32
    kafka_topic_replication_factor: int = 3
    kafka_topic_retention_ms: int = 7 * 24 * 3600 * 1000
    # Longest the sender's ack waits for the broker to confirm an OFFLINE_MESSAGE.
    offline_notify_wait_ms: int = 200
    # Deliveries a v1.1 connection may leave unconfirmed (no DeliveryAck yet); what is
    # unconfirmed when it ends goes back to the offline path. Past either cap the oldest
    # are forgotten (receipts are optional). 0 messages: no tracking.
    unconfirmed_max_messages: int = 1024
    unconfirmed_max_bytes: int = 8 * 1_048_576

    # Cluster (protocol.md 7 and 8). An empty REDIS__CONNECTION keeps the node alone
    # with the in-memory route table.
    redis_connection: str = Field(
        default="",
        validation_alias=AliasChoices("redis__connection", "redis_connection"),
    )
    # The node service (gRPC) listens here; PUBLIC_ENDPOINT must reach it.
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 0  # 0: PORT + 1
    cluster_grpc_token: str = ""
    grpc_breaker_failure_threshold: int = 5
    grpc_breaker_open_ms: int = 5000
    node_ttl_seconds: float = 30.0
    node_refresh_seconds: float = 10.0
    node_snapshot_seconds: float = 3.0
    node_cleanup_seconds: float = 5.0
    # Remote routes kept locally to spare Redis a read per message; 0 disables.
    local_route_cache_ttl_seconds: float = 5.0
    local_route_cache_entries: int = 100_000
    # 0: derived from the tenant heartbeat timeout as the protocol says.
    route_lease_ttl_seconds: float = 0.0
    route_renew_interval_seconds: float = 0.0

    heartbeat_sweep_interval_seconds: float = 5.0
    drain_timeout_seconds: int = 10
    # On drain, how long v1.1 connections get to confirm their deliveries before 4200.
    drain_receipt_wait_ms: int = 1000
    log_level: str = "INFO"

    @field_validator("hook_queue_timeout_ms")
    @classmethod
    def _queue_timeout(cls, v: int) -> int:
        return _clamp(v, 0, 10_000)

    @field_validator("hook_breaker_failure_threshold")
    @classmethod
    def _threshold(cls, v: int) -> int:
        return _clamp(v, 1, 100)

    @field_validator("hook_breaker_open_ms")
    @classmethod
    def _open_ms(cls, v: int) -> int:
        return _clamp(v, 0, 60_000)

    @field_validator("hook_max_concurrency")
    @classmethod
    def _concurrency(cls, v: int) -> int:
        return 32 if v <= 0 else v

    @field_validator("ws_keepalive_interval_seconds")
    @classmethod
    def _keepalive(cls, v: int) -> int:
        return _clamp(v, 0, 600)

    @field_validator("max_message_bytes")
    @classmethod
    def _max_message(cls, v: int) -> int:
        return _clamp(v, 0, 64 * 1_048_576)

    @field_validator("group_route_chunk_size")
    @classmethod
    def _chunk(cls, v: int) -> int:
        return _clamp(v, 1, 4096)

    @field_validator("group_members_max_users")
    @classmethod
    def _members_max(cls, v: int) -> int:
        return _clamp(v, 1, 5_000_000)

    @field_validator("drain_timeout_seconds")
    @classmethod
    def _drain(cls, v: int) -> int:
        return _clamp(v, 0, 600)

    @field_validator("max_inflight_per_connection")
    @classmethod
    def _inflight(cls, v: int) -> int:
        return _clamp(v, 1, 10_000)

    @field_validator("kafka_max_attempts")
    @classmethod
    def _attempts(cls, v: int) -> int:
        return _clamp(v, 1, 10)

    @field_validator("kafka_queue_capacity", "kafka_max_pending_per_tenant")
    @classmethod
    def _capacity(cls, v: int) -> int:
        return _clamp(v, 1, 1_000_000)

    @field_validator("kafka_retry_backoff_ms")
    @classmethod
    def _backoff(cls, v: int) -> int:
        return _clamp(v, 0, 10_000)

    @field_validator("event_bus")
    @classmethod
    def _bus(cls, v: str) -> str:
        if v not in ("", "kafka", "inprocess", "none"):
            raise ValueError("event_bus must be kafka, inprocess or none")
        return v

    @property
    def resolved_event_bus(self) -> str:
        if self.event_bus:
            return self.event_bus
        return "kafka" if self.kafka_bootstrap_servers.strip() else "none"

    @model_validator(mode="after")
    def _check_events(self) -> GatewaySettings:
        if self.resolved_event_bus == "kafka":
            if not self.kafka_bootstrap_servers.strip():
                raise ValueError("event_bus=kafka needs KAFKA__BOOTSTRAP_SERVERS")
            from mics.events.config import parse_bootstrap

            parse_bootstrap(self.kafka_bootstrap_servers)
            # Every event is signed with the tenant secret: refuse to start without one.
            missing = [t for t in self.tenant_auth_map if not self.tenant_hook_secrets.get(t)]
            if missing:
                raise ValueError(
                    f"events are enabled but tenants {missing} have no TENANT_HOOK_SECRETS "
                    "entry: events must be signed"
                )
        return self

    @model_validator(mode="after")
    def _check_cluster_timing(self) -> GatewaySettings:
        ttl = self.node_ttl_seconds
        if min(ttl, self.node_refresh_seconds, self.node_snapshot_seconds) <= 0:
            raise ValueError("node TTL and intervals must be > 0")
        if not (self.node_refresh_seconds < ttl and self.node_cleanup_seconds < ttl):
            raise ValueError(
                "NODE_REFRESH_SECONDS and NODE_CLEANUP_SECONDS must be shorter than "
                "NODE_TTL_SECONDS, or live nodes look dead"
            )
        return self

    @model_validator(mode="after")
    def _check_tenants(self) -> GatewaySettings:
        for tenant, url in self.tenant_auth_map.items():
            if not tenant or "|" in tenant:
                raise ValueError(f"tenant id {tenant!r} must be non-empty and must not contain '|'")
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"auth base URL of tenant {tenant!r} must be http(s): {url!r}")
        return self

    @property
    def resolved_grpc_port(self) -> int:
        return self.grpc_port or (self.port + 1 if self.port else 0)

    @property
    def endpoint(self) -> str:
        """What peers dial for the node service."""
        return self.public_endpoint or f"http://localhost:{self.resolved_grpc_port}"


def load_settings(config_file: Path | None = None, **overrides: Any) -> GatewaySettings:
    """Settings from the environment, then a TOML file, then explicit overrides.

    Later sources win: a file checked into a deployment repo overrides the
    environment's defaults, and command-line flags override both.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        with config_file.open("rb") as fh:
            data = tomllib.load(fh)
        values.update({k.lower(): v for k, v in data.get("gateway", data).items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GatewaySettings(**values)
