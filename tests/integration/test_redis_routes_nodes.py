"""NodeDirectory against a real redis-server: heartbeats, the live-node snapshot, dead-node
cleanup by exactly one live node, graceful deregistration and Redis outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mics.cluster.nodes import CleanupReport, LiveNode, NodeDirectory
from mics.cluster.redis_routes import RedisRouteTable, RouteTableUnavailable
from mics.cluster.rendezvous import home_node
from mics.cluster.routes import AdmissionLimits, AdmissionResult, Route
from tests.support.redis import RedisServer
from tests.support.waiting import wait_until

T0 = 1_700_000_000.0
T0_MS = int(T0 * 1000)
NO_LIMITS = AdmissionLimits()

# Fast settings for the loop tests: a dead node must be gone within 2 x TTL = 4 s.
FAST: dict[str, float] = {"ttl_s": 2.0, "refresh_s": 0.5, "snapshot_s": 0.2, "cleanup_s": 0.25}


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_client(url: str) -> Redis:
    return Redis.from_url(
        url,
        decode_responses=True,
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


def endpoint(node_id: str) -> str:
    return f"http://{node_id}:8080"


def directory(
    client: Redis, node_id: str, clock: Callable[[], float], **kwargs: Any
) -> NodeDirectory:
    return NodeDirectory(client, node_id, endpoint(node_id), clock=clock, **kwargs)


def table(client: Redis, node_id: str, clock: Callable[[], float] = time.time) -> RedisRouteTable:
    return RedisRouteTable(client, node_id=node_id, endpoint=endpoint(node_id), clock=clock)


async def wait_for(
    check: Callable[[], Awaitable[object]], within_s: float, what: str, step_s: float = 0.02
) -> None:
    """Poll an async condition (a Redis read) until it holds, or fail after ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(step_s)


async def admit_many(routes: RedisRouteTable, tenant: str, users: int, devices: int) -> list[Route]:
    admitted = []
    for u in range(users):
        for d in range(devices):
            r = Route(tenant, f"u{u}", f"d{d}", routes.node_id, f"{routes.node_id}-c{u}-{d}")
            assert (await routes.admit(r, NO_LIMITS)).result is AdmissionResult.ADMITTED
            admitted.append(r)
    return admitted


# --- heartbeat and snapshot ----------------------------------------------------------------


async def test_heartbeat_writes_the_section_8_node_keys(client: Redis, clock: FakeClock) -> None:
    node = directory(client, "n1", clock)

    await node.heartbeat()

    assert sorted(await client.keys("*")) == ["nodes:known", "nodes:live", "nodes:n1"]
    assert await client.type("nodes:n1") == "hash"
    assert await client.hgetall("nodes:n1") == {
        "nodeId": "n1",
        "endpoint": "http://n1:8080",
        "heartbeatAtMs": str(T0_MS),
    }
    assert 25_000 < await client.pttl("nodes:n1") <= 30_000
    assert await client.zrange("nodes:live", 0, -1, withscores=True) == [("n1", T0_MS + 30_000)]
    assert await client.smembers("nodes:known") == {"n1"}
    assert node.stats.heartbeats == 1

    clock.advance(10.0)
    await node.heartbeat()
    assert await client.zscore("nodes:live", "n1") == T0_MS + 40_000
    assert await client.hget("nodes:n1", "heartbeatAtMs") == str(T0_MS + 10_000)


