"""The offline path end to end on real services: Kafka, PostgreSQL, backend, gateway, SDK.

offline-design.md sections 3, 4 and 8, protocol.md 9.2-9.5. Each test runs its own
production-shaped stack (:mod:`tests.e2e.offline_stack`): a message to an offline user
becomes an OFFLINE_MESSAGE event on the tenant's Kafka topic, the backend's consumer
stores it in PostgreSQL and nudges the gateway, and the user's next connect (or the
nudge) pulls it through the signed hooks; the SDK's receipts confirm it, and only then
is it marked delivered.

Every wait is for a condition; the deadlines only bound a failing test, except the one
the design states: a message stored while its recipient is online arrives within 2 s.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import pytest

from mics.client import MicsClient
from mics.gateway.session import Session
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.offline_stack import (
    Inbox,
    OfflineStack,
    StackFactory,
    key_of,
    offline_stacks,
)
from tests.support.kafka import KafkaBroker
from tests.support.postgres import PostgresDatabase, PostgresServer
from tests.support.waiting import wait_until

SENT = msg_pb.SENT


@pytest.fixture
async def make_stack(
    kafka_broker: KafkaBroker, postgres_db: PostgresDatabase
) -> AsyncIterator[StackFactory]:
    async with offline_stacks(kafka_broker, postgres_db) as factory:
        yield factory


# -- helpers -------------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    """Poll an async condition until it holds; fail after ``within_s`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def all_acknowledged(stack: OfflineStack, *users: str, within_s: float = 30) -> None:
    """Wait until the users' rows are all marked delivered (the SDK's receipts came
    back to the gateway, which committed the cursor through /ack-offline-messages)."""

    async def done() -> bool:
        return all([await stack.pending(u) == 0 for u in users])

    await eventually(done, within_s, f"every row of {users} acknowledged")


async def send_offline(
    sender: MicsClient, to: str, msg_ids: list[str], body: bytes = b"offline"
) -> None:
    for msg_id in msg_ids:
        ack = await sender.send_single(to, body + b" " + msg_id.encode(), msg_id=msg_id)
        assert (ack.status, ack.reason) == (SENT, "user_offline"), (msg_id, ack)


def sync_of(sync: msg_pb.OfflineSync) -> tuple[int, bool, str]:
    return sync.delivered, sync.complete, sync.reason


def assert_no_visible_duplicates(*inboxes: Inbox) -> None:
    for inbox in inboxes:
        repeated = [k for k, n in Counter(inbox.keys).items() if n > 1]
        assert not repeated, f"{inbox.user}/{inbox.device} was shown {repeated} twice"


def session_of(stack: OfflineStack, user: str, device: str = "d1") -> Session | None:
    """The gateway's session of the user's device (gray box: is it holding?)."""
    devices = stack.gateway.gateway.registry.devices(stack.tenant, user) or {}
    return next((s for s in devices.values() if s.device_id == device), None)


# -- offline, then reconnect -----------------------------------------------------------------


async def test_single_chat_to_an_offline_user_arrives_on_reconnect_once(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    alice = await stack.connect("u1")
    await stack.wait_producer_ready()
    ids = [f"single-{i:02d}" for i in range(20)]
    await send_offline(alice, "u2", ids)
    # The gateway keeps nothing: the messages are in Kafka, then in PostgreSQL.
    assert stack.gateway.gateway.buffer.pending(stack.tenant, "u2") == 0
    await stack.wait_rows(20)
    assert await stack.pending("u2") == 20

    bob = stack.inbox("u2")
    assert (await bob.connect()).protocol_version == "1.1"
    assert sync_of(await bob.client.next_offline_sync(timeout=15)) == (20, True, "")
    assert bob.msg_ids == ids, "the backlog arrives complete and in the order it was sent"
    assert all(m.user_id == "u1" and m.to_user_id == "u2" for m in bob.got)
    assert [m.msg_body for m in bob.got] == [b"offline " + i.encode() for i in ids]
    await all_acknowledged(stack, "u2")

    # Confirmed and committed: the next connection has no backlog.
    await bob.close()
    await bob.connect()
    assert sync_of(await bob.client.next_offline_sync(timeout=15)) == (0, True, "")
    assert bob.msg_ids == ids
    assert bob.client.stats.duplicate_deliveries == 0
    assert (await stack.row_counts()) == {("u2", "u1", i): 1 for i in ids}


async def test_group_message_reaches_each_offline_member_once(make_stack: StackFactory) -> None:
    stack = await make_stack()  # g1 = u1, u2, u3, u4
    alice = await stack.connect("u1")
    await stack.wait_producer_ready()
    ids = [f"group-{i}" for i in range(5)]
    for msg_id in ids:
        ack = await alice.send_group("g1", b"to everyone", msg_id=msg_id)
        assert ack.status == SENT
        assert (ack.offline_notified_users, ack.offline_buffered_users) == (3, 0)
        assert not ack.partial_delivery
    await stack.wait_rows(15)
    assert await stack.row_counts() == {(u, "u1", i): 1 for u in ("u2", "u3", "u4") for i in ids}

    members = [stack.inbox(u) for u in ("u2", "u3", "u4")]
    for member in members:
        await member.connect()
    for member in members:
        assert sync_of(await member.client.next_offline_sync(timeout=15)) == (5, True, "")
        assert member.msg_ids == ids
        assert all(m.group_id == "g1" and m.msg_type == msg_pb.GROUP_CHAT for m in member.got)
    assert_no_visible_duplicates(*members)
    await all_acknowledged(stack, "u2", "u3", "u4")


async def test_second_device_after_the_first_confirmed_gets_no_backlog(
    make_stack: StackFactory,
) -> None:
    """Documented behaviour: the offline backlog belongs to the user, not to a device.
    The first device that connects drains it; once its receipts confirmed the pages,
    the backend marks the user's rows delivered, so a device connecting afterwards gets
    an empty drain (OfflineSync 0, complete). Nothing is lost for the user: every
    message reached one of its devices, and messages sent while both are online reach
    both."""
    stack = await make_stack()
    alice = await stack.connect("u1")
    await stack.wait_producer_ready()
    ids = [f"dev-{i}" for i in range(10)]
    await send_offline(alice, "u2", ids)
    await stack.wait_rows(10)

    phone = stack.inbox("u2", "phone")
    await phone.connect()
    assert sync_of(await phone.client.next_offline_sync(timeout=15)) == (10, True, "")
    assert phone.msg_ids == ids
    await all_acknowledged(stack, "u2")

    laptop = stack.inbox("u2", "laptop")
    await laptop.connect()
    assert sync_of(await laptop.client.next_offline_sync(timeout=15)) == (0, True, "")
    assert laptop.got == []

    ack = await alice.send_single("u2", b"both online", msg_id="live-both")
    assert (ack.status, ack.reason) == (SENT, "")
    await wait_until(lambda: phone.has(["live-both"]) and laptop.has(["live-both"]), 10, "live")
    assert set(phone.msg_ids) | set(laptop.msg_ids) == {*ids, "live-both"}
    assert_no_visible_duplicates(phone, laptop)


async def test_two_devices_connecting_together_lose_nothing(make_stack: StackFactory) -> None:
    """Both devices drain before either confirmed: each may get the backlog (both pull
    from the start); the user loses nothing and neither SDK shows a message twice."""
    stack = await make_stack()
    alice = await stack.connect("u1")
    await stack.wait_producer_ready()
    ids = [f"pair-{i:03d}" for i in range(150)]
    await send_offline(alice, "u2", ids)
    await stack.wait_rows(150)

    phone, laptop = stack.inbox("u2", "phone"), stack.inbox("u2", "laptop")
    await asyncio.gather(phone.connect(), laptop.connect())
    for device in (phone, laptop):
        sync = await device.client.next_offline_sync(timeout=15)
        assert sync.complete, sync
    assert set(phone.msg_ids) | set(laptop.msg_ids) == set(ids)
    for device in (phone, laptop):  # what a device got, it got in order
        assert device.msg_ids == [i for i in ids if i in set(device.msg_ids)]
    assert_no_visible_duplicates(phone, laptop)
    await all_acknowledged(stack, "u2")


# -- disconnect in the middle of a drain -----------------------------------------------------


async def test_disconnect_mid_drain_then_reconnect_delivers_everything_once(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    alice = await stack.connect("u1")
    await stack.wait_producer_ready()
    total = 500
    ids = [f"mid-{i:03d}" for i in range(total)]
    body = b"x" * 16_384  # 8 MB of backlog: the drain cannot be in the socket buffers at once
    for msg_id in ids:
        ack = await alice.send_single("u2", body, msg_id=msg_id)
        assert (ack.status, ack.reason) == (SENT, "user_offline")
    await stack.wait_rows(total)

    bob = stack.inbox("u2")
    closing: list[asyncio.Task[None]] = []

    def close_at_150(_: msg_pb.MessageRequest) -> None:
        if len(bob.got) == 150 and not closing:
            closing.append(asyncio.get_running_loop().create_task(bob.close()))

    bob.on_message = close_at_150
    await bob.connect()
    await wait_until(lambda: bool(closing) and closing[0].done(), 30, "the first connection closed")
    first = len(bob.got)
    assert 150 <= first < total, f"closed after {first} deliveries: not in the middle of the drain"
    assert bob.client.stats.offline_syncs == 0, "the drain had not finished"
    assert await stack.pending("u2") > 0, "what the client never confirmed is not committed"

    bob.on_message = None
    await bob.connect()
    await wait_until(lambda: len(bob.got) >= total, 60, "the whole backlog")
    sync = await bob.client.next_offline_sync(timeout=15)
    assert sync.complete, sync
    assert set(bob.msg_ids) == set(ids)
    assert_no_visible_duplicates(bob)
    assert bob.msg_ids == ids, "across both connections, in order"
    await all_acknowledged(stack, "u2")
    print(
        f"mid-drain: first connection {first}/{total}, "
        f"duplicates dropped by the SDK {bob.client.stats.duplicate_deliveries}"
    )


# -- a message stored after the recipient already drained ------------------------------------


async def test_late_arrival_reaches_the_online_user_within_2_s_through_the_nudge(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    alice = await stack.connect("u1")
    await stack.wait_producer_ready()
    await stack.pause_consumer()
    await send_offline(alice, "u2", ["late-1"])  # in Kafka, not in the database

    bob = stack.inbox("u2")
    await bob.connect()
    assert sync_of(await bob.client.next_offline_sync(timeout=15)) == (0, True, "")
    assert bob.got == []
    assert await stack.row_counts() == {}

    await stack.resume_consumer()
    await wait_until(lambda: bob.has(["late-1"]), 2.0, "the late message within 2 s")
    assert bob.msg_ids == ["late-1"]
    assert (
        stack.gw_metric("mics_offline_drain_requests_total", tenant=stack.tenant, trigger="nudge")
        >= 1
    )
    assert stack.be_metric("offline_nudge_total", tenant=stack.tenant, result="ok") >= 1
    await all_acknowledged(stack, "u2")


# -- backlog before live ---------------------------------------------------------------------


async def test_live_messages_during_a_drain_arrive_after_the_backlog(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    alice = await stack.connect("u1")
    carol = await stack.connect("u3")
    await stack.wait_producer_ready()
    backlog = [f"old-{i:03d}" for i in range(600)]
    body = b"b" * 4096
    for msg_id in backlog:
        ack = await alice.send_single("u2", body, msg_id=msg_id)
        assert (ack.status, ack.reason) == (SENT, "user_offline")
    await stack.wait_rows(len(backlog))

    bob = stack.inbox("u2")
    await bob.connect()
    live: list[str] = []
    held = 0
    while bob.client.stats.offline_syncs == 0 and len(live) < 300:
        msg_id = f"live-{len(live):03d}"
        ack = await carol.send_single("u2", b"live", msg_id=msg_id)
        assert (ack.status, ack.reason) == (SENT, ""), ack
        session = session_of(stack, "u2")
        held += bool(session is not None and session.holding)
        live.append(msg_id)
    assert held >= 1, "no live message arrived while the backlog was draining"

    await wait_until(lambda: len(bob.got) >= len(backlog) + len(live), 30, "everything")
    assert bob.msg_ids == backlog + live, "the backlog first, in order, then the live ones"
    assert_no_visible_duplicates(bob)
    print(f"backlog {len(backlog)}, live during the drain {held} of {len(live)}")


# -- the broker is down ----------------------------------------------------------------------


async def test_broker_down_falls_back_to_the_gateway_buffer(
    make_stack: StackFactory, kafka_broker: KafkaBroker
) -> None:
    stack = await make_stack(offline_notify_wait_ms=300)
    alice = await stack.connect("u1")
    await stack.wait_producer_ready()
    await asyncio.to_thread(kafka_broker.stop)
    try:
        ack = await alice.send_single("u2", b"kafka is down", msg_id="kdown-1")
        assert (ack.status, ack.reason) == (SENT, "offline_buffered")
        group = await alice.send_group("g1", b"kafka is down, group", msg_id="kdown-g")
        assert group.status == SENT
        assert (group.offline_notified_users, group.offline_buffered_users) == (0, 3)

        bob, dave = stack.inbox("u2"), stack.inbox("u4")
        await bob.connect()
        await dave.connect()
        await wait_until(lambda: bob.has(["kdown-1", "kdown-g"]), 15, "bob's buffered messages")
        await wait_until(lambda: dave.has(["kdown-g"]), 15, "dave's buffered message")
        assert bob.msg_ids == ["kdown-1", "kdown-g"]
        assert dave.msg_ids == ["kdown-g"]
    finally:
        await asyncio.to_thread(kafka_broker.start)

    # The events waited in the gateway's queue; once the broker is back they are stored
    # and the online recipients are nudged. The re-pull finds what the buffer already
    # delivered: the connection does not push it again and commits it.
    expected = {("u2", "u1", "kdown-1"), ("u2", "u1", "kdown-g"), ("u3", "u1", "kdown-g")}
    expected.add(("u4", "u1", "kdown-g"))
    await stack.wait_rows(len(expected), 90)
    assert set(await stack.row_counts()) == expected
    await all_acknowledged(stack, "u2", "u4", within_s=30)
    assert bob.msg_ids == ["kdown-1", "kdown-g"]
    assert dave.msg_ids == ["kdown-g"]
    carol = stack.inbox("u3")  # buffered by the gateway and stored by the backend
    await carol.connect()
    await wait_until(lambda: carol.has(["kdown-g"]), 15, "carol's message")
    await carol.client.next_offline_sync(timeout=15)
    assert carol.msg_ids == ["kdown-g"]
    assert_no_visible_duplicates(bob, carol, dave)


# -- the database is down --------------------------------------------------------------------


async def test_database_down_then_back_every_message_exactly_once(
    make_stack: StackFactory, postgres_server: PostgresServer
) -> None:
    stack = await make_stack()
    alice = await stack.connect("u1")
    await stack.wait_producer_ready()
    [consumer] = stack.backend.consumers.consumers
    postgres_server.kill()
    try:
        expected: dict[str, list[str]] = {"u2": [], "u3": [], "u4": []}
        for i in range(40):
            to = ("u2", "u3")[i % 2]
            msg_id = f"dbdown-{i:02d}"
            await send_offline(alice, to, [msg_id])
            expected[to].append(msg_id)
        for i in range(5):
            msg_id = f"dbdown-g{i}"
            ack = await alice.send_group("g1", b"group while the database is down", msg_id=msg_id)
            assert (ack.status, ack.offline_notified_users) == (SENT, 3)
            for member in ("u2", "u3", "u4"):
                expected[member].append(msg_id)
        failed = consumer.batches_failed
        await wait_until(
            lambda: consumer.batches_failed >= failed + 2, 30, "the consumer failing to store"
        )
        assert stack.be_metric("offline_message_store_failed_total", tenant=stack.tenant) > 0
    finally:
        postgres_server.start()

    rows = sum(len(v) for v in expected.values())
    await stack.wait_rows(rows, 60)
    counts = await stack.row_counts()
    assert counts == {(u, "u1", i): 1 for u, ids in expected.items() for i in ids}

    inboxes = [stack.inbox(u) for u in expected]
    for inbox in inboxes:
        await inbox.connect()
    for inbox in inboxes:
        sync = await inbox.client.next_offline_sync(timeout=15)
        assert sync_of(sync) == (len(expected[inbox.user]), True, "")
        assert inbox.msg_ids == expected[inbox.user]
        assert len({key_of(m) for m in inbox.got}) == len(inbox.got)
    await all_acknowledged(stack, *expected)
    assert await stack.row_counts() == counts, "nothing stored twice afterwards either"


# -- messages acked SENT must survive a disconnect -------------------------------------------


async def hold_one_live_message(stack: OfflineStack, sender: MicsClient, msg_id: str) -> None:
    """Leave a live message for u2 held behind a drain of a connection that then ends.

    A transaction locks the offline table, so the backend's /get-offline-messages (and
    with it u2's connect drain) waits for as long as we like.
    """
    locker = await asyncpg.connect(stack.database.dsn)
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE offline_messages IN ACCESS EXCLUSIVE MODE")
        first = stack.inbox("u2", "d1")
        await first.connect()
        ack = await sender.send_single("u2", b"live while draining", msg_id=msg_id)
        assert (ack.status, ack.reason) == (SENT, ""), "handed to the connection"
        held = session_of(stack, "u2")
        assert held is not None
        assert held.holding, "held behind the drain"
        await first.close()
        await lock.rollback()
    finally:
        await locker.close()
    assert first.got == []


async def test_live_message_held_behind_a_drain_survives_the_disconnect(
    make_stack: StackFactory,
) -> None:
    """A live message for a user whose backlog is draining is held (protocol.md 9.4)
    and acked SENT to its sender. If the connection ends before the drain does, the
    held message must still reach the user, not vanish with the session.

    Found against 80f4356 (the held frames were dropped with the session); fixed in
    b8e2e82, which keeps them in the gateway's buffer for the next connection.
    """
    stack = await make_stack()
    carol = await stack.connect("u3")
    await stack.wait_producer_ready()
    await stack.wait_rows(0)  # the schema exists
    await hold_one_live_message(stack, carol, "held-1")

    bob = stack.inbox("u2", "d1")
    await bob.connect()
    assert sync_of(await bob.client.next_offline_sync(timeout=15)) == (1, True, "")
    assert bob.msg_ids == ["held-1"]


async def test_buffered_live_message_survives_a_connection_that_dies_before_confirming(
    make_stack: StackFactory,
) -> None:
    """The held message of the test above waits in the gateway's buffer. The next
    connection gets it written to its socket, then dies before the app processed it (no
    receipt). The connection after that must get it again: nothing confirmed it.
    Receipts exist for exactly this (offline-design.md 8.1).

    Found against b8e2e82 (frames left the buffer when written, not when confirmed);
    fixed by the per-connection ledger of unconfirmed deliveries (mics.gateway.unconfirmed),
    handed back to the offline path when the connection ends."""
    stack = await make_stack()
    carol = await stack.connect("u3")
    await stack.wait_producer_ready()
    await stack.wait_rows(0)
    await hold_one_live_message(stack, carol, "held-2")
    assert stack.gateway.gateway.buffer.pending(stack.tenant, "u2") == 1

    url = (
        f"{stack.gateway.ws_url}?tenantId={stack.tenant}&token=u2-token"
        "&deviceId=d1&protocolVersion=1.1"
    )
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        frames: list[msg_pb.ServerFrame] = []
        async with asyncio.timeout(15):
            while not any(f.WhichOneof("payload") == "delivery" for f in frames):
                msg = await ws.receive()
                assert msg.type is aiohttp.WSMsgType.BINARY, msg
                frames.append(msg_pb.ServerFrame.FromString(msg.data))
        # The frame reached the device; the app dies before it processed (and receipted) it.
    bob = stack.inbox("u2", "d1")
    await bob.connect()
    await bob.client.next_offline_sync(timeout=15)
    await wait_until(lambda: bob.has(["held-2"]), 10, "the unconfirmed message again")


async def test_live_messages_in_flight_when_the_client_closes_are_not_lost(
    make_stack: StackFactory,
) -> None:
    """Every live message acked SENT was written to the recipient's socket before the
    gateway read the client's close frame (afterwards it goes to the offline path). The
    SDK stops reading when it closes and confirms only what it processed; the gateway
    hands the unconfirmed rest back to the offline path, so the next connection gets it.

    Found against b8e2e82 (what the closing client never read was lost); fixed with the
    test above."""
    stack = await make_stack()
    carol = await stack.connect("u3")
    await stack.wait_producer_ready()
    bob = stack.inbox("u2")
    await bob.connect()
    assert sync_of(await bob.client.next_offline_sync(timeout=15)) == (0, True, "")

    closing: list[asyncio.Task[None]] = []

    def close_on_first(_: msg_pb.MessageRequest) -> None:
        if not closing:
            closing.append(asyncio.get_running_loop().create_task(bob.close()))

    bob.on_message = close_on_first
    body = b"f" * 262_144
    ids = [f"flight-{i:02d}" for i in range(20)]
    acks = await asyncio.gather(*(carol.send_single("u2", body, msg_id=i) for i in ids))
    assert all(a.status == SENT for a in acks)
    assert any(a.reason == "" for a in acks), "some were written to bob's socket"
    await wait_until(lambda: bool(closing) and closing[0].done(), 15, "bob closed")
    bob.on_message = None
    await bob.connect()
    await bob.client.next_offline_sync(timeout=15)
    await wait_until(lambda: bob.has(ids), 10, "every message acked SENT")


async def test_buffered_message_is_not_committed_before_the_client_confirms_it(
    make_stack: StackFactory, kafka_broker: KafkaBroker
) -> None:
    """offline-design.md 8.1: rows may be considered delivered only once the client
    confirmed the delivery. A message buffered by the gateway while the broker was down
    reaches Kafka later; the recipient, online by then, is nudged and re-pulls it. Its
    connection already pushed the buffered copy, so the gateway does not push it again;
    it must not commit the row before the client confirmed that copy: a client that
    never processed it (it crashed, the socket died) would lose the message for good.

    Found against 80f4356 (the row was committed at once, without a receipt); fixed in
    b8e2e82."""
    stack = await make_stack(offline_notify_wait_ms=300)
    alice = await stack.connect("u1")
    await stack.wait_producer_ready()
    await asyncio.to_thread(kafka_broker.stop)
    try:
        ack = await alice.send_single("u2", b"buffered", msg_id="buf-1")
        assert (ack.status, ack.reason) == (SENT, "offline_buffered")
        # A device that gets the buffered copy but never processes or confirms it.
        crashed = stack.inbox("u2", send_receipts=False)
        await crashed.connect()
        await wait_until(lambda: crashed.has(["buf-1"]), 15, "the buffered copy pushed")
    finally:
        await asyncio.to_thread(kafka_broker.start)
    await stack.wait_rows(1, 90)  # the event reached Kafka after all, and was stored

    drainer = stack.gateway.gateway.drainer
    await wait_until(
        lambda: stack.gw_metric("mics_offline_pull_duplicates_total", tenant=stack.tenant) >= 1,
        30,
        "the nudged re-pull finding the buffered message",
    )
    await wait_until(lambda: not drainer._tasks, 10, "the re-pull and its commit")
    assert await stack.pending("u2") == 1, "marked delivered without a receipt"
    await crashed.close()
    bob = stack.inbox("u2", "d2")
    await bob.connect()
    await bob.client.next_offline_sync(timeout=15)
    await wait_until(lambda: bob.has(["buf-1"]), 10, "the message on the next device")
