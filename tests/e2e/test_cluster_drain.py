"""Cluster e2e: a node drained under traffic, nudges across nodes, the cluster token.

In-process nodes sharing the session's real Redis and forwarding over real gRPC, with
the ``Cluster`` fixture of ``test_cluster.py``; SDK clients over real WebSockets. Waits
are for conditions (deadlines only bound a failing test), never fixed sleeps.

The tests under "bugs found on the way" pin bugs found while writing these tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from mics.client import MicsClient
from mics.cluster.routes import Route
from mics.gateway.app import GatewayServer
from mics.protocol import codec
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.conftest import TENANT
from tests.e2e.scripted_backend import AUTH_SECRET, GET_OFFLINE, ScriptedBackend
from tests.e2e.test_cluster import Cluster, wait_for_snapshots
from tests.e2e.test_cluster import cluster as cluster  # the fixture, shared
from tests.support.waiting import wait_until

SENT = msg_pb.SENT
# A node TTL far beyond the test: the survivor's dead-node cleanup cannot be what
# removes the drained node's keys, so their absence proves the node removed them.
LONG_TTL = {"node_ttl_seconds": 30, "node_refresh_seconds": 1}


@dataclass
class Traffic:
    """One sender sending single-chat messages round-robin to ``users``, one at a time
    (each waits for its ack), until stopped; every ack is kept."""

    sender: MicsClient
    users: tuple[str, ...]
    sent: dict[str, list[str]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        return sum(len(ids) for ids in self.sent.values())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            user = self.users[i % len(self.users)]
            msg_id = f"dr-{i}"
            ack = await self.sender.send_single(user, b"drain", msg_id=msg_id)
            assert ack.status == SENT, ack
            self.sent.setdefault(user, []).append(msg_id)
            self.reasons[msg_id] = ack.reason
            i += 1

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 10)


async def collect(client: MicsClient, into: list[str]) -> None:
    """Append every delivery's msg_id until the client is closed for good."""
    async for message in client.deliveries():
        into.append(message.msg_id)


async def wait_for_more(traffic: Traffic, count: int) -> None:
    target = traffic.count + count
    await wait_until(lambda: traffic.count >= target, 10, f"{count} more messages sent")


def home_of(node: GatewayServer, user: str) -> str:
    assert node.membership is not None
    home = node.membership.directory.home_node(TENANT, user)
    assert home is not None
    return home.node_id


def sample(server: GatewayServer, name: str, **labels: str) -> float:
    return server.gateway.metrics_registry.sample(name, labels)


async def test_graceful_drain_under_traffic_moves_users_without_loss(cluster: Cluster) -> None:
    n1 = await cluster.add_node("n1", **LONG_TTL)
    n2 = await cluster.add_node("n2", **LONG_TTL)
    users = ("u2", "u3")
    sender = await cluster.connect(n1, "u1")
    on_n2 = {user: await cluster.connect(n2, user) for user in users}
    got: dict[str, list[str]] = {user: [] for user in users}
    readers = [asyncio.create_task(collect(on_n2[u], got[u])) for u in users]
    traffic = Traffic(sender, users)
    traffic.start()
    await wait_until(lambda: all(len(got[u]) >= 5 for u in users), 10, "traffic across nodes")

    stopping = asyncio.create_task(n2.stop())
    for user in users:
        await on_n2[user].wait_closed(timeout=10)
        assert (on_n2[user].close_code, on_n2[user].close_reason) == (
            codec.CLOSE_DRAINING,
            "server draining",
        )
    # Each session's route is removed before it is closed: gone as soon as the clients
    # see 4200, while n2 is still stopping (no polling, no dead-node cleanup).
    r = aioredis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        for user in users:
            assert await r.hgetall(f"{TENANT}:online:{user}") == {}
            assert await r.zscore(f"{TENANT}:conn_leases", f"{user}|d1") is None
            assert await r.zcard(f"{TENANT}:user:{user}:conn_leases") == 0
        assert await r.smembers("nodes:n2:routes") == set()
        await asyncio.wait_for(stopping, 15)
        # Deregistered: the node's own keys are gone too, long before its 30 s TTL.
        assert await r.exists("nodes:n2", "nodes:n2:routes") == 0
        assert await r.zscore("nodes:live", "n2") is None
        assert not await r.sismember("nodes:known", "n2")
    finally:
        await r.aclose()
    await asyncio.gather(*readers)
    assert n2.gateway.metrics_registry.sample("mics_shutdown_drain_total", {"node": "n2"}) == 2

    # The sender keeps going while the users have no connection: n1 holds those.
    await wait_for_more(traffic, 10)
    on_n1 = {user: await cluster.connect(n1, user) for user in users}
    await wait_for_more(traffic, 10)  # and live again, now local on n1
    await traffic.stop()

    for user in users:
        before = got[user]
        after = [
            (await on_n1[user].next_delivery(timeout=5)).msg_id
            for _ in range(len(traffic.sent[user]) - len(before))
        ]
        # Zero loss, no duplicates, in the order sent.
        assert before + after == traffic.sent[user]
        with pytest.raises(TimeoutError):
            await on_n1[user].next_delivery(timeout=0.2)
        held = [m for m in traffic.sent[user] if traffic.reasons[m] == "offline_buffered"]
        assert len(held) >= 3, "messages were sent while the user was offline"
        assert set(held) <= set(after)
        assert {traffic.reasons[m] for m in traffic.sent[user]} <= {"", "offline_buffered"}
    for client in (*on_n2.values(), *on_n1.values()):
        assert client.stats.duplicate_deliveries == 0


