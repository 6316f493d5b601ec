"""RedisRouteTable against a real redis-server: the section 8 layout, admission limits,
takeover, leases, compare-and-delete, lookups, renewals, concurrency and outages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mics.cluster.redis_routes import (
    GROUP_ROUTE_CHUNK_SIZE,
    RedisRouteTable,
    RemoteRoute,
    RouteTableUnavailable,
)
from mics.cluster.routes import AdmissionLimits, AdmissionResult, Route
from tests.support.redis import RedisServer

T0 = 1_700_000_000.0  # fake clock start, Unix seconds
T0_MS = int(T0 * 1000)
NO_LIMITS = AdmissionLimits()


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_client(url: str, *, decode: bool = True) -> Redis:
    return Redis.from_url(
        url,
        decode_responses=decode,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    c = make_client(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table_for(client: Redis, clock: FakeClock) -> Callable[..., RedisRouteTable]:
    def make(node_id: str = "n1", **kwargs: Any) -> RedisRouteTable:
        return RedisRouteTable(
            client, node_id=node_id, endpoint=f"http://{node_id}:8080", clock=clock, **kwargs
        )

    return make


@pytest.fixture
def table(table_for: Callable[..., RedisRouteTable]) -> RedisRouteTable:
    return table_for("n1")


def route(
    user: str = "u1", device: str = "d1", conn: str = "c1", node: str = "n1", tenant: str = "t1"
) -> Route:
    return Route(tenant, user, device, node, conn)


# --- layout ------------------------------------------------------------------------------


async def test_admit_writes_the_section_8_layout(client: Redis, table: RedisRouteTable) -> None:
    admission = await table.admit(route(), NO_LIMITS)

    assert admission.result is AdmissionResult.ADMITTED
    assert admission.previous is None
    assert sorted(await client.keys("*")) == [
        "nodes:n1:routes",
        "t1:conn_leases",
        "t1:online:u1",
        "t1:user:u1:conn_leases",
    ]
    assert await client.type("t1:online:u1") == "hash"
    assert await client.hgetall("t1:online:u1") == {"d1": f"n1|http://n1:8080|c1|{T0_MS}"}
    assert await client.type("t1:conn_leases") == "zset"
    assert await client.zrange("t1:conn_leases", 0, -1, withscores=True) == [
        ("u1|d1", T0_MS + 30_000)
    ]
    assert await client.type("t1:user:u1:conn_leases") == "zset"
    assert await client.zrange("t1:user:u1:conn_leases", 0, -1, withscores=True) == [
        ("d1", T0_MS + 30_000)
    ]
    assert await client.type("nodes:n1:routes") == "set"
    assert await client.smembers("nodes:n1:routes") == {"t1|u1|d1"}
    for key in ("t1:online:u1", "t1:conn_leases", "t1:user:u1:conn_leases"):
        assert 55_000 < await client.pttl(key) <= 60_000, key  # 2 x lease TTL
    assert await client.pttl("nodes:n1:routes") == -1  # removed by unregister or cleanup


async def test_lease_ttl_from_the_table_and_per_call(
    client: Redis, table_for: Callable[..., RedisRouteTable]
) -> None:
    table = table_for("n1", lease_ttl_s=45.0)
    await table.admit(route(device="d1"), NO_LIMITS)
    await table.admit(route(device="d2", conn="c2"), NO_LIMITS, lease_ttl_s=60.0)

    assert await client.zscore("t1:user:u1:conn_leases", "d1") == T0_MS + 45_000
    assert await client.zscore("t1:user:u1:conn_leases", "d2") == T0_MS + 60_000
    assert await client.zscore("t1:conn_leases", "u1|d2") == T0_MS + 60_000
    assert 115_000 < await client.pttl("t1:online:u1") <= 120_000


# --- admission -----------------------------------------------------------------------------


async def test_user_limit_denies_a_new_device_without_writing(
    client: Redis, table: RedisRouteTable
) -> None:
    limits = AdmissionLimits(user_max_connections=2)
    assert (await table.admit(route(device="d1"), limits)).result is AdmissionResult.ADMITTED
    assert (await table.admit(route(device="d2"), limits)).result is AdmissionResult.ADMITTED

    denied = await table.admit(route(device="d3", conn="c3"), limits)

    assert denied.result is AdmissionResult.DENIED
    assert denied.previous is None
    assert sorted(await client.hkeys("t1:online:u1")) == ["d1", "d2"]
    assert await client.zcard("t1:user:u1:conn_leases") == 2
    assert await client.zcard("t1:conn_leases") == 2
    assert await client.smembers("nodes:n1:routes") == {"t1|u1|d1", "t1|u1|d2"}
    # Another user is not affected by u1's limit.
    other = await table.admit(route(user="u2", device="d3"), limits)
    assert other.result is AdmissionResult.ADMITTED


async def test_tenant_limit_counts_all_users_of_the_tenant(
    client: Redis, table: RedisRouteTable
) -> None:
    limits = AdmissionLimits(tenant_max_connections=3)
    for user in ("u1", "u2", "u3"):
        admission = await table.admit(route(user=user, conn=f"c-{user}"), limits)
        assert admission.result is AdmissionResult.ADMITTED

    assert (await table.admit(route(user="u4"), limits)).result is AdmissionResult.DENIED
    assert not await client.exists("t1:online:u4")
    # Another tenant has its own count.
    assert (
        await table.admit(route(user="u4", tenant="t2"), limits)
    ).result is AdmissionResult.ADMITTED

    # A removal frees a slot.
    assert await table.remove(route(user="u2", conn="c-u2"))
    assert (await table.admit(route(user="u4"), limits)).result is AdmissionResult.ADMITTED


async def test_replacement_skips_the_limit_check_and_returns_the_old_route(
    client: Redis, table_for: Callable[..., RedisRouteTable], clock: FakeClock
) -> None:
    n1, n2 = table_for("n1"), table_for("n2")
    limits = AdmissionLimits(tenant_max_connections=1, user_max_connections=1)
    assert (await n1.admit(route(conn="c1"), limits)).result is AdmissionResult.ADMITTED

    clock.advance(1.0)
    takeover = await n2.admit(route(conn="c2", node="n2"), limits)  # both limits are full

    assert takeover.result is AdmissionResult.REPLACED
    assert takeover.previous == RemoteRoute("t1", "u1", "d1", "n1", "c1", "http://n1:8080", T0_MS)
    assert await client.hgetall("t1:online:u1") == {"d1": f"n2|http://n2:8080|c2|{T0_MS + 1000}"}
    assert await client.zscore("t1:conn_leases", "u1|d1") == T0_MS + 1000 + 30_000
    assert await client.zcard("t1:conn_leases") == 1
    assert await client.smembers("nodes:n2:routes") == {"t1|u1|d1"}
    # A new device is still denied: the takeover did not add a connection.
    assert (await n1.admit(route(device="d2"), limits)).result is AdmissionResult.DENIED


async def test_readmitting_the_same_connection_is_idempotent(table: RedisRouteTable) -> None:
    limits = AdmissionLimits(user_max_connections=1)
    await table.admit(route(), limits)

    again = await table.admit(route(), limits)

    assert again.result is AdmissionResult.REPLACED
    assert again.previous is not None
    assert (again.previous.node_id, again.previous.conn_id) == ("n1", "c1")
    assert len(await table.lookup("t1", "u1")) == 1


async def test_expired_leases_do_not_count(
    client: Redis, table: RedisRouteTable, clock: FakeClock
) -> None:
    await table.admit(route(user="u1", device="d1", conn="c1"), NO_LIMITS)
    await table.admit(route(user="u2", device="d1", conn="c2"), NO_LIMITS)
    clock.advance(30.0)  # expiry == now: expired

    user_full = AdmissionLimits(user_max_connections=1)
    admitted = await table.admit(route(user="u1", device="d2", conn="c3"), user_full)

    assert admitted.result is AdmissionResult.ADMITTED
    # u1's stale route went with its lease; u2's lease left the tenant set only.
    assert await client.hkeys("t1:online:u1") == ["d2"]
    assert await client.zrange("t1:user:u1:conn_leases", 0, -1) == ["d2"]
    assert await client.zrange("t1:conn_leases", 0, -1) == ["u1|d2"]

    tenant_full = AdmissionLimits(tenant_max_connections=2)
    assert (await table.admit(route(user="u3"), tenant_full)).result is AdmissionResult.ADMITTED
    assert (await table.admit(route(user="u4"), tenant_full)).result is AdmissionResult.DENIED


async def test_an_expired_device_reconnecting_is_admitted_afresh(
    client: Redis, table: RedisRouteTable, clock: FakeClock
) -> None:
    await table.admit(route(conn="c1"), NO_LIMITS)
    clock.advance(31.0)

    again = await table.admit(route(conn="c2"), AdmissionLimits(user_max_connections=1))

    assert again.result is AdmissionResult.ADMITTED  # the old lease no longer counted
    assert await client.hget("t1:online:u1", "d1") == f"n1|http://n1:8080|c2|{T0_MS + 31_000}"


# --- removal -------------------------------------------------------------------------------


async def test_remove_is_compare_and_delete(
    client: Redis, table_for: Callable[..., RedisRouteTable]
) -> None:
    n1, n2 = table_for("n1"), table_for("n2")
    old = route(conn="c1", node="n1")
    new = route(conn="c2", node="n2")
    await n1.admit(old, NO_LIMITS)
    await n2.admit(new, NO_LIMITS)

    assert await n1.remove(old) is False  # the old connection's cleanup

    assert [(r.node_id, r.conn_id) for r in await n2.lookup("t1", "u1")] == [("n2", "c2")]
    assert await client.zrange("t1:conn_leases", 0, -1) == ["u1|d1"]
    assert await client.zrange("t1:user:u1:conn_leases", 0, -1) == ["d1"]
    assert await client.smembers("nodes:n1:routes") == set()  # always removed
    assert await client.smembers("nodes:n2:routes") == {"t1|u1|d1"}

    assert await n2.remove(new) is True
    assert await n2.lookup("t1", "u1") == []
    assert sorted(await client.keys("*")) == []
    assert await n2.remove(new) is False  # already gone


async def test_remove_matches_the_node_as_well_as_the_connection(
    table_for: Callable[..., RedisRouteTable],
) -> None:
    n1 = table_for("n1")
    await n1.admit(route(conn="c1"), NO_LIMITS)

    assert await n1.remove(route(conn="c1", node="n2")) is False
    assert await n1.remove(route(conn="c9")) is False
    assert len(await n1.lookup("t1", "u1")) == 1


async def test_removing_an_old_connection_keeps_the_routes_entry_of_a_newer_one(
    client: Redis, table: RedisRouteTable
) -> None:
    await table.admit(route(conn="c1"), NO_LIMITS)
    await table.admit(route(conn="c2"), NO_LIMITS)  # same device, same node

    assert await table.remove(route(conn="c1")) is False

    assert await client.smembers("nodes:n1:routes") == {"t1|u1|d1"}  # c2 still needs it
    assert await table.remove(route(conn="c2")) is True
    assert await client.smembers("nodes:n1:routes") == set()


# --- lookups -------------------------------------------------------------------------------


async def test_lookup_parses_routes_and_skips_malformed_values(
    client: Redis, table_for: Callable[..., RedisRouteTable]
) -> None:
    n1, n2 = table_for("n1"), table_for("n2")
    await n2.admit(route(device="d2", conn="c2", node="n2"), NO_LIMITS)
    await n1.admit(route(device="d1", conn="c1"), NO_LIMITS)
    await client.hset(
        "t1:online:u1",
        mapping={
            "x1": "garbage",
            "x2": "n9|http://n9|c9|not-a-number",
            "x3": "|http://n9|c9|1",
            "x4": "n9|http://n9||1",
            "x5": "n9|http://n9|c9|1|extra",
            "x6": "n9|http://n9|c9",
            "": "n9|http://n9:8080|c0|5",  # MICS v1 accepts an empty device id
        },
    )

    routes = await n1.lookup("t1", "u1")

    assert routes == [
        RemoteRoute("t1", "u1", "", "n9", "c0", "http://n9:8080", 5),
        RemoteRoute("t1", "u1", "d1", "n1", "c1", "http://n1:8080", T0_MS),
        RemoteRoute("t1", "u1", "d2", "n2", "c2", "http://n2:8080", T0_MS),
    ]
    assert all(isinstance(r, Route) for r in routes)
    assert await n1.lookup("t1", "nobody") == []


def spy_pipelines(client: Redis, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of commands of each pipeline the client executes."""
    sizes: list[int] = []
    real = client.pipeline

    def pipeline(transaction: bool = True, shard_hint: str | None = None) -> Any:
        pipe = real(transaction=transaction, shard_hint=shard_hint)
        execute = pipe.execute

        async def counted(raise_on_error: bool = True) -> list[Any]:
            sizes.append(len(pipe.command_stack))
            return await execute(raise_on_error=raise_on_error)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    monkeypatch.setattr(client, "pipeline", pipeline)
    return sizes


