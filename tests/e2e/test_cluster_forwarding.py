"""Cluster e2e: coalesced forwards (ForwardMany) arriving at a real gateway node.

The sending side is a bare `NodeClient` issuing forwards in one event-loop iteration,
so they go out as one ForwardMany; the receiving node is a real in-process gateway
with SDK clients over real WebSockets (the ``Cluster`` fixture of ``test_cluster.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from grpc import aio

from mics.client import MicsClient
from mics.cluster.forwarding import ForwardOutcome, NodeClient, NodeService
from mics.gateway.app import GatewayServer
from mics.gateway.session import Session
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.pb import mics_node_pb2 as node_pb
from tests.e2e.conftest import TENANT
from tests.e2e.test_cluster import Cluster
from tests.e2e.test_cluster import cluster as cluster  # the fixture, shared


@pytest.fixture
async def client() -> AsyncIterator[NodeClient]:
    made = NodeClient(MetricsRegistry())
    try:
        yield made
    finally:
        await made.close()


def message(msg_id: str, sender: str = "u1") -> msg_pb.MessageRequest:
    return msg_pb.MessageRequest(
        user_id=sender, device_id="d1", msg_id=msg_id, msg_type=msg_pb.SINGLE_CHAT, msg_body=b"x"
    )


async def forward_together(
    client: NodeClient, node: GatewayServer, forwards: Sequence[tuple[str, str]]
) -> list[ForwardOutcome]:
    """(recipient, msg_id) pairs, all forwarded to ``node`` in one loop iteration."""
    return list(
        await asyncio.gather(
            *(
                client.forward(
                    node_id=node.gateway.node_id,
                    endpoint=node.settings.endpoint,
                    tenant_id=TENANT,
                    to_user_ids=[user],
                    message=message(msg_id),
                )
                for user, msg_id in forwards
            )
        )
    )


def received(node: GatewayServer, rpc: str) -> float:
    return node.gateway.metrics_registry.sample("mics_grpc_node_calls_received_total", {"rpc": rpc})


async def connected(cluster: Cluster, node: GatewayServer, user: str) -> MicsClient:
    """A connection whose connect drain is over (its deliveries are no longer held)."""
    made = await cluster.connect(node, user)
    await made.next_offline_sync(timeout=5)
    return made


async def test_one_coalesced_call_reaches_each_session_in_one_socket_write(
    cluster: Cluster, client: NodeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    n2 = await cluster.add_node("n2")
    bob = await connected(cluster, n2, "u2")
    carol = await connected(cluster, n2, "u3")
    flushes: list[str] = []
    real_flush = Session._flush

    def counting_flush(self: Session) -> None:
        flushes.append(self.user_id)
        real_flush(self)

    monkeypatch.setattr(Session, "_flush", counting_flush)
    outcomes = await forward_together(
        client, n2, [("u2", "m1"), ("u3", "m2"), ("u2", "m3"), ("u5", "m4"), ("u2", "m5")]
    )
    # One answer per caller: only u5 (not connected) had no session.
    assert [(o.failed, o.missing) for o in outcomes] == [
        (False, []),
        (False, []),
        (False, []),
        (False, ["u5"]),
        (False, []),
    ]
    assert [(await bob.next_delivery(timeout=5)).msg_id for _ in range(3)] == ["m1", "m3", "m5"]
    assert (await carol.next_delivery(timeout=5)).msg_id == "m2"
    assert (received(n2, "ForwardMany"), received(n2, "ForwardSingle")) == (1, 0)
    # All of one call's frames for a session were written together: one flush each.
    assert sorted(flushes) == ["u2", "u3"]
    deliveries = n2.gateway.metrics_registry.sample(
        "mics_deliveries_total", {"tenant": TENANT, "via": "grpc_in_single"}
    )
    assert deliveries == 4


async def test_a_retried_coalesced_call_delivers_nothing_twice(
    cluster: Cluster, client: NodeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = NodeService.ForwardMany
    retried = asyncio.Event()
    attempts = 0

    async def answer_too_late_once(
        self: NodeService,
        request: node_pb.ForwardManyRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.ForwardManyResponse:
        # The first attempt delivers, then its answer is held until the caller has
        # given up on it (deadline) and retried.
        nonlocal attempts
        attempts += 1
        response = await real(self, request, context)
        if attempts == 1:
            await retried.wait()
        else:
            retried.set()
        return response

    # Before the node starts: its server binds the servicer's methods then.
    monkeypatch.setattr(NodeService, "ForwardMany", answer_too_late_once)
    n2 = await cluster.add_node("n2")
    bob = await connected(cluster, n2, "u2")
    outcomes = await forward_together(client, n2, [("u2", "r1"), ("u2", "r2")])
    assert [(o.failed, o.missing) for o in outcomes] == [(False, []), (False, [])]
    assert attempts == 2
    # A marker after the retry: nothing else arrives in between.
    marker = await forward_together(client, n2, [("u2", "r3")])
    assert marker[0].missing == []
    got = [(await bob.next_delivery(timeout=5)).msg_id for _ in range(3)]
    assert got == ["r1", "r2", "r3"]
    assert bob.stats.duplicate_deliveries == 0
