"""Node-to-node forwarding over real gRPC: answers, missing users, token, breaker."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest

from mics.cluster.forwarding import NodeClient, NodeService, start_node_server
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_message_pb2 as msg_pb


@dataclass
class FakeNode:
    """A gateway's local side: which users have sessions, what was delivered."""

    online: set[str] = field(default_factory=set)
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


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    node = FakeNode(online={"u1", "u2"})
    server, port = await start_node_server(
        NodeService(node, MetricsRegistry(), token="cluster-secret"), "127.0.0.1", 0
    )
    try:
        yield Peer(node, f"http://127.0.0.1:{port}")
    finally:
        await server.stop(None)


def message(msg_id: str) -> msg_pb.MessageRequest:
    return msg_pb.MessageRequest(tenant_id="spoofed", user_id="s", msg_id=msg_id, msg_body=b"x")


async def test_single_and_batch_forwards_report_missing_users(peer: Peer) -> None:
    client = NodeClient(MetricsRegistry(), token="cluster-secret")
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
