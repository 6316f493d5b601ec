"""Kafka transport over confluent-kafka (librdkafka).

Produces are asynchronous: `produce` hands the message to librdkafka's buffer and
returns; a poll task on the event loop serves delivery reports, so callbacks run on the
loop thread with no cross-thread hand-off. The producer is idempotent with acks=all.
"""

from __future__ import annotations

import asyncio
import logging

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from mics.events.config import EventConfigError, KafkaSettings, TopicSettings
from mics.events.transport import DoneCallback, TransportFull

log = logging.getLogger("mics.events.kafka")
_librdkafka_log = logging.getLogger("mics.events.librdkafka")

_POLL_INTERVAL_S = 0.002


class KafkaDeliveryError(Exception):
    def __init__(self, error: KafkaError) -> None:
        super().__init__(error.str())
        self.code = error.code()
        self.retriable = error.retriable()


class KafkaTransport:
    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer: Producer | None = None
        self._outstanding = 0
        self._work = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config: dict[str, object] = dict(self._settings.producer_config())
        config["logger"] = _librdkafka_log  # librdkafka's own lines, as JSON logs
        try:
            self._producer = Producer(config)
        except KafkaException as exc:
            raise EventConfigError(f"invalid Kafka producer configuration: {exc}") from exc
        loop = asyncio.get_running_loop()
        self._poller = loop.create_task(self._poll_forever())
        # Connect before serving, so the first event does not pay for it. A broker that
        # is down now is not fatal: events queue and flow once it is back.
        try:
            await loop.run_in_executor(None, self._producer.list_topics, None, 5.0)
        except KafkaException as exc:
            log.warning(
                "Kafka not reachable at startup; events will queue", extra={"error": str(exc)}
            )

    def produce(self, topic: str, key: bytes, value: bytes, on_done: DoneCallback) -> None:
        producer = self._producer
        assert producer is not None, "start() first"

        def report(error: KafkaError | None, _: Message) -> None:
            self._outstanding -= 1
            on_done(None if error is None else KafkaDeliveryError(error))

        try:
            producer.produce(topic, value=value, key=key, on_delivery=report)
        except BufferError as exc:
            raise TransportFull(str(exc)) from exc
        except KafkaException as exc:
            loop = asyncio.get_running_loop()
            loop.call_soon(on_done, KafkaDeliveryError(exc.args[0]))
            return
        self._outstanding += 1
        self._work.set()

    async def _poll_forever(self) -> None:
        producer = self._producer
        assert producer is not None
        while True:
            if not self._outstanding:
                self._work.clear()
                await self._work.wait()
            producer.poll(0)  # runs delivery callbacks on this thread
            await asyncio.sleep(_POLL_INTERVAL_S)

    async def flush(self, timeout_s: float) -> int:
        producer = self._producer
        if producer is None:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._outstanding and loop.time() < deadline:
            producer.poll(0)
            await asyncio.sleep(_POLL_INTERVAL_S)
        return self._outstanding

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        if self._producer is not None:
            self._producer.poll(0)
            self._producer = None


def provision_topics(
    bootstrap_servers: str, tenants: list[str], topics: TopicSettings, timeout_s: float = 30.0
) -> list[str]:
    """Create each tenant's event and dead-letter topic if missing; return those created.

    Blocking (admin calls): run it at startup, before serving.
    """
    from mics.events.bus import dlq_topic_for, topic_for

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [name for t in tenants for name in (topic_for(t), dlq_topic_for(t))]
    new = [
        NewTopic(
            name,
            num_partitions=topics.partitions,
            replication_factor=topics.replication_factor,
            config={
                "retention.ms": str(topics.retention_ms),
                "compression.type": topics.compression_type,
            },
        )
        for name in wanted
        if name not in existing
    ]
    if not new:
        return []
    created: list[str] = []
    for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    log.info("topics provisioned", extra={"created": created})
    return created
