"""The event dispatcher over a scripted in-memory transport (no broker: unit level)."""

from __future__ import annotations

import asyncio

import pytest

from mics.events.bus import dlq_topic_for, topic_for
from mics.events.config import DispatcherConfig, EventConfigError, parse_bootstrap
from mics.events.dispatcher import EventDispatcher
from mics.events.transport import DoneCallback, TransportFull
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from tests.support.waiting import wait_until


class ScriptedTransport:
    """Completes, fails or holds produces per topic, as a test decides."""

    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes, bytes]] = []
        self.held: list[tuple[str, DoneCallback]] = []
        self.hold_topics: set[str] = set()
        self.fail_topics: set[str] = set()
        self.fail_times: dict[str, int] = {}
        self.full_times = 0
        self.closed = False

    async def start(self) -> None:
        return None

    def produce(self, topic: str, key: bytes, value: bytes, on_done: DoneCallback) -> None:
        if self.full_times:
            self.full_times -= 1
            raise TransportFull("buffer full")
        self.produced.append((topic, key, value))
        loop = asyncio.get_running_loop()
        if topic in self.hold_topics:
            self.held.append((topic, on_done))
        elif topic in self.fail_topics or self.fail_times.get(topic, 0) > 0:
            if topic in self.fail_times:
                self.fail_times[topic] -= 1
            loop.call_soon(on_done, RuntimeError(f"cannot write {topic}"))
        else:
            loop.call_soon(on_done, None)

    def release(self, topic: str) -> None:
        self.hold_topics.discard(topic)
        held, self.held = self.held, []
        for t, on_done in held:
            if t == topic:
                on_done(None)
            else:
                self.held.append((t, on_done))

    async def flush(self, timeout_s: float) -> int:
        return len(self.held)

    async def close(self) -> None:
        self.closed = True


def event(
    tenant: str, user: str = "u1", kind: int = hook_pb.SINGLE_CHAT_MSG, to: str = "u2"
) -> hook_pb.MqEvent:
    return hook_pb.MqEvent(
        tenant_id=tenant, event_type=kind, user_id=user, to_user_id=to, msg_id="m"
    )  # type: ignore[arg-type]


@pytest.fixture
def registry() -> MetricsRegistry:
    return MetricsRegistry()


async def started(
    transport: ScriptedTransport, registry: MetricsRegistry, **config: int
) -> EventDispatcher:
    dispatcher = EventDispatcher(transport, DispatcherConfig(**config), registry)
    await dispatcher.start()
    return dispatcher


async def test_publish_produces_to_tenant_topic_keyed_by_user(registry: MetricsRegistry) -> None:
    transport = ScriptedTransport()
    dispatcher = await started(transport, registry)
    assert dispatcher.publish(event("t1", user="alice"))
    offline = event("t1", user="alice", kind=hook_pb.OFFLINE_MESSAGE, to="bob")
    confirmed = dispatcher.publish_confirmed(offline)
    assert confirmed is not None
    assert await asyncio.wait_for(confirmed, 5) is True
    await wait_until(lambda: len(transport.produced) == 2)
    (t1, k1, v1), (t2, k2, _) = transport.produced
    assert (t1, k1, t2, k2) == (topic_for("t1"), b"alice", topic_for("t1"), b"bob")
    assert hook_pb.MqEvent.FromString(v1).user_id == "alice"
    labels = {"tenant": "t1", "topic": "event", "event_type": "OfflineMessage"}
    await wait_until(lambda: registry.sample("mics_mq_published_total", labels) == 1)
    await dispatcher.stop(1)
    assert transport.closed


async def test_one_tenants_stuck_topic_does_not_delay_another(registry: MetricsRegistry) -> None:
    transport = ScriptedTransport()
    transport.hold_topics.add(topic_for("flood"))
    dispatcher = await started(transport, registry, max_inflight_per_tenant=10)
    for _ in range(2000):
        assert dispatcher.publish(event("flood"))
    futures = [dispatcher.publish_confirmed(event("calm")) for _ in range(50)]
    results = await asyncio.wait_for(asyncio.gather(*(f for f in futures if f)), 5)
    assert results == [True] * 50
    flood_produced = sum(1 for t, _, _ in transport.produced if t == topic_for("flood"))
    assert flood_produced == 10  # its window, no more
    assert dispatcher.depth("flood") == 2000
    transport.release(topic_for("flood"))
    await wait_until(lambda: dispatcher.depth("flood") < 2000)
    await dispatcher.stop(0.1)