# -- nudge across nodes (protocol.md 9.5) ------------------------------------------------


@pytest.fixture
async def pull_backend() -> AsyncIterator[ScriptedBackend]:
    """A notify_pull tenant served by the scripted backend (offline store, nudges).

    Request it before ``cluster`` so that it stops after the nodes.
    """
    backend = ScriptedBackend(runtime={"offline_mode": "notify_pull"})
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


async def test_nudge_to_one_node_repulls_on_the_node_holding_the_user(
    pull_backend: ScriptedBackend, cluster: Cluster
) -> None:
    backend = pull_backend
    tenant = {
        "tenant_auth_map": {TENANT: backend.url},
        "tenant_hook_secrets": {TENANT: AUTH_SECRET},
    }
    n1 = await cluster.add_node("n1", **tenant)
    n2 = await cluster.add_node("n2", **tenant)
    bob = await cluster.connect(n2, "u2")
    sync = await bob.next_offline_sync(timeout=5)  # the connect drain: nothing yet
    assert (sync.delivered, sync.complete) == (0, True)

    backend.offline.add_many("u2", 1, prefix="late")
    # n1 has no session of the tenant, so it never received the /auth tenant_secret:
    # sign with the TENANT_HOOK_SECRETS entry, which every node knows (section 9.5).
    answer = await backend.nudge(n1.url, "u2", secret=AUTH_SECRET)
    assert answer.status == 200
    response = answer.response
    assert (response.ok, response.reason, response.connections) == (True, "", 1)

    late = await bob.next_delivery(timeout=5)
    assert (late.msg_id, late.user_id) == ("late-0", "u1")
    sync = await bob.next_offline_sync(timeout=5)
    assert (sync.delivered, sync.complete) == (1, True)
    # n2 pulled again, from bob's cursor, because n1 asked it to (PullOffline).
    assert len(backend.gets_of("u2")) == 2
    n1_metrics = n1.gateway.metrics_registry
    n2_metrics = n2.gateway.metrics_registry
    assert n1_metrics.sample("mics_offline_nudges_total", {"tenant": TENANT, "result": "ok"}) == 1
    assert (
        n2_metrics.sample(
            "mics_offline_drain_requests_total", {"tenant": TENANT, "trigger": "nudge"}
        )
        == 1
    )
    assert (
        n1_metrics.sample(
            "mics_offline_drain_requests_total", {"tenant": TENANT, "trigger": "nudge"}
        )
        == 0
    )
    await wait_until(lambda: backend.offline.undelivered("u2") == [], 5, "the pull committed")
    assert backend.calls[GET_OFFLINE] == 2


# -- the cluster token (protocol.md 7) ---------------------------------------------------


