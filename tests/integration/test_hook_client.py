"""HookClient against a real aiohttp server on a free local port."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from aiohttp import web
from google.protobuf.message import Message

from mics.hooks.client import HOOK_PATHS, HookClient, HookOp, HookOutcome, HookResult
from mics.hooks.policy import HookDefaults, HookPolicy
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.signing import verify_hook_request
from tests.support.process import free_port

TENANT = "t1"
SECRET = "s3cret"
COND_TIMEOUT_S = 5.0

BASE_POLICY = HookPolicy(
    max_concurrency=8,
    queue_timeout_ms=10,
    breaker_failure_threshold=5,
    breaker_open_ms=5000,
    sign_required=False,
    timeout_ms=2000,
)


def policy(**changes: object) -> HookPolicy:
    return dataclasses.replace(BASE_POLICY, **changes)  # type: ignore[arg-type]


@dataclass
class Received:
    path: str
    content_type: str
    headers: dict[str, str]
    body: bytes


Behavior = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HookServer:
    """A controllable hook backend: records every request, replies per ``behavior``."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.release = asyncio.Event()  # unblocks hanging handlers (set at teardown)
        self._changed = asyncio.Event()
        self.behavior: Behavior = self.reply(hook_pb.CheckMessageResponse(allow=True))
        self.runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Received(request.path, request.content_type, dict(request.headers), body)
        )
        self._changed.set()
        return await self.behavior(request)

    async def wait_requests(self, n: int) -> None:
        async with asyncio.timeout(COND_TIMEOUT_S):
            while len(self.requests) < n:
                self._changed.clear()
                await self._changed.wait()

    @staticmethod
    def reply(message: Message, status: int = 200) -> Behavior:
        async def behavior(_: web.Request) -> web.StreamResponse:
            return web.Response(
                status=status, body=message.SerializeToString(), content_type="application/x"
            )

        return behavior

    @staticmethod
    def status(code: int, headers: dict[str, str] | None = None) -> Behavior:
        async def behavior(_: web.Request) -> web.StreamResponse:
            return web.Response(status=code, text="nope", headers=headers)

        return behavior

    @staticmethod
    def raw(body: bytes) -> Behavior:
        async def behavior(_: web.Request) -> web.StreamResponse:
            return web.Response(status=200, body=body)

        return behavior

    def hang(self) -> Behavior:
        async def behavior(_: web.Request) -> web.StreamResponse:
            await self.release.wait()
            return web.Response(body=hook_pb.CheckMessageResponse(allow=True).SerializeToString())

        return behavior


@pytest.fixture
async def server() -> AsyncIterator[HookServer]:
    srv = HookServer()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
def metrics() -> MetricsRegistry:
    return MetricsRegistry()


@pytest.fixture
async def client(metrics: MetricsRegistry) -> AsyncIterator[HookClient]:
    hc = HookClient(metrics, HookDefaults())
    await hc.start()
    try:
        yield hc
    finally:
        await hc.close()


async def check(
    client: HookClient,
    server: HookServer,
    pol: HookPolicy = BASE_POLICY,
    *,
    secret: str = SECRET,
    tenant: str = TENANT,
    base_url: str | None = None,
    trace_id: str = "",
) -> HookOutcome[hook_pb.CheckMessageResponse]:
    request = hook_pb.CheckMessageRequest()
    request.message.msg_id = "m1"
    return await client.call(
        tenant_id=tenant,
        op=HookOp.CHECK_MESSAGE,
        base_url=server.base_url if base_url is None else base_url,
        request=request,
        response_type=hook_pb.CheckMessageResponse,
        secret=secret,
        policy=pol,
        trace_id=trace_id,
    )


def requests_total(
    metrics: MetricsRegistry, result: str, op: str = "CheckMessage", tenant: str = TENANT
) -> float:
    return metrics.sample(
        "mics_hook_requests_total", {"tenant": tenant, "op": op, "result": result}
    )


async def wait_breaker(client: HookClient, state: str, op: HookOp = HookOp.CHECK_MESSAGE) -> None:
    async with asyncio.timeout(COND_TIMEOUT_S):
        # The open -> half_open transition is driven by time alone, so there is no
        # event to wait on: poll the condition.
        while client.breaker_state(TENANT, op) != state:  # noqa: ASYNC110
            await asyncio.sleep(0.005)


