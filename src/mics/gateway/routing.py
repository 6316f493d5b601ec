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
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
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


class RouteCache:
    """Recently read remote routes, so Redis stays off most messages' path.

    Entries live `ttl_s` and are dropped at once when this node learns the user's routes
    changed (a local connect or disconnect, or another node's change announced over
    Redis pub/sub). A stale entry costs latency, never a message: a forward to a node
    where the user is gone comes back as missing and takes the offline path, which the
    backend's nudge turns into a pull on the user's new connection.
    """

    def __init__(
        self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_s
        self._max = max(1, max_entries)
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, list[Route]]] = OrderedDict()
        # Bumped by every invalidation: a lookup that started before one must not put
        # the routes it read back into the cache (they may be the stale ones).
        self.generation = 0

    @property
    def enabled(self) -> bool:
        return self._ttl > 0

    def get(self, tenant_id: str, user_id: str) -> list[Route] | None:
        entry = self._entries.get((tenant_id, user_id))
        if entry is None:
            return None
        expiry, routes = entry
        if expiry <= self._clock():
            del self._entries[(tenant_id, user_id)]
            return None
        return routes

    def put(
        self, tenant_id: str, user_id: str, routes: list[Route], generation: int | None = None
    ) -> None:
        if not self.enabled or (generation is not None and generation != self.generation):
            return
        key = (tenant_id, user_id)
        self._entries[key] = (self._clock() + self._ttl, routes)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def invalidate(self, tenant_id: str, user_id: str) -> None:
        self.generation += 1
        self._entries.pop((tenant_id, user_id), None)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()


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
        cache: RouteCache | None = None,
    ) -> None:
        self._node_id = node_id
        self._registry = registry
        self._routes = routes
        self._forwarder = forwarder
        self._m = metrics
        self._chunk = chunk_size
        self.cache = cache or RouteCache(0, 1)
        self._fallback = metrics.registry.counter(
            "mics_redis_fallback",
            "Route lookups that failed: the users were treated as offline",
            ("tenantId", "op"),
        )

    @property
    def local_only(self) -> bool:
        return self._routes.local_only or self._forwarder is None

    def deliver_local(self, tenant_id: str, user_id: str, frame: bytes, msg_id: str) -> int:
        devices = self._registry.devices(tenant_id, user_id)
        if not devices:
            return 0
        written = 0
        for target in list(devices.values()):
            if target.deliver(frame, msg_id):
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
            written = self.deliver_local(tenant_id, user, frame, message.msg_id)
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
        # The lookup awaited Redis: a recipient may have connected here meanwhile. Its
        # own route is skipped below, so deliver to it locally now or it would go to the
        # offline path after its connect drain already ran.
        for user in recipients:
            if user not in local_hits:
                written = self.deliver_local(tenant_id, user, frame, message.msg_id)
                if written:
                    reach.local += written
                    local_hits.add(user)
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
        cache = self.cache
        found: dict[str, list[Route]] = {}
        wanted: list[str] = []
        for user in users:
            cached = cache.get(tenant_id, user)
            if cached is None:
                wanted.append(user)
            else:
                found[user] = cached
        if not wanted:
            return found
        generation = cache.generation
        fetched = await self._fetch_routes(tenant_id, wanted)
        if fetched is None:
            return found or None
        for user, routes in fetched.items():
            cache.put(tenant_id, user, routes, generation)
        found.update(fetched)
        return found

    async def _fetch_routes(
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
