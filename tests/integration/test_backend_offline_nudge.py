"""Offline-available nudges (protocol.md 9.5) against a small fake gateway over HTTP that
verifies every signature, as the real endpoint does."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from mics.backend import BackendConfig, BackendServer, demo_config
from mics.backend.nudge import Nudger
from mics.backend.state import BackendMetrics
from mics.events.bus import topic_for
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import sign_event, verify_hook_request
from tests.support.waiting import wait_until

SECRET = "dev-secret-demo"
TOPIC = topic_for("demo")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Received:
    tenant_id: str
    user_id: str
    request_id: str
    timestamp_ms: int


class FakeGateway:
    """POST /v1/offline-available: verifies the signature, records, answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[Received] = []
        self.rejected = 0
        self.in_flight = 0
        self.hold: asyncio.Event | None = None
        self.on_request: Callable[[Received], Awaitable[None]] | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/offline-available", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        req = hook_pb.OfflineAvailableRequest()
        req.ParseFromString(await request.read())
        if request.content_type != "application/protobuf" or not verify_hook_request(req, SECRET):
            self.rejected += 1
            return self._answer(401, ok=False, reason="invalid sign")
        got = Received(req.meta.tenant_id, req.user_id, req.meta.request_id, req.meta.timestamp_ms)
        self.received.append(got)
        self.in_flight += 1
        try:
            if self.on_request is not None:
                await self.on_request(got)
            if self.hold is not None:
                await self.hold.wait()
        finally:
            self.in_flight -= 1
        ok = self.status < 300
        return self._answer(self.status, ok=ok, reason="" if ok else "nope", connections=1)

    @staticmethod
    def _answer(status: int, *, ok: bool, reason: str = "", connections: int = 0) -> web.Response:
        resp = hook_pb.OfflineAvailableResponse(ok=ok, reason=reason, connections=connections)
        return web.Response(
            status=status, body=resp.SerializeToString(), content_type="application/protobuf"
        )


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    fake = FakeGateway()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def gateway2() -> AsyncIterator[FakeGateway]:
    fake = FakeGateway()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def metrics() -> BackendMetrics:
    return BackendMetrics()


def nudger(metrics: BackendMetrics, urls: list[str], **kw: float) -> Nudger:
    return Nudger(urls, lambda t: SECRET if t == "demo" else None, metrics, **kw)  # type: ignore[arg-type]


def count(metrics: BackendMetrics, result: str, tenant: str = "demo") -> float:
    return metrics.registry.sample("offline_nudge_total", {"tenant": tenant, "result": result})


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def event_bytes(mid: str, to: str) -> bytes:
    req = msg_pb.MessageRequest(
        tenant_id="demo", user_id="alice", device_id="d1", msg_id=mid, to_user_id=to, msg_body=b"x"
    )
    event = hook_pb.MqEvent(
        tenant_id="demo",
        event_type=hook_pb.OFFLINE_MESSAGE,
        msg_id=mid,
        user_id="alice",
        device_id="d1",
        to_user_id=to,
        event_data=req.SerializeToString(),
        timestamp=now_ms(),
    )
    sign_event(event, SECRET)
    return event.SerializeToString()


def config(tmp_path: Path, urls: list[str]) -> BackendConfig:
    base = demo_config()
    return base.model_copy(
        update={
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'offline.db'}",
            "gateway_urls": urls,
        }
    )


# -- end to end from the backend ---------------------------------------------------------


async def test_stored_message_nudges_the_gateway_after_commit(
    tmp_path: Path, gateway: FakeGateway
) -> None:
    async with BackendServer(config(tmp_path, [gateway.url + "/"])) as server:
        visible: list[int] = []

        async def check_stored(got: Received) -> None:
            repo = await server.state.store.repository()
            visible.append(await repo.count_pending(got.tenant_id, got.user_id))

        gateway.on_request = check_stored
        await server.event_subscriber(TOPIC, b"bob", event_bytes("m1", "bob"))
        await wait_until(lambda: len(visible) == 1, what="nudge")
        [got] = gateway.received
        assert (got.tenant_id, got.user_id) == ("demo", "bob")
        assert abs(got.timestamp_ms - now_ms()) < 5000
        assert visible == [1]  # the row was committed before the nudge was sent
        await wait_until(lambda: count(server.state.metrics, "ok") == 1, what="ok counted")
        # A redelivered event stores nothing new: no nudge.
        await server.event_subscriber(TOPIC, b"bob", event_bytes("m1", "bob"))
        assert await server.state.nudger.wait_idle(5)
        assert len(gateway.received) == 1
        # One batch for three users: one nudge each.
        await server.state.ingestor.ingest(
            [(TOPIC, event_bytes(f"x{u}", u)) for u in ("bob", "carol", "carol", "alice")]
        )
        assert await server.state.nudger.wait_idle(5)
        assert sorted(g.user_id for g in gateway.received[1:]) == ["alice", "bob", "carol"]
        assert gateway.rejected == 0


