"""Node-to-node forwarding over real gRPC: answers, missing users, token, breaker,
coalescing into ForwardMany, and the home-node buffer calls."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from grpc import aio

from mics.cluster.forwarding import (
    ForwardOutcome,
    NodeClient,
    NodeService,
    start_node_server,
)
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.pb import mics_node_pb2 as node_pb


@dataclass
class FakeNode:
    """A gateway's local side: which users have sessions, what was delivered."""

    online: set[str] = field(default_factory=set)
    draining: bool = False
    delivered: list[tuple[str, str, str, str]] = field(default_factory=list)
    nudged: list[tuple[str, str]] = field(default_factory=list)
    buffered: dict[tuple[str, str], list[bytes]] = field(default_factory=dict)

    def deliver_forwarded(
        self, tenant_id: str, to_user_ids: Sequence[str], message: msg_pb.MessageRequest, via: str
    ) -> list[str]:
        missing = []
        for user in to_user_ids:
            if user in self.online:
                self.delivered.append((tenant_id, user, message.msg_id, via))
            else:
                missing.append(user)
        return missing

    def nudge(self, tenant_id: str, user_id: str) -> int:
        self.nudged.append((tenant_id, user_id))
        return 1 if user_id in self.online else 0

    def buffer_put(self, tenant_id: str, user_id: str, frame: bytes, ttl_s: int) -> bool:
        self.buffered.setdefault((tenant_id, user_id), []).append(frame)
        return True

    def buffer_take(self, tenant_id: str, user_id: str) -> list[bytes]:
        return self.buffered.pop((tenant_id, user_id), [])


@dataclass
class Peer:
    node: FakeNode
    endpoint: str
    metrics: MetricsRegistry

    def received(self, rpc: str) -> float:
        return self.metrics.sample("mics_grpc_node_calls_received_total", {"rpc": rpc})