async def test_a_node_with_a_wrong_cluster_token_cannot_deliver_to_others(
    cluster: Cluster,
) -> None:
    n1 = await cluster.add_node("n1", cluster_grpc_token="right-token")
    n2 = await cluster.add_node("n2", cluster_grpc_token="wrong-token")
    n3 = await cluster.add_node("n3", cluster_grpc_token="right-token")
    await wait_for_snapshots(n1, n2, n3)
    # Home nodes over (n1, n2, n3): u1's is n3, u2's is n2 (protocol.md 7.1).
    assert (home_of(n1, "u1"), home_of(n1, "u2")) == ("n3", "n2")
    bob = await cluster.connect(n1, "u2")
    alice = await cluster.connect(n2, "u1")
    # Connecting asked each user's home node for buffered messages, and n2 refused
    # n1's call (the drain ends with an offline sync): count what the messages cause
    # from here on.
    for client in (bob, alice):
        await client.next_offline_sync(timeout=5)
    n1_metrics = n1.gateway.metrics_registry
    n2_metrics = n2.gateway.metrics_registry
    refused_by_n1 = n1_metrics.sample("mics_grpc_unauthorized_total")
    refused_by_n2 = n2_metrics.sample("mics_grpc_unauthorized_total")

    ack = await alice.send_single("u2", b"refused", msg_id="tok-1")
    # The forward was refused: the message took the offline path, and the ack says so.
    assert (ack.status, ack.reason) == (SENT, "offline_buffered")
    with pytest.raises(TimeoutError):
        await bob.next_delivery(timeout=0.5)
    # One attempt: UNAUTHENTICATED is not retried.
    assert n1_metrics.sample("mics_grpc_unauthorized_total") == refused_by_n1 + 1
    failed = {"tenant": TENANT, "via": "grpc_single", "status": "UNAUTHENTICATED"}
    assert n2_metrics.sample("mics_grpc_forward_failed_total", failed) == 1
    assert (
        n1_metrics.sample("mics_deliveries_total", {"tenant": TENANT, "via": "grpc_in_single"}) == 0
    )

    # The other direction is refused too, by n2 (u1's home, n3, takes the message).
    back = await bob.send_single("u1", b"refused too", msg_id="tok-2")
    assert (back.status, back.reason) == (SENT, "offline_buffered")
    with pytest.raises(TimeoutError):
        await alice.next_delivery(timeout=0.5)
    assert n2_metrics.sample("mics_grpc_unauthorized_total") == refused_by_n2 + 1

    # A node with the right token delivers to n1 as usual.
    carol = await cluster.connect(n3, "u3")
    ok = await carol.send_single("u2", b"allowed", msg_id="tok-3")
    assert (ok.status, ok.reason) == (SENT, "")
    assert (await bob.next_delivery(timeout=5)).msg_id == "tok-3"
    assert n1_metrics.sample("mics_grpc_unauthorized_total") == refused_by_n1 + 1

    # Held, not lost: on u2's home, here the sender's node; a connection there drains it.
    bob_on_n2 = await cluster.connect(n2, "u2", "d2")
    assert (await bob_on_n2.next_delivery(timeout=5)).msg_id == "tok-1"


# -- bugs found on the way -------------------------------------------------------------------


