"""Where a message goes: local sessions, peer nodes, or the offline path.

With the in-memory route table (one node) every route is a local session, and delivery
is a synchronous loop over the registry. With a cluster route table the gateway also
looks up the recipients' routes, forwards once per peer node that hosts them
(`ForwardSingle` for one recipient, one `ForwardBatch` per node for a group), and hands
to the offline path every recipient that a peer had no session for or that a failed
forward did not reach. A route table that cannot be read makes its users look offline:
their messages take the offline path, never the floor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from mics.cluster.forwarding import NodeClient
from mics.cluster.routes import Route, RouteTable
from mics.gateway.metrics import GatewayMetrics
from mics.gateway.registry import SessionRegistry
from mics.protocol.pb import mics_message_pb2 as msg_pb

log = logging.getLogger("mics.gateway.routing")


@dataclass(slots=True)
class Reach:
    """Who a message reached and who must go to the offline path."""

    local: int = 0  # deliveries written to sessions on this node
    forwarded: int = 0  # recipients a peer node accepted
    offline: list[str] = field(default_factory=list)
    nodes: int = 0  # peer nodes forwarded to

    @property
    def delivered(self) -> int:
        return self.local + self.forwarded


class Router:
    def __init__(
        self,
        *,
        node_id: str,
        registry: SessionRegistry,
        routes: RouteTable,
        forwarder: NodeClient | None,
        metrics: GatewayMetrics,
        chunk_size: int = 256,
    ) -> None:
        self._node_id = node_id
        self._registry = registry
        self._routes = routes
        self._forwarder = forwarder
        self._m = metrics
        self._chunk = chunk_size
        self._fallback = metrics.registry.counter(
            "mics_redis_fallback",
            "Route lookups that failed: the users were treated as offline",
            ("tenantId", "op"),
        )

    @property
    def local_only(self) -> bool:
        return self._routes.local_only or self._forwarder is None

    def deliver_local(self, tenant_id: str, user_id: str, frame: bytes) -> int:
        devices = self._registry.devices(tenant_id, user_id)
        if not devices:
            return 0
        written = 0
        for target in list(devices.values()):
            if target.deliver(frame):
                written += 1
        return written

    async def deliver(
        self,
        tenant_id: str,
        recipients: Sequence[str],
        frame: bytes,
        message: msg_pb.MessageRequest,
    ) -> Reach:
        """Deliver to every device of every recipient, wherever it is connected."""
        reach = Reach()
        local_hits: set[str] = set()
        for user in recipients:
            written = self.deliver_local(tenant_id, user, frame)
            if written:
                reach.local += written
                local_hits.add(user)
        if self.local_only:
            reach.offline = [u for u in recipients if u not in local_hits]
            return reach
        remote = await self._remote_routes(tenant_id, recipients)
        if remote is None:  # route table unavailable: whoever is not here is offline
            reach.offline = [u for u in recipients if u not in local_hits]
            return reach
        by_node: dict[str, tuple[str, list[str]]] = {}
        unreached = set(recipients) - local_hits
        for user, routes in remote.items():
            for route in routes:
                if route.node_id == self._node_id:
                    continue  # our own routes: the registry already answered
                endpoint = getattr(route, "endpoint", "")
                if not endpoint:
                    continue
                entry = by_node.setdefault(route.node_id, (endpoint, []))
                if user not in entry[1]:
                    entry[1].append(user)
        failed: set[str] = set()
        if by_node:
            assert self._forwarder is not None
            forwarder = self._forwarder
            nodes = list(by_node.items())
            outcomes = await asyncio.gather(
                *(
                    forwarder.forward(
                        node_id=node_id,
                        endpoint=endpoint,
                        tenant_id=tenant_id,
                        to_user_ids=users,
                        message=message,
                    )
                    for node_id, (endpoint, users) in nodes
                )
            )
            reach.nodes = len(nodes)
            for (_, (_, users)), outcome in zip(nodes, outcomes, strict=True):
                if outcome.failed:
                    failed.update(users)
                    continue
                missing = set(outcome.missing)
                failed.update(missing)
                for user in users:
                    if user not in missing:
                        reach.forwarded += 1
                        unreached.discard(user)
        # Offline: recipients nobody reached, and any a peer failed or had no session
        # for (a user reached on one device and missed on another gets the offline copy
        # too: a duplicate the client drops, never a loss).
        reach.offline = [u for u in recipients if u in unreached or u in failed]
        return reach

    async def _remote_routes(
        self, tenant_id: str, users: Sequence[str]
    ) -> dict[str, list[Route]] | None:
        from mics.cluster.redis_routes import RouteTableUnavailable

        try:
            if len(users) == 1:
                return {users[0]: await self._routes.lookup(tenant_id, users[0])}
            lookup_many = getattr(self._routes, "lookup_many", None)
            if lookup_many is not None:
                result: dict[str, list[Route]] = await lookup_many(tenant_id, users)
                return result
            return {u: await self._routes.lookup(tenant_id, u) for u in users}
        except RouteTableUnavailable:
            op = "route_get" if len(users) == 1 else "route_get_batch"
            self._fallback.labels(tenant_id, op).inc()
            log.warning("route table unavailable: recipients treated as offline")
            return None
