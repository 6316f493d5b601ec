"""The gateway's event path on a real Kafka broker (KRaft, started by the test session).

What a tenant's consumer sees: topics per tenant, signed values, keys, per-key order,
the dead-letter topic, and what happens while the broker is away.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from confluent_kafka import Consumer, Message
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from mics.events.bus import dlq_topic_for, topic_for
from mics.events.config import DispatcherConfig, KafkaSettings
from mics.events.dispatcher import EventDispatcher
from mics.events.kafka import KafkaTransport
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import sign_event, verify_event
from tests.e2e.conftest import SECRET, Stack, StackFactory, UserConfig, tenant_config
from tests.support.kafka import KafkaBroker
from tests.support.waiting import wait_until


def unique_tenant() -> str:
    return f"k{uuid.uuid4().hex[:8]}"


def read_topic(bootstrap: str, topic: str, count: int, within_s: float = 30) -> list[Message]:
    """Read ``count`` messages from the start of ``topic`` with a real consumer."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    got: list[Message] = []
    try:
        import time

        deadline = time.monotonic() + within_s
        while len(got) < count and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is None:
                    got.append(message)
    finally:
        consumer.close()
    return got


def create_topic(bootstrap: str, name: str, partitions: int, **config: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, partitions, 1, config=config)])
    for future in futures.values():
        future.result(timeout=30)


async def kafka_stack(
    make_stack: StackFactory, broker: KafkaBroker, tenant: str, **overrides: Any
) -> Stack:
    users = {u: UserConfig(tokens=[f"{tenant}-{u}-token"]) for u in ("u1", "u2", "u3")}
    config = tenant_config(
        users=users, groups={"g1": ["u1", "u2", "u3"]}, offline_mode="notify_pull"
    )
    settings: dict[str, Any] = {
        "kafka_bootstrap_servers": broker.bootstrap,
        "kafka_provision_topics": True,
        "kafka_topic_partitions": 3,
        "kafka_topic_replication_factor": 1,
        "kafka_retry_backoff_ms": 10,
    }
    settings.update(overrides)
    return await make_stack(extra_tenants={tenant: config}, **settings)


async def connect(stack: Stack, tenant: str, user: str, device: str = "d1") -> Any:
    client = stack.client(user, device, tenant=tenant, token=f"{tenant}-{user}-token")
    await client.connect()
    return client


async def test_events_reach_the_tenant_topic_signed_keyed_and_in_order(
    make_stack: StackFactory, kafka_broker: KafkaBroker
) -> None:
    tenant = unique_tenant()
    stack = await kafka_stack(make_stack, kafka_broker, tenant)
    senders = [await connect(stack, tenant, u) for u in ("u1", "u2")]
    await connect(stack, tenant, "u3")
    sent: dict[str, list[str]] = {"u1": [], "u2": []}
    for i in range(30):
        for sender, name in zip(senders, ("u1", "u2"), strict=True):
            msg_id = f"{name}-{i:03d}"
            ack = await sender.send_single("u3", b"payload", msg_id=msg_id)
            assert ack.status == msg_pb.SENT
            sent[name].append(msg_id)
    expected = 60 + 3  # chats + three CONNECT_ONLINE
    messages = await asyncio.to_thread(
        read_topic, kafka_broker.bootstrap, topic_for(tenant), expected
    )
    assert len(messages) == expected
    chats: dict[str, list[str]] = {"u1": [], "u2": []}
    partitions: dict[bytes, set[int]] = {}
    for message in messages:
        event = hook_pb.MqEvent.FromString(message.value() or b"")
        assert event.tenant_id == tenant
        assert verify_event(event, SECRET), "every event is signed with the tenant secret"
        key = message.key() or b""
        assert key == event.user_id.encode()
        partitions.setdefault(key, set()).add(message.partition() or 0)
        if event.event_type == hook_pb.SINGLE_CHAT_MSG:
            chats[event.user_id].append(event.msg_id)
            inner = msg_pb.MessageRequest.FromString(event.event_data)
            assert (inner.user_id, inner.to_user_id, inner.msg_id) == (
                event.user_id,
                "u3",
                event.msg_id,
            )
    assert all(len(p) == 1 for p in partitions.values()), "one key, one partition"
    assert chats == sent, "each sender's events keep their order"