async def test_a_user_connecting_on_the_senders_node_during_the_route_lookup_gets_it(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    n1 = await cluster.add_node("n1")
    alice = await cluster.connect(n1, "u1")
    assert n1.membership is not None
    routes = n1.membership.routes
    real_lookup = routes.lookup
    in_lookup = asyncio.Event()
    proceed = asyncio.Event()

    async def lookup(tenant_id: str, user_id: str) -> list[Route]:
        # The interleaving a Redis round trip allows: the registry said "not here",
        # then bob connects (admitted, connect drain done), then the lookup answers.
        if user_id == "u2" and not in_lookup.is_set():
            in_lookup.set()
            await proceed.wait()
        return await real_lookup(tenant_id, user_id)

    monkeypatch.setattr(routes, "lookup", lookup)
    sending = asyncio.create_task(alice.send_single("u2", b"racing", msg_id="race-1"))
    await asyncio.wait_for(in_lookup.wait(), 5)
    bob = await cluster.connect(n1, "u2")
    proceed.set()
    ack = await sending
    assert ack.status == SENT
    # Bob is online on this very node: he must get it now, not at his next connect.
    assert (await bob.next_delivery(timeout=2)).msg_id == "race-1"


async def test_a_lookup_in_flight_during_an_invalidation_does_not_cache_stale_routes(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    n1 = await cluster.add_node("n1")
    n2 = await cluster.add_node("n2")
    alice = await cluster.connect(n1, "u1")
    assert n1.membership is not None
    routes = n1.membership.routes
    real_lookup = routes.lookup
    answered = asyncio.Event()
    proceed = asyncio.Event()

    async def lookup(tenant_id: str, user_id: str) -> list[Route]:
        found = await real_lookup(tenant_id, user_id)
        if user_id == "u2" and not answered.is_set():
            answered.set()  # Redis answered "no route"; the reply is still on its way
            await proceed.wait()
        return found

    cache = n1.gateway.pipeline.router.cache
    real_invalidate = cache.invalidate
    invalidated = asyncio.Event()

    def invalidate(tenant_id: str, user_id: str) -> None:
        real_invalidate(tenant_id, user_id)
        if user_id == "u2":
            invalidated.set()

    monkeypatch.setattr(routes, "lookup", lookup)
    monkeypatch.setattr(cache, "invalidate", invalidate)
    first = asyncio.create_task(alice.send_single("u2", b"before", msg_id="inv-1"))
    await asyncio.wait_for(answered.wait(), 5)
    bob = await cluster.connect(n2, "u2")
    await asyncio.wait_for(invalidated.wait(), 5)  # n2's announcement reached n1
    proceed.set()
    assert (await first).status == SENT  # sent before bob was online: offline is fine
    # Bob is online on n2 now, and n1 was told so: this one must reach him live.
    ack = await alice.send_single("u2", b"after", msg_id="inv-2")
    assert ack.status == SENT
    assert (await bob.next_delivery(timeout=2)).msg_id == "inv-2"


async def test_a_message_held_for_an_offline_user_reaches_them_on_any_node(
    cluster: Cluster,
) -> None:
    n1 = await cluster.add_node("n1")
    n2 = await cluster.add_node("n2")
    await wait_for_snapshots(n1, n2)
    alice = await cluster.connect(n1, "u1")
    ack = await alice.send_single("u2", b"while away", msg_id="home-1")
    assert (ack.status, ack.reason) == (SENT, "offline_buffered")
    # E.g. bob's node was drained and he reconnected to a node other than the sender's.
    bob = await cluster.connect(n2, "u2")
    assert (await bob.next_delivery(timeout=2)).msg_id == "home-1"


# -- the offline buffer on the home node (protocol.md 7.1, 7.2) ----------------------------


async def test_buffered_messages_go_to_the_home_node_and_are_drained_from_any_node(
    cluster: Cluster,
) -> None:
    n1 = await cluster.add_node("n1")
    n2 = await cluster.add_node("n2")
    await wait_for_snapshots(n1, n2)
    nodes = {"n1": n1, "n2": n2}
    # Rendezvous over (n1, n2) for tenant t1: u2 lives on n2, u3 on n1 (protocol.md 7.1).
    assert (home_of(n1, "u2"), home_of(n1, "u3")) == ("n2", "n1")
    alice = await cluster.connect(n1, "u1")
    for user in ("u2", "u3"):
        ack = await alice.send_single(user, b"for later", msg_id=f"later-{user}")
        assert (ack.status, ack.reason) == (SENT, "offline_buffered")
    # Each frame sits on its recipient's home, nowhere else.
    assert n1.gateway.buffer.pending(TENANT, "u2") == 0
    assert n2.gateway.buffer.pending(TENANT, "u2") == 1
    assert n1.gateway.buffer.pending(TENANT, "u3") == 1
    assert sample(n2, "mics_offline_buffered_total", tenant=TENANT, via="grpc_in") == 1
    assert sample(n1, "mics_grpc_node_calls_received_total", rpc="BufferOffline") == 0

    # Each user connects to the node that is not its home: the drain asks the home.
    bob = await cluster.connect(n1, "u2")
    carol = await cluster.connect(n2, "u3")
    assert (await bob.next_delivery(timeout=5)).msg_id == "later-u2"
    assert (await carol.next_delivery(timeout=5)).msg_id == "later-u3"
    for client in (bob, carol):
        sync = await client.next_offline_sync(timeout=5)
        assert (sync.delivered, sync.complete, sync.reason) == (1, True, "")
    for user, home in (("u2", "n2"), ("u3", "n1")):
        assert nodes[home].gateway.buffer.pending(TENANT, user) == 0
        assert sample(nodes[home], "mics_offline_drained_total", tenant=TENANT, node="home") == 1

    # Taken once: another connection of the same user finds nothing more.
    again = await cluster.connect(n2, "u2", "d2")
    sync = await again.next_offline_sync(timeout=5)
    assert (sync.delivered, sync.complete) == (0, True)


async def test_an_unreachable_home_node_leaves_the_message_with_the_sender_node(
    cluster: Cluster,
) -> None:
    # n2 does not take n1's calls (wrong cluster token): it is u2's home, unreachable.
    n1 = await cluster.add_node("n1", cluster_grpc_token="one")
    n2 = await cluster.add_node("n2", cluster_grpc_token="two")
    await wait_for_snapshots(n1, n2)
    assert home_of(n1, "u2") == "n2"
    alice = await cluster.connect(n1, "u1")
    await alice.next_offline_sync(timeout=5)  # her connect drain asked n2 too, in vain
    ack = await alice.send_single("u2", b"kept here", msg_id="kept-1")
    assert (ack.status, ack.reason) == (SENT, "offline_buffered")
    assert n1.gateway.buffer.pending(TENANT, "u2") == 1
    refused = {"tenant": TENANT, "status": "UNAUTHENTICATED"}
    assert sample(n1, "mics_grpc_offline_buffer_failed_total", **refused) == 1

    # Bob connects to n1: its own buffer drains; the home's could not be asked, and the
    # offline sync says so.
    failed_drains = sample(n1, "mics_grpc_offline_drain_failed_total", **refused)
    bob = await cluster.connect(n1, "u2")
    assert (await bob.next_delivery(timeout=5)).msg_id == "kept-1"
    sync = await bob.next_offline_sync(timeout=5)
    assert (sync.delivered, sync.complete, sync.reason) == (1, False, "buffer unavailable")
    assert sample(n1, "mics_grpc_offline_drain_failed_total", **refused) == failed_drains + 1


async def test_a_draining_home_node_takes_no_more_messages(cluster: Cluster) -> None:
    n1 = await cluster.add_node("n1")
    n2 = await cluster.add_node("n2")
    await wait_for_snapshots(n1, n2)
    assert home_of(n1, "u2") == "n2"
    alice = await cluster.connect(n1, "u1")
    n2.gateway.draining = True  # as from the start of a graceful shutdown
    ack = await alice.send_single("u2", b"not there", msg_id="drn-1")
    assert (ack.status, ack.reason) == (SENT, "offline_buffered")
    # n2's buffer would end with n2: n1 keeps the message, and n2 is not penalized.
    assert n2.gateway.buffer.pending(TENANT, "u2") == 0
    assert n1.gateway.buffer.pending(TENANT, "u2") == 1
    assert n1.membership is not None
    assert n1.membership.forwarder.breaker_state("n2") == "closed"
    n2.gateway.draining = False
    bob = await cluster.connect(n1, "u2")
    assert (await bob.next_delivery(timeout=5)).msg_id == "drn-1"


async def test_the_documented_unauthorized_metric_counts_refused_calls(cluster: Cluster) -> None:
    n1 = await cluster.add_node("n1", cluster_grpc_token="right-token")
    n2 = await cluster.add_node("n2", cluster_grpc_token="wrong-token")
    await wait_for_snapshots(n1, n2)
    bob = await cluster.connect(n1, "u2")
    alice = await cluster.connect(n2, "u1")

    def documented() -> float:
        return sum(
            node.gateway.metrics_registry.sample("mics_grpc_unauthorized_total")
            for node in (n1, n2)
        )

    # Connecting asked the users' home nodes for buffered messages (refused or not);
    # each drain ends with an offline sync.
    for client in (bob, alice):
        await client.next_offline_sync(timeout=5)
    before = documented()
    refused_by_n1 = n1.gateway.metrics_registry.sample("mics_grpc_unauthorized_total")
    assert (await alice.send_single("u2", b"refused", msg_id="m-1")).reason == "offline_buffered"
    assert n1.gateway.metrics_registry.sample("mics_grpc_unauthorized_total") == refused_by_n1 + 1
    assert documented() == before + 1