class OlderNodeService(NodeService):
    """A node from before ForwardMany: the generated servicer's default answer."""

    async def ForwardMany(
        self,
        request: node_pb.ForwardManyRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.ForwardManyResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        raise AssertionError("unreachable")


class FlakyNodeService(NodeService):
    """Answers the first ForwardMany with UNAVAILABLE, then as usual."""

    failures_left = 1

    async def ForwardMany(
        self,
        request: node_pb.ForwardManyRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.ForwardManyResponse:
        if self.failures_left:
            self.failures_left -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return await super().ForwardMany(request, context)


async def serve(service_type: type[NodeService] = NodeService) -> AsyncIterator[Peer]:
    node = FakeNode(online={"u1", "u2"})
    metrics = MetricsRegistry()
    server, port = await start_node_server(
        service_type(node, metrics, token="cluster-secret"), "127.0.0.1", 0
    )
    try:
        yield Peer(node, f"http://127.0.0.1:{port}", metrics)
    finally:
        await server.stop(None)


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    async for made in serve():
        yield made


def calls(registry: MetricsRegistry, rpc: str) -> float:
    return registry.sample("mics_grpc_forward_calls_total", {"rpc": rpc})


async def forward_all(
    client: NodeClient, endpoint: str, recipients: Sequence[Sequence[str]], prefix: str = "c"
) -> list[ForwardOutcome]:
    """One forward per entry of ``recipients``, all issued in the same loop iteration."""
    return list(
        await asyncio.gather(
            *(
                client.forward(
                    node_id="n2",
                    endpoint=endpoint,
                    tenant_id="t1",
                    to_user_ids=users,
                    message=message(f"{prefix}{index}"),
                )
                for index, users in enumerate(recipients)
            )
        )
    )


def message(msg_id: str) -> msg_pb.MessageRequest:
    return msg_pb.MessageRequest(tenant_id="spoofed", user_id="s", msg_id=msg_id, msg_body=b"x")


async def test_single_and_batch_forwards_report_missing_users(peer: Peer) -> None:
    registry = MetricsRegistry()
    client = NodeClient(registry, token="cluster-secret")
    try:
        single = await client.forward(
            node_id="n2",
            endpoint=peer.endpoint,
            tenant_id="t1",
            to_user_ids=["u1"],
            message=message("m1"),
        )
        assert (single.failed, single.missing) == (False, [])
        batch = await client.forward(
            node_id="n2",
            endpoint=peer.endpoint,
            tenant_id="t1",
            to_user_ids=["u1", "gone", "u2"],
            message=message("m2"),
        )
        assert (batch.failed, batch.missing) == (False, ["gone"])
        assert peer.node.delivered == [
            ("t1", "u1", "m1", "grpc_in_single"),
            ("t1", "u1", "m2", "grpc_in_batch"),
            ("t1", "u2", "m2", "grpc_in_batch"),
        ]
        assert (
            await client.pull_offline(
                node_id="n2", endpoint=peer.endpoint, tenant_id="t1", user_id="u1", trace_id="tr"
            )
            == 1
        )
        assert peer.node.nudged == [("t1", "u1")]
        # Each forward was alone in its loop iteration: the v1 calls, nothing coalesced.
        assert (calls(registry, "ForwardSingle"), calls(registry, "ForwardBatch")) == (1, 1)
        assert calls(registry, "ForwardMany") == 0
    finally:
        await client.close()


async def test_wrong_cluster_token_is_refused(peer: Peer) -> None:
    client = NodeClient(MetricsRegistry(), token="not-the-token")
    try:
        outcome = await client.forward(
            node_id="n2",
            endpoint=peer.endpoint,
            tenant_id="t1",
            to_user_ids=["u1"],
            message=message("m1"),
        )
        assert (outcome.failed, outcome.status) == (True, "UNAUTHENTICATED")
        assert peer.node.delivered == []
    finally:
        await client.close()


def dead_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_breaker_opens_on_a_dead_peer_and_skips_it() -> None:
    registry = MetricsRegistry()
    client = NodeClient(registry, breaker_failure_threshold=2, breaker_open_ms=60_000)
    endpoint = dead_endpoint()
    try:
        for _ in range(2):
            outcome = await client.forward(
                node_id="dead",
                endpoint=endpoint,
                tenant_id="t1",
                to_user_ids=["u1"],
                message=message("m"),
            )
            assert outcome.failed
        assert client.breaker_state("dead") == "open"
        skipped = await client.forward(
            node_id="dead",
            endpoint=endpoint,
            tenant_id="t1",
            to_user_ids=["u1"],
            message=message("m"),
        )
        assert (skipped.failed, skipped.status) == (True, "CIRCUIT_OPEN")
        assert (
            registry.sample(
                "mics_grpc_circuit_open_total",
                {"tenant": "t1", "node": "dead", "via": "grpc_single"},
            )
            == 1
        )
    finally:
        await client.close()


# -- coalescing: ForwardMany ---------------------------------------------------------------


async def test_forwards_to_one_peer_in_one_iteration_go_as_one_call(peer: Peer) -> None:
    registry = MetricsRegistry()
    client = NodeClient(registry, token="cluster-secret")
    try:
        recipients = [["u1"], ["gone"], ["u2", "gone-too"], ["u1", "u2"], ["u2"]]
        outcomes = await forward_all(client, peer.endpoint, recipients)
        # Each caller gets its own answer: who of its recipients had no session.
        assert [(o.failed, o.missing) for o in outcomes] == [
            (False, []),
            (False, ["gone"]),
            (False, ["gone-too"]),
            (False, []),
            (False, []),
        ]
        assert calls(registry, "ForwardMany") == 1
        assert calls(registry, "ForwardSingle") + calls(registry, "ForwardBatch") == 0
        assert (peer.received("ForwardMany"), peer.received("ForwardSingle")) == (1, 0)
        # Delivered in the order issued; each item counted as the call it stands for.
        assert peer.node.delivered == [
            ("t1", "u1", "c0", "grpc_in_single"),
            ("t1", "u2", "c2", "grpc_in_batch"),
            ("t1", "u1", "c3", "grpc_in_batch"),
            ("t1", "u2", "c3", "grpc_in_batch"),
            ("t1", "u2", "c4", "grpc_in_single"),
        ]
        # Every message got its tenant from the item, not from the sender's copy.
        duration = registry.sample(
            "mics_grpc_forward_duration_ms_count", {"tenant": "t1", "via": "grpc_single"}
        )
        assert duration == 3
    finally:
        await client.close()


async def test_many_forwards_in_one_iteration_are_split_into_bounded_calls(peer: Peer) -> None:
    from mics.cluster import forwarding

    registry = MetricsRegistry()
    client = NodeClient(registry, token="cluster-secret")
    try:
        count = forwarding.MANY_MAX_ITEMS * 2 + 1
        outcomes = await forward_all(client, peer.endpoint, [["u1"]] * count)
        assert all(not o.failed and o.missing == [] for o in outcomes)
        # 256 + 256 in two ForwardMany calls; the one left over goes as ForwardSingle.
        assert (calls(registry, "ForwardMany"), calls(registry, "ForwardSingle")) == (2, 1)
        # The calls run side by side: each caller's message arrives once, in some order
        # (one connection never has two messages in delivery, so no order is lost).
        delivered = [d[2] for d in peer.node.delivered]
        assert sorted(delivered) == sorted(f"c{i}" for i in range(count))
    finally:
        await client.close()


async def test_a_forward_many_retried_after_unavailable_answers_every_caller() -> None:
    async for flaky in serve(FlakyNodeService):
        registry = MetricsRegistry()
        client = NodeClient(registry, token="cluster-secret")
        try:
            outcomes = await forward_all(client, flaky.endpoint, [["u1"], ["nobody"]])
            assert [(o.failed, o.missing) for o in outcomes] == [(False, []), (False, ["nobody"])]
            assert calls(registry, "ForwardMany") == 2
            assert [d[2] for d in flaky.node.delivered] == ["c0"]
            assert client.breaker_state("n2") == "closed"
        finally:
            await client.close()


async def test_an_older_peer_gets_one_call_per_forward() -> None:
    async for older in serve(OlderNodeService):
        registry = MetricsRegistry()
        client = NodeClient(registry, token="cluster-secret")
        try:
            outcomes = await forward_all(client, older.endpoint, [["u1"], ["gone"], ["u1", "u2"]])
            assert [(o.failed, o.missing) for o in outcomes] == [
                (False, []),
                (False, ["gone"]),
                (False, []),
            ]
            assert calls(registry, "ForwardMany") == 1
            assert (calls(registry, "ForwardSingle"), calls(registry, "ForwardBatch")) == (2, 1)
            assert client.breaker_state("n2") == "closed"  # alive, just older
            # Remembered: the next burst goes straight to the v1 calls.
            again = await forward_all(client, older.endpoint, [["u1"], ["u2"]], prefix="d")
            assert [o.failed for o in again] == [False, False]
            assert calls(registry, "ForwardMany") == 1
            assert calls(registry, "ForwardSingle") == 4
            assert sorted(d[2] for d in older.node.delivered) == [
                "c0",
                "c2",
                "c2",
                "d0",
                "d1",
            ]
        finally:
            await client.close()


async def test_a_coalesced_call_with_a_wrong_token_fails_every_forward(peer: Peer) -> None:
    registry = MetricsRegistry()
    client = NodeClient(registry, token="not-the-token")
    try:
        outcomes = await forward_all(client, peer.endpoint, [["u1"], ["u2"], ["u1", "u2"]])
        assert [(o.failed, o.status) for o in outcomes] == [(True, "UNAUTHENTICATED")] * 3
        assert calls(registry, "ForwardMany") == 1  # not retried
        assert peer.node.delivered == []
        assert peer.metrics.sample("mics_grpc_unauthorized_total") == 1
        failed = registry.sample(
            "mics_grpc_forward_failed_total",
            {"tenant": "t1", "via": "grpc_single", "status": "UNAUTHENTICATED"},
        )
        assert failed == 2
    finally:
        await client.close()


async def test_a_coalesced_call_to_a_dead_peer_counts_once_for_the_breaker() -> None:
    registry = MetricsRegistry()
    client = NodeClient(registry, breaker_failure_threshold=2, breaker_open_ms=60_000)
    endpoint = dead_endpoint()
    try:
        for state in ("closed", "open"):  # one failure per call, not per forward
            outcomes = await forward_all(client, endpoint, [["u1"], ["u2"], ["u3"]])
            assert [(o.failed, o.status) for o in outcomes] == [(True, "UNAVAILABLE")] * 3
            assert client.breaker_state("n2") == state
        skipped = await forward_all(client, endpoint, [["u1"], ["u2"]])
        assert [(o.failed, o.status) for o in skipped] == [(True, "CIRCUIT_OPEN")] * 2
        assert calls(registry, "ForwardMany") == 4  # 2 calls x 2 attempts, none when open
        assert (
            registry.sample(
                "mics_grpc_circuit_open_total",
                {"tenant": "t1", "node": "n2", "via": "grpc_single"},
            )
            == 2
        )
    finally:
        await client.close()


async def test_a_cancelled_caller_is_left_out_of_the_call(peer: Peer) -> None:
    registry = MetricsRegistry()
    client = NodeClient(registry, token="cluster-secret")
    try:
        loop = asyncio.get_running_loop()
        kept = loop.create_task(
            client.forward(
                node_id="n2",
                endpoint=peer.endpoint,
                tenant_id="t1",
                to_user_ids=["u1"],
                message=message("kept"),
            )
        )
        dropped = loop.create_task(
            client.forward(
                node_id="n2",
                endpoint=peer.endpoint,
                tenant_id="t1",
                to_user_ids=["u2"],
                message=message("dropped"),
            )
        )
        await asyncio.sleep(0)  # both queued for the end of this iteration
        dropped.cancel()
        assert (await kept).missing == []
        with pytest.raises(asyncio.CancelledError):
            await dropped
        assert [d[2] for d in peer.node.delivered] == ["kept"]
    finally:
        await client.close()


# -- the home node's buffer: BufferOffline / DrainOffline ----------------------------------


async def test_buffer_offline_and_drain_offline_round_trip(peer: Peer) -> None:
    client = NodeClient(MetricsRegistry(), token="cluster-secret")
    try:
        for frame in (b"one", b"two"):
            stored = await client.buffer_offline(
                node_id="n2",
                endpoint=peer.endpoint,
                tenant_id="t1",
                user_id="u9",
                frame=frame,
                ttl_s=60,
            )
            assert stored is True
        assert peer.node.buffered == {("t1", "u9"): [b"one", b"two"]}
        frames = await client.drain_offline(
            node_id="n2", endpoint=peer.endpoint, tenant_id="t1", user_id="u9"
        )
        assert frames == [b"one", b"two"]
        assert peer.node.buffered == {}
        empty = await client.drain_offline(
            node_id="n2", endpoint=peer.endpoint, tenant_id="t1", user_id="u9"
        )
        assert empty == []
    finally:
        await client.close()


async def test_a_draining_node_refuses_buffer_offline_without_tripping_the_breaker(
    peer: Peer,
) -> None:
    registry = MetricsRegistry()
    client = NodeClient(registry, token="cluster-secret", breaker_failure_threshold=1)
    peer.node.draining = True
    try:
        stored = await client.buffer_offline(
            node_id="n2", endpoint=peer.endpoint, tenant_id="t1", user_id="u9", frame=b"x", ttl_s=60
        )
        assert stored is False
        assert peer.node.buffered == {}
        assert client.breaker_state("n2") == "closed"
        assert (
            registry.sample(
                "mics_grpc_offline_buffer_failed_total", {"tenant": "t1", "status": "DRAINING"}
            )
            == 1
        )
    finally:
        await client.close()


async def test_buffer_calls_to_an_unreachable_node_report_failure() -> None:
    registry = MetricsRegistry()
    client = NodeClient(registry)
    endpoint = dead_endpoint()
    try:
        stored = await client.buffer_offline(
            node_id="dead", endpoint=endpoint, tenant_id="t1", user_id="u9", frame=b"x", ttl_s=60
        )
        assert stored is False
        frames = await client.drain_offline(
            node_id="dead", endpoint=endpoint, tenant_id="t1", user_id="u9"
        )
        assert frames is None
        for name in (
            "mics_grpc_offline_buffer_failed_total",
            "mics_grpc_offline_drain_failed_total",
        ):
            assert registry.sample(name, {"tenant": "t1", "status": "UNAVAILABLE"}) == 1
    finally:
        await client.close()
