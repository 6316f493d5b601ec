"""Several gateway nodes sharing a real Redis route table, forwarding over real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from mics.backend.app import BackendServer
from mics.backend.config import BackendConfig
from mics.client import ClientOptions, MicsClient
from mics.gateway.app import GatewayServer
from mics.gateway.config import GatewaySettings
from mics.protocol import codec
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.conftest import SECRET, TENANT, tenant_config
from tests.support.waiting import wait_until


@dataclass
class Cluster:
    backend: BackendServer
    redis_url: str
    nodes: list[GatewayServer] = field(default_factory=list)
    clients: list[MicsClient] = field(default_factory=list)

    async def add_node(self, name: str, **overrides: Any) -> GatewayServer:
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "grpc_host": "127.0.0.1",
            "node_id": name,
            "tenant_auth_map": {TENANT: self.backend.url},
            "tenant_hook_secrets": {TENANT: SECRET},
            "hook_sign_required": True,
            "hook_timeout_ms": 2000,
            "redis_connection": self.redis_url,
            "route_renew_interval_seconds": 0.2,
            "node_ttl_seconds": 2,
            "node_refresh_seconds": 0.5,
            "node_snapshot_seconds": 0.5,
            "node_cleanup_seconds": 0.5,
            "heartbeat_sweep_interval_seconds": 0.1,
        }
        settings.update(overrides)
        node = GatewayServer(GatewaySettings(**settings))
        await node.start()
        self.nodes.append(node)
        return node

    async def connect(self, node: GatewayServer, user: str, device: str = "d1") -> MicsClient:
        client = MicsClient(
            ClientOptions(
                url=node.ws_url,
                tenant_id=TENANT,
                token=f"{user}-token",
                device_id=device,
                reconnect=False,
                heartbeat_interval_s=0,
                ack_timeout_s=5,
            )
        )
        await client.connect()
        self.clients.append(client)
        return client


async def wait_for_snapshots(*nodes: GatewayServer) -> None:
    """Every node's live-node snapshot lists every node: homes agree (protocol.md 7.1)."""
    names = {node.gateway.node_id for node in nodes}
    directories = [node.membership.directory for node in nodes if node.membership]
    assert len(directories) == len(nodes)
    await wait_until(
        lambda: all(set(d.live_node_ids) == names for d in directories), 10, "snapshots"
    )


@pytest.fixture
async def cluster(redis_url: str) -> AsyncIterator[Cluster]:
    backend = BackendServer(
        BackendConfig(host="127.0.0.1", port=0, tenants={TENANT: tenant_config()})
    )
    await backend.start()
    made = Cluster(backend, redis_url)
    try:
        yield made
    finally:
        for client in made.clients:
            await client.close()
        for node in made.nodes:
            await node.stop()
        await backend.stop()


async def test_single_chat_crosses_nodes_and_reaches_every_device(cluster: Cluster) -> None:
    n1 = await cluster.add_node("n1")
    n2 = await cluster.add_node("n2")
    alice = await cluster.connect(n1, "u1")
    bob_phone = await cluster.connect(n2, "u2", "phone")
    bob_laptop = await cluster.connect(n1, "u2", "laptop")
    ack = await alice.send_single("u2", b"across", msg_id="x-1")
    assert (ack.status, ack.reason) == (msg_pb.SENT, "")
    for device in (bob_phone, bob_laptop):
        got = await device.next_delivery(timeout=5)
        assert (got.msg_id, got.user_id) == ("x-1", "u1")
    assert (
        n2.gateway.metrics_registry.sample(
            "mics_deliveries_total", {"tenant": TENANT, "via": "grpc_in_single"}
        )
        == 1
    )


async def test_group_fan_out_sends_one_batch_per_node(cluster: Cluster) -> None:
    n1 = await cluster.add_node("n1")
    n2 = await cluster.add_node("n2")
    n3 = await cluster.add_node("n3")
    u1 = await cluster.connect(n1, "u1")
    u2 = await cluster.connect(n2, "u2")
    u3 = await cluster.connect(n2, "u3")
    ack = await u1.send_group("g1", b"hello", msg_id="g-1")
    assert ack.status == msg_pb.SENT
    for member in (u1, u2, u3):
        assert (await member.next_delivery(timeout=5)).msg_id == "g-1"
    assert (
        n2.gateway.metrics_registry.sample(
            "mics_deliveries_total", {"tenant": TENANT, "via": "grpc_in_batch"}
        )
        == 2
    )
    assert (
        n1.gateway.metrics_registry.sample("mics_group_fanout_nodes_total", {"tenant": TENANT}) == 1
    )
    # n3 hosts no member: it received nothing.
    assert (
        n3.gateway.metrics_registry.sample(
            "mics_deliveries_total", {"tenant": TENANT, "via": "grpc_in_batch"}
        )
        == 0
    )


async def test_same_device_takeover_across_nodes(cluster: Cluster) -> None:
    n1 = await cluster.add_node("n1")
    n2 = await cluster.add_node("n2")
    old = await cluster.connect(n1, "u2", "phone")
    new = await cluster.connect(n2, "u2", "phone")
    await old.wait_closed(timeout=10)
    assert (old.close_code, old.close_reason) == (codec.CLOSE_REPLACED, "replaced")
    sender = await cluster.connect(n1, "u1")
    assert (await sender.send_single("u2", b"to the new one")).status == msg_pb.SENT
    assert (await new.next_delivery(timeout=5)).msg_body == b"to the new one"


