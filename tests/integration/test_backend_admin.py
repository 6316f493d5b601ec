"""Reference backend admin API over real HTTP, and its effect on the hooks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from mics.backend import BackendConfig, BackendServer, demo_config
from mics.protocol.ids import new_request_id
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.signing import sign_hook_request

SECRET = "dev-secret-demo"
ADMIN_TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _meta() -> hook_pb.HookMeta:
    return hook_pb.HookMeta(
        tenant_id="demo", request_id=new_request_id(), timestamp_ms=time.time_ns() // 1_000_000
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def server() -> AsyncIterator[BackendServer]:
    """Demo backend with an admin token."""
    async with BackendServer(demo_config().model_copy(update={"admin_token": ADMIN_TOKEN})) as srv:
        yield srv


async def auth(
    http: aiohttp.ClientSession, server: BackendServer, token: str
) -> hook_pb.AuthResponse:
    req = hook_pb.AuthRequest(meta=_meta(), token=token, device_id="d1")
    sign_hook_request(req, SECRET)
    async with http.post(f"{server.url}/auth", data=req.SerializeToString()) as response:
        assert response.status == 200
        return hook_pb.AuthResponse.FromString(await response.read())


async def members(http: aiohttp.ClientSession, server: BackendServer, group: str) -> list[str]:
    req = hook_pb.GetGroupMembersRequest(meta=_meta(), group_id=group)
    sign_hook_request(req, SECRET)
    async with http.post(f"{server.url}/get-group-members", data=req.SerializeToString()) as r:
        assert r.status == 200
        return list(hook_pb.GetGroupMembersResponse.FromString(await r.read()).user_ids)


async def admin(
    http: aiohttp.ClientSession,
    server: BackendServer,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with http.request(
        method,
        f"{server.url}/admin{path}",
        json=body,
        headers=AUTH if headers is None else headers,
    ) as response:
        return response.status, await response.json()


async def test_add_user_then_auth(server: BackendServer, http: aiohttp.ClientSession) -> None:
    assert (await auth(http, server, "dave-token")).reason == "invalid token"
    status, body = await admin(
        http, server, "POST", "/tenants/demo/users", {"user_id": "dave", "tokens": ["dave-token"]}
    )
    assert (status, body) == (201, {"tenant_id": "demo", "user_id": "dave", "created": True})
    resp = await auth(http, server, "dave-token")
    assert (resp.ok, resp.user_id) == (True, "dave")
    # Adding a token to an existing user: 200, both tokens work.
    status, body = await admin(
        http, server, "POST", "/tenants/demo/users", {"user_id": "dave", "tokens": ["dave-2"]}
    )
    assert (status, body["created"]) == (200, False)
    assert (await auth(http, server, "dave-2")).user_id == "dave"
    assert (await auth(http, server, "dave-token")).ok


async def test_block_user(server: BackendServer, http: aiohttp.ClientSession) -> None:
    status, _ = await admin(
        http, server, "POST", "/tenants/demo/users", {"user_id": "alice", "blocked": True}
    )
    assert status == 200
    assert (await auth(http, server, "alice-token")).reason == "user blocked"


async def test_remove_user(server: BackendServer, http: aiohttp.ClientSession) -> None:
    status, body = await admin(http, server, "DELETE", "/tenants/demo/users/bob")
    assert (status, body["removed"]) == (200, True)
    assert (await auth(http, server, "bob-token")).reason == "invalid token"
    assert await members(http, server, "friends") == ["alice", "carol"]
    status, body = await admin(http, server, "DELETE", "/tenants/demo/users/bob")
    assert status == 404
    assert "unknown user" in body["error"]


async def test_set_group(server: BackendServer, http: aiohttp.ClientSession) -> None:
    status, body = await admin(
        http, server, "PUT", "/tenants/demo/groups/pair", {"members": ["carol", "alice", "carol"]}
    )
    assert (status, body["members"]) == (201, ["carol", "alice"])
    assert await members(http, server, "pair") == ["carol", "alice"]
    status, body = await admin(http, server, "PUT", "/tenants/demo/groups/pair", {"members": []})
    assert (status, body["members"]) == (200, [])
    assert await members(http, server, "pair") == []
    status, _ = await admin(http, server, "DELETE", "/tenants/demo/groups/pair")
    assert status == 200
    status, _ = await admin(http, server, "DELETE", "/tenants/demo/groups/pair")
    assert status == 404


async def test_get_tenant(server: BackendServer, http: aiohttp.ClientSession) -> None:
    status, body = await admin(http, server, "GET", "/tenants/demo")
    assert status == 200
    assert body["tenant_id"] == "demo"
    assert body["users"]["alice"] == {"tokens": 1, "blocked": False}
    assert body["groups"] == {"friends": ["alice", "bob", "carol"]}
    assert body["sign_required"] is True
    assert "alice-token" not in str(body)  # token values are never shown
    status, body = await admin(http, server, "GET", "/tenants")
    assert (status, body) == (200, {"tenants": ["demo"]})


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("GET", "/tenants/ghost", None, 404, "unknown tenant"),
        ("POST", "/tenants/ghost/users", {"user_id": "x"}, 404, "unknown tenant"),
        (
            "POST",
            "/tenants/demo/users",
            {"user_id": "x", "tokens": ["bob-token"]},
            409,
            "another user",
        ),
        ("POST", "/tenants/demo/users", {"user_id": "a|b"}, 400, "'|'"),
        ("POST", "/tenants/demo/users", {"user_id": ""}, 400, "empty"),
        ("POST", "/tenants/demo/users", {"tokens": []}, 400, "invalid body"),
        ("POST", "/tenants/demo/users", {"user_id": "x", "extra": 1}, 400, "invalid body"),
        ("POST", "/tenants/demo/users", [1], 400, "invalid body"),
        ("PUT", "/tenants/demo/groups/g", {"members": ["ghost"]}, 400, "not users"),
        ("PUT", "/tenants/demo/groups/g", {}, 400, "invalid body"),
        ("DELETE", "/tenants/demo/users/ghost", None, 404, "unknown user"),
    ],
)
async def test_errors(
    server: BackendServer,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any,
    status: int,
    error: str,
) -> None:
    got_status, got = await admin(http, server, method, path, body)
    assert got_status == status
    assert error in got["error"]


async def test_invalid_json(server: BackendServer, http: aiohttp.ClientSession) -> None:
    async with http.post(
        f"{server.url}/admin/tenants/demo/users", data=b"{not json", headers=AUTH
    ) as response:
        assert response.status == 400
        assert "invalid body" in (await response.json())["error"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    ],
)
async def test_admin_token_required(
    server: BackendServer, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    status, body = await admin(
        http, server, "POST", "/tenants/demo/users", {"user_id": "x"}, headers=headers
    )
    assert (status, body) == (401, {"error": "unauthorized"})
    status, _ = await admin(http, server, "GET", "/tenants/demo", headers=headers)
    assert status == 401
    assert not server.state.directory.has_user("demo", "x")
    # The scheme is case-insensitive.
    status, _ = await admin(
        http, server, "GET", "/tenants/demo", headers={"Authorization": f"bearer {ADMIN_TOKEN}"}
    )
    assert status == 200


async def test_loopback_without_token_is_open(http: aiohttp.ClientSession) -> None:
    async with BackendServer(demo_config()) as server:
        status, _ = await admin(http, server, "GET", "/tenants/demo", headers={})
        assert status == 200


async def test_non_loopback_without_token_has_no_admin_api(http: aiohttp.ClientSession) -> None:
    config = BackendConfig.model_validate({**demo_config().model_dump(), "host": "0.0.0.0"})
    async with BackendServer(config) as server:
        # Unreachable public address (0.0.0.0) becomes loopback in the default URL.
        assert server.url == f"http://127.0.0.1:{server.port}"
        async with http.get(f"{server.url}/admin/tenants/demo") as response:
            assert response.status == 404
        async with http.get(f"{server.url}/healthz") as response:
            assert response.status == 200
