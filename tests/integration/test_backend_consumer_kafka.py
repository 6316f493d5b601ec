"""The offline consumer against a real Kafka broker (KRaft, started by the test harness):
signed OFFLINE_MESSAGE events produced with confluent_kafka are stored exactly once,
offsets are committed only after the rows are, and invalid events are skipped."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from mics.backend import BackendConfig, BackendServer, TenantConfig, UserConfig
from mics.backend.consumer import OfflineConsumer, group_id_for
from mics.backend.ingest import StoreFailed
from mics.backend.state import BackendState
from mics.backend.store import OfflineRepository
from mics.events.bus import topic_for
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import sign_event
from tests.support.kafka import KafkaBroker
from tests.support.postgres import PostgresDatabase, PostgresServer
from tests.support.waiting import wait_until

SECRET = "kafka-secret"
PARTITIONS = 3
DEADLINE_S = 60.0
FAST = {"lag_interval_s": 0.2, "backoff_min_s": 0.05, "backoff_max_s": 0.3}
USERS = ("u0", "u1", "u2", "u3", "u4")


def new_tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def create_topics(broker: KafkaBroker, *tenants: str) -> None:
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    topics = [
        NewTopic(topic_for(t), num_partitions=PARTITIONS, replication_factor=1) for t in tenants
    ]
    for future in admin.create_topics(topics).values():
        future.result(30)


def make_config(
    broker: KafkaBroker, database_url: str, *tenants: str, mode: str = "per_tenant"
) -> BackendConfig:
    return BackendConfig(
        host="127.0.0.1",
        port=0,
        database_url=database_url,
        kafka_bootstrap_servers=broker.bootstrap,
        consumer_group_mode=mode,  # type: ignore[arg-type]
        kafka_consumer_options={"topic.metadata.refresh.interval.ms": 1000},
        tenants={
            t: TenantConfig(
                secret=SECRET,
                offline_mode="notify_pull",
                users={u: UserConfig(tokens=[f"{t}-{u}"]) for u in USERS},
            )
            for t in tenants
        },
    )


def event(
    tenant: str,
    mid: str,
    to: str,
    *,
    secret: str | None = SECRET,
    kind: int = hook_pb.OFFLINE_MESSAGE,
) -> hook_pb.MqEvent:
    req = msg_pb.MessageRequest(
        tenant_id=tenant,
        user_id="u0",
        device_id="d0",
        msg_id=mid,
        to_user_id=to,
        msg_body=mid.encode(),
    )
    ev = hook_pb.MqEvent(
        tenant_id=tenant,
        event_type=kind,  # type: ignore[arg-type]
        msg_id=mid,
        user_id="u0",
        device_id="d0",
        to_user_id=to,
        event_data=req.SerializeToString(),
        timestamp=1_700_000_000_000,
        node_id="n1",
    )
    if secret is not None:
        sign_event(ev, secret)
    return ev


def produce(broker: KafkaBroker, tenant: str, records: list[tuple[bytes, bytes]]) -> None:
    """Produce (key, value) records to the tenant's topic; wait for every ack."""
    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 2})
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    for key, value in records:
        producer.produce(topic_for(tenant), key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert not errors, errors


def offline_records(tenant: str, count: int, prefix: str = "m") -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(count):
        to = USERS[i % len(USERS)]
        out.append((to.encode(), event(tenant, f"{prefix}{i}", to).SerializeToString()))
    return out


def committed(broker: KafkaBroker, group: str, tenant: str) -> list[int]:
    """The group's committed offsets of the tenant topic's partitions; 0 for none (an
    empty partition never gets a commit)."""
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        tps = [TopicPartition(topic_for(tenant), p) for p in range(PARTITIONS)]
        return [max(tp.offset, 0) for tp in consumer.committed(tps, timeout=10)]
    finally:
        consumer.close()


def end_offsets(broker: KafkaBroker, tenant: str) -> list[int]:
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "probe"})
    try:
        return [
            consumer.get_watermark_offsets(TopicPartition(topic_for(tenant), p), timeout=10)[1]
            for p in range(PARTITIONS)
        ]
    finally:
        consumer.close()


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, within: float = DEADLINE_S
) -> None:
    """Poll an async condition until it holds; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        assert loop.time() < deadline, f"timed out after {within} s waiting for {what}"
        await asyncio.sleep(0.02)


async def row_count(repo: OfflineRepository, tenant: str) -> int:
    return sum([await repo.count_pending(tenant, u) for u in USERS])


async def all_rows(repo: OfflineRepository, tenant: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for user in USERS:
        out.extend((user, m.message_id) for m in await repo.fetch_page(tenant, user, 0, 10_000))
    return out


def metric(server: BackendServer, name: str, **labels: str) -> float:
    return server.state.metrics.registry.sample(name, labels)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'offline.db'}"


@pytest.fixture
async def started() -> AsyncIterator[list[BackendServer]]:
    """Servers a test started; stopped even when it fails."""
    servers: list[BackendServer] = []
    yield servers
    for server in servers:
        await server.stop()


async def start(started: list[BackendServer], config: BackendConfig) -> BackendServer:
    server = BackendServer(config, consumer_settings=dict(FAST))
    await server.start()
    started.append(server)
    return server


# -- tests -------------------------------------------------------------------------------


async def test_events_are_stored_and_offsets_committed_after(
    kafka_broker: KafkaBroker, sqlite_url: str, started: list[BackendServer]
) -> None:
    tenant = new_tenant()
    create_topics(kafka_broker, tenant)
    records = offline_records(tenant, 50)
    records.append(
        (b"u1", event(tenant, "x", "u1", kind=hook_pb.CONNECT_ONLINE).SerializeToString())
    )
    records.append((b"u1", event(tenant, "bad1", "u1", secret="attacker").SerializeToString()))
    records.append((b"u1", event(tenant, "bad2", "u1", secret=None).SerializeToString()))
    records.append((b"u1", b"\xff\xfe not protobuf"))
    produce(kafka_broker, tenant, records)

    server = await start(started, make_config(kafka_broker, sqlite_url, tenant))
    [consumer] = server.consumers.consumers
    assert consumer.group_id == f"offline-message-consumer-{tenant}"
    repo = await server.state.store.repository()

    async def all_stored() -> bool:
        return await row_count(repo, tenant) == 50

    await eventually(all_stored, "50 rows")
    ends = await asyncio.to_thread(end_offsets, kafka_broker, tenant)
    assert sum(ends) == 54

    async def all_committed() -> bool:
        return await asyncio.to_thread(committed, kafka_broker, consumer.group_id, tenant) == ends

    await eventually(all_committed, "offsets committed to the end")
    assert metric(server, "offline_message_stored_total", tenant=tenant) == 50
    assert metric(server, "offline_message_invalid_sign_total", tenant=tenant) == 2
    assert metric(server, "offline_message_skipped_total", tenant=tenant, reason="unparsable") == 1
    assert (
        metric(server, "offline_consumer_events_total", tenant=tenant, event_type="ConnectOnline")
        == 1
    )
    assert sorted(m for _, m in await all_rows(repo, tenant)) == sorted(f"m{i}" for i in range(50))
    # The injected messages are nowhere.
    assert all(m not in ("bad1", "bad2", "x") for _, m in await all_rows(repo, tenant))

    used = [p for p in range(PARTITIONS) if ends[p]]
    assert len(used) > 1  # keyed by recipient: several partitions

    async def lag_zero() -> bool:
        offsets = [
            metric(server, "kafka_consumer_offset", tenant=tenant, partition=str(p)) for p in used
        ]
        lags = [
            server.state.metrics.registry.registry.get_sample_value(
                "kafka_consumer_lag", {"tenant": tenant, "partition": str(p)}
            )
            for p in used
        ]
        return offsets == [float(ends[p]) for p in used] and lags == [0.0] * len(used)

    await eventually(lag_zero, "lag and offset gauges")


async def test_failing_store_commits_nothing_then_stores_everything_once(
    kafka_broker: KafkaBroker,
    sqlite_url: str,
    started: list[BackendServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant = new_tenant()
    create_topics(kafka_broker, tenant)
    produce(kafka_broker, tenant, offline_records(tenant, 40))

    server = BackendServer(
        make_config(kafka_broker, sqlite_url, tenant), consumer_settings=dict(FAST)
    )
    real_repository = server.state.store.repository
    broken = True

    async def flaky() -> OfflineRepository:
        if broken:
            raise ConnectionError("database down")
        return await real_repository()

    monkeypatch.setattr(server.state.store, "repository", flaky)
    await server.start()
    started.append(server)
    [consumer] = server.consumers.consumers
    group = consumer.group_id

    async def retried() -> bool:
        return consumer.batches_failed >= 3

    await eventually(retried, "several failed store attempts")
    assert consumer.batches_stored == 0
    assert await asyncio.to_thread(committed, kafka_broker, group, tenant) == [0] * PARTITIONS
    repo = await real_repository()
    assert await row_count(repo, tenant) == 0
    assert metric(server, "offline_message_store_failed_total", tenant=tenant) >= 40

    async def backlog_visible() -> bool:
        lags = [
            server.state.metrics.registry.registry.get_sample_value(
                "kafka_consumer_lag", {"tenant": tenant, "partition": str(p)}
            )
            or 0.0
            for p in range(PARTITIONS)
        ]
        return sum(lags) > 0

    await eventually(backlog_visible, "consumer lag while the store is down")

    broken = False  # the database is back

    async def all_stored() -> bool:
        return await row_count(repo, tenant) == 40

    await eventually(all_stored, "40 rows after recovery")
    ends = await asyncio.to_thread(end_offsets, kafka_broker, tenant)

    async def all_committed() -> bool:
        return await asyncio.to_thread(committed, kafka_broker, group, tenant) == ends

    await eventually(all_committed, "offsets committed after recovery")
    rows = await all_rows(repo, tenant)
    assert len(rows) == len(set(rows)) == 40  # every event exactly once
    assert metric(server, "offline_message_stored_total", tenant=tenant) == 40

    # Kafka redelivering the same events (a producer retry, a lost commit): no-ops.
    produce(kafka_broker, tenant, offline_records(tenant, 40))

    async def duplicates_seen() -> bool:
        return metric(server, "offline_message_duplicate_total", tenant=tenant) == 40

    await eventually(duplicates_seen, "redelivered events counted as duplicates")
    assert await row_count(repo, tenant) == 40


async def test_a_restarted_backend_resumes_from_the_committed_offsets(
    kafka_broker: KafkaBroker, sqlite_url: str, started: list[BackendServer]
) -> None:
    tenant = new_tenant()
    create_topics(kafka_broker, tenant)
    config = make_config(kafka_broker, sqlite_url, tenant)
    produce(kafka_broker, tenant, offline_records(tenant, 10, "a"))
    first = await start(started, config)
    repo = await first.state.store.repository()

    async def first_ten() -> bool:
        return await row_count(repo, tenant) == 10

    await eventually(first_ten, "first 10 rows")
    ends = await asyncio.to_thread(end_offsets, kafka_broker, tenant)

    async def first_committed() -> bool:
        return (
            await asyncio.to_thread(committed, kafka_broker, group_id_for(tenant), tenant) == ends
        )

    await eventually(first_committed, "first offsets committed")
    await first.stop()

    produce(kafka_broker, tenant, offline_records(tenant, 10, "b"))
    second = await start(started, config)
    repo = await second.state.store.repository()

    async def twenty() -> bool:
        return await row_count(repo, tenant) == 20

    await eventually(twenty, "20 rows")
    # Only the new events were read: nothing was stored twice.
    assert metric(second, "offline_message_stored_total", tenant=tenant) == 10
    assert metric(second, "offline_message_duplicate_total", tenant=tenant) == 0


async def test_shared_group_over_several_tenants(
    kafka_broker: KafkaBroker, sqlite_url: str, started: list[BackendServer]
) -> None:
    a, b = new_tenant(), new_tenant()
    create_topics(kafka_broker, a, b)
    produce(kafka_broker, a, offline_records(a, 7))
    produce(kafka_broker, b, offline_records(b, 9))
    # A tenant secret per topic: b's events signed with a's... secret are rejected.
    produce(
        kafka_broker,
        b,
        [(b"u1", event(a, "forged", "u1").SerializeToString())],  # tenant a's event in b's topic
    )
    server = await start(started, make_config(kafka_broker, sqlite_url, a, b, mode="shared"))
    [consumer] = server.consumers.consumers
    assert consumer.group_id == "offline-message-consumer"
    assert sorted(consumer.topics) == sorted([topic_for(a), topic_for(b)])
    repo = await server.state.store.repository()

    async def both() -> bool:
        return await row_count(repo, a) == 7 and await row_count(repo, b) == 9

    await eventually(both, "rows of both tenants")

    async def mismatch_counted() -> bool:
        return (
            metric(server, "offline_message_skipped_total", tenant=b, reason="tenant_mismatch") == 1
        )

    await eventually(mismatch_counted, "event of another tenant skipped")


async def test_postgres_outage_loses_nothing(
    kafka_broker: KafkaBroker,
    postgres_db: PostgresDatabase,
    postgres_server: PostgresServer,
    started: list[BackendServer],
) -> None:
    """A real database outage: the consumer stops committing, Kafka keeps the events,
    and once PostgreSQL is back every event is stored exactly once."""
    tenant = new_tenant()
    create_topics(kafka_broker, tenant)
    server = await start(started, make_config(kafka_broker, postgres_db.async_url, tenant))
    [consumer] = server.consumers.consumers
    repo = await server.state.store.repository()
    produce(kafka_broker, tenant, offline_records(tenant, 10, "before"))

    async def ten() -> bool:
        return await row_count(repo, tenant) == 10

    await eventually(ten, "rows before the outage")
    ends_before = await asyncio.to_thread(end_offsets, kafka_broker, tenant)

    async def committed_before() -> bool:
        return (
            await asyncio.to_thread(committed, kafka_broker, consumer.group_id, tenant)
            == ends_before
        )

    await eventually(committed_before, "offsets before the outage")

    await asyncio.to_thread(postgres_server.stop)
    try:
        failures = consumer.batches_failed
        produce(kafka_broker, tenant, offline_records(tenant, 30, "during"))

        async def failing() -> bool:
            return consumer.batches_failed >= failures + 2

        await eventually(failing, "store failures during the outage")
        assert (
            await asyncio.to_thread(committed, kafka_broker, consumer.group_id, tenant)
            == ends_before
        )
    finally:
        await asyncio.to_thread(postgres_server.start)

    async def forty() -> bool:
        try:
            return await row_count(repo, tenant) == 40
        except Exception:  # the pool reconnects
            return False

    await eventually(forty, "all rows after the outage")
    ends = await asyncio.to_thread(end_offsets, kafka_broker, tenant)

    async def committed_after() -> bool:
        return await asyncio.to_thread(committed, kafka_broker, consumer.group_id, tenant) == ends

    await eventually(committed_after, "offsets after the outage")
    rows = await all_rows(repo, tenant)
    assert len(rows) == len(set(rows)) == 40


def test_no_consumer_without_bootstrap_servers(sqlite_url: str) -> None:
    from mics.backend.consumer import OfflineConsumers

    config = BackendConfig(tenants={"t": TenantConfig(secret="s")}, database_url=sqlite_url)
    server = BackendServer(config)
    assert (
        OfflineConsumers.from_config(config, server.state.ingestor, server.state.metrics).consumers
        == []
    )
    _: Any = None


# -- pipelining, lone events, pause and resume -------------------------------------------


async def test_a_failed_batch_mid_stream_is_stored_once_with_what_follows(
    kafka_broker: KafkaBroker,
    postgres_db: PostgresDatabase,
    started: list[BackendServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batches are decoded and polled ahead of the one being stored: when a store fails,
    it and everything read after it are read again, and nothing is lost or doubled."""
    tenant = new_tenant()
    create_topics(kafka_broker, tenant)
    produce(kafka_broker, tenant, offline_records(tenant, 200))
    server = BackendServer(
        make_config(kafka_broker, postgres_db.async_url, tenant),
        consumer_settings={**FAST, "batch_size": 7},
    )
    ingestor = server.state.ingestor
    real_store = ingestor.store
    calls = 0

    async def flaky(batch: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls in (3, 4, 9):
            raise StoreFailed("injected")
        return await real_store(batch)

    monkeypatch.setattr(ingestor, "store", flaky)
    await server.start()
    started.append(server)
    [consumer] = server.consumers.consumers
    repo = await server.state.store.repository()

    async def all_stored() -> bool:
        return await row_count(repo, tenant) == 200

    await eventually(all_stored, "200 rows")
    ends = await asyncio.to_thread(end_offsets, kafka_broker, tenant)

    async def all_committed() -> bool:
        return await asyncio.to_thread(committed, kafka_broker, consumer.group_id, tenant) == ends

    await eventually(all_committed, "offsets committed to the end")
    rows = await all_rows(repo, tenant)
    assert len(rows) == len(set(rows)) == 200
    assert metric(server, "offline_message_stored_total", tenant=tenant) == 200
    assert consumer.batches_failed >= 3


async def test_a_lone_event_does_not_wait_for_a_full_batch(
    kafka_broker: KafkaBroker, sqlite_url: str
) -> None:
    """With a large batch and a poll timeout longer than this test waits, a single event
    is still stored: the poll waits for the first record only."""
    tenant = new_tenant()
    create_topics(kafka_broker, tenant)
    state = BackendState.from_config(make_config(kafka_broker, sqlite_url, tenant))
    consumer = OfflineConsumer(
        kafka_broker.bootstrap,
        group_id_for(tenant),
        [topic_for(tenant)],
        state.ingestor,
        state.metrics,
        options={"topic.metadata.refresh.interval.ms": 1000},
        batch_size=5000,
        poll_timeout_s=45.0,
        lag_interval_s=0.2,
    )
    await consumer.start()
    repo = await state.store.repository()
    try:
        await wait_until(lambda: len(consumer.assigned) == PARTITIONS, 30, "assignment")
        produce(kafka_broker, tenant, offline_records(tenant, 1, "lone"))

        async def stored() -> bool:
            return await row_count(repo, tenant) == 1

        await eventually(stored, "the lone event", within=20)
    finally:
        # The poll in progress waits for a record (up to 45 s): stopping finishes the
        # batch that wakes it, and commits it.
        stopping = asyncio.create_task(consumer.stop())
        await asyncio.sleep(0)
        produce(kafka_broker, tenant, offline_records(tenant, 1, "wake"))
        await stopping
        try:
            assert await row_count(repo, tenant) == 2
            ends = await asyncio.to_thread(end_offsets, kafka_broker, tenant)
            group = group_id_for(tenant)
            assert await asyncio.to_thread(committed, kafka_broker, group, tenant) == ends
        finally:
            await state.store.close()


async def lag_total(server_or_state: BackendServer | BackendState, tenant: str) -> float:
    state = server_or_state.state if isinstance(server_or_state, BackendServer) else server_or_state
    return sum(
        state.metrics.registry.registry.get_sample_value(
            "kafka_consumer_lag", {"tenant": tenant, "partition": str(p)}
        )
        or 0.0
        for p in range(PARTITIONS)
    )


async def test_pause_stops_reading_without_a_rebalance_and_resume_goes_on(
    kafka_broker: KafkaBroker, sqlite_url: str, started: list[BackendServer]
) -> None:
    tenant = new_tenant()
    create_topics(kafka_broker, tenant)
    produce(kafka_broker, tenant, offline_records(tenant, 10, "a"))
    server = await start(started, make_config(kafka_broker, sqlite_url, tenant))
    [consumer] = server.consumers.consumers
    group = consumer.group_id
    repo = await server.state.store.repository()

    async def first_ten() -> bool:
        return await row_count(repo, tenant) == 10

    await eventually(first_ten, "rows before the pause")
    ends = await asyncio.to_thread(end_offsets, kafka_broker, tenant)

    async def first_committed() -> bool:
        return await asyncio.to_thread(committed, kafka_broker, group, tenant) == ends

    await eventually(first_committed, "offsets before the pause")
    assignments = consumer.assignments
    assert len(consumer.assigned) == PARTITIONS

    await server.consumers.pause()
    assert consumer.paused
    produce(kafka_broker, tenant, offline_records(tenant, 20, "b"))

    # The backlog shows in the lag while nothing is read.
    async def backlog() -> bool:
        return await lag_total(server, tenant) == 20

    await eventually(backlog, "lag of the paused backlog")
    polls = consumer.polls
    await wait_until(lambda: consumer.polls >= polls + 3, 10, "polls while paused")
    assert await row_count(repo, tenant) == 10
    assert await asyncio.to_thread(committed, kafka_broker, group, tenant) == ends
    assert consumer.assignments == assignments  # still in the group: no rebalance

    await server.consumers.resume()
    assert not consumer.paused

    async def thirty() -> bool:
        return await row_count(repo, tenant) == 30

    await eventually(thirty, "rows after resume")
    ends = await asyncio.to_thread(end_offsets, kafka_broker, tenant)
    await eventually(first_committed, "offsets after resume")

    async def no_lag() -> bool:
        return await lag_total(server, tenant) == 0

    await eventually(no_lag, "lag back to zero")
    assert consumer.assignments == assignments
    rows = await all_rows(repo, tenant)
    assert len(rows) == len(set(rows)) == 30


async def test_partitions_assigned_while_paused_stay_paused(
    kafka_broker: KafkaBroker, sqlite_url: str
) -> None:
    tenant = new_tenant()
    create_topics(kafka_broker, tenant)
    produce(kafka_broker, tenant, offline_records(tenant, 5))
    state = BackendState.from_config(make_config(kafka_broker, sqlite_url, tenant))
    consumer = OfflineConsumer(
        kafka_broker.bootstrap,
        group_id_for(tenant),
        [topic_for(tenant)],
        state.ingestor,
        state.metrics,
        options={"topic.metadata.refresh.interval.ms": 1000},
        **FAST,
    )
    await consumer.pause()  # before it joins the group
    await consumer.start()
    repo = await state.store.repository()
    try:
        await wait_until(lambda: len(consumer.assigned) == PARTITIONS, 30, "assignment")

        async def backlog() -> bool:
            return await lag_total(state, tenant) == 5

        await eventually(backlog, "lag of the paused backlog")
        polls = consumer.polls
        await wait_until(lambda: consumer.polls >= polls + 3, 10, "polls while paused")
        assert await row_count(repo, tenant) == 0

        await consumer.resume()

        async def five() -> bool:
            return await row_count(repo, tenant) == 5

        await eventually(five, "rows after resume")
        assert consumer.assignments == 1
    finally:
        await consumer.stop()
        await state.store.close()