def test_paths_and_labels() -> None:
    assert {op.value for op in HookOp} == {
        "Auth",
        "CheckMessage",
        "GetGroupMembers",
        "GetOfflineMessages",
        "AckOfflineMessages",
    }
    assert HOOK_PATHS == {
        HookOp.AUTH: "/auth",
        HookOp.CHECK_MESSAGE: "/check-message",
        HookOp.GET_GROUP_MEMBERS: "/get-group-members",
        HookOp.GET_OFFLINE_MESSAGES: "/get-offline-messages",
        HookOp.ACK_OFFLINE_MESSAGES: "/ack-offline-messages",
    }


async def test_ok_signed_request(
    client: HookClient, server: HookServer, metrics: MetricsRegistry
) -> None:
    server.behavior = server.reply(hook_pb.CheckMessageResponse(allow=False, reason="spam"))
    before_ms = time.time_ns() // 1_000_000
    outcome = await check(client, server, base_url=server.base_url + "/", trace_id="tr-1")
    after_ms = time.time_ns() // 1_000_000

    assert outcome.ok
    assert outcome.result is HookResult.OK
    assert outcome.http_status == 200
    assert outcome.duration_ms > 0
    assert outcome.response is not None
    assert outcome.response.reason == "spam"
    assert not outcome.response.allow

    assert len(server.requests) == 1
    got = server.requests[0]
    assert got.path == "/check-message"
    assert got.content_type == "application/protobuf"
    assert "Cookie" not in got.headers
    sent = hook_pb.CheckMessageRequest.FromString(got.body)
    assert verify_hook_request(sent, SECRET)
    assert not verify_hook_request(sent, "other-secret")
    assert sent.meta.tenant_id == TENANT
    assert re.fullmatch(r"[0-9a-f]{32}", sent.meta.request_id)
    assert before_ms <= sent.meta.timestamp_ms <= after_ms
    assert sent.meta.trace_id == "tr-1"
    assert sent.message.msg_id == "m1"

    labels = {"tenant": TENANT, "op": "CheckMessage"}
    assert requests_total(metrics, "ok") == 1
    assert metrics.sample("mics_hook_duration_ms_count", labels) == 1
    total = metrics.sample("mics_hook_duration_ms_total", labels)
    assert total > 0
    assert total == pytest.approx(metrics.sample("mics_hook_duration_ms_sum", labels))
    assert total == pytest.approx(outcome.duration_ms)


async def test_each_call_gets_fresh_request_id(client: HookClient, server: HookServer) -> None:
    for _ in range(3):
        assert (await check(client, server)).ok
    ids = {hook_pb.CheckMessageRequest.FromString(r.body).meta.request_id for r in server.requests}
    assert len(ids) == 3


async def test_no_secret_sends_unsigned(client: HookClient, server: HookServer) -> None:
    outcome = await check(client, server, secret="")
    assert outcome.ok
    sent = hook_pb.CheckMessageRequest.FromString(server.requests[0].body)
    assert sent.meta.sign == ""


async def test_other_ops_use_their_paths(client: HookClient, server: HookServer) -> None:
    server.behavior = server.reply(hook_pb.GetGroupMembersResponse(user_ids=["a", "b"]))
    outcome = await client.call(
        tenant_id=TENANT,
        op=HookOp.GET_GROUP_MEMBERS,
        base_url=server.base_url,
        request=hook_pb.GetGroupMembersRequest(group_id="g1"),
        response_type=hook_pb.GetGroupMembersResponse,
        secret=SECRET,
        policy=BASE_POLICY,
    )
    assert outcome.response is not None
    assert list(outcome.response.user_ids) == ["a", "b"]
    assert server.requests[0].path == "/get-group-members"
    sent = hook_pb.GetGroupMembersRequest.FromString(server.requests[0].body)
    assert sent.group_id == "g1"
    assert verify_hook_request(sent, SECRET)


@pytest.mark.parametrize(
    ("code", "result"),
    [
        (400, HookResult.HTTP_4XX),
        (404, HookResult.HTTP_4XX),
        (500, HookResult.HTTP_5XX),
        (503, HookResult.HTTP_5XX),
        (302, HookResult.HTTP_OTHER),
    ],
)
async def test_http_errors(
    client: HookClient,
    server: HookServer,
    metrics: MetricsRegistry,
    code: int,
    result: HookResult,
) -> None:
    # A redirect is reported, never followed.
    server.behavior = server.status(code, headers={"Location": "/auth"} if code == 302 else None)
    outcome = await check(client, server)
    assert outcome.result is result
    assert outcome.http_status == code
    assert outcome.response is None
    assert not outcome.ok
    assert len(server.requests) == 1
    assert requests_total(metrics, result.value) == 1
    assert requests_total(metrics, "ok") == 0
    labels = {"tenant": TENANT, "op": "CheckMessage"}
    assert metrics.sample("mics_hook_duration_ms_count", labels) == 1