async def test_offline_messages_are_keyed_by_recipient_and_acked_user_offline(
    make_stack: StackFactory, kafka_broker: KafkaBroker
) -> None:
    tenant = unique_tenant()
    # OFFLINE_MESSAGE events have a producer of their own (KAFKA_OFFLINE_LINGER_MS),
    # which the warm-up below does not warm: on a fresh broker its producer id can take
    # longer than the default 200 ms, and the ack would rightly fall back to the buffer.
    stack = await kafka_stack(make_stack, kafka_broker, tenant, offline_notify_wait_ms=2000)
    alice = await connect(stack, tenant, "u1")
    # A broker fresh from its first start needs a moment before the first produce is
    # confirmed; wait until it confirmed alice's CONNECT_ONLINE.
    await wait_until(
        lambda: (
            stack.metric(
                "mics_mq_published_total",
                {"tenant": tenant, "topic": "event", "event_type": "ConnectOnline"},
            )
            == 1
        ),
        30,
        "warm producer",
    )
    for i in range(5):
        ack = await alice.send_single("u2", b"x", msg_id=f"off-{i}")
        assert (ack.status, ack.reason) == (msg_pb.SENT, "user_offline")
    group = await alice.send_group("g1", b"hello all", msg_id="grp-1")
    assert (group.status, group.offline_notified_users) == (msg_pb.SENT, 2)
    # 1 online + 5 offline + 5 single chat + 2 offline group + 1 group chat
    messages = await asyncio.to_thread(read_topic, kafka_broker.bootstrap, topic_for(tenant), 14)
    events = [(m.key(), hook_pb.MqEvent.FromString(m.value() or b"")) for m in messages]
    offline = [(k, e) for k, e in events if e.event_type == hook_pb.OFFLINE_MESSAGE]
    assert [e.msg_id for k, e in offline if e.to_user_id == "u2" and k == b"u2"][:5] == [
        f"off-{i}" for i in range(5)
    ]
    assert sorted(e.to_user_id for _, e in offline if e.msg_id == "grp-1") == ["u2", "u3"]
    assert all(k == e.to_user_id.encode() for k, e in offline)
    assert stack.gateway.gateway.buffer.pending(tenant, "u2") == 0, "the gateway keeps nothing"
    # Each of the 7 offline acks waited for its confirmation, and the wait is measured.
    assert stack.metric("mics_offline_notify_wait_ms_count") == 7
    assert 0 < stack.metric("mics_offline_notify_wait_ms_sum") < 7 * 2000


async def test_broker_down_queues_events_and_delivers_all_after_restart(
    make_stack: StackFactory, kafka_broker: KafkaBroker
) -> None:
    tenant = unique_tenant()
    stack = await kafka_stack(make_stack, kafka_broker, tenant)
    alice = await connect(stack, tenant, "u1")
    bob = await connect(stack, tenant, "u2")
    await wait_until(lambda: stack.gateway.gateway.events.depth(tenant) == 0, 30, "connect events")  # type: ignore[attr-defined]
    await asyncio.to_thread(kafka_broker.stop)
    try:
        # The chat path does not wait for the broker: every ack comes back SENT.
        for i in range(50):
            ack = await alice.send_single("u2", b"during outage", msg_id=f"down-{i}")
            assert (ack.status, ack.reason) == (msg_pb.SENT, "")
        for _ in range(50):
            await bob.next_delivery(timeout=5)
        assert stack.metric("mics_kafka_queue_depth", {"tenant": tenant}) >= 50
        # An offline recipient cannot be confirmed: the message is held, honestly.
        held = await alice.send_single("u3", b"for later", msg_id="down-offline")
        assert (held.status, held.reason) == (msg_pb.SENT, "offline_buffered")
    finally:
        await asyncio.to_thread(kafka_broker.start)
    messages = await asyncio.to_thread(
        read_topic, kafka_broker.bootstrap, topic_for(tenant), 2 + 50 + 2, 60
    )
    ids = [hook_pb.MqEvent.FromString(m.value() or b"").msg_id for m in messages]
    assert [i for i in ids if i.startswith("down-") and i != "down-offline"] == [
        f"down-{i}" for i in range(50)
    ]
    await wait_until(
        lambda: stack.metric("mics_kafka_queue_depth", {"tenant": tenant}) == 0, 30, "drained"
    )