async def test_snapshot_lists_live_nodes_that_have_an_endpoint(
    client: Redis, clock: FakeClock
) -> None:
    nodes = {n: directory(client, n, clock) for n in ("n3", "n1", "n2")}
    for node in nodes.values():
        await node.heartbeat()
    await client.zadd("nodes:live", {"ghost": T0_MS + 60_000})  # live score, no hash
    await client.zadd("nodes:live", {"stale": T0_MS - 1})  # expired
    await client.hset("nodes:stale", mapping={"nodeId": "stale", "endpoint": "http://stale"})

    snapshot = await nodes["n1"].refresh_snapshot()

    assert snapshot == tuple(LiveNode(n, endpoint(n)) for n in ("n1", "n2", "n3"))
    assert nodes["n1"].live_nodes == snapshot
    assert nodes["n1"].live_node_ids == ("n1", "n2", "n3")
    assert nodes["n1"].endpoint_of("n2") == "http://n2:8080"
    assert nodes["n1"].endpoint_of("ghost") is None
    for user in ("u1", "u2", "u3"):
        home = nodes["n1"].home_node("t1", user)
        assert home is not None
        assert home.node_id == home_node("t1", user, ["n1", "n2", "n3"])
    assert nodes["n2"].home_node("t1", "u1") is None  # n2 has no snapshot yet

    # n3 misses its heartbeats: once its score is past, it leaves the snapshot.
    clock.advance(25.0)
    await nodes["n1"].heartbeat()
    await nodes["n2"].heartbeat()
    clock.advance(5.0)  # n3's score == now: still live
    assert len(await nodes["n1"].refresh_snapshot()) == 3
    clock.advance(0.01)
    assert [n.node_id for n in await nodes["n1"].refresh_snapshot()] == ["n1", "n2"]


async def test_loops_keep_heartbeating_and_snapshotting(client: Redis) -> None:
    a = directory(client, "a", time.time, **FAST)
    b = directory(client, "b", time.time, **FAST)
    await a.start()
    await b.start()
    try:
        assert a.running
        await wait_until(
            lambda: a.live_node_ids == ("a", "b") == b.live_node_ids, 3.0, "both snapshots"
        )
        await wait_until(lambda: a.stats.heartbeats >= 3, 3.0, "three heartbeats")
        await wait_until(lambda: a.stats.cleanup_passes >= 2, 3.0, "cleanup passes")
        assert a.stats.cleanups == 0
        assert 0 < await client.pttl("nodes:a") <= 2_000
    finally:
        await a.stop()
        await b.stop()
    assert not a.running


# --- dead-node cleanup ---------------------------------------------------------------------


async def test_a_dead_nodes_routes_are_removed_by_exactly_one_live_node_within_two_ttl(
    redis_url: str,
) -> None:
    clients = [make_client(redis_url) for _ in range(3)]
    a = directory(clients[0], "a", time.time, **FAST)
    b = directory(clients[1], "b", time.time, **FAST)
    dead = directory(clients[2], "dead", time.time, **FAST)
    check = clients[0]
    try:
        dead_routes = table(clients[2], "dead")
        routes = await admit_many(dead_routes, "t1", users=4, devices=3)
        routes += await admit_many(dead_routes, "t2", users=3, devices=1)
        # One device reconnected to node a: its route is re-pointed and must survive.
        moved = Route("t1", "u0", "d0", "a", "a-c0")
        assert (await table(clients[0], "a").admit(moved, NO_LIMITS)).previous is not None
        await dead.heartbeat()  # the dead node's last sign of life
        last_heartbeat = time.monotonic()
        await a.start()
        await b.start()

        async def dead_node_gone() -> bool:
            keys = set(await check.keys("nodes:dead*"))
            known = await check.smembers("nodes:known")
            remaining = [
                r
                for r in routes[1:]
                if await check.hget(f"{r.tenant_id}:online:{r.user_id}", r.device_id)
            ]
            return keys <= {"nodes:dead:cleanup_lock"} and "dead" not in known and not remaining

        remaining_s = 2 * FAST["ttl_s"] - (time.monotonic() - last_heartbeat)
        await wait_for(dead_node_gone, remaining_s, "the dead node's routes and keys to go")

        assert a.stats.cleanups + b.stats.cleanups == 1
        cleaner = a if a.stats.cleanups else b
        assert cleaner.stats.routes_processed == len(routes) == 15
        assert cleaner.stats.routes_removed == len(routes) - 1
        assert await check.get("nodes:dead:cleanup_lock") == cleaner.node_id
        # The re-pointed route, its leases and a's routes entry are untouched.
        assert await check.hget("t1:online:u0", "d0") is not None
        assert [(r.node_id, r.conn_id) for r in await table(check, "a").lookup("t1", "u0")] == [
            ("a", "a-c0")
        ]
        assert await check.zscore("t1:conn_leases", "u0|d0") is not None
        assert await check.zscore("t1:user:u0:conn_leases", "d0") is not None
        assert await check.smembers("nodes:a:routes") == {"t1|u0|d0"}
        assert await check.zrange("t1:conn_leases", 0, -1) == ["u0|d0"]
        assert not await check.exists("t2:online:u0", "t2:conn_leases", "t2:user:u0:conn_leases")
        assert await check.smembers("nodes:known") == {"a", "b"}
        assert sorted(await check.zrange("nodes:live", 0, -1)) == ["a", "b"]

        # Later passes of both nodes find nothing more to clean.
        passes = (a.stats.cleanup_passes, b.stats.cleanup_passes)
        await wait_until(
            lambda: (
                a.stats.cleanup_passes >= passes[0] + 2 and b.stats.cleanup_passes >= passes[1] + 2
            ),
            3.0,
            "two more cleanup passes on each node",
        )
        assert a.stats.cleanups + b.stats.cleanups == 1
    finally:
        await a.stop()
        await b.stop()
        for c in clients:
            await c.aclose()