async def test_tenant_quota_refuses_and_counts_without_touching_others(
    registry: MetricsRegistry,
) -> None:
    transport = ScriptedTransport()
    transport.hold_topics.add(topic_for("t1"))
    dispatcher = await started(transport, registry, max_pending_per_tenant=5)
    assert all(dispatcher.publish(event("t1")) for _ in range(5))
    assert not dispatcher.publish(event("t1"))
    assert dispatcher.publish_confirmed(event("t1")) is None
    assert registry.sample("mics_mq_dropped_total", {"tenant": "t1", "reason": "tenant_quota"}) == 2
    other = dispatcher.publish_confirmed(event("t2"))
    assert other is not None
    assert await asyncio.wait_for(other, 5) is True
    await dispatcher.stop(0.1)


async def test_global_capacity_is_a_hard_bound(registry: MetricsRegistry) -> None:
    transport = ScriptedTransport()
    transport.hold_topics.update({topic_for("a"), topic_for("b")})
    dispatcher = await started(transport, registry, queue_capacity=6, max_pending_per_tenant=5)
    accepted = [dispatcher.publish(event(t)) for t in ("a", "a", "a", "b", "b", "b", "b")]
    assert accepted == [True] * 6 + [False]
    assert registry.sample("mics_mq_dropped_total", {"tenant": "b", "reason": "queue_full"}) == 1
    await dispatcher.stop(0.1)


async def test_retry_then_success_confirms(registry: MetricsRegistry) -> None:
    transport = ScriptedTransport()
    transport.fail_times[topic_for("t1")] = 2
    dispatcher = await started(transport, registry, retry_backoff_ms=1, max_attempts=3)
    confirmed = dispatcher.publish_confirmed(event("t1"))
    assert confirmed is not None
    assert await asyncio.wait_for(confirmed, 5) is True
    labels = {"tenant": "t1", "event_type": "SingleChatMsg"}
    assert registry.sample("mics_mq_retried_total", labels) == 2
    assert registry.sample("mics_mq_dlq_total", labels) == 0
    await dispatcher.stop(1)


async def test_unwritable_topic_retries_then_dead_letters(registry: MetricsRegistry) -> None:
    transport = ScriptedTransport()
    transport.fail_topics.add(topic_for("t1"))
    dispatcher = await started(transport, registry, retry_backoff_ms=1, max_attempts=3)
    confirmed = dispatcher.publish_confirmed(event("t1"))
    assert confirmed is not None
    assert await asyncio.wait_for(confirmed, 5) is False  # the event topic never got it
    labels = {"tenant": "t1", "event_type": "SingleChatMsg"}
    await wait_until(
        lambda: (
            registry.sample("mics_mq_published_total", {"tenant": "t1", "topic": "dlq", **labels})
            == 1
        )
    )
    topics = [t for t, _, _ in transport.produced]
    assert topics == [topic_for("t1")] * 3 + [dlq_topic_for("t1")]
    assert registry.sample("mics_mq_retried_total", labels) == 2
    assert registry.sample("mics_mq_dlq_total", labels) == 1
    assert registry.sample("mics_kafka_push_failed_total", {"tenant": "t1"}) == 1
    await dispatcher.stop(1)


async def test_dead_letter_failure_is_a_counted_drop(registry: MetricsRegistry) -> None:
    transport = ScriptedTransport()
    transport.fail_topics.update({topic_for("t1"), dlq_topic_for("t1")})
    dispatcher = await started(transport, registry, retry_backoff_ms=1, max_attempts=2)
    assert dispatcher.publish(event("t1"))
    await wait_until(
        lambda: (
            registry.sample("mics_mq_dropped_total", {"tenant": "t1", "reason": "dlq_failed"}) == 1
        )
    )
    assert dispatcher.depth("t1") == 0
    assert registry.sample("mics_kafka_queue_depth", {"tenant": "t1"}) == 0
    await dispatcher.stop(1)


