"""Connection sequence, close codes and takeover over real sockets (protocol.md 2.2, 2.3)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from mics.client import ConnectRejected
from mics.protocol import codec
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.conftest import TENANT, Stack, StackFactory, tenant_config


async def test_connect_ack_is_first_frame_with_session_identity(stack: Stack) -> None:
    client = stack.client("u1", "phone")
    ack = await client.connect()
    assert ack.code == 1000
    assert (ack.tenant_id, ack.user_id, ack.device_id) == (TENANT, "u1", "phone")
    assert ack.node_id == "node-test"
    assert len(ack.trace_id) == 32
    assert ack.protocol_version == "1.1"


async def test_v1_client_gets_no_protocol_version(stack: Stack) -> None:
    client = await stack.connect("u1", protocol_version=None)
    assert client.connect_ack is not None
    assert client.connect_ack.protocol_version == ""


@pytest.mark.parametrize(
    ("tenant", "token", "code", "reason"),
    [
        ("nope", "u1-token", codec.CLOSE_INVALID_TENANT, "invalid tenant"),
        ("", "u1-token", codec.CLOSE_INVALID_TENANT, "invalid tenant"),
        (TENANT, "wrong-token", codec.CLOSE_AUTH_FAILED, "invalid token"),
        (TENANT, "", codec.CLOSE_AUTH_FAILED, "invalid token"),
    ],
)
async def test_refused_connections_close_with_code_and_reason(
    stack: Stack, tenant: str, token: str, code: int, reason: str
) -> None:
    client = stack.client("u1", tenant=tenant, token=token)
    with pytest.raises(ConnectRejected) as info:
        await client.connect()
    assert info.value.code == code
    assert info.value.reason == reason
    assert stack.metric("mics_ws_connections", {"node": "node-test"}) == 0


async def test_auth_hook_down_fails_closed(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await stack.backend.stop()
    client = stack.client("u1")
    with pytest.raises(ConnectRejected) as info:
        await client.connect()
    assert info.value.code == codec.CLOSE_AUTH_FAILED
    assert info.value.reason == "hook timeout/failure"


async def test_auth_sign_required_without_secret_makes_no_call(make_stack: StackFactory) -> None:
    stack = await make_stack(tenant_hook_secrets={})
    client = stack.client("u1")
    with pytest.raises(ConnectRejected) as info:
        await client.connect()
    assert info.value.code == codec.CLOSE_AUTH_FAILED
    assert info.value.reason == "auth hook sign required"
    # The backend never saw a request.
    served = stack.backend.state.metrics.registry.render().decode()
    assert "mics_backend_hook_requests_total{" not in served


async def test_wrong_gateway_secret_is_rejected_by_backend(make_stack: StackFactory) -> None:
    stack = await make_stack(tenant_hook_secrets={TENANT: "not-the-secret"})
    with pytest.raises(ConnectRejected) as info:
        await stack.client("u1").connect()
    assert info.value.code == codec.CLOSE_AUTH_FAILED


async def test_plain_http_get_on_ws_is_400(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http, http.get(stack.gateway.url + "/ws") as resp:
        assert resp.status == 400


async def test_same_device_takeover_closes_old_with_4409(stack: Stack) -> None:
    first = await stack.connect("u1", "phone")
    second = await stack.connect("u1", "phone")
    await first.wait_closed(timeout=5)
    assert first.close_code == codec.CLOSE_REPLACED
    assert first.close_reason == "replaced"
    assert second.is_open
    # The survivor is the one that receives, and the old socket's cleanup did not
    # unregister it.
    sender = await stack.connect("u2")
    ack = await sender.send_single("u1", b"after takeover")
    assert ack.status == msg_pb.SENT
    got = await second.next_delivery(timeout=5)
    assert got.msg_body == b"after takeover"
    assert stack.metric("mics_ws_takeovers_total", {"tenant": TENANT}) == 1


async def test_reconnect_after_dropped_socket_is_not_locked_out(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{stack.ws_url}?tenantId={TENANT}&token=u1-token&deviceId=d1")
        await ws.receive()  # connect_ack
        ws._response.connection.transport.abort()  # type: ignore[union-attr]
    again = await stack.connect("u1", "d1")
    assert again.is_open


async def test_heartbeat_timeout_closes_with_4100(make_stack: StackFactory) -> None:
    stack = await make_stack(tenant_config(heartbeat_timeout_seconds=1))
    idle = await stack.connect("u1", heartbeat_interval_s=0)
    pinging = await stack.connect("u2", heartbeat_interval_s=0.2)
    await idle.wait_closed(timeout=10)
    assert idle.close_code == codec.CLOSE_HEARTBEAT_TIMEOUT
    assert idle.close_reason == "heartbeat timeout"
    assert pinging.is_open
    assert stack.metric("mics_ws_heartbeat_timeouts_total", {"tenant": TENANT}) == 1


async def test_heartbeat_ping_gets_pong_with_server_time(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{stack.ws_url}?tenantId={TENANT}&token=u1-token&deviceId=d1")
        await ws.receive()
        ping = msg_pb.ClientFrame(heartbeat_ping=msg_pb.HeartbeatPing(timestamp_ms=123))
        await ws.send_bytes(ping.SerializeToString())
        frame = msg_pb.ServerFrame.FromString((await ws.receive()).data)
        assert frame.WhichOneof("payload") == "heartbeat_pong"
        assert frame.heartbeat_pong.timestamp_ms > 1_600_000_000_000
        await ws.close()


async def test_user_connection_limit_closes_4429(make_stack: StackFactory) -> None:
    stack = await make_stack(tenant_config(user_max_connections=2))
    await stack.connect("u1", "a")
    await stack.connect("u1", "b")
    with pytest.raises(ConnectRejected) as info:
        await stack.client("u1", "c").connect()
    assert info.value.code == codec.CLOSE_RATE_LIMITED
    assert info.value.reason == "rate limited"
    # The same device replacing itself is not limited.
    again = await stack.connect("u1", "a")
    assert again.is_open
    assert await stack.connect("u2", "a")


async def test_tenant_connection_limit_closes_4429(make_stack: StackFactory) -> None:
    stack = await make_stack(tenant_config(tenant_max_connections=2))
    await stack.connect("u1")
    await stack.connect("u2")
    with pytest.raises(ConnectRejected) as info:
        await stack.client("u3").connect()
    assert info.value.code == codec.CLOSE_RATE_LIMITED
    assert (
        stack.metric("mics_rate_limited_total", {"tenant": TENANT, "kind": "connection_limit"}) == 1
    )


async def test_graceful_shutdown_closes_4200_and_readyz_503(stack: Stack) -> None:
    clients = [await stack.connect(u) for u in ("u1", "u2")]
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway.url + "/readyz") as resp:
            assert resp.status == 200
        stopping = asyncio.create_task(stack.gateway.stop())
        for client in clients:
            await client.wait_closed(timeout=10)
            assert client.close_code == codec.CLOSE_DRAINING
            assert client.close_reason == "server draining"
        await stopping
    assert stack.gateway.gateway.ready is False
    assert len(stack.gateway.gateway.registry) == 0


async def test_draining_node_refuses_upgrade_with_503(stack: Stack) -> None:
    stack.gateway.gateway.draining = True
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway.url + "/readyz") as resp:
            assert resp.status == 503
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(f"{stack.ws_url}?tenantId={TENANT}&token=u1-token&deviceId=d")
        assert info.value.status == 503
    stack.gateway.gateway.draining = False


async def test_operational_endpoints(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.gateway.url + "/") as resp:
            assert await resp.text() == "MICS Gateway"
        async with http.get(stack.gateway.url + "/healthz") as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
        await stack.connect("u1")
        async with http.get(stack.gateway.url + "/metrics") as resp:
            text = await resp.text()
            assert resp.headers["Content-Type"].startswith("text/plain")
    assert "# HELP mics_ws_connections " in text
    assert "# TYPE mics_ws_connected_total counter" in text
    assert 'mics_ws_connections{node="node-test"} 1.0' in text
    assert 'mics_hook_requests_total{op="Auth",result="ok",tenant="t1"} 1.0' in text
