"""The real-Kafka test harness: a KRaft broker started by the tests, and its restarts."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from tests.support.kafka import KafkaBroker

DEADLINE_S = 30.0


def _topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _producer(broker: KafkaBroker) -> Producer:
    return Producer(
        {
            "bootstrap.servers": broker.bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": "lz4",
            "linger.ms": 5,
            "reconnect.backoff.max.ms": 500,
        }
    )


def _produce(producer: Producer, topic: str, records: Iterable[tuple[str, str]]) -> list[Message]:
    """Produce ``(key, value)`` pairs and wait until every one is acknowledged."""
    delivered: list[Message] = []
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
        else:
            delivered.append(msg)

    expected = 0
    for key, value in records:
        producer.produce(topic, key=key.encode(), value=value.encode(), on_delivery=on_delivery)
        producer.poll(0)
        expected += 1
    remaining = producer.flush(DEADLINE_S)
    assert remaining == 0, f"{remaining} messages not delivered within {DEADLINE_S} s"
    assert not errors, errors
    assert len(delivered) == expected
    return delivered


def _consume(broker: KafkaBroker, topic: str, count: int) -> list[Message]:
    """Read ``count`` messages of ``topic`` from the beginning, with a fresh group."""
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": _topic("harness-group"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[Message] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + DEADLINE_S
        while len(received) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            received.append(msg)
    finally:
        consumer.close()
    assert len(received) == count, f"got {len(received)} of {count} messages from {topic}"
    return received


def _keyed(count: int, keys: int) -> list[tuple[str, str]]:
    return [(f"user-{i % keys}", f"user-{i % keys}:{i // keys}") for i in range(count)]


def _by_key(messages: Iterable[Message]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for msg in messages:
        key, value = msg.key(), msg.value()
        assert key is not None
        assert value is not None
        grouped[key.decode()].append(value.decode())
    return grouped


def _assert_per_key_order(messages: Iterable[Message], count: int, keys: int) -> None:
    grouped = _by_key(messages)
    assert sorted(grouped) == sorted({f"user-{i}" for i in range(keys)})
    for key, values in grouped.items():
        assert all(v.startswith(f"{key}:") for v in values), (key, values)
        sequence = [int(v.split(":")[1]) for v in values]
        assert sequence == list(range(len(sequence))), (key, sequence)
    assert sum(len(v) for v in grouped.values()) == count


def test_broker_is_a_real_kraft_node(kafka_broker: KafkaBroker) -> None:
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    metadata = admin.list_topics(timeout=10)
    assert [b.id for b in metadata.brokers.values()] == [1]
    assert kafka_broker.bootstrap == f"127.0.0.1:{kafka_broker.port}"
    assert kafka_broker.running
    assert (kafka_broker.data_dir / "meta.properties").is_file()
    assert "Kafka Server started" in kafka_broker.log_file.read_text(errors="replace")


def test_keyed_messages_round_trip_in_order(kafka_broker: KafkaBroker) -> None:
    topic = _topic("harness-roundtrip")  # auto-created by the first produce
    producer = _producer(kafka_broker)
    _produce(producer, topic, _keyed(100, keys=7))

    received = _consume(kafka_broker, topic, 100)

    _assert_per_key_order(received, count=100, keys=7)
    assert [m.offset() for m in received] == list(range(100))


def test_admin_created_topic_keeps_each_key_on_one_partition(kafka_broker: KafkaBroker) -> None:
    topic = _topic("harness-partitioned")
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    futures[topic].result(timeout=DEADLINE_S)
    assert len(admin.list_topics(topic, timeout=10).topics[topic].partitions) == 3

    producer = _producer(kafka_broker)
    delivered = _produce(producer, topic, _keyed(60, keys=6))
    partitions_of: dict[str, set[int]] = defaultdict(set)
    for msg in delivered:
        key, partition = msg.key(), msg.partition()
        assert key is not None
        assert partition is not None
        partitions_of[key.decode()].add(partition)
    assert all(len(parts) == 1 for parts in partitions_of.values()), partitions_of
    assert len(set().union(*partitions_of.values())) > 1  # the keys spread over partitions

    _assert_per_key_order(_consume(kafka_broker, topic, 60), count=60, keys=6)


def _restart_keeps_data(broker: KafkaBroker, bounce: Any) -> None:
    topic = _topic("harness-restart")
    producer = _producer(broker)
    _produce(producer, topic, [("k", "before")])
    bootstrap, pid = broker.bootstrap, broker.pid

    bounce()

    assert broker.running
    assert broker.bootstrap == bootstrap
    assert broker.pid != pid
    # The same producer reconnects to the same address after the restart.
    _produce(producer, topic, [("k", "after")])
    values = [m.value() for m in _consume(broker, topic, 2)]
    assert values == [b"before", b"after"]


def test_graceful_restart_keeps_port_and_data(kafka_broker: KafkaBroker) -> None:
    _restart_keeps_data(kafka_broker, kafka_broker.restart)


def test_crash_and_start_recovers_the_log(kafka_broker: KafkaBroker) -> None:
    def crash_then_start() -> None:
        kafka_broker.kill()
        assert not kafka_broker.running
        kafka_broker.start()

    _restart_keeps_data(kafka_broker, crash_then_start)
