"""The Kafka transport on a real broker: delivery reports, flush, close.

Reports reach the loop one of two ways (`fd`: librdkafka wakes the loop through a pipe;
`thread`: a report thread), and every test here runs in both. What the rest of the
gateway relies on is that each `on_done` runs exactly once, on the event loop's thread,
and that closing a transport leaves no thread and no file descriptor behind.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import uuid
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from mics.events import rdkafka_wakeup
from mics.events.config import KafkaSettings
from mics.events.dispatcher import EventDispatcher
from mics.events.kafka import KafkaDeliveryError, KafkaTransport
from mics.gateway.config import GatewaySettings
from mics.gateway.wiring import build_event_bus
from mics.observability.metrics import MetricsRegistry
from tests.support.kafka import KafkaBroker
from tests.support.waiting import wait_until


def _topic() -> str:
    return f"transport-{uuid.uuid4().hex[:10]}"


def _report_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kafka-reports-")]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(params=["fd", "thread"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _started(settings: KafkaSettings, mode: str) -> KafkaTransport:
    transport = KafkaTransport(replace(settings, report_wakeup=mode))
    await transport.start()
    assert transport.report_mode == mode
    return transport


async def test_every_report_runs_once_on_the_loop_thread(
    kafka_broker: KafkaBroker, mode: str
) -> None:
    transport = await _started(KafkaSettings(bootstrap_servers=kafka_broker.bootstrap), mode)
    loop_thread = threading.get_ident()
    calls: Counter[int] = Counter()
    threads: set[int] = set()
    errors: list[Exception] = []
    all_done = asyncio.get_running_loop().create_future()
    count = 2000

    def done(i: int, error: Exception | None) -> None:
        calls[i] += 1
        threads.add(threading.get_ident())
        if error is not None:
            errors.append(error)
        if len(calls) == count and not all_done.done():
            all_done.set_result(None)

    try:
        topic = _topic()
        for i in range(count):
            transport.produce(topic, b"k%d" % (i % 7), b"v%d" % i, functools.partial(done, i))
            if i % 100 == 99:
                await asyncio.sleep(0)  # reports arrive while produces continue
        await asyncio.wait_for(all_done, 60)
        assert await transport.flush(5) == 0
    finally:
        await transport.close()
    assert errors == []
    assert threads == {loop_thread}
    assert set(calls.values()) == {1}
    assert len(calls) == count


async def test_failed_produces_report_their_errors(kafka_broker: KafkaBroker, mode: str) -> None:
    topic = _topic()
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=1, config={"max.message.bytes": "200"})]
    )
    await asyncio.to_thread(futures[topic].result, 30)
    settings = KafkaSettings(
        bootstrap_servers=kafka_broker.bootstrap, extra={"message.max.bytes": "20000"}
    )
    transport = await _started(settings, mode)
    loop = asyncio.get_running_loop()
    refused_by_broker = loop.create_future()
    refused_at_once = loop.create_future()
    try:
        # Incompressible and over the topic's limit: the broker refuses it (a report).
        transport.produce(topic, b"k", os.urandom(2000), refused_by_broker.set_result)
        # Over the producer's own limit: refused by produce() itself.
        transport.produce(topic, b"k", b"x" * 30_000, refused_at_once.set_result)
        errors = await asyncio.wait_for(asyncio.gather(refused_by_broker, refused_at_once), 60)
    finally:
        await transport.close()
    assert all(isinstance(error, KafkaDeliveryError) for error in errors)


async def test_a_raising_callback_does_not_stop_the_others(
    kafka_broker: KafkaBroker, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    transport = await _started(KafkaSettings(bootstrap_servers=kafka_broker.bootstrap), mode)
    seen: list[int] = []
    last = asyncio.get_running_loop().create_future()

    def bad(_: Exception | None) -> None:
        seen.append(0)
        raise RuntimeError("callback bug")

    try:
        topic = _topic()
        transport.produce(topic, b"k", b"0", bad)
        transport.produce(topic, b"k", b"1", lambda _: seen.append(1))
        await asyncio.sleep(0)
        transport.produce(topic, b"k", b"2", lambda _: last.set_result(None))
        await asyncio.wait_for(last, 30)
        # Reports are still served: another round trip works.
        again = asyncio.get_running_loop().create_future()
        transport.produce(topic, b"k", b"3", again.set_result)
        assert await asyncio.wait_for(again, 30) is None
    finally:
        await transport.close()
    assert seen == [0, 1]
    assert "Kafka delivery callback failed" in caplog.text


async def test_starting_and_closing_many_transports_leaves_nothing_behind(
    kafka_broker: KafkaBroker, mode: str
) -> None:
    threads_before, fds_before = len(_report_threads()), _open_fds()
    transport: KafkaTransport | None = None
    for round_ in range(10):
        settings = KafkaSettings(
            bootstrap_servers=kafka_broker.bootstrap, client_id=f"leak{round_}"
        )
        transport = await _started(settings, mode)
        assert len(_report_threads()) == threads_before + (mode == "thread")
        if round_ % 2:  # half of them close with nothing outstanding, half right after
            confirmed = asyncio.get_running_loop().create_future()
            transport.produce(_topic(), b"k", b"v", confirmed.set_result)
            assert await asyncio.wait_for(confirmed, 30) is None
        else:
            transport.produce(_topic(), b"k", b"v", lambda _: None)
        await transport.close()
        assert transport.report_mode == ""
        assert len(_report_threads()) == threads_before
    # librdkafka closes its broker sockets on its own threads, a moment after close().
    await wait_until(lambda: _open_fds() <= fds_before, 10, "the transports' descriptors closed")
    # close() twice, and close() of a transport never started, are harmless.
    assert transport is not None
    await transport.close()
    await KafkaTransport(KafkaSettings(bootstrap_servers=kafka_broker.bootstrap)).close()


async def test_flush_and_close_with_the_broker_unreachable(mode: str) -> None:
    # Nothing listens there: the message stays outstanding, flush gives up after its
    # timeout and says so, close still stops serving reports.
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:9", message_timeout_ms=60_000)
    before = len(_report_threads())
    transport = await _started(settings, mode)
    transport.produce(_topic(), b"k", b"v", lambda _: None)
    assert await transport.flush(0.2) == 1
    await transport.close()
    assert len(_report_threads()) == before
    assert transport.report_mode == ""


async def test_without_the_pipe_reports_come_from_a_thread(
    kafka_broker: KafkaBroker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A confluent-kafka whose handle cannot be verified (here: librdkafka's functions
    # cannot be found) still delivers every report, from a thread, and says so.
    monkeypatch.setattr(rdkafka_wakeup, "_load_api", lambda: None)
    transport = KafkaTransport(KafkaSettings(bootstrap_servers=kafka_broker.bootstrap))
    await transport.start()
    try:
        assert transport.report_mode == "thread"
        confirmed = asyncio.get_running_loop().create_future()
        transport.produce(_topic(), b"k", b"v", confirmed.set_result)
        assert await asyncio.wait_for(confirmed, 30) is None
    finally:
        await transport.close()
    assert "serving them from a thread" in caplog.text


def test_an_offline_linger_gives_confirmed_events_a_producer_of_their_own() -> None:
    base: dict[str, Any] = {"kafka_bootstrap_servers": "127.0.0.1:9092", "node_id": "n1"}
    for linger in (5, -1):  # the same linger as the others, or off: one producer
        settings = GatewaySettings(**base, kafka_offline_linger_ms=linger)
        bus, _ = build_event_bus(settings, MetricsRegistry())
        assert isinstance(bus, EventDispatcher)
        assert bus._confirmed_transport is bus._transport
    # By default the offline events' producer does not linger, the others 5 ms.
    bus, _ = build_event_bus(GatewaySettings(**base), MetricsRegistry())
    assert isinstance(bus, EventDispatcher)
    confirmed = bus._confirmed_transport
    assert isinstance(confirmed, KafkaTransport)
    assert confirmed is not bus._transport
    config = confirmed._settings.producer_config()
    assert (config["linger.ms"], config["client.id"]) == (0, "n1-offline")