async def test_lookup_many_reads_users_in_pipelined_chunks(
    client: Redis, table_for: Callable[..., RedisRouteTable], monkeypatch: pytest.MonkeyPatch
) -> None:
    table = table_for("n1", chunk_size=3)
    online = {f"u{i}" for i in range(10) if i % 3 == 0}  # u0 u3 u6 u9
    for user in sorted(online):
        await table.admit(route(user=user, conn=f"c-{user}"), NO_LIMITS)
    await table.admit(route(user="u3", device="d2", conn="c-u3b"), NO_LIMITS)
    sizes = spy_pipelines(client, monkeypatch)

    users = [f"u{i}" for i in range(10)] + ["u3", "u0"]  # duplicates are read once
    found = await table.lookup_many("t1", users)

    assert sizes == [3, 3, 3, 1]
    assert list(found) == [f"u{i}" for i in range(10)]
    assert {user for user, routes in found.items() if routes} == online
    assert [(r.device_id, r.conn_id) for r in found["u3"]] == [("d1", "c-u3"), ("d2", "c-u3b")]
    assert found["u9"] == [RemoteRoute("t1", "u9", "d1", "n1", "c-u9", "http://n1:8080", T0_MS)]
    assert await table.lookup_many("t1", []) == {}


async def test_lookup_many_default_chunk_is_the_group_route_chunk_size(
    client: Redis, table: RedisRouteTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert GROUP_ROUTE_CHUNK_SIZE == 256
    await table.admit(route(user="u599"), NO_LIMITS)
    sizes = spy_pipelines(client, monkeypatch)

    found = await table.lookup_many("t1", [f"u{i}" for i in range(600)])

    assert sizes == [256, 256, 88]
    assert len(found) == 600
    assert [user for user, routes in found.items() if routes] == ["u599"]


async def test_lookup_many_leaves_out_a_user_whose_read_failed(
    client: Redis, table: RedisRouteTable
) -> None:
    await table.admit(route(user="u1"), NO_LIMITS)
    await client.set("t1:online:u2", "not a hash")  # WRONGTYPE for HGETALL

    found = await table.lookup_many("t1", ["u1", "u2", "u3"])

    assert sorted(found) == ["u1", "u3"]
    assert len(found["u1"]) == 1
    assert found["u3"] == []
    with pytest.raises(RouteTableUnavailable):
        await table.lookup("t1", "u2")


# --- renewal -------------------------------------------------------------------------------


async def test_renew_extends_the_leases_and_the_key_expiry(
    client: Redis, table_for: Callable[..., RedisRouteTable], clock: FakeClock
) -> None:
    table = table_for("n1", renew_chunk_size=2)
    routes = [route(user=f"u{i}", conn=f"c{i}") for i in range(5)]
    for r in routes:
        await table.admit(r, NO_LIMITS)
    await client.pexpire("t1:online:u0", 1_000)
    await client.pexpire("t1:conn_leases", 1_000)
    clock.advance(20.0)

    result = await table.renew(routes)

    assert result.renewed == 5
    assert result.ok
    expiry = T0_MS + 20_000 + 30_000
    assert await client.zscore("t1:user:u0:conn_leases", "d1") == expiry
    assert await client.zrange("t1:conn_leases", 0, -1, withscores=True) == [
        (f"u{i}|d1", expiry) for i in range(5)
    ]
    assert await client.pttl("t1:online:u0") > 55_000
    assert await client.pttl("t1:conn_leases") > 55_000

    # Renewed leases keep counting after the original expiry.
    clock.advance(15.0)
    limits = AdmissionLimits(tenant_max_connections=5)
    assert (await table.admit(route(user="u9"), limits)).result is AdmissionResult.DENIED

    longer = await table.renew(routes[:1], lease_ttl_s=90.0)
    assert longer.renewed == 1
    assert await client.zscore("t1:user:u0:conn_leases", "d1") == T0_MS + 35_000 + 90_000


async def test_renew_reports_lost_routes_without_recreating_them(
    client: Redis, table_for: Callable[..., RedisRouteTable], clock: FakeClock
) -> None:
    n1, n2 = table_for("n1"), table_for("n2")
    live = route(user="u1", conn="c1")
    taken_over = route(user="u2", conn="c2")
    removed = route(user="u3", conn="c3")
    expired = route(user="u4", conn="c4")
    for r in (live, taken_over, removed, expired):
        await n1.admit(r, NO_LIMITS)
    await n2.admit(route(user="u2", conn="c2b", node="n2"), NO_LIMITS)
    await n1.remove(removed)
    clock.advance(31.0)  # every lease has expired, none was dropped yet
    assert (await n1.renew([live])).renewed == 1  # so it is still renewable
    # An admission drops the expired leases: u4's stale route goes with its lease.
    await n2.admit(route(user="u4", device="d2", conn="c4b", node="n2"), NO_LIMITS)

    result = await n1.renew([live, taken_over, removed, expired])

    assert result.renewed == 1
    assert result.lost == (taken_over, removed, expired)
    assert result.failed == ()
    assert not result.ok
    assert await client.hkeys("t1:online:u4") == ["d2"]
    assert await client.zscore("t1:conn_leases", "u3|d1") is None
    # The caller re-admits a lost route.
    again = await n1.admit(expired, NO_LIMITS)
    assert again.result is AdmissionResult.ADMITTED
    assert (await n1.renew([expired])).renewed == 1


# --- concurrency ---------------------------------------------------------------------------


async def test_concurrent_admits_respect_the_user_limit_exactly(redis_url: str) -> None:
    clients = [make_client(redis_url) for _ in range(5)]
    try:
        tables = [
            RedisRouteTable(c, node_id=f"n{i}", endpoint=f"http://n{i}")
            for i, c in enumerate(clients)
        ]
        limits = AdmissionLimits(user_max_connections=5)
        admissions = await asyncio.gather(
            *(
                tables[i % 5].admit(route(device=f"d{i}", conn=f"c{i}", node=f"n{i % 5}"), limits)
                for i in range(50)
            )
        )

        results = [a.result for a in admissions]
        assert results.count(AdmissionResult.ADMITTED) == 5
        assert results.count(AdmissionResult.DENIED) == 45
        assert await clients[0].hlen("t1:online:u1") == 5
        assert await clients[0].zcard("t1:user:u1:conn_leases") == 5
        assert await clients[0].zcard("t1:conn_leases") == 5
    finally:
        for c in clients:
            await c.aclose()


async def test_concurrent_admits_respect_the_tenant_limit_exactly(
    client: Redis, table: RedisRouteTable
) -> None:
    limits = AdmissionLimits(tenant_max_connections=7, user_max_connections=1)
    admissions = await asyncio.gather(
        *(table.admit(route(user=f"u{i % 25}", device=f"d{i}"), limits) for i in range(50))
    )

    assert [a.result for a in admissions].count(AdmissionResult.ADMITTED) == 7
    assert await client.zcard("t1:conn_leases") == 7


# --- clients, scripts and outages ----------------------------------------------------------


async def test_works_with_a_bytes_client(redis_url: str) -> None:
    raw = make_client(redis_url, decode=False)
    try:
        n1 = RedisRouteTable(raw, node_id="n1", endpoint="http://n1", clock=FakeClock())
        n2 = RedisRouteTable(raw, node_id="n2", endpoint="http://n2", clock=FakeClock())
        await n1.admit(route(), NO_LIMITS)
        takeover = await n2.admit(route(node="n2", conn="c2"), NO_LIMITS)
        assert takeover.previous == RemoteRoute("t1", "u1", "d1", "n1", "c1", "http://n1", T0_MS)
        expected = [RemoteRoute("t1", "u1", "d1", "n2", "c2", "http://n2", T0_MS)]
        assert await n1.lookup("t1", "u1") == expected
        assert await n1.lookup_many("t1", ["u1", "u2"]) == {"u1": expected, "u2": []}
        assert (await n2.renew([route(node="n2", conn="c2")])).renewed == 1
        assert await n2.remove(route(node="n2", conn="c2"))
    finally:
        await raw.aclose()


async def test_scripts_are_reloaded_after_a_script_flush(
    client: Redis, table: RedisRouteTable
) -> None:
    await table.admit(route(), NO_LIMITS)
    await client.script_flush()

    assert (await table.admit(route(user="u2"), NO_LIMITS)).result is AdmissionResult.ADMITTED
    await client.script_flush()
    assert (await table.renew([route()])).renewed == 1
    await client.script_flush()
    assert await table.remove(route())


async def test_redis_down_raises_unavailable_and_recovers_after_restart(
    redis_server: RedisServer, client: Redis, table: RedisRouteTable
) -> None:
    before = route(user="u1")
    await table.admit(before, NO_LIMITS)
    try:
        redis_server.stop()

        with pytest.raises(RouteTableUnavailable):
            await table.admit(route(user="u2"), NO_LIMITS)
        with pytest.raises(RouteTableUnavailable):
            await table.lookup("t1", "u1")
        with pytest.raises(RouteTableUnavailable):
            await table.lookup_many("t1", ["u1", "u2"])
        with pytest.raises(RouteTableUnavailable):
            await table.remove(before)
        down = await table.renew([before, route(user="u3")])
        assert (down.renewed, down.lost) == (0, ())
        assert down.failed == (before, route(user="u3"))
    finally:
        if not redis_server.running:
            redis_server.start()

    # Same port, empty server, no scripts: everything works again.
    assert await table.lookup("t1", "u1") == []
    lost = await table.renew([before])
    assert lost.lost == (before,)
    assert (await table.admit(before, NO_LIMITS)).result is AdmissionResult.ADMITTED
    assert (await table.admit(route(user="u2"), NO_LIMITS)).result is AdmissionResult.ADMITTED
    assert [r.user_id for r in (await table.lookup_many("t1", ["u1", "u2"]))["u2"]] == ["u2"]
    assert await table.remove(before)