async def test_storing_never_waits_for_the_gateway(tmp_path: Path, gateway: FakeGateway) -> None:
    gateway.hold = asyncio.Event()  # the gateway never answers
    async with BackendServer(config(tmp_path, [gateway.url])) as server:
        for i in range(5):
            await server.event_subscriber(TOPIC, b"u", event_bytes(f"m{i}", f"user{i}"))
        repo = await server.state.store.repository()
        assert all([await repo.count_pending("demo", f"user{i}") == 1 for i in range(5)])
        await wait_until(lambda: gateway.in_flight == 5, what="hanging nudges")
        gateway.hold.set()


# -- the nudger's policies ---------------------------------------------------------------


async def test_notifications_within_the_debounce_window_coalesce(
    metrics: BackendMetrics, gateway: FakeGateway
) -> None:
    n = nudger(metrics, [gateway.url], debounce_s=0.05)
    for _ in range(10):
        n.notify("demo", "bob")
    n.notify("demo", "carol")
    assert n.pending == 2
    assert await n.wait_idle(5)
    assert sorted(g.user_id for g in gateway.received) == ["bob", "carol"]
    await n.close()


async def test_one_call_in_flight_plus_one_queued(
    metrics: BackendMetrics, gateway: FakeGateway
) -> None:
    gateway.hold = asyncio.Event()
    n = nudger(metrics, [gateway.url], debounce_s=0)
    n.notify("demo", "bob")
    await wait_until(lambda: gateway.in_flight == 1, what="first call in flight")
    for _ in range(5):
        n.notify("demo", "bob")
    assert gateway.in_flight == 1  # never two at once for one user
    gateway.hold.set()
    assert await n.wait_idle(5)
    assert [g.user_id for g in gateway.received] == ["bob", "bob"]
    assert len({g.request_id for g in gateway.received}) == 2  # fresh request each time
    assert count(metrics, "ok") == 2
    await n.close()


async def test_5xx_is_retried_once_on_the_next_node(
    metrics: BackendMetrics, gateway: FakeGateway, gateway2: FakeGateway
) -> None:
    gateway.status = 503
    n = nudger(metrics, [gateway.url, gateway2.url], debounce_s=0)
    n.notify("demo", "bob")
    assert await n.wait_idle(5)
    assert (len(gateway.received), len(gateway2.received)) == (1, 1)
    assert gateway.received[0].request_id != gateway2.received[0].request_id
    assert (count(metrics, "retried"), count(metrics, "ok")) == (1, 1)
    await n.close()


async def test_gives_up_after_the_retry(
    metrics: BackendMetrics, gateway: FakeGateway, gateway2: FakeGateway
) -> None:
    gateway.status = gateway2.status = 500
    n = nudger(metrics, [gateway.url, gateway2.url], debounce_s=0)
    n.notify("demo", "bob")
    assert await n.wait_idle(5)
    assert len(gateway.received) + len(gateway2.received) == 2
    assert count(metrics, "failed") == 1
    await n.close()


async def test_network_error_is_retried(metrics: BackendMetrics, gateway: FakeGateway) -> None:
    n = nudger(metrics, [closed_port_url(), gateway.url], debounce_s=0)
    n.notify("demo", "bob")
    assert await n.wait_idle(5)
    assert [g.user_id for g in gateway.received] == ["bob"]
    assert (count(metrics, "retried"), count(metrics, "ok")) == (1, 1)
    await n.close()


async def test_4xx_is_not_retried(
    metrics: BackendMetrics, gateway: FakeGateway, gateway2: FakeGateway
) -> None:
    gateway.status = gateway2.status = 400
    n = nudger(metrics, [gateway.url, gateway2.url], debounce_s=0)
    n.notify("demo", "bob")
    assert await n.wait_idle(5)
    assert len(gateway.received) + len(gateway2.received) == 1
    assert count(metrics, "rejected") == 1
    await n.close()


async def test_bounded_pending_and_unknown_tenants(
    metrics: BackendMetrics, gateway: FakeGateway
) -> None:
    gateway.hold = asyncio.Event()
    n = nudger(metrics, [gateway.url], debounce_s=0, max_pending=2)
    n.notify("demo", "a")
    n.notify("demo", "b")
    n.notify("demo", "c")  # over the bound: dropped, counted
    n.notify("nobody", "x")  # no secret: nothing to sign with
    assert count(metrics, "dropped") == 1
    gateway.hold.set()
    assert await n.wait_idle(5)
    assert sorted(g.user_id for g in gateway.received) == ["a", "b"]
    await n.close()


async def test_no_gateway_urls_means_no_nudges(metrics: BackendMetrics) -> None:
    n = nudger(metrics, [])
    assert not n.enabled
    n.notify("demo", "bob")
    assert n.pending == 0
    await n.close()


async def test_close_cancels_what_does_not_finish(
    metrics: BackendMetrics, gateway: FakeGateway
) -> None:
    gateway.hold = asyncio.Event()
    n = nudger(metrics, [gateway.url], debounce_s=0)
    n.notify("demo", "bob")
    await wait_until(lambda: gateway.in_flight == 1, what="call in flight")
    await n.close(timeout_s=0.05)
    assert n.pending == 0
    n.notify("demo", "bob")  # closed: ignored
    assert n.pending == 0