async def test_cleanup_waits_until_a_node_is_dead(client: Redis, clock: FakeClock) -> None:
    a = directory(client, "a", clock)
    c = directory(client, "c", clock)
    await a.heartbeat()
    await c.heartbeat()
    await admit_many(table(client, "c", clock), "t1", users=2, devices=1)

    clock.advance(29.0)
    await a.heartbeat()
    assert await a.cleanup_dead_nodes() == CleanupReport()  # nothing dead
    assert await client.hlen("t1:online:u0") == 1

    clock.advance(1.0)  # c's score == now: still live
    assert (await a.cleanup_dead_nodes()).cleaned == ()
    clock.advance(0.01)
    report = await a.cleanup_dead_nodes()
    assert report.cleaned == ("c",)
    assert (report.routes_processed, report.routes_removed) == (2, 2)
    assert await client.smembers("nodes:known") == {"a"}
    assert not await client.exists("t1:online:u0", "t1:online:u1", "nodes:c:routes", "nodes:c")


async def test_cleanup_skips_routes_it_cannot_remove(client: Redis, clock: FakeClock) -> None:
    a = directory(client, "a", clock)
    c = directory(client, "c", clock)
    await c.heartbeat()
    await admit_many(table(client, "c", clock), "t1", users=2, devices=1)
    await client.set("t1:online:bad", "not a hash")
    await client.sadd("nodes:c:routes", "t1|bad|d0", "malformed")
    clock.advance(31.0)
    await a.heartbeat()

    report = await a.cleanup_dead_nodes()

    assert report.cleaned == ("c",)
    assert (report.routes_processed, report.routes_removed) == (4, 2)
    assert a.stats.route_errors == 1
    assert not await client.exists("t1:online:u0", "t1:online:u1", "nodes:c:routes")
    assert await client.get("t1:online:bad") == "not a hash"


async def test_cleanup_skips_a_node_whose_lock_is_taken(client: Redis, clock: FakeClock) -> None:
    a = directory(client, "a", clock)
    c = directory(client, "c", clock)
    await c.heartbeat()
    await admit_many(table(client, "c", clock), "t1", users=1, devices=2)
    clock.advance(31.0)
    await a.heartbeat()
    await client.set("nodes:c:cleanup_lock", "b", px=60_000)  # node b is on it

    assert (await a.cleanup_dead_nodes()).cleaned == ()
    assert await client.hlen("t1:online:u0") == 2
    assert a.stats.cleanups == 0

    await client.delete("nodes:c:cleanup_lock")  # b died while cleaning: the lock expired
    assert (await a.cleanup_dead_nodes()).cleaned == ("c",)
    assert a.stats.cleanups == 1
    assert not await client.exists("t1:online:u0")