async def test_garbage_body_is_decode_error(
    client: HookClient, server: HookServer, metrics: MetricsRegistry
) -> None:
    server.behavior = server.raw(b"\x0f\xff\xff")  # field 1 with invalid wire type 7
    outcome = await check(client, server)
    assert outcome.result is HookResult.DECODE_ERROR
    assert outcome.http_status == 200
    assert outcome.response is None
    assert requests_total(metrics, "decode_error") == 1


async def test_empty_2xx_body_is_ok(client: HookClient, server: HookServer) -> None:
    server.behavior = server.raw(b"")
    outcome = await check(client, server)
    assert outcome.ok
    assert outcome.response == hook_pb.CheckMessageResponse()


async def test_slow_hook_times_out(
    client: HookClient, server: HookServer, metrics: MetricsRegistry
) -> None:
    server.behavior = server.hang()
    outcome = await check(client, server, policy(timeout_ms=50))
    assert outcome.result is HookResult.TIMEOUT
    assert outcome.response is None
    assert outcome.duration_ms >= 50
    assert len(server.requests) == 1
    assert requests_total(metrics, "timeout") == 1


async def test_connection_refused_is_network_error(
    client: HookClient, server: HookServer, metrics: MetricsRegistry
) -> None:
    outcome = await check(client, server, base_url=f"http://127.0.0.1:{free_port()}")
    assert outcome.result is HookResult.NETWORK_ERROR
    assert outcome.http_status == 0
    assert requests_total(metrics, "network_error") == 1


@pytest.mark.parametrize("base_url", ["", "not a url", "ftp://example.invalid"])
async def test_bad_base_url_is_network_error_not_exception(
    client: HookClient, server: HookServer, base_url: str
) -> None:
    outcome = await check(client, server, base_url=base_url)
    assert outcome.result is HookResult.NETWORK_ERROR


async def test_breaker_opens_and_probe_recovers(
    client: HookClient, server: HookServer, metrics: MetricsRegistry
) -> None:
    pol = policy(breaker_failure_threshold=2, breaker_open_ms=50)
    server.behavior = server.status(500)
    assert (await check(client, server, pol)).result is HookResult.HTTP_5XX
    assert client.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "closed"
    assert (await check(client, server, pol)).result is HookResult.HTTP_5XX
    assert client.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "open"

    outcome = await check(client, server, pol)
    assert outcome.result is HookResult.CIRCUIT_OPEN
    assert len(server.requests) == 2  # no HTTP call while open
    assert requests_total(metrics, "circuit_open") == 1

    server.behavior = server.reply(hook_pb.CheckMessageResponse(allow=True))
    await wait_breaker(client, "half_open")
    assert (await check(client, server, pol)).ok
    assert client.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "closed"
    assert len(server.requests) == 3


async def test_failed_probe_reopens(client: HookClient, server: HookServer) -> None:
    pol = policy(breaker_failure_threshold=1, breaker_open_ms=50)
    server.behavior = server.status(500)
    await check(client, server, pol)
    await wait_breaker(client, "half_open")
    assert (await check(client, server, pol)).result is HookResult.HTTP_5XX
    assert client.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "open"
    assert (await check(client, server, pol)).result is HookResult.CIRCUIT_OPEN
    assert len(server.requests) == 2


async def test_half_open_lets_one_probe_through(client: HookClient, server: HookServer) -> None:
    pol = policy(breaker_failure_threshold=1, breaker_open_ms=50)
    server.behavior = server.status(500)
    await check(client, server, pol)
    await wait_breaker(client, "half_open")

    server.behavior = server.hang()
    probe = asyncio.create_task(check(client, server, pol))
    await server.wait_requests(2)
    assert (await check(client, server, pol)).result is HookResult.CIRCUIT_OPEN
    server.release.set()
    assert (await probe).ok
    assert client.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "closed"


