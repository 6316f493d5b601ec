"""Event-path benchmark: enqueue cost, sustained events/s into Kafka, ack p99 up vs down.

Starts a real single-node Kafka broker (the test suite's harness, jars from Maven) and
measures, in one process on uvloop:

1. enqueue cost: the time of one `EventDispatcher.publish` call (serialize, queue),
   per event, over --enqueue-events calls; goal p99 < 50 us. Also the cost of building
   and signing one event, which the gateway pays per message when events are on.
2. sustained events/s from one process into the broker with lz4, acks=all, idempotent
   producer: --events events offered as fast as the bounded queue takes them, counted
   when the broker acknowledged them; goal >= 50k/s.
3. sender ack latency p50/p99 for 1:1 chat through a real gateway with Kafka events on,
   broker up, then broker stopped (events queue); goal: unchanged within noise. The
   gateway, its /auth hook and the clients share this process, so absolute figures
   include the clients' cost; the comparison is what matters.

Run: python -m bench.events [--events 300000] [--acks 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path

from tests.support.kafka import KafkaBroker

from bench._auth import AuthServer
from bench._common import install_uvloop, percentile
from mics.client import ClientOptions, MicsClient
from mics.events.config import DispatcherConfig, KafkaSettings
from mics.events.dispatcher import EventDispatcher
from mics.events.kafka import KafkaTransport
from mics.gateway.app import GatewayServer
from mics.gateway.config import GatewaySettings
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import sign_event

SECRET = "bench-secret"


def sample_event(tenant: str, i: int) -> hook_pb.MqEvent:
    request = msg_pb.MessageRequest(
        tenant_id=tenant,
        user_id="u1",
        device_id="d1",
        msg_id=f"m{i}",
        to_user_id="u2",
        msg_body=b"x" * 100,
        timestamp_ms=1,
    )
    event = hook_pb.MqEvent(
        tenant_id=tenant,
        event_type=hook_pb.SINGLE_CHAT_MSG,
        msg_id=request.msg_id,
        user_id="u1",
        device_id="d1",
        to_user_id="u2",
        event_data=request.SerializeToString(),
        timestamp=1,
        node_id="bench",
    )
    sign_event(event, SECRET)
    return event


def fmt_us(values_ns: list[int]) -> str:
    ordered = sorted(values_ns)
    return (
        f"p50 {percentile(ordered, 0.50) / 1000:.2f} us, "
        f"p99 {percentile(ordered, 0.99) / 1000:.2f} us, "
        f"mean {statistics.fmean(ordered) / 1000:.2f} us"
    )


async def dispatcher_for(bootstrap: str, **config: int) -> tuple[EventDispatcher, MetricsRegistry]:
    registry = MetricsRegistry()
    transport = KafkaTransport(KafkaSettings(bootstrap_servers=bootstrap))
    dispatcher = EventDispatcher(transport, DispatcherConfig(**config), registry)
    await dispatcher.start()
    return dispatcher, registry


def published(registry: MetricsRegistry, tenant: str) -> float:
    return registry.sample(
        "mics_mq_published_total",
        {"tenant": tenant, "topic": "event", "event_type": "SingleChatMsg"},
    )


async def bench_enqueue(bootstrap: str, count: int) -> None:
    build_ns: list[int] = []
    for i in range(min(count, 50_000)):
        t0 = time.perf_counter_ns()
        sample_event("tb", i)
        build_ns.append(time.perf_counter_ns() - t0)
    print(f"build + sign one event:   {fmt_us(build_ns)}")
    dispatcher, registry = await dispatcher_for(
        bootstrap, queue_capacity=1_000_000, max_pending_per_tenant=1_000_000
    )
    events = [sample_event("tenq", i) for i in range(count)]
    cost_ns: list[int] = []
    gc.disable()
    try:
        for index, event in enumerate(events):
            t0 = time.perf_counter_ns()
            dispatcher.publish(event)
            cost_ns.append(time.perf_counter_ns() - t0)
            if index % 512 == 511:
                await asyncio.sleep(0)  # let the pump hand batches to librdkafka
    finally:
        gc.enable()
    print(f"enqueue one event:        {fmt_us(cost_ns)}   (goal p99 < 50 us)")
    deadline = time.monotonic() + 120
    while published(registry, "tenq") < count and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # polling the published counter
    await dispatcher.stop(30)


async def bench_throughput(bootstrap: str, count: int) -> None:
    dispatcher, registry = await dispatcher_for(
        bootstrap,
        queue_capacity=100_000,
        max_pending_per_tenant=100_000,
        max_inflight_per_tenant=50_000,
    )
    events = [sample_event("tthr", i) for i in range(count)]
    # Warm the producer (topic metadata, idempotence PID) before the clock starts.
    dispatcher.publish(sample_event("tthr", -1))
    while published(registry, "tthr") < 1:  # noqa: ASYNC110 (polling a counter)
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    index = 0
    while index < count:
        if dispatcher.publish(events[index]):
            index += 1
            if index % 1024 == 0:
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(0.001)  # bounded queue full: wait for the broker
    while published(registry, "tthr") < count + 1:  # noqa: ASYNC110 (polling a counter)
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    print(
        f"sustained into Kafka:     {count / elapsed:,.0f} events/s "
        f"({count:,} events, lz4, acks=all, idempotent; goal >= 50,000/s)"
    )
    await dispatcher.stop(30)


async def ack_latencies(
    clients: list[tuple[MicsClient, str]], total: int, window: int
) -> list[float]:
    latencies: list[float] = []
    per_client = total // len(clients)

    async def run(client: MicsClient, peer: str) -> None:
        semaphore = asyncio.Semaphore(window)

        async def one() -> None:
            async with semaphore:
                t0 = time.perf_counter()
                ack = await client.send_single(peer, b"y" * 100)
                latencies.append((time.perf_counter() - t0) * 1000)
                assert ack.status == msg_pb.SENT, ack

        await asyncio.gather(*(one() for _ in range(per_client)))

    await asyncio.gather(*(run(c, p) for c, p in clients))
    return sorted(latencies)


async def bench_ack_up_down(broker: KafkaBroker, total: int) -> None:
    auth = AuthServer()
    auth_url = await auth.start()
    gateway = GatewayServer(
        GatewaySettings(
            host="127.0.0.1",
            port=0,
            node_id="bench",
            tenant_auth_map={"bench": auth_url},
            tenant_hook_secrets={"bench": SECRET},
            kafka_bootstrap_servers=broker.bootstrap,
            kafka_queue_capacity=1_000_000,
            kafka_max_pending_per_tenant=1_000_000,
        )
    )
    await gateway.start()
    clients: list[tuple[MicsClient, str]] = []
    receivers: list[MicsClient] = []
    try:
        for i in range(10):
            for role, peer in (("s", f"r{i}"), ("r", None)):
                client = MicsClient(
                    ClientOptions(
                        url=gateway.ws_url,
                        tenant_id="bench",
                        token=f"{role}{i}",
                        device_id="d",
                        reconnect=False,
                        heartbeat_interval_s=0,
                        protocol_version=None,
                        dedup_capacity=0,
                    ),
                    on_delivery=lambda _m: None,
                )
                await client.connect()
                if peer is not None:
                    clients.append((client, peer))
                else:
                    receivers.append(client)
        await ack_latencies(clients, 2000, 8)  # warm-up
        for label in ("broker up", "broker down"):
            if label == "broker down":
                await asyncio.to_thread(broker.stop)
            ordered = await ack_latencies(clients, total, 8)
            print(
                f"sender ack, {label:<11} p50 {percentile(ordered, 0.5):.2f} ms, "
                f"p99 {percentile(ordered, 0.99):.2f} ms ({len(ordered):,} messages, "
                f"events queued: {gateway.gateway.events.depth('bench')})"  # type: ignore[attr-defined]
            )
    finally:
        for client, _ in clients:
            await client.close()
        for client in receivers:
            await client.close()
        if not broker.running:
            await asyncio.to_thread(broker.start)
        await gateway.stop()
        await auth.stop()


async def main(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="mics-bench-kafka-"))
    print(f"starting a Kafka broker in {workdir} ...", flush=True)
    with KafkaBroker(workdir) as broker:
        print(f"broker at {broker.bootstrap}", flush=True)
        await bench_enqueue(broker.bootstrap, args.enqueue_events)
        await bench_throughput(broker.bootstrap, args.events)
        await bench_ack_up_down(broker, args.acks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enqueue-events", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--acks", type=int, default=20_000)
    install_uvloop()
    asyncio.run(main(parser.parse_args()))
