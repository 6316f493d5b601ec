"""A production-shaped offline stack for end-to-end tests: real Kafka, real PostgreSQL.

``OfflineStack`` is what a tenant runs in production, in one process:

* the reference backend (:class:`mics.backend.app.BackendServer`) with its PostgreSQL
  offline store, its Kafka consumer group ``offline-message-consumer-{tenant}`` and its
  nudger pointed at the gateway;
* a gateway (:class:`mics.gateway.app.GatewayServer`) producing the tenant's events to
  Kafka, pulling offline messages from the backend's hooks and accepting nudges;
* SDK clients (:class:`mics.client.MicsClient`) over real WebSockets.

Every stack gets its own tenant id, so its topics and consumer group never collide with
another test's on the shared session broker, and its own database (``postgres_db``).

Use it through :func:`offline_stacks`, from a fixture of the test module::

    @pytest.fixture
    async def make_stack(kafka_broker, postgres_db) -> AsyncIterator[StackFactory]:
        async with offline_stacks(kafka_broker, postgres_db) as factory:
            yield factory

Fault helpers: :meth:`OfflineStack.restart_backend` (stop, then a new BackendServer on the
same config, port and database; the consumer group resumes from its committed offsets)
and :meth:`OfflineStack.pause_consumer` / :meth:`OfflineStack.resume_consumer`.
``OfflineConsumers`` has no pause: pausing stops the backend's consumers (they finish
and commit the batch in progress, then leave the group) and resuming starts them again
(they rejoin the group and continue from the committed offsets).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import text

from mics.backend.app import BackendServer
from mics.backend.config import BackendConfig, TenantConfig, UserConfig
from mics.backend.consumer import group_id_for
from mics.backend.store.repository import OfflineRepository
from mics.client import ClientOptions, MicsClient
from mics.events.bus import topic_for
from mics.events.config import TopicSettings
from mics.events.kafka import provision_topics
from mics.gateway.app import GatewayServer
from mics.gateway.config import GatewaySettings
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.support.kafka import KafkaBroker
from tests.support.postgres import PostgresDatabase
from tests.support.waiting import wait_until

PARTITIONS = 3
DEFAULT_USERS = ("u1", "u2", "u3", "u4", "u5")
DEFAULT_GROUPS: dict[str, list[str]] = {"g1": ["u1", "u2", "u3", "u4"]}

# Keyword arguments of each OfflineConsumer: poll often, retry a failed store soon.
FAST_CONSUMER: dict[str, Any] = {
    "poll_timeout_s": 0.05,
    "backoff_min_s": 0.05,
    "backoff_max_s": 0.5,
    "lag_interval_s": 1.0,
}

Key = tuple[str, str]  # (sender user_id, msg_id): what the SDK dedups on


def unique_tenant() -> str:
    return f"off{uuid.uuid4().hex[:10]}"


def token_of(user: str) -> str:
    return f"{user}-token"


def key_of(message: msg_pb.MessageRequest) -> Key:
    return message.user_id, message.msg_id


class Inbox:
    """One device of one user: an SDK client and everything it handed to the app.

    ``got`` is the SDK's output (its ``on_delivery`` callback): deliveries the SDK did
    not drop as duplicates, across every connection of this client object (the SDK's
    dedup memory lives as long as the object, over close() and connect()).
    """

    def __init__(self, client_factory: Callable[..., MicsClient], user: str, device: str) -> None:
        self.user = user
        self.device = device
        self.got: list[msg_pb.MessageRequest] = []
        # Called after each new delivery was recorded (e.g. to close mid-drain).
        self.on_message: Callable[[msg_pb.MessageRequest], None] | None = None
        self.client: MicsClient = client_factory(user, device, on_delivery=self._deliver)

    def _deliver(self, message: msg_pb.MessageRequest) -> None:
        self.got.append(message)
        if self.on_message is not None:
            self.on_message(message)

    @property
    def keys(self) -> list[Key]:
        return [key_of(m) for m in self.got]

    @property
    def msg_ids(self) -> list[str]:
        return [m.msg_id for m in self.got]

    def has(self, msg_ids: Iterable[str]) -> bool:
        return set(msg_ids) <= set(self.msg_ids)

    async def connect(self) -> msg_pb.ConnectAck:
        return await self.client.connect()

    async def close(self) -> None:
        await self.client.close()


@dataclass
class OfflineStack:
    tenant: str
    secret: str
    broker: KafkaBroker
    database: PostgresDatabase
    backend_config: BackendConfig
    consumer_settings: dict[str, Any]
    backend: BackendServer
    gateway: GatewayServer
    clients: list[MicsClient] = field(default_factory=list)
    backend_restarts: int = 0

    # -- clients ---------------------------------------------------------------------

    def client(
        self,
        user: str,
        device: str = "d1",
        *,
        on_delivery: Callable[[msg_pb.MessageRequest], None] | None = None,
        session: aiohttp.ClientSession | None = None,
        **options: Any,
    ) -> MicsClient:
        opts: dict[str, Any] = {"reconnect": False, "heartbeat_interval_s": 0, "ack_timeout_s": 10}
        opts.update(options)
        client = MicsClient(
            ClientOptions(
                url=self.gateway.ws_url,
                tenant_id=self.tenant,
                token=token_of(user),
                device_id=device,
                **opts,
            ),
            on_delivery=on_delivery,
            session=session,
        )
        self.clients.append(client)
        return client

    async def connect(self, user: str, device: str = "d1", **options: Any) -> MicsClient:
        client = self.client(user, device, **options)
        await client.connect()
        return client

    def inbox(self, user: str, device: str = "d1", **options: Any) -> Inbox:
        """A client of ``user`` whose SDK output is recorded (options as :meth:`client`)."""
        return Inbox(lambda u, d, **kw: self.client(u, d, **kw, **options), user, device)

    # -- metrics ---------------------------------------------------------------------

    def gw_metric(self, name: str, **labels: str) -> float:
        return self.gateway.gateway.metrics_registry.sample(name, labels)

    def be_metric(self, name: str, **labels: str) -> float:
        return self.backend.state.metrics.registry.sample(name, labels)

    def stored(self) -> float:
        """Rows the current backend instance stored (redeliveries not counted)."""
        return self.be_metric("offline_message_stored_total", tenant=self.tenant)

    # -- database --------------------------------------------------------------------

    async def repository(self) -> OfflineRepository:
        return await self.backend.state.store.repository()

    async def pending(self, user: str) -> int:
        """The user's undelivered (not yet acknowledged) rows."""
        return await (await self.repository()).count_pending(self.tenant, user)

    async def row_counts(self) -> dict[tuple[str, str, str], int]:
        """Rows per (recipient, sender, msg_id) of this tenant, straight from SQL."""
        repo = await self.repository()
        query = text(
            "SELECT user_id, from_user_id, message_id, count(*) FROM offline_messages "
            "WHERE tenant_id = :tenant GROUP BY user_id, from_user_id, message_id"
        )
        async with repo.engine.connect() as conn:
            result = await conn.execute(query, {"tenant": self.tenant})
            return {(r[0], r[1], r[2]): int(r[3]) for r in result}

    async def rows_delivered(self) -> dict[tuple[str, str, str], bool]:
        """The delivered flag per (recipient, sender, msg_id) of this tenant."""
        repo = await self.repository()
        query = text(
            "SELECT user_id, from_user_id, message_id, delivered FROM offline_messages "
            "WHERE tenant_id = :tenant"
        )
        async with repo.engine.connect() as conn:
            result = await conn.execute(query, {"tenant": self.tenant})
            return {(r[0], r[1], r[2]): bool(r[3]) for r in result}

    async def undelivered_total(self) -> int:
        repo = await self.repository()
        query = text(
            "SELECT count(*) FROM offline_messages WHERE tenant_id = :tenant AND NOT delivered"
        )
        async with repo.engine.connect() as conn:
            return int((await conn.execute(query, {"tenant": self.tenant})).scalar_one())

    async def wait_rows(self, count: int, within_s: float = 60.0) -> None:
        """Wait until the tenant has ``count`` stored rows (the database may be
        restarting: errors count as "not yet")."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        last: int | str = "nothing"
        while True:
            try:
                rows = await self.row_counts()
                last = sum(rows.values())
                if last == count:
                    return
            except Exception as exc:  # the pool reconnects after an outage
                last = f"{type(exc).__name__}"
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {within_s} s: {last} rows, want {count}")
            await asyncio.sleep(0.05)

    # -- Kafka -----------------------------------------------------------------------

    @property
    def consumer_group(self) -> str:
        return group_id_for(self.tenant)

    async def wait_producer_ready(self, within_s: float = 30.0) -> None:
        """Wait until the broker confirmed a CONNECT_ONLINE (connect someone first): the
        gateway's producer has its metadata. OFFLINE_MESSAGE events go through a second
        producer, which this does not warm; the stacks' 2 s OFFLINE_NOTIFY_WAIT_MS
        covers its first producer id."""
        await wait_until(
            lambda: (
                self.gw_metric(
                    "mics_mq_published_total",
                    tenant=self.tenant,
                    topic="event",
                    event_type="ConnectOnline",
                )
                >= 1
            ),
            within_s,
            "the gateway's first event on the broker",
        )

    async def consumer_lag(self) -> int:
        """Events on the tenant topic the backend's group has not committed yet."""

        def lag() -> int:
            consumer = Consumer(
                {"bootstrap.servers": self.broker.bootstrap, "group.id": self.consumer_group}
            )
            try:
                partitions = [TopicPartition(topic_for(self.tenant), p) for p in range(PARTITIONS)]
                committed = consumer.committed(partitions, timeout=10)
                total = 0
                for tp in committed:
                    low, high = consumer.get_watermark_offsets(tp, timeout=10)
                    total += high - (tp.offset if tp.offset >= 0 else low)
                return total
            finally:
                consumer.close()

        return await asyncio.to_thread(lag)

    async def pause_consumer(self) -> None:
        """Stop fetching (no rebalance: the consumers keep their partitions)."""
        await self.backend.consumers.pause()

    async def resume_consumer(self) -> None:
        """Fetch again from where the consumers paused."""
        await self.backend.consumers.resume()

    # -- backend restart -------------------------------------------------------------

    async def restart_backend(self, *, down_s: float = 0.0) -> BackendServer:
        """Stop the backend, wait ``down_s``, start a new BackendServer on the same port,
        config and database. Its consumer joins the same group and resumes from the
        committed offsets; its nudger points at the gateway again."""
        port = self.backend.port
        await self.backend.stop()
        if down_s:
            await asyncio.sleep(down_s)
        config = self.backend_config.model_copy(update={"port": port})
        backend = BackendServer(config, consumer_settings=dict(self.consumer_settings))
        for attempt in range(50):  # the old listening socket may linger for a moment
            try:
                await backend.start()
                break
            except OSError:
                if attempt == 49:
                    raise
                backend = BackendServer(config, consumer_settings=dict(self.consumer_settings))
                await asyncio.sleep(0.1)
        backend.state.nudger.set_gateway_urls([self.gateway.url])
        self.backend = backend
        self.backend_restarts += 1
        return backend

    # -- teardown --------------------------------------------------------------------

    async def stop(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        await self.gateway.stop()
        await self.backend.stop()


StackFactory = Callable[..., Awaitable[OfflineStack]]


def tenant_config(
    secret: str,
    users: Iterable[str],
    groups: dict[str, list[str]],
    **overrides: Any,
) -> TenantConfig:
    fields: dict[str, Any] = {
        "secret": secret,
        "sign_required": True,
        "heartbeat_timeout_seconds": 60,
        "offline_mode": "notify_pull",
        "users": {u: UserConfig(tokens=[token_of(u)]) for u in users},
        "groups": groups,
    }
    fields.update(overrides)
    return TenantConfig(**fields)


async def build_stack(
    broker: KafkaBroker,
    database: PostgresDatabase,
    *,
    users: Iterable[str] = DEFAULT_USERS,
    groups: dict[str, list[str]] | None = None,
    tenant_overrides: dict[str, Any] | None = None,
    consumer_settings: dict[str, Any] | None = None,
    **gateway_overrides: Any,
) -> OfflineStack:
    """Start backend, then gateway, then point the backend's nudger at the gateway."""
    tenant = unique_tenant()
    secret = f"secret-{tenant}"
    config = BackendConfig(
        host="127.0.0.1",
        port=0,
        database_url=database.async_url,
        kafka_bootstrap_servers=broker.bootstrap,
        kafka_consumer_options={"topic.metadata.refresh.interval.ms": 1000},
        tenants={
            tenant: tenant_config(
                secret,
                users,
                DEFAULT_GROUPS if groups is None else groups,
                **(tenant_overrides or {}),
            )
        },
    )
    topics = TopicSettings(partitions=PARTITIONS, replication_factor=1, retention_ms=3_600_000)
    # The topics exist before the consumer subscribes: it is assigned at once.
    await asyncio.to_thread(provision_topics, broker.bootstrap, [tenant], topics)
    consumer = {**FAST_CONSUMER, **(consumer_settings or {})}
    backend = BackendServer(config, consumer_settings=dict(consumer))
    await backend.start()
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "node_id": f"node-{tenant}",
        "tenant_auth_map": {tenant: backend.url},
        "tenant_hook_secrets": {tenant: secret},
        "hook_sign_required": True,
        # A loaded 2-core machine running Kafka and PostgreSQL too: generous hooks.
        "hook_timeout_ms": 2000,
        "heartbeat_sweep_interval_seconds": 0.5,
        "kafka_bootstrap_servers": broker.bootstrap,
        "kafka_provision_topics": True,
        "kafka_topic_partitions": PARTITIONS,
        "kafka_topic_replication_factor": 1,
        "kafka_retry_backoff_ms": 10,
        # The ack waits for the broker's confirmation; the production 200 ms is too
        # tight for a test machine, where a miss would turn user_offline into
        # offline_buffered. Tests of the fallback set their own.
        "offline_notify_wait_ms": 2000,
    }
    settings.update(gateway_overrides)
    gateway = GatewayServer(GatewaySettings(**settings))
    try:
        await gateway.start()
    except BaseException:
        await backend.stop()
        raise
    backend.state.nudger.set_gateway_urls([gateway.url])
    return OfflineStack(
        tenant=tenant,
        secret=secret,
        broker=broker,
        database=database,
        backend_config=config.model_copy(update={"port": backend.port}),
        consumer_settings=consumer,
        backend=backend,
        gateway=gateway,
    )


@contextlib.asynccontextmanager
async def offline_stacks(
    broker: KafkaBroker, database: PostgresDatabase
) -> AsyncIterator[StackFactory]:
    """A factory of stacks (``await factory(**options)``, options of :func:`build_stack`);
    every stack it built is stopped on exit, also when the test failed."""
    stacks: list[OfflineStack] = []

    async def factory(**options: Any) -> OfflineStack:
        stack = await build_stack(broker, database, **options)
        stacks.append(stack)
        return stack

    try:
        yield factory
    finally:
        for stack in stacks:
            await stack.stop()
        if not broker.running:  # a fault test failed before it restarted the broker
            await asyncio.to_thread(broker.start)