async def test_cancelled_probe_is_released(client: HookClient, server: HookServer) -> None:
    pol = policy(breaker_failure_threshold=1, breaker_open_ms=50)
    server.behavior = server.status(500)
    await check(client, server, pol)
    await wait_breaker(client, "half_open")

    server.behavior = server.hang()
    probe = asyncio.create_task(check(client, server, pol))
    await server.wait_requests(2)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    # The probe slot is free again: the next call probes instead of being rejected.
    server.behavior = server.reply(hook_pb.CheckMessageResponse(allow=True))
    assert (await check(client, server, pol)).ok
    assert client.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "closed"


async def test_breakers_are_per_tenant_and_op(client: HookClient, server: HookServer) -> None:
    pol = policy(breaker_failure_threshold=1)
    server.behavior = server.status(500)
    await check(client, server, pol)
    assert (await check(client, server, pol)).result is HookResult.CIRCUIT_OPEN

    server.behavior = server.reply(hook_pb.CheckMessageResponse(allow=True))
    assert (await check(client, server, pol, tenant="t2")).ok
    server.behavior = server.reply(hook_pb.GetGroupMembersResponse(user_ids=["u"]))
    outcome = await client.call(
        tenant_id=TENANT,
        op=HookOp.GET_GROUP_MEMBERS,
        base_url=server.base_url,
        request=hook_pb.GetGroupMembersRequest(group_id="g"),
        response_type=hook_pb.GetGroupMembersResponse,
        secret=SECRET,
        policy=pol,
    )
    assert outcome.ok


async def test_queue_rejected_when_slot_busy(
    client: HookClient, server: HookServer, metrics: MetricsRegistry
) -> None:
    pol = policy(max_concurrency=1, queue_timeout_ms=10, breaker_failure_threshold=1)
    server.behavior = server.hang()
    stuck = asyncio.create_task(check(client, server, pol))
    await server.wait_requests(1)

    outcome = await check(client, server, pol)
    assert outcome.result is HookResult.QUEUE_REJECTED
    assert outcome.duration_ms == 0
    assert len(server.requests) == 1
    assert requests_total(metrics, "queue_rejected") == 1
    assert (
        metrics.sample(
            "mics_hook_limiter_rejected_total",
            {"tenant": TENANT, "op": "CheckMessage", "reason": "queue_timeout"},
        )
        == 1
    )
    # Not a breaker failure (threshold 1 would have opened it).
    assert client.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "closed"

    server.release.set()
    assert (await stuck).ok
    assert (await check(client, server, pol)).ok  # the slot came back


async def test_zero_queue_timeout_rejects_immediately(
    client: HookClient, server: HookServer
) -> None:
    pol = policy(max_concurrency=1, queue_timeout_ms=0)
    server.behavior = server.hang()
    stuck = asyncio.create_task(check(client, server, pol))
    await server.wait_requests(1)
    assert (await check(client, server, pol)).result is HookResult.QUEUE_REJECTED
    server.release.set()
    assert (await stuck).ok


async def test_queued_call_proceeds_when_slot_frees(client: HookClient, server: HookServer) -> None:
    pol = policy(max_concurrency=1, queue_timeout_ms=5000)
    server.behavior = server.hang()
    first = asyncio.create_task(check(client, server, pol))
    await server.wait_requests(1)
    second = asyncio.create_task(check(client, server, pol))
    await asyncio.sleep(0)
    assert len(server.requests) == 1
    server.release.set()
    assert (await first).ok
    assert (await second).ok
    assert len(server.requests) == 2


async def test_policy_for_resizes_limiter(metrics: MetricsRegistry, server: HookServer) -> None:
    hc = HookClient(metrics, HookDefaults(max_concurrency=1, queue_timeout_ms=0, timeout_ms=5000))
    await hc.start()
    try:
        pol1 = hc.policy_for(TENANT, None)
        assert pol1.max_concurrency == 1
        server.behavior = server.hang()
        first = asyncio.create_task(check(hc, server, pol1))
        await server.wait_requests(1)
        assert (await check(hc, server, pol1)).result is HookResult.QUEUE_REJECTED

        assert hc.policy_for(TENANT, hook_pb.TenantRuntimeConfig()) is pol1
        pol2 = hc.policy_for(TENANT, hook_pb.TenantRuntimeConfig(hook_max_concurrency=2))
        assert pol2.max_concurrency == 2
        second = asyncio.create_task(check(hc, server, pol2))
        await server.wait_requests(2)
        server.release.set()
        assert (await first).ok
        assert (await second).ok
    finally:
        await hc.close()