async def test_cleanup_stops_when_the_node_is_live_again(client: Redis, clock: FakeClock) -> None:
    # The scripts re-check liveness on the server: a node that heartbeats between the
    # scan and the deletion keeps its routes and keys.
    a = directory(client, "a", clock)
    c = directory(client, "c", clock)
    await c.heartbeat()
    await admit_many(table(client, "c", clock), "t1", users=3, devices=1)

    seen, removed, finished = await a._drop_node_routes("c", require_dead=True)

    assert (seen, removed, finished) == (3, 0, False)
    assert await client.hlen("t1:online:u2") == 1
    assert await client.smembers("nodes:known") == {"c"}
    assert await client.exists("nodes:c", "nodes:c:routes") == 2


async def test_a_node_that_comes_back_after_cleanup_heals_by_readmitting(
    client: Redis, clock: FakeClock
) -> None:
    a = directory(client, "a", clock)
    c = directory(client, "c", clock)
    c_routes = table(client, "c", clock)
    await c.heartbeat()
    sessions = await admit_many(c_routes, "t1", users=2, devices=1)
    clock.advance(31.0)
    await a.heartbeat()
    assert (await a.cleanup_dead_nodes()).cleaned == ("c",)

    await c.heartbeat()  # c was only paused
    renewal = await c_routes.renew(sessions)
    assert renewal.lost == tuple(sessions)
    for session in renewal.lost:
        assert (await c_routes.admit(session, NO_LIMITS)).result is AdmissionResult.ADMITTED
    assert await client.smembers("nodes:c:routes") == {"t1|u0|d0", "t1|u1|d0"}
    assert await client.smembers("nodes:known") == {"a", "c"}


# --- deregistration and outages ------------------------------------------------------------


async def test_deregister_removes_own_routes_and_keys(client: Redis, clock: FakeClock) -> None:
    a = directory(client, "a", clock, **FAST)
    b = directory(client, "b", clock)
    await a.start()
    await b.heartbeat()
    await admit_many(table(client, "a", clock), "t1", users=3, devices=1)
    moved = Route("t1", "u2", "d0", "b", "b-c")
    await table(client, "b", clock).admit(moved, NO_LIMITS)

    removed = await a.deregister()

    assert removed == 2
    assert not a.running
    assert a.live_nodes == ()
    assert sorted(await client.keys("nodes:*")) == [
        "nodes:b",
        "nodes:b:routes",
        "nodes:known",
        "nodes:live",
    ]
    assert await client.smembers("nodes:known") == {"b"}
    assert await client.zrange("nodes:live", 0, -1) == ["b"]
    assert not await client.exists("t1:online:u0", "t1:online:u1")
    assert await client.hget("t1:online:u2", "d0") == f"b|http://b:8080|b-c|{T0_MS}"
    assert await client.zrange("t1:conn_leases", 0, -1) == ["u2|d0"]


async def test_operations_raise_unavailable_and_loops_recover_after_a_restart(
    redis_server: RedisServer, client: Redis
) -> None:
    a = directory(client, "a", time.time, **FAST)
    await a.start()
    try:
        await wait_until(lambda: a.live_node_ids == ("a",), 2.0, "a's first snapshot")
        redis_server.stop()
        try:
            with pytest.raises(RouteTableUnavailable):
                await a.heartbeat()
            with pytest.raises(RouteTableUnavailable):
                await a.refresh_snapshot()
            with pytest.raises(RouteTableUnavailable):
                await a.cleanup_dead_nodes()
            await wait_until(
                lambda: a.stats.snapshot_failures >= 2 and a.stats.cleanup_failures >= 2,
                3.0,
                "the loops to fail on their own",
            )
            assert a.live_node_ids == ("a",)  # the previous snapshot stays in use
        finally:
            if not redis_server.running:
                redis_server.start()

        # The empty server is repopulated by the next heartbeat.
        await wait_for(lambda: client.exists("nodes:a"), 2.0, "a's heartbeat after restart")
        assert await client.smembers("nodes:known") == {"a"}
        snapshots = a.stats.snapshots
        await wait_until(lambda: a.stats.snapshots > snapshots, 2.0, "a fresh snapshot")
        assert a.live_node_ids == ("a",)
    finally:
        await a.stop()
