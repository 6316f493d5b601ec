"""The Redis route table's layout, value format and settings (protocol.md 8); no server."""

from __future__ import annotations

import dataclasses

import pytest
from redis.asyncio import Redis

from mics.cluster.redis_routes import (
    GROUP_ROUTE_CHUNK_SIZE,
    RedisRouteTable,
    RemoteRoute,
    RenewResult,
    format_route_value,
    lease_ttl_for,
    load_lua,
    node_routes_key,
    node_routes_member,
    online_key,
    parse_node_routes_member,
    parse_route_value,
    renew_interval_for,
    tenant_lease_member,
    tenant_leases_key,
    user_leases_key,
)
from mics.cluster.routes import AdmissionLimits, Route, RouteTable

UNREACHABLE = "redis://127.0.0.1:1/0"  # never connected to by these tests


def test_key_layout() -> None:
    assert online_key("t1", "u1") == "t1:online:u1"
    assert tenant_leases_key("t1") == "t1:conn_leases"
    assert user_leases_key("t1", "u1") == "t1:user:u1:conn_leases"
    assert node_routes_key("n1") == "nodes:n1:routes"
    assert tenant_lease_member("u1", "d1") == "u1|d1"
    assert node_routes_member("t1", "u1", "d1") == "t1|u1|d1"


def test_route_value_round_trip() -> None:
    value = format_route_value("n1", "http://10.0.0.1:8080", "c1", 1_700_000_000_123)
    assert value == "n1|http://10.0.0.1:8080|c1|1700000000123"
    route = parse_route_value("t1", "u1", "d1", value)
    assert route == RemoteRoute(
        "t1", "u1", "d1", "n1", "c1", "http://10.0.0.1:8080", 1_700_000_000_123
    )


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        "n1|e|c1",
        "n1|e|c1|1|2",
        "n1|e|c1|soon",
        "n1|e|c1|",
        "|e|c1|1",
        "n1|e||1",
    ],
)
def test_malformed_route_values_are_rejected(value: str) -> None:
    assert parse_route_value("t1", "u1", "d1", value) is None


def test_an_empty_endpoint_still_parses() -> None:
    route = parse_route_value("t1", "u1", "", "n1||c1|5")
    assert route is not None
    assert (route.device_id, route.endpoint, route.online_at_ms) == ("", "", 5)


def test_node_routes_members_parse_with_a_separator_in_the_device() -> None:
    assert parse_node_routes_member("t1|u1|d1") == ("t1", "u1", "d1")
    assert parse_node_routes_member("t1|u1|") == ("t1", "u1", "")
    assert parse_node_routes_member("t1|u1|d|x") == ("t1", "u1", "d|x")
    assert parse_node_routes_member("t1|u1") is None
    assert parse_node_routes_member("|u1|d1") is None


def test_remote_route_is_a_route_with_an_endpoint() -> None:
    remote = RemoteRoute("t1", "u1", "d1", "n1", "c1", "http://n1", 1)
    assert isinstance(remote, Route)
    assert remote != Route("t1", "u1", "d1", "n1", "c1")  # compare by node and conn ids
    with pytest.raises(dataclasses.FrozenInstanceError):
        remote.endpoint = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("timeout_s", "lease_s", "renew_s"),
    [
        (0, 60.0, 15.0),
        (-1, 60.0, 15.0),
        (5, 30.0, 2.5),
        (15, 30.0, 7.5),
        (45, 90.0, 22.5),
        (1, 30.0, 1.0),
    ],
)
def test_lease_ttl_and_renew_interval(timeout_s: float, lease_s: float, renew_s: float) -> None:
    assert lease_ttl_for(timeout_s) == lease_s
    assert renew_interval_for(timeout_s) == renew_s


def test_renew_result_ok() -> None:
    assert RenewResult(3).ok
    assert not RenewResult(2, lost=(Route("t", "u", "d", "n", "c"),)).ok
    assert not RenewResult(2, failed=(Route("t", "u", "d", "n", "c"),)).ok


@pytest.mark.parametrize("name", ["admit.lua", "remove.lua", "renew.lua"])
def test_lua_scripts_ship_with_the_package(name: str) -> None:
    assert "redis.call" in load_lua(name)


async def test_table_settings_and_protocol() -> None:
    client = Redis.from_url(UNREACHABLE)
    table = RedisRouteTable(client, node_id="n1", endpoint="http://n1:8080")
    routes: RouteTable = table  # structurally a RouteTable
    assert routes.local_only is False
    assert (table.node_id, table.endpoint, table.lease_ttl_s) == ("n1", "http://n1:8080", 30.0)
    assert GROUP_ROUTE_CHUNK_SIZE == 256
    for bad in (
        {"node_id": "", "endpoint": "e"},
        {"node_id": "n|1", "endpoint": "e"},
        {"node_id": "n1", "endpoint": "a|b"},
        {"node_id": "n1", "endpoint": "e", "lease_ttl_s": 0},
        {"node_id": "n1", "endpoint": "e", "chunk_size": 0},
    ):
        with pytest.raises(ValueError):  # noqa: PT011
            RedisRouteTable(client, **bad)
    await client.aclose()


async def test_admit_refuses_routes_it_cannot_key_before_any_io() -> None:
    client = Redis.from_url(UNREACHABLE)
    table = RedisRouteTable(client, node_id="n1", endpoint="http://n1")
    with pytest.raises(ValueError, match="admitted by"):
        await table.admit(Route("t1", "u1", "d1", "n2", "c1"), AdmissionLimits())
    with pytest.raises(ValueError, match="must not contain"):
        await table.admit(Route("t1", "u|1", "d1", "n1", "c1"), AdmissionLimits())
    with pytest.raises(ValueError, match="must not contain"):
        await table.remove(Route("t|1", "u1", "d1", "n1", "c1"))
    with pytest.raises(ValueError, match="lease_ttl_s"):
        await table.admit(Route("t1", "u1", "d1", "n1", "c1"), AdmissionLimits(), lease_ttl_s=0)
    await client.aclose()