async def test_sign_required_without_secret_makes_no_call(
    client: HookClient, server: HookServer, metrics: MetricsRegistry
) -> None:
    pol = policy(sign_required=True, breaker_failure_threshold=2)
    outcome = await check(client, server, pol, secret="")
    assert outcome.result is HookResult.SIGN_REQUIRED
    assert outcome.response is None
    assert requests_total(metrics, "sign_required") == 1
    # It is a breaker failure.
    await check(client, server, pol, secret="")
    assert client.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "open"
    assert server.requests == []
    labels = {"tenant": TENANT, "op": "CheckMessage"}
    assert metrics.sample("mics_hook_duration_ms_count", labels) == 0


async def test_sign_required_with_secret_calls(client: HookClient, server: HookServer) -> None:
    assert (await check(client, server, policy(sign_required=True))).ok
    sent = hook_pb.CheckMessageRequest.FromString(server.requests[0].body)
    assert verify_hook_request(sent, SECRET)


async def test_cancel_in_flight_counts_canceled(
    client: HookClient, server: HookServer, metrics: MetricsRegistry
) -> None:
    pol = policy(max_concurrency=1, breaker_failure_threshold=1)
    server.behavior = server.hang()
    task = asyncio.create_task(check(client, server, pol))
    await server.wait_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert requests_total(metrics, "canceled") == 1
    assert (
        metrics.sample("mics_hook_duration_ms_count", {"tenant": TENANT, "op": "CheckMessage"}) == 0
    )
    assert client.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "closed"
    # The slot was released: with concurrency 1 the next call still goes through.
    server.behavior = server.reply(hook_pb.CheckMessageResponse(allow=True))
    assert (await check(client, server, pol)).ok


async def test_cancel_while_queued_counts_canceled(
    client: HookClient, server: HookServer, metrics: MetricsRegistry
) -> None:
    pol = policy(max_concurrency=1, queue_timeout_ms=5000)
    server.behavior = server.hang()
    first = asyncio.create_task(check(client, server, pol))
    await server.wait_requests(1)
    queued = asyncio.create_task(check(client, server, pol))
    await asyncio.sleep(0)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert requests_total(metrics, "canceled") == 1
    server.release.set()
    assert (await first).ok
    assert (await check(client, server, pol)).ok
    assert len(server.requests) == 2


async def test_failures_are_logged_ok_is_not(
    client: HookClient, server: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mics.hooks")
    assert (await check(client, server)).ok
    assert [r for r in caplog.records if r.name == "mics.hooks"] == []

    server.behavior = server.status(503)
    await check(client, server, policy(breaker_failure_threshold=100))
    await check(client, server, policy(breaker_failure_threshold=100))
    records = [r for r in caplog.records if r.name == "mics.hooks"]
    # Throttled: one warning per (tenant, hook) per second.
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert records[0].__dict__["op"] == "CheckMessage"
    assert records[0].__dict__["result"] == "http_5xx"
    assert records[0].__dict__["http_status"] == 503


async def test_breaker_opening_is_always_logged(
    client: HookClient, server: HookServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mics.hooks")
    server.behavior = server.status(500)
    pol = policy(breaker_failure_threshold=2)
    await check(client, server, pol)
    await check(client, server, pol)
    records = [r for r in caplog.records if r.name == "mics.hooks"]
    assert len(records) == 2
    assert records[1].__dict__["breaker"] == "open"


async def test_metrics_exposition_has_both_duration_families(
    client: HookClient, server: HookServer, metrics: MetricsRegistry
) -> None:
    assert (await check(client, server)).ok
    text = metrics.render().decode()
    assert "# TYPE mics_hook_duration_ms_total counter" in text
    assert "# TYPE mics_hook_duration_ms histogram" in text
    assert 'mics_hook_requests_total{op="CheckMessage",result="ok",tenant="t1"} 1.0' in text
    assert text.count("# TYPE mics_hook_duration_ms_created") <= 1


async def test_call_before_start_raises(metrics: MetricsRegistry) -> None:
    hc = HookClient(metrics, HookDefaults())
    with pytest.raises(RuntimeError, match="start"):
        await hc.call(
            tenant_id=TENANT,
            op=HookOp.AUTH,
            base_url="http://127.0.0.1:1",
            request=hook_pb.AuthRequest(),
            response_type=hook_pb.AuthResponse,
            secret="",
            policy=BASE_POLICY,
        )
