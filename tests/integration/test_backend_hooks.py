"""Reference backend over real HTTP: signed protobuf hooks against a BackendServer."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import aiohttp
import pytest
from google.protobuf.message import Message

from mics.backend import BackendConfig, BackendServer, TenantConfig, UserConfig, demo_config
from mics.backend.app import run_backend
from mics.protocol.ids import new_request_id
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import sign_hook_request

SECRET = "dev-secret-demo"
OTHER_SECRET = "other-secret"
PROTOBUF = "application/protobuf"

R = TypeVar("R", bound=Message)


def _config(**overrides: object) -> BackendConfig:
    """The demo tenant plus: dave (not in friends), eve (blocked), and tenant ``other``
    (signing optional) whose user zed has token ``zed-token``."""
    base = demo_config()
    demo = base.tenants["demo"]
    users = {**demo.users, "dave": UserConfig(tokens=["dave-token"])}
    users["eve"] = UserConfig(tokens=["eve-token"], blocked=True)
    other = TenantConfig(
        secret=OTHER_SECRET,
        sign_required=False,
        users={"zed": UserConfig(tokens=["zed-token"])},
        groups={"solo": ["zed"]},
    )
    tenants = {"demo": demo.model_copy(update={"users": users}), "other": other}
    # Round-trip through validation so that overrides are checked like a config file.
    updated = base.model_copy(update={"tenants": tenants, **overrides})
    return BackendConfig.model_validate(updated.model_dump())


@pytest.fixture
async def server() -> AsyncIterator[BackendServer]:
    async with BackendServer(_config()) as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def meta(
    tenant: str = "demo", *, ts: int | None = None, request_id: str | None = None, trace: str = ""
) -> hook_pb.HookMeta:
    return hook_pb.HookMeta(
        tenant_id=tenant,
        request_id=request_id or new_request_id(),
        timestamp_ms=now_ms() if ts is None else ts,
        trace_id=trace,
    )


def signed(req: R, secret: str | None = SECRET) -> R:
    """Sign ``req`` in place (``secret=None`` leaves it unsigned) and return it."""
    if secret is not None:
        sign_hook_request(req, secret)  # type: ignore[arg-type]
    return req


def auth_req(token: str = "alice-token", tenant: str = "demo", **kw: object) -> hook_pb.AuthRequest:
    return hook_pb.AuthRequest(meta=meta(tenant, **kw), token=token, device_id="d1")  # type: ignore[arg-type]


def check_req(tenant: str = "demo", /, **fields: object) -> hook_pb.CheckMessageRequest:
    message: dict[str, object] = {
        "tenant_id": tenant,
        "user_id": "alice",
        "device_id": "d1",
        "msg_id": new_request_id(),
        "msg_type": msg_pb.SINGLE_CHAT,
        "to_user_id": "bob",
        "msg_body": b"hi",
        "timestamp_ms": now_ms(),
    }
    message.update(fields)
    return hook_pb.CheckMessageRequest(
        meta=meta(tenant),
        message=msg_pb.MessageRequest(**message),  # type: ignore[arg-type]
    )


async def post_raw(
    http: aiohttp.ClientSession, server: BackendServer, path: str, body: bytes
) -> tuple[int, bytes, str]:
    async with http.post(
        server.url + path, data=body, headers={"Content-Type": PROTOBUF}
    ) as response:
        return response.status, await response.read(), response.content_type


async def post(
    http: aiohttp.ClientSession,
    server: BackendServer,
    path: str,
    req: Message,
    response_type: type[R],
) -> tuple[int, R]:
    status, body, content_type = await post_raw(http, server, path, req.SerializeToString())
    assert content_type == PROTOBUF
    response = response_type()
    response.ParseFromString(body)
    return status, response


def hook_count(server: BackendServer, tenant: str, op: str, result: str) -> float:
    return server.state.metrics.registry.sample(
        "mics_backend_hook_requests_total", {"tenant": tenant, "op": op, "result": result}
    )


# -- /auth -----------------------------------------------------------------------------


async def test_auth_ok(server: BackendServer, http: aiohttp.ClientSession) -> None:
    req = signed(auth_req(trace="ab" * 16))
    status, resp = await post(http, server, "/auth", req, hook_pb.AuthResponse)
    assert status == 200
    assert resp.ok
    assert resp.reason == ""
    assert resp.user_id == "alice"
    # Meta echoed, unsigned.
    assert resp.meta.tenant_id == "demo"
    assert resp.meta.request_id == req.meta.request_id
    assert resp.meta.timestamp_ms == req.meta.timestamp_ms
    assert resp.meta.trace_id == "ab" * 16
    assert resp.meta.sign == ""
    config = resp.config
    assert config.hook_base_url == server.url == f"http://127.0.0.1:{server.port}"
    assert config.heartbeat_timeout_seconds == 30
    assert config.offline_buffer_ttl_seconds == 300
    assert config.tenant_secret == SECRET
    assert config.offline_mode == "notify_pull"
    assert config.offline_use_hook_pull  # for v1 gateways
    assert config.HasField("hook_sign_required")
    assert config.hook_sign_required
    assert not config.HasField("hook_max_concurrency")
    assert not config.HasField("check_message_fail_closed")
    assert hook_count(server, "demo", "Auth", "ok") == 1


async def test_auth_config_optional_fields_and_public_url(http: aiohttp.ClientSession) -> None:
    config = _config(public_url="http://backend.example:9999/")
    demo = config.tenants["demo"].model_copy(
        update={"hook_max_concurrency": 4, "check_message_fail_closed": True}
    )
    config = _config(
        public_url="http://backend.example:9999/", tenants={**config.tenants, "demo": demo}
    )
    async with BackendServer(config) as server:
        assert server.url == "http://backend.example:9999"
        # The configured public URL is not where we listen in this test: use the port.
        url = f"http://127.0.0.1:{server.port}/auth"
        async with http.post(url, data=signed(auth_req()).SerializeToString()) as r:
            assert r.status == 200
            auth = hook_pb.AuthResponse.FromString(await r.read())
    assert auth.ok
    assert auth.config.hook_base_url == "http://backend.example:9999"
    assert auth.config.hook_max_concurrency == 4
    assert auth.config.HasField("check_message_fail_closed")
    assert auth.config.check_message_fail_closed


async def test_auth_invalid_token(server: BackendServer, http: aiohttp.ClientSession) -> None:
    for token in ("nope", "", "zed-token"):  # unknown, empty, another tenant's token
        status, resp = await post(
            http, server, "/auth", signed(auth_req(token)), hook_pb.AuthResponse
        )
        assert status == 200
        assert (resp.ok, resp.reason, resp.user_id) == (False, "invalid token", "")
        assert not resp.HasField("config")
    assert hook_count(server, "demo", "Auth", "denied") == 3


async def test_auth_blocked_user(server: BackendServer, http: aiohttp.ClientSession) -> None:
    status, resp = await post(
        http, server, "/auth", signed(auth_req("eve-token")), hook_pb.AuthResponse
    )
    assert status == 200
    assert (resp.ok, resp.reason) == (False, "user blocked")


async def test_auth_unknown_tenant(server: BackendServer, http: aiohttp.ClientSession) -> None:
    req = signed(auth_req(tenant="ghost"))
    status, resp = await post(http, server, "/auth", req, hook_pb.AuthResponse)
    assert status == 400
    assert (resp.ok, resp.reason) == (False, "unknown tenant")
    assert resp.meta.request_id == req.meta.request_id
    assert hook_count(server, "", "Auth", "unknown_tenant") == 1


async def test_auth_bad_signature(server: BackendServer, http: aiohttp.ClientSession) -> None:
    wrong_key = signed(auth_req(), "not-the-secret")
    tampered = signed(auth_req("alice-token"))
    tampered.token = "bob-token"
    truncated = signed(auth_req())
    truncated.meta.sign = truncated.meta.sign[:-4]
    for req in (wrong_key, tampered, truncated):
        status, resp = await post(http, server, "/auth", req, hook_pb.AuthResponse)
        assert status == 401
        assert (resp.ok, resp.reason) == (False, "invalid sign")
    assert hook_count(server, "demo", "Auth", "bad_sign") == 3


async def test_auth_non_canonical_base64_rejected(
    server: BackendServer, http: aiohttp.ClientSession
) -> None:
    req = signed(auth_req())
    raw = base64.b64decode(req.meta.sign)
    # Same bytes, but non-zero padding bits: decodes equally yet is not canonical.
    encoded = base64.b64encode(raw).decode()
    last = encoded[-2]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    req.meta.sign = encoded[:-2] + alphabet[alphabet.index(last) | 1] + "="
    assert base64.b64decode(req.meta.sign) == raw
    status, resp = await post(http, server, "/auth", req, hook_pb.AuthResponse)
    assert (status, resp.reason) == (401, "invalid sign")


async def test_auth_missing_signature(server: BackendServer, http: aiohttp.ClientSession) -> None:
    # Required for "demo"...
    status, resp = await post(http, server, "/auth", signed(auth_req(), None), hook_pb.AuthResponse)
    assert (status, resp.ok, resp.reason) == (401, False, "invalid sign")
    # ...optional for "other", where a missing signature passes but a wrong one does not.
    req = signed(auth_req("zed-token", tenant="other"), None)
    status, resp = await post(http, server, "/auth", req, hook_pb.AuthResponse)
    assert (status, resp.ok, resp.user_id) == (200, True, "zed")
    assert not resp.config.HasField("hook_sign_required")
    bad = signed(auth_req("zed-token", tenant="other"), SECRET)
    status, resp = await post(http, server, "/auth", bad, hook_pb.AuthResponse)
    assert (status, resp.reason) == (401, "invalid sign")
    good = signed(auth_req("zed-token", tenant="other"), OTHER_SECRET)
    status, resp = await post(http, server, "/auth", good, hook_pb.AuthResponse)
    assert (status, resp.ok) == (200, True)


async def test_auth_stale_timestamp(server: BackendServer, http: aiohttp.ClientSession) -> None:
    for ts in (now_ms() - 301_000, now_ms() + 301_000, 0):
        status, resp = await post(
            http, server, "/auth", signed(auth_req(ts=ts)), hook_pb.AuthResponse
        )
        assert (status, resp.ok, resp.reason) == (401, False, "stale request")
    # Within the window is fine.
    status, resp = await post(
        http, server, "/auth", signed(auth_req(ts=now_ms() - 250_000)), hook_pb.AuthResponse
    )
    assert (status, resp.ok) == (200, True)
    assert hook_count(server, "demo", "Auth", "stale") == 3


async def test_auth_replayed_request(server: BackendServer, http: aiohttp.ClientSession) -> None:
    body = signed(auth_req()).SerializeToString()
    status, first, _ = await post_raw(http, server, "/auth", body)
    assert status == 200
    assert hook_pb.AuthResponse.FromString(first).ok
    status, second, _ = await post_raw(http, server, "/auth", body)
    resp = hook_pb.AuthResponse.FromString(second)
    assert (status, resp.ok, resp.reason) == (401, False, "replayed request")
    # Same request id, newly signed with a new timestamp: still a replay.
    again = signed(auth_req(request_id=resp.meta.request_id))
    status, resp = await post(http, server, "/auth", again, hook_pb.AuthResponse)
    assert (status, resp.reason) == (401, "replayed request")
    # The same request id in another tenant is independent.
    other = signed(auth_req("zed-token", "other", request_id=resp.meta.request_id), OTHER_SECRET)
    status, resp = await post(http, server, "/auth", other, hook_pb.AuthResponse)
    assert (status, resp.ok) == (200, True)
    assert hook_count(server, "demo", "Auth", "replayed") == 2


async def test_forged_request_does_not_burn_request_id(
    server: BackendServer, http: aiohttp.ClientSession
) -> None:
    rid = new_request_id()
    forged = signed(auth_req(request_id=rid), "guess")
    status, _ = await post(http, server, "/auth", forged, hook_pb.AuthResponse)
    assert status == 401
    status, resp = await post(
        http, server, "/auth", signed(auth_req(request_id=rid)), hook_pb.AuthResponse
    )
    assert (status, resp.ok) == (200, True)


# -- /check-message ----------------------------------------------------------------------


async def test_check_message_allow(server: BackendServer, http: aiohttp.ClientSession) -> None:
    single = signed(check_req())
    group = signed(check_req(msg_type=msg_pb.GROUP_CHAT, to_user_id="", group_id="friends"))
    for req in (single, group):
        status, resp = await post(http, server, "/check-message", req, hook_pb.CheckMessageResponse)
        assert (status, resp.allow, resp.reason) == (200, True, "")
        assert resp.meta.request_id == req.meta.request_id
    assert hook_count(server, "demo", "CheckMessage", "ok") == 2


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"user_id": "mallory"}, "sender unknown"),
        ({"to_user_id": "mallory"}, "recipient unknown"),
        ({"msg_type": msg_pb.GROUP_CHAT, "group_id": "nobody"}, "group unknown"),
        (
            {"msg_type": msg_pb.GROUP_CHAT, "group_id": "friends", "user_id": "dave"},
            "not a group member",
        ),
        ({"msg_body": b"this is ForBidden"}, "blocked word"),
        ({"user_id": "eve"}, "sender blocked"),
    ],
)
async def test_check_message_deny(
    server: BackendServer, http: aiohttp.ClientSession, fields: dict[str, object], reason: str
) -> None:
    req = signed(check_req(**fields))
    status, resp = await post(http, server, "/check-message", req, hook_pb.CheckMessageResponse)
    assert (status, resp.allow, resp.reason) == (200, False, reason)
    assert hook_count(server, "demo", "CheckMessage", "denied") == 1


async def test_check_message_verification(
    server: BackendServer, http: aiohttp.ClientSession
) -> None:
    cases = [
        (signed(check_req(), "wrong"), 401, "invalid sign"),
        (signed(check_req(), None), 401, "invalid sign"),
        (signed(check_req("ghost")), 400, "unknown tenant"),
    ]
    stale = check_req()
    stale.meta.timestamp_ms = now_ms() - 3_600_000
    cases.append((signed(stale), 401, "stale request"))
    for req, expected_status, reason in cases:
        status, resp = await post(http, server, "/check-message", req, hook_pb.CheckMessageResponse)
        assert (status, resp.allow, resp.reason) == (expected_status, False, reason)


# -- /get-group-members ------------------------------------------------------------------


async def test_get_group_members(server: BackendServer, http: aiohttp.ClientSession) -> None:
    req = signed(hook_pb.GetGroupMembersRequest(meta=meta(), group_id="friends"))
    status, resp = await post(
        http, server, "/get-group-members", req, hook_pb.GetGroupMembersResponse
    )
    assert status == 200
    assert list(resp.user_ids) == ["alice", "bob", "carol"]
    assert resp.meta.request_id == req.meta.request_id

    req = signed(hook_pb.GetGroupMembersRequest(meta=meta(), group_id="nobody"))
    status, resp = await post(
        http, server, "/get-group-members", req, hook_pb.GetGroupMembersResponse
    )
    assert (status, list(resp.user_ids)) == (200, [])

    # Groups are per tenant: "solo" exists only in "other".
    req = signed(hook_pb.GetGroupMembersRequest(meta=meta(), group_id="solo"))
    status, resp = await post(
        http, server, "/get-group-members", req, hook_pb.GetGroupMembersResponse
    )
    assert (status, list(resp.user_ids)) == (200, [])

    req = signed(hook_pb.GetGroupMembersRequest(meta=meta(), group_id="friends"), "wrong")
    status, resp = await post(
        http, server, "/get-group-members", req, hook_pb.GetGroupMembersResponse
    )
    assert (status, list(resp.user_ids)) == (401, [])
    assert hook_count(server, "demo", "GetGroupMembers", "ok") == 3
    assert hook_count(server, "demo", "GetGroupMembers", "bad_sign") == 1


# -- malformed requests, methods, limits -------------------------------------------------


@pytest.mark.parametrize(
    ("path", "response_type", "op"),
    [
        ("/auth", hook_pb.AuthResponse, "Auth"),
        ("/check-message", hook_pb.CheckMessageResponse, "CheckMessage"),
        ("/get-group-members", hook_pb.GetGroupMembersResponse, "GetGroupMembers"),
    ],
)
async def test_malformed_body(
    server: BackendServer,
    http: aiohttp.ClientSession,
    path: str,
    response_type: type[Message],
    op: str,
) -> None:
    status, body, content_type = await post_raw(http, server, path, b"\xff\xff\xff\xff")
    assert status == 400
    assert content_type == PROTOBUF
    resp = response_type.FromString(body)
    if hasattr(resp, "reason"):
        assert resp.reason == "malformed request"
    assert hook_count(server, "", op, "bad_request") == 1


async def test_empty_body_is_unknown_tenant(
    server: BackendServer, http: aiohttp.ClientSession
) -> None:
    status, body, _ = await post_raw(http, server, "/auth", b"")
    assert status == 400
    assert hook_pb.AuthResponse.FromString(body).reason == "unknown tenant"


async def test_wrong_method(server: BackendServer, http: aiohttp.ClientSession) -> None:
    async with http.get(server.url + "/auth") as response:
        assert response.status == 405


async def test_request_too_large(http: aiohttp.ClientSession) -> None:
    async with BackendServer(_config(max_request_bytes=1024)) as server:
        req = signed(check_req(msg_body=b"x" * 4096))
        status, _, _ = await post_raw(http, server, "/check-message", req.SerializeToString())
        assert status == 413
        assert hook_count(server, "", "CheckMessage", "bad_request") == 1


async def test_concurrent_requests(server: BackendServer, http: aiohttp.ClientSession) -> None:
    async def one(i: int) -> bool:
        token = ("alice-token", "bob-token", "carol-token")[i % 3]
        _, resp = await post(http, server, "/auth", signed(auth_req(token)), hook_pb.AuthResponse)
        return resp.ok

    assert all(await asyncio.gather(*(one(i) for i in range(50))))
    assert hook_count(server, "demo", "Auth", "ok") == 50


# -- health, readiness, metrics ------------------------------------------------------------


async def test_health_and_readiness(server: BackendServer, http: aiohttp.ClientSession) -> None:
    for path in ("/healthz", "/readyz"):
        async with http.get(server.url + path) as response:
            assert (response.status, await response.text()) == (200, "ok")
    server.state.ready = False
    async with http.get(server.url + "/readyz") as response:
        assert response.status == 503
    async with http.get(server.url + "/healthz") as response:
        assert response.status == 200


async def test_metrics(server: BackendServer, http: aiohttp.ClientSession) -> None:
    await post(http, server, "/auth", signed(auth_req()), hook_pb.AuthResponse)
    await post(http, server, "/auth", signed(auth_req("nope")), hook_pb.AuthResponse)
    async with http.get(server.url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    assert 'mics_backend_hook_requests_total{op="Auth",result="ok",tenant="demo"} 1.0' in text
    assert 'mics_backend_hook_requests_total{op="Auth",result="denied",tenant="demo"} 1.0' in text
    assert 'mics_backend_hook_duration_ms_count{op="Auth"} 2.0' in text
    assert 'mics_backend_hook_duration_ms_bucket{le="150.0",op="Auth"}' in text


# -- lifecycle -------------------------------------------------------------------------------


async def test_server_lifecycle() -> None:
    server = BackendServer(_config())
    with pytest.raises(RuntimeError):
        _ = server.port
    with pytest.raises(RuntimeError):
        _ = server.url
    await server.start()
    try:
        assert server.port > 0
        with pytest.raises(RuntimeError):
            await server.start()
    finally:
        await server.stop()
    assert not server.state.ready
    await server.stop()  # idempotent


async def test_two_servers_are_independent(http: aiohttp.ClientSession) -> None:
    async with BackendServer(_config()) as a, BackendServer(_config()) as b:
        assert a.port != b.port
        body = signed(auth_req()).SerializeToString()
        assert (await post_raw(http, a, "/auth", body))[0] == 200
        assert (await post_raw(http, b, "/auth", body))[0] == 200  # separate replay memory
        assert hook_count(a, "demo", "Auth", "ok") == 1
        assert hook_count(b, "demo", "Auth", "ok") == 1


async def test_run_backend_until_cancelled() -> None:
    ready = asyncio.Event()
    task = asyncio.create_task(run_backend(_config(), ready=ready))
    await asyncio.wait_for(ready.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
