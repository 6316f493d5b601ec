"""MICS client SDK against an in-test fake gateway (aiohttp.web, real sockets)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mics.client import (
    TERMINAL_CLOSE_CODES,
    AckTimeout,
    Backoff,
    ClientOptions,
    ConnectError,
    ConnectionLost,
    ConnectRejected,
    MicsClient,
    NotConnected,
    State,
    backoff_delay,
)
from mics.protocol.codec import (
    CLOSE_AUTH_FAILED,
    CLOSE_DRAINING,
    CLOSE_INVALID_TENANT,
    CLOSE_RATE_LIMITED,
    CLOSE_REPLACED,
)
from mics.protocol.pb import mics_message_pb2 as msg_pb

WAIT_S = 5.0


async def eventually(predicate: Callable[[], bool], within_s: float = WAIT_S) -> None:
    """Wait until a condition holds, failing the test (TimeoutError) if it does not in time.

    Conditions span the fake gateway and the client's counters, which have no common
    notification, so this polls; nothing asserts on elapsed time.
    """
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.002)


# --------------------------------------------------------------------------- fake gateway


class FakeConn:
    def __init__(self, request: web.Request, ws: web.WebSocketResponse, index: int) -> None:
        self.request = request
        self.ws = ws
        self.query = dict(request.query)
        self.raw: list[bytes] = []
        self.frames: list[msg_pb.ClientFrame] = []
        self.closed = False
        self.index = index

    def payloads(self, kind: str) -> list[Any]:
        return [getattr(f, kind) for f in self.frames if f.WhichOneof("payload") == kind]

    @property
    def messages(self) -> list[msg_pb.MessageRequest]:
        return self.payloads("message")

    @property
    def receipts(self) -> list[msg_pb.DeliveryAck]:
        return self.payloads("delivery_ack")

    @property
    def receipt_ids(self) -> list[str]:
        return [i for r in self.receipts for i in r.msg_ids]

    async def send(self, frame: msg_pb.ServerFrame) -> None:
        await self.ws.send_bytes(frame.SerializeToString())

    async def ack(
        self, msg_id: str, status: msg_pb.AckStatus = msg_pb.SENT, reason: str = ""
    ) -> None:
        ack = msg_pb.MessageAck(msg_id=msg_id, status=status, reason=reason, timestamp_ms=1)
        await self.send(msg_pb.ServerFrame(ack=ack))

    async def deliver(self, sender: str, msg_id: str, body: bytes = b"x", cursor: str = "") -> None:
        message = msg_pb.MessageRequest(
            tenant_id="t1", user_id=sender, device_id="dx", msg_id=msg_id, msg_body=body
        )
        delivery = msg_pb.MessageDelivery(message=message, offline_cursor=cursor)
        await self.send(msg_pb.ServerFrame(delivery=delivery))

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code=code, message=reason.encode())

    def abort(self) -> None:
        transport = self.request.transport
        assert transport is not None
        transport.abort()


class FakeGateway:
    """Accepts /ws, records frames, answers pings and (optionally) acks every message."""

    def __init__(self) -> None:
        self.conns: list[FakeConn] = []
        self.rejections: list[tuple[int, str]] = []  # one popped per accepted upgrade
        self.http_refusals: list[int] = []  # one popped per request, before the upgrade
        self.auto_ack = True
        self.answer_pings = True
        self.pong_ms = 1_700_000_000_000
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"ws://127.0.0.1:{port}/ws"

    async def stop(self) -> None:
        for conn in self.conns:
            if not conn.ws.closed:
                conn.abort()
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def last(self) -> FakeConn:
        return self.conns[-1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.http_refusals:
            return web.Response(status=self.http_refusals.pop(0))
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        conn = FakeConn(request, ws, len(self.conns))
        self.conns.append(conn)
        try:
            if self.rejections:
                code, reason = self.rejections.pop(0)
                await conn.close(code, reason)
                return ws
            query = request.query
            ack = msg_pb.ConnectAck(
                code=1000,
                tenant_id=query.get("tenantId", ""),
                user_id="u-" + query.get("token", ""),
                device_id=query.get("deviceId", ""),
                node_id="n1",
                trace_id=f"tr{conn.index}",
                protocol_version="1.1" if query.get("protocolVersion") == "1.1" else "",
            )
            await conn.send(msg_pb.ServerFrame(connect_ack=ack))
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    continue
                conn.raw.append(msg.data)
                frame = msg_pb.ClientFrame()
                try:
                    frame.ParseFromString(msg.data)
                except Exception:
                    continue
                conn.frames.append(frame)
                kind = frame.WhichOneof("payload")
                if kind == "heartbeat_ping" and self.answer_pings:
                    self.pong_ms += 1
                    pong = msg_pb.HeartbeatPong(timestamp_ms=self.pong_ms)
                    await conn.send(msg_pb.ServerFrame(heartbeat_pong=pong))
                elif kind == "message" and self.auto_ack:
                    await conn.ack(frame.message.msg_id)
            return ws
        finally:
            conn.closed = True


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    gw = FakeGateway()
    await gw.start()
    yield gw
    await gw.stop()


ClientFactory = Callable[..., MicsClient]


@pytest.fixture
async def make_client(gateway: FakeGateway) -> AsyncIterator[ClientFactory]:
    created: list[MicsClient] = []

    def make(
        *,
        rng: Callable[[], float] | None = None,
        on_state: Callable[[State], None] | None = None,
        session: aiohttp.ClientSession | None = None,
        on_delivery: Callable[[msg_pb.MessageRequest], None] | None = None,
        **overrides: Any,
    ) -> MicsClient:
        settings: dict[str, Any] = {
            "url": gateway.url,
            "tenant_id": "t1",
            "token": "tok",
            "device_id": "d1",
            "heartbeat_interval_s": 0,
            "ack_timeout_s": WAIT_S,
            "backoff_initial_s": 0.005,
            "backoff_max_s": 0.02,
            "connect_timeout_s": WAIT_S,
            "receipt_interval_s": 0.01,
            "close_timeout_s": 1.0,
        }
        settings.update(overrides)
        client = MicsClient(
            ClientOptions(**settings),
            rng=rng,
            on_state=on_state,
            session=session,
            on_delivery=on_delivery,
        )
        created.append(client)
        return client

    yield make
    for client in created:
        await client.close()


async def _pending_send(client: MicsClient, gw: FakeGateway, msg_id: str) -> asyncio.Task[Any]:
    """Start a send whose ack the (auto_ack=False) gateway withholds; wait until it arrived."""
    task = asyncio.create_task(client.send_single("u2", b"hi", msg_id=msg_id))
    await eventually(lambda: any(m.msg_id == msg_id for m in gw.last.messages))
    return task


# --------------------------------------------------------------------------- connect


async def test_connect_ok_sends_encoded_query_params(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    states: list[State] = []
    token = "a+b/c=d&e f%?#é"
    client = make_client(token=token, device_id="dev 1", on_state=states.append)
    ack = await client.connect()

    assert ack.code == 1000
    assert ack.user_id == "u-" + token
    assert ack.device_id == "dev 1"
    assert ack.protocol_version == "1.1"
    assert client.connect_ack == ack
    assert client.state == "open"
    assert states == ["connecting", "open"]
    assert gateway.last.query == {
        "tenantId": "t1",
        "token": token,
        "deviceId": "dev 1",
        "protocolVersion": "1.1",
    }
    raw_query = gateway.last.request.rel_url.raw_query_string
    assert "+" not in raw_query  # spaces and plus signs are percent-encoded
    assert "%20" in raw_query
    assert "%2B" in raw_query


async def test_v1_connect_omits_protocol_version(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    client = make_client(protocol_version=None)
    ack = await client.connect()
    assert ack.protocol_version == ""
    assert "protocolVersion" not in gateway.last.query


def test_ws_url_keeps_existing_query() -> None:
    opts = ClientOptions(
        url="ws://h:1/ws?x=1", tenant_id="t|1", token="k", device_id="", protocol_version=None
    )
    assert str(opts.ws_url()) == "ws://h:1/ws?x=1&tenantId=t%7C1&token=k&deviceId="


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (CLOSE_AUTH_FAILED, "bad token"),
        (CLOSE_INVALID_TENANT, "invalid tenant"),
        (CLOSE_RATE_LIMITED, "duplicate device"),
        (CLOSE_REPLACED, "replaced"),
    ],
)
async def test_connect_rejected_raises_and_does_not_reconnect(
    gateway: FakeGateway, make_client: ClientFactory, code: int, reason: str
) -> None:
    gateway.rejections.append((code, reason))
    client = make_client()
    with pytest.raises(ConnectRejected) as info:
        await client.connect()
    assert info.value.code == code
    assert info.value.reason == reason
    assert info.value.terminal is (code in TERMINAL_CLOSE_CODES)
    assert client.state == "closed"
    assert (client.close_code, client.close_reason) == (code, reason)
    await client.wait_closed(timeout=0)  # already closed: nothing is left running
    assert client.stats.reconnect_attempts == 0
    assert len(gateway.conns) == 1


async def test_connect_http_refusal_and_unreachable(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    gateway.http_refusals.append(503)
    client = make_client()
    with pytest.raises(ConnectError) as info:
        await client.connect()
    assert info.value.status == 503
    assert client.state == "closed"

    # The client can connect again once the gateway accepts.
    ack = await client.connect()
    assert ack.code == 1000

    unreachable = make_client(url="ws://127.0.0.1:1/ws")
    with pytest.raises(ConnectError):
        await unreachable.connect()


# --------------------------------------------------------------------------- send / ack


async def test_send_ack_matching_out_of_order(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    gateway.auto_ack = False
    client = make_client()
    await client.connect()

    single = asyncio.create_task(client.send_single("u2", b"one", msg_id="m1"))
    group = asyncio.create_task(client.send_group("g1", b"two", msg_id="m2"))
    generated = asyncio.create_task(client.send_single("u3", b"three"))
    await eventually(lambda: len(gateway.last.messages) == 3)
    sent = {m.msg_id: m for m in gateway.last.messages}
    assert sent["m1"].msg_type == msg_pb.SINGLE_CHAT
    assert (sent["m1"].to_user_id, sent["m1"].msg_body) == ("u2", b"one")
    assert sent["m2"].msg_type == msg_pb.GROUP_CHAT
    assert (sent["m2"].group_id, sent["m2"].msg_body) == ("g1", b"two")
    assert all(m.timestamp_ms > 0 for m in sent.values())
    (gen_id,) = set(sent) - {"m1", "m2"}
    assert len(gen_id) == 32
    int(gen_id, 16)

    # Acks in reverse order, plus one nobody waits for.
    await gateway.last.ack("unknown")
    await gateway.last.ack(gen_id, msg_pb.FAILED, "delivery failed")
    await gateway.last.ack("m2", msg_pb.SENT, "offline_buffered")
    await gateway.last.ack("m1", msg_pb.SENT, "")

    ack1, ack2, ack3 = await asyncio.gather(single, group, generated)
    assert (ack1.msg_id, ack1.status, ack1.reason) == ("m1", msg_pb.SENT, "")
    assert (ack2.msg_id, ack2.reason) == ("m2", "offline_buffered")
    assert (ack3.msg_id, ack3.status, ack3.reason) == (gen_id, msg_pb.FAILED, "delivery failed")
    assert client.pending_acks == 0
    assert client.stats.unmatched_acks == 1


async def test_same_msg_id_twice_resolves_in_send_order(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    gateway.auto_ack = False
    client = make_client()
    await client.connect()
    first = await _pending_send(client, gateway, "dup")
    second = asyncio.create_task(client.send_single("u2", b"hi", msg_id="dup"))
    await eventually(lambda: len(gateway.last.messages) == 2)
    await gateway.last.ack("dup", msg_pb.SENT, "")
    await gateway.last.ack("dup", msg_pb.SENT, "duplicate")
    assert (await first).reason == ""
    assert (await second).reason == "duplicate"


async def test_ack_timeout(gateway: FakeGateway, make_client: ClientFactory) -> None:
    gateway.auto_ack = False
    client = make_client(ack_timeout_s=0.05)
    await client.connect()
    with pytest.raises(AckTimeout) as info:
        await client.send_single("u2", b"hi", msg_id="slow")
    assert info.value.msg_id == "slow"
    assert isinstance(info.value, TimeoutError)
    assert client.pending_acks == 0

    # A late ack is ignored and counted; the connection stays usable.
    await gateway.last.ack("slow")
    await eventually(lambda: client.stats.unmatched_acks == 1)
    gateway.auto_ack = True
    ack = await client.send_single("u2", b"hi", msg_id="fast")
    assert ack.msg_id == "fast"


async def test_connection_lost_fails_pending_acks(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    gateway.auto_ack = False
    client = make_client(reconnect=False)
    await client.connect()
    pending = await _pending_send(client, gateway, "m1")

    await gateway.last.close(CLOSE_DRAINING, "server draining")
    with pytest.raises(ConnectionLost) as info:
        await pending
    assert (info.value.code, info.value.reason) == (CLOSE_DRAINING, "server draining")
    await client.wait_closed(timeout=WAIT_S)
    assert (client.close_code, client.close_reason) == (CLOSE_DRAINING, "server draining")
    with pytest.raises(NotConnected):
        await client.send_single("u2", b"hi")


async def test_network_drop_fails_pending_acks(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    gateway.auto_ack = False
    client = make_client(reconnect=False)
    await client.connect()
    pending = await _pending_send(client, gateway, "m1")
    gateway.last.abort()
    with pytest.raises(ConnectionLost) as info:
        await pending
    assert info.value.code == 1006
    await client.wait_closed(timeout=WAIT_S)


async def test_close_fails_pending_and_is_idempotent(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    gateway.auto_ack = False
    states: list[State] = []
    client = make_client(on_state=states.append)
    await client.connect()
    pending = await _pending_send(client, gateway, "m1")
    await client.close()
    with pytest.raises(ConnectionLost):
        await pending
    await client.close()
    assert client.state == "closed"
    assert states == ["connecting", "open", "closed"]
    assert client.close_code == 1000
    await eventually(lambda: gateway.last.closed)


async def test_send_raw_error_frame_and_offline_sync(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    client = make_client()
    await client.connect()
    await client.send_raw(b"\xff\xff")
    await eventually(lambda: gateway.last.raw == [b"\xff\xff"])

    conn = gateway.last
    await conn.send(
        msg_pb.ServerFrame(error=msg_pb.ServerError(code=4400, message="invalid protobuf"))
    )
    sync = msg_pb.OfflineSync(delivered=3, complete=False, reason="limit reached")
    await conn.send(msg_pb.ServerFrame(offline_sync=sync))
    error = await client.next_error(timeout=WAIT_S)
    assert (error.code, error.message) == (4400, "invalid protobuf")
    got = await client.next_offline_sync(timeout=WAIT_S)
    assert (got.delivered, got.complete, got.reason) == (3, False, "limit reached")


# --------------------------------------------------------------------------- deliveries / receipts


async def test_deliveries_dedup_and_receipts_list_every_copy(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    client = make_client()
    await client.connect()
    conn = gateway.last
    await conn.deliver("u2", "m1", b"a")
    await conn.deliver("u2", "m1", b"a")  # duplicate: dropped but receipted
    await conn.deliver("u3", "m1", b"b")  # another sender may reuse the id
    await conn.deliver("u2", "m2", b"c", cursor="c1")

    got = [await client.next_delivery(timeout=WAIT_S) for _ in range(3)]
    assert [(m.user_id, m.msg_id, m.msg_body) for m in got] == [
        ("u2", "m1", b"a"),
        ("u3", "m1", b"b"),
        ("u2", "m2", b"c"),
    ]
    assert client.stats.deliveries == 3
    assert client.stats.duplicate_deliveries == 1
    assert client.last_offline_cursor == "c1"

    await eventually(lambda: len(conn.receipt_ids) == 4)
    assert sorted(conn.receipt_ids) == ["m1", "m1", "m1", "m2"]
    cursors = [r.offline_cursor for r in conn.receipts if r.offline_cursor]
    assert cursors == ["c1"]
    assert "m2" in next(r.msg_ids for r in conn.receipts if r.offline_cursor)


async def test_dedup_memory_is_bounded(gateway: FakeGateway, make_client: ClientFactory) -> None:
    client = make_client(dedup_capacity=2, send_receipts=False)
    await client.connect()
    conn = gateway.last
    for msg_id in ("a", "b", "c", "a"):  # "a" was evicted by "c", so it is new again
        await conn.deliver("u2", msg_id)
    got = [(await client.next_delivery(timeout=WAIT_S)).msg_id for _ in range(4)]
    assert got == ["a", "b", "c", "a"]


async def test_on_delivery_callback_replaces_queue(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    seen: list[str] = []
    client = make_client(on_delivery=lambda m: seen.append(m.msg_id))
    await client.connect()
    for msg_id in ("m1", "m1", "m2"):
        await gateway.last.deliver("u2", msg_id)
    await eventually(lambda: len(gateway.last.receipt_ids) == 3)
    assert seen == ["m1", "m2"]
    with pytest.raises(TimeoutError):
        await client.next_delivery(timeout=0)  # nothing was queued


async def test_receipts_batched_and_flushed_on_close(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    client = make_client(receipt_interval_s=60)  # nothing flushes before close()
    await client.connect()
    conn = gateway.last
    ids = [f"m{i}" for i in range(20)]
    for i, msg_id in enumerate(ids):
        await conn.deliver("u2", msg_id, cursor="p1" if i == 9 else "p2" if i == 19 else "")
    for _ in ids:
        await client.next_delivery(timeout=WAIT_S)
    assert conn.receipts == []

    await client.close()
    await eventually(lambda: conn.closed)
    assert len(conn.receipts) == 1
    assert list(conn.receipts[0].msg_ids) == ids
    assert conn.receipts[0].offline_cursor == "p2"
    assert client.stats.receipt_frames == 1
    assert client.stats.receipt_ids == 20


async def test_no_receipts_without_v11(gateway: FakeGateway, make_client: ClientFactory) -> None:
    client = make_client(protocol_version=None)
    await client.connect()
    conn = gateway.last
    await conn.deliver("u2", "m1", cursor="c1")
    await client.next_delivery(timeout=WAIT_S)
    await client.close()
    await eventually(lambda: conn.closed)
    assert conn.receipts == []


async def test_deliveries_iterator_ends_when_closed(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    client = make_client()
    await client.connect()
    await gateway.last.deliver("u2", "m1")
    await gateway.last.close(CLOSE_REPLACED, "replaced")
    got = [m.msg_id async for m in client.deliveries()]
    assert got == ["m1"]
    with pytest.raises(NotConnected):
        await client.next_delivery(timeout=WAIT_S)


# --------------------------------------------------------------------------- heartbeats


async def test_heartbeats_sent_and_pongs_recorded(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    client = make_client(heartbeat_interval_s=0.01)
    await client.connect()
    await eventually(lambda: client.stats.pongs >= 3)
    pings = gateway.last.payloads("heartbeat_ping")
    assert len(pings) >= 3
    assert all(p.timestamp_ms > 0 for p in pings)
    assert client.last_pong_ms is not None
    assert client.last_pong_ms > 1_700_000_000_000
    assert client.last_pong_at is not None


async def test_heartbeats_disabled(gateway: FakeGateway, make_client: ClientFactory) -> None:
    client = make_client(heartbeat_interval_s=0)
    await client.connect()
    await client.send_single("u2", b"x")  # a round trip on the same connection
    await client.close()
    await eventually(lambda: gateway.last.closed)
    assert gateway.last.payloads("heartbeat_ping") == []


async def test_missing_pongs_drop_and_reconnect(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    gateway.answer_pings = False
    client = make_client(heartbeat_interval_s=0.01, pong_timeout_s=0.05)
    await client.connect()
    await eventually(lambda: len(gateway.conns) >= 2)
    assert (client.close_code, client.close_reason) == (1006, "pong timeout")


# --------------------------------------------------------------------------- reconnect


async def test_reconnect_after_server_drop(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    gateway.auto_ack = False
    draws: list[float] = []

    def rng() -> float:
        draws.append(0.5)
        return 0.5

    states: list[State] = []
    client = make_client(rng=rng, on_state=states.append)
    await client.connect()
    pending = await _pending_send(client, gateway, "m1")

    await gateway.last.close(CLOSE_DRAINING, "server draining")
    with pytest.raises(ConnectionLost) as info:
        await pending
    assert info.value.code == CLOSE_DRAINING
    await eventually(lambda: len(gateway.conns) == 2 and client.state == "open")
    ack = await client.wait_open(timeout=WAIT_S)
    assert ack.trace_id == "tr1"
    assert client.connect_ack is ack
    assert states == ["connecting", "open", "reconnecting", "open"]
    assert draws == [0.5]
    assert client.stats.connects == 2
    assert client.close_code == CLOSE_DRAINING  # how the previous connection ended

    # The caller resends with the same msg_id on the new connection.
    gateway.auto_ack = True
    resent = await client.send_single("u2", b"hi", msg_id="m1")
    assert resent.msg_id == "m1"
    assert [m.msg_id for m in gateway.last.messages] == ["m1"]


async def test_reconnect_retries_refusals_and_network_drops(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    client = make_client()
    await client.connect()
    gateway.http_refusals.append(503)
    gateway.rejections.append((CLOSE_RATE_LIMITED, "rate limited"))
    gateway.last.abort()
    await eventually(lambda: client.state == "open" and len(gateway.conns) == 3)
    assert client.stats.reconnect_attempts == 3
    assert (client.close_code, client.close_reason) == (CLOSE_RATE_LIMITED, "rate limited")
    assert (await client.send_single("u2", b"x")).status == msg_pb.SENT


async def test_no_reconnect_after_replaced(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    client = make_client()
    await client.connect()
    await gateway.last.close(CLOSE_REPLACED, "replaced")
    await client.wait_closed(timeout=WAIT_S)
    assert (client.close_code, client.close_reason) == (CLOSE_REPLACED, "replaced")
    assert client.stats.reconnect_attempts == 0
    assert len(gateway.conns) == 1
    with pytest.raises(NotConnected):
        await client.wait_open(timeout=WAIT_S)


async def test_reconnect_stops_on_terminal_rejection(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    client = make_client()
    await client.connect()
    gateway.rejections.append((CLOSE_AUTH_FAILED, "token expired"))
    await gateway.last.close(CLOSE_DRAINING, "server draining")
    await client.wait_closed(timeout=WAIT_S)
    assert (client.close_code, client.close_reason) == (CLOSE_AUTH_FAILED, "token expired")
    assert client.stats.reconnect_attempts == 1
    assert len(gateway.conns) == 2


async def test_close_while_reconnecting(gateway: FakeGateway, make_client: ClientFactory) -> None:
    client = make_client(backoff_initial_s=60, backoff_max_s=60)
    await client.connect()
    await gateway.last.close(CLOSE_DRAINING, "server draining")
    await eventually(lambda: client.state == "reconnecting")
    await client.close()
    assert client.state == "closed"
    assert len(gateway.conns) == 1


async def test_shared_session_is_not_closed(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = [make_client(session=session, device_id=f"d{i}") for i in range(3)]
        acks = await asyncio.gather(*(c.connect() for c in clients))
        assert sorted(a.device_id for a in acks) == ["d0", "d1", "d2"]
        for c in clients:
            await c.close()
        assert not session.closed


async def test_closed_shared_session_ends_client(
    gateway: FakeGateway, make_client: ClientFactory
) -> None:
    session = aiohttp.ClientSession()
    client = make_client(session=session)
    await client.connect()
    await session.close()  # the owner closed it: reconnects cannot work, the client ends
    await client.wait_closed(timeout=WAIT_S)
    assert client.state == "closed"


# --------------------------------------------------------------------------- backoff


def test_backoff_delay_bounds() -> None:
    for attempt in range(30):
        cap = min(10.0, 0.2 * 2**attempt)
        assert backoff_delay(attempt, 0.2, 10.0, lambda: 0.0) == 0.0
        top = backoff_delay(attempt, 0.2, 10.0, lambda: 0.999999)
        assert 0.0 <= top < cap
        assert top == pytest.approx(cap, rel=1e-5)
    assert backoff_delay(10_000, 0.2, 10.0, lambda: 0.5) == 5.0  # no overflow, capped
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1, 0.2, 10.0)


def test_backoff_full_jitter_is_seeded_and_resets() -> None:
    a = Backoff(0.2, 10.0, random.Random(7).random)
    b = Backoff(0.2, 10.0, random.Random(7).random)
    seq_a = [a.next() for _ in range(12)]
    assert seq_a == [b.next() for _ in range(12)]
    for attempt, delay in enumerate(seq_a):
        assert 0.0 <= delay < min(10.0, 0.2 * 2**attempt)
    assert len(set(seq_a)) == len(seq_a)  # jittered, not a fixed ladder
    assert a.attempt == 12
    a.reset()
    assert a.attempt == 0
    assert a.next() < 0.2


def test_options_validation() -> None:
    with pytest.raises(ValueError, match="ack_timeout_s"):
        ClientOptions(url="ws://h/ws", tenant_id="t", token="k", device_id="d", ack_timeout_s=-1)