async def test_forward_to_a_node_where_the_user_just_left_goes_offline(cluster: Cluster) -> None:
    n1 = await cluster.add_node("n1")
    n2 = await cluster.add_node("n2")
    alice = await cluster.connect(n1, "u1")
    bob = await cluster.connect(n2, "u2")
    # Bob's session ends on n2 but his route is still in Redis (as right after a crash
    # of the socket, before cleanup): take the session out of n2's registry only.
    session = next(iter(n2.gateway.registry))
    n2.gateway.registry.remove(session)
    ack = await alice.send_single("u2", b"missed", msg_id="gone-1")
    assert (ack.status, ack.reason) == (msg_pb.SENT, "offline_buffered")
    await bob.close()
    again = await cluster.connect(n1, "u2", "d2")
    assert (await again.next_delivery(timeout=5)).msg_id == "gone-1"


async def test_nodes_see_each_other_and_report_ready(cluster: Cluster) -> None:
    n1 = await cluster.add_node("n1")
    await cluster.add_node("n2")
    assert n1.membership is not None
    directory = n1.membership.directory
    await wait_until(lambda: set(directory.live_node_ids) == {"n1", "n2"}, 10, "snapshot")
    assert n1.gateway.ready


async def test_redis_down_keeps_local_traffic_and_reports_not_ready(
    cluster: Cluster, redis_server: Any
) -> None:
    n1 = await cluster.add_node("n1")
    alice = await cluster.connect(n1, "u1")
    bob = await cluster.connect(n1, "u2")
    redis_server.stop()
    try:
        await wait_until(lambda: not n1.gateway.ready, 15, "not ready without Redis")
        ack = await alice.send_single("u2", b"still local", msg_id="rd-1")
        assert (ack.status, ack.reason) == (msg_pb.SENT, "")
        assert (await bob.next_delivery(timeout=5)).msg_id == "rd-1"
        # A user the node cannot locate takes the offline path, never the floor.
        lost = await alice.send_single("u3", b"for later", msg_id="rd-2")
        assert (lost.status, lost.reason) == (msg_pb.SENT, "offline_buffered")
    finally:
        redis_server.start()
    await wait_until(lambda: n1.gateway.ready, 15, "ready again")
    carol = await cluster.connect(n1, "u3")
    assert (await carol.next_delivery(timeout=5)).msg_id == "rd-2"


async def test_redis_restart_under_traffic_loses_nothing(
    cluster: Cluster, redis_server: Any, redis_url: str
) -> None:
    import redis.asyncio as aioredis

    n1 = await cluster.add_node("n1")
    n2 = await cluster.add_node("n2")
    alice = await cluster.connect(n1, "u1")
    bob = await cluster.connect(n2, "u2")
    sent: list[str] = []
    for i in range(10):
        assert (await alice.send_single("u2", b"a", msg_id=f"rr-{i}")).status == msg_pb.SENT
        sent.append(f"rr-{i}")
    redis_server.restart()  # every route is gone with Redis's data
    for i in range(10, 30):
        ack = await alice.send_single("u2", b"b", msg_id=f"rr-{i}")
        assert ack.status == msg_pb.SENT, ack
        sent.append(f"rr-{i}")
    # n2's lease renewal registers bob again; then a marker must arrive live.
    r = aioredis.Redis.from_url(redis_url)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await r.hget(f"{TENANT}:online:u2", "d1"):
            assert loop.time() < deadline, "bob's route was not registered again"
            await asyncio.sleep(0.05)
    finally:
        await r.aclose()
    assert (await alice.send_single("u2", b"m", msg_id="rr-marker")).reason == ""
    live: list[str] = []
    while (msg_id := (await bob.next_delivery(timeout=5)).msg_id) != "rr-marker":
        live.append(msg_id)
    # What found no route meanwhile was buffered (legacy mode) on bob's home node, or
    # on n1 while its snapshot missed the home: a new connection of bob's on n1 drains
    # both, once n1 sees every node again (its snapshot names the same home).
    await wait_for_snapshots(n1, n2)
    other = await cluster.connect(n1, "u2", "d2")
    held = [(await other.next_delivery(timeout=5)).msg_id for _ in range(len(sent) - len(live))]
    assert sorted(live + held) == sorted(sent), "zero loss, nothing twice"


async def test_nudge_reaches_connections_on_other_nodes(cluster: Cluster) -> None:
    import aiohttp

    from mics.protocol.ids import new_request_id
    from mics.protocol.pb import mics_hook_pb2 as hook_pb
    from mics.protocol.signing import sign_hook_request

    n1 = await cluster.add_node("n1")
    n2 = await cluster.add_node("n2")
    await cluster.connect(n2, "u2")
    nudge = hook_pb.OfflineAvailableRequest(user_id="u2")
    nudge.meta.tenant_id = TENANT
    nudge.meta.request_id = new_request_id()
    import time

    nudge.meta.timestamp_ms = int(time.time() * 1000)
    sign_hook_request(nudge, SECRET)
    async with (
        aiohttp.ClientSession() as http,
        http.post(n1.url + "/v1/offline-available", data=nudge.SerializeToString()) as resp,
    ):
        body = hook_pb.OfflineAvailableResponse.FromString(await resp.read())
    # The tenant is in legacy mode: n2 answers, with no connection that pulls.
    assert resp.status == 200
    assert body.ok
    assert n2.gateway.metrics_registry.sample("mics_grpc_unauthorized_total") == 0