async def test_transport_full_is_retried_not_lost(registry: MetricsRegistry) -> None:
    transport = ScriptedTransport()
    transport.full_times = 3
    dispatcher = await started(transport, registry)
    confirmed = dispatcher.publish_confirmed(event("t1"))
    assert confirmed is not None
    assert await asyncio.wait_for(confirmed, 5) is True
    await dispatcher.stop(1)


async def test_stop_flushes_queue_and_drops_what_cannot_leave(registry: MetricsRegistry) -> None:
    transport = ScriptedTransport()
    dispatcher = await started(transport, registry)
    for _ in range(100):
        dispatcher.publish(event("t1"))
    await dispatcher.stop(5)
    assert len(transport.produced) == 100
    assert not dispatcher.publish(event("t1"))  # stopped: refused
    stuck = ScriptedTransport()
    stuck.hold_topics.add(topic_for("t1"))
    second = MetricsRegistry()
    slow = await started(stuck, second, max_inflight_per_tenant=1)
    for _ in range(3):
        slow.publish(event("t1"))
    await slow.stop(0.05)
    assert second.sample("mics_mq_dropped_total", {"tenant": "t1", "reason": "shutdown"}) == 2


def test_bootstrap_validation() -> None:
    assert parse_bootstrap("127.0.0.1:9092,kafka-2:9093") == ["127.0.0.1:9092", "kafka-2:9093"]
    for bad in ("", "localhost", "host:0", "host:99999", "a:1,,b:2", "http://x:1"):
        with pytest.raises(EventConfigError):
            parse_bootstrap(bad)


async def test_confirmed_events_can_have_a_transport_of_their_own(
    registry: MetricsRegistry,
) -> None:
    bulk, fast = ScriptedTransport(), ScriptedTransport()
    dispatcher = EventDispatcher(bulk, DispatcherConfig(), registry, confirmed=fast)
    await dispatcher.start()
    assert dispatcher.publish(event("t1", user="alice"))
    confirmed = dispatcher.publish_confirmed(
        event("t1", user="alice", kind=hook_pb.OFFLINE_MESSAGE, to="bob")
    )
    assert confirmed is not None
    assert await asyncio.wait_for(confirmed, 5) is True
    await wait_until(lambda: len(bulk.produced) == 1, 5, "the chat event")
    assert [key for _, key, _ in bulk.produced] == [b"alice"]
    assert [key for _, key, _ in fast.produced] == [b"bob"]
    # A confirmed event that fails goes to the dead-letter topic the same way.
    fast.fail_topics.add(topic_for("t2"))
    failed = dispatcher.publish_confirmed(event("t2", kind=hook_pb.OFFLINE_MESSAGE))
    assert failed is not None
    assert await asyncio.wait_for(failed, 5) is False
    await wait_until(lambda: fast.produced[-1][0] == dlq_topic_for("t2"), 5, "dead letter")
    assert all(topic == topic_for("t1") for topic, _, _ in bulk.produced)
    await dispatcher.stop(1)
    assert bulk.closed
    assert fast.closed


async def test_a_confirmed_event_with_nothing_ahead_is_produced_at_once(
    registry: MetricsRegistry,
) -> None:
    transport = ScriptedTransport()
    dispatcher = await started(transport, registry)
    offline = event("t1", kind=hook_pb.OFFLINE_MESSAGE, to="bob")
    first = dispatcher.publish_confirmed(offline)
    assert first is not None
    assert [key for _, key, _ in transport.produced] == [b"bob"]  # no loop turn needed
    # Behind a queued event it waits for its turn: the tenant's order is kept.
    assert dispatcher.publish(event("t1", user="carol"))
    second = dispatcher.publish_confirmed(event("t1", kind=hook_pb.OFFLINE_MESSAGE, to="dave"))
    assert second is not None
    assert len(transport.produced) == 1
    assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [True, True]
    assert [key for _, key, _ in transport.produced] == [b"bob", b"carol", b"dave"]
    # A full transport leaves it to the pump.
    transport.full_times = 1
    third = dispatcher.publish_confirmed(event("t1", kind=hook_pb.OFFLINE_MESSAGE, to="erin"))
    assert third is not None
    assert await asyncio.wait_for(third, 5) is True
    assert transport.produced[-1][1] == b"erin"
    await dispatcher.stop(1)