async def test_unwritable_topic_retries_then_dead_letters_then_drops(
    kafka_broker: KafkaBroker,
) -> None:
    tenant = unique_tenant()
    # Topics that refuse anything but tiny messages: the event topic, then also its DLQ.
    create_topic(kafka_broker.bootstrap, topic_for(tenant), 1, **{"max.message.bytes": "200"})
    registry = MetricsRegistry()
    transport = KafkaTransport(KafkaSettings(bootstrap_servers=kafka_broker.bootstrap))
    dispatcher = EventDispatcher(
        transport, DispatcherConfig(max_attempts=3, retry_backoff_ms=10), registry
    )
    await dispatcher.start()
    try:
        big = hook_pb.MqEvent(
            tenant_id=tenant,
            event_type=hook_pb.SINGLE_CHAT_MSG,
            msg_id="too-big",
            user_id="u1",
            event_data=os.urandom(2000),  # incompressible: lz4 must not shrink it
        )
        sign_event(big, SECRET)
        confirmed = dispatcher.publish_confirmed(big)
        assert confirmed is not None
        assert await asyncio.wait_for(confirmed, 60) is False
        labels = {"tenant": tenant, "event_type": "SingleChatMsg"}
        assert registry.sample("mics_mq_retried_total", labels) == 2
        await wait_until(
            lambda: registry.sample("mics_mq_published_total", {"topic": "dlq", **labels}) == 1,
            30,
            "dead letter",
        )
        dead = await asyncio.to_thread(read_topic, kafka_broker.bootstrap, dlq_topic_for(tenant), 1)
        assert hook_pb.MqEvent.FromString(dead[0].value() or b"").msg_id == "too-big"
        # A tenant whose dead-letter topic refuses it too: counted drop, nothing queued.
        other = unique_tenant()
        for topic in (topic_for(other), dlq_topic_for(other)):
            create_topic(kafka_broker.bootstrap, topic, 1, **{"max.message.bytes": "200"})
        big.tenant_id = other
        assert dispatcher.publish(big)
        await wait_until(
            lambda: (
                registry.sample("mics_mq_dropped_total", {"tenant": other, "reason": "dlq_failed"})
                == 1
            ),
            60,
            "drop",
        )
        assert dispatcher.depth(other) == 0
    finally:
        await dispatcher.stop(5)


async def test_one_tenants_full_queue_refuses_only_that_tenant(kafka_broker: KafkaBroker) -> None:
    flood, calm = unique_tenant(), unique_tenant()
    registry = MetricsRegistry()
    transport = KafkaTransport(KafkaSettings(bootstrap_servers=kafka_broker.bootstrap))
    dispatcher = EventDispatcher(transport, DispatcherConfig(max_pending_per_tenant=200), registry)
    await dispatcher.start()
    try:

        def event(tenant: str, i: int) -> hook_pb.MqEvent:
            e = hook_pb.MqEvent(
                tenant_id=tenant, event_type=hook_pb.SINGLE_CHAT_MSG, msg_id=str(i), user_id="u"
            )
            sign_event(e, SECRET)
            return e

        accepted = sum(dispatcher.publish(event(flood, i)) for i in range(5000))
        assert accepted < 5000
        refused = registry.sample(
            "mics_mq_dropped_total", {"tenant": flood, "reason": "tenant_quota"}
        )
        assert refused == 5000 - accepted
        confirmations = [dispatcher.publish_confirmed(event(calm, i)) for i in range(100)]
        assert all(c is not None for c in confirmations)
        results = await asyncio.wait_for(asyncio.gather(*(c for c in confirmations if c)), 60)
        assert results == [True] * 100
        assert (
            registry.sample("mics_mq_dropped_total", {"tenant": calm, "reason": "tenant_quota"})
            == 0
        )
    finally:
        await dispatcher.stop(10)


async def test_graceful_shutdown_flushes_queued_events(
    make_stack: StackFactory, kafka_broker: KafkaBroker
) -> None:
    tenant = unique_tenant()
    stack = await kafka_stack(make_stack, kafka_broker, tenant)
    alice = await connect(stack, tenant, "u1")
    await connect(stack, tenant, "u2")
    for i in range(200):
        assert (await alice.send_single("u2", b"bye", msg_id=f"flush-{i}")).status == msg_pb.SENT
    await stack.gateway.stop()  # drains sessions, then flushes the event queue
    # 2 online + 200 chats + 2 offline events of the drained sessions
    messages = await asyncio.to_thread(
        read_topic, kafka_broker.bootstrap, topic_for(tenant), 204, 60
    )
    ids = {hook_pb.MqEvent.FromString(m.value() or b"").msg_id for m in messages}
    assert {f"flush-{i}" for i in range(200)} <= ids
    types = [hook_pb.MqEvent.FromString(m.value() or b"").event_type for m in messages]
    assert types.count(hook_pb.CONNECT_OFFLINE) == 2
