"""From settings to parts: the event bus a gateway was configured for."""

from __future__ import annotations

from dataclasses import replace

from mics.events.bus import EventBus, NullEventBus
from mics.events.config import DispatcherConfig, KafkaSettings, TopicSettings
from mics.events.dispatcher import EventDispatcher
from mics.events.inprocess import InProcessTransport
from mics.gateway.config import GatewaySettings
from mics.observability.metrics import MetricsRegistry


def dispatcher_config(settings: GatewaySettings) -> DispatcherConfig:
    return DispatcherConfig(
        queue_capacity=settings.kafka_queue_capacity,
        max_pending_per_tenant=settings.kafka_max_pending_per_tenant,
        max_attempts=settings.kafka_max_attempts,
        retry_backoff_ms=settings.kafka_retry_backoff_ms,
        max_inflight_per_tenant=settings.kafka_max_inflight_per_tenant,
    )


def kafka_settings(settings: GatewaySettings) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id=settings.node_id,
        linger_ms=settings.kafka_linger_ms,
        compression_type=settings.kafka_compression_type,
        report_wakeup=settings.kafka_report_wakeup,
        message_timeout_ms=settings.kafka_message_timeout_ms,
        provision_topics=settings.kafka_provision_topics,
        topics=TopicSettings(
            partitions=settings.kafka_topic_partitions,
            replication_factor=settings.kafka_topic_replication_factor,
            retention_ms=settings.kafka_topic_retention_ms,
            compression_type=settings.kafka_compression_type,
        ),
    )


def build_event_bus(
    settings: GatewaySettings, metrics: MetricsRegistry
) -> tuple[EventBus, InProcessTransport | None]:
    """The configured bus; for the in-process bus also its transport, to subscribe to."""
    kind = settings.resolved_event_bus
    if kind == "kafka":
        from mics.events.kafka import KafkaTransport  # librdkafka only when Kafka is used

        main = kafka_settings(settings)
        transport = KafkaTransport(main)
        confirmed = None
        offline_linger = settings.kafka_offline_linger_ms
        if offline_linger >= 0 and offline_linger != main.linger_ms:
            # The events the sender's ack waits for, on a producer that lingers less.
            confirmed = KafkaTransport(
                replace(main, client_id=f"{main.client_id}-offline", linger_ms=offline_linger)
            )
        bus = EventDispatcher(transport, dispatcher_config(settings), metrics, confirmed)
        return bus, None
    if kind == "inprocess":
        local = InProcessTransport()
        return EventDispatcher(local, dispatcher_config(settings), metrics), local
    return NullEventBus(), None
