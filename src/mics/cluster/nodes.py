"""Cluster membership in Redis (protocol section 8): heartbeats, the live-node snapshot
and the cleanup of dead nodes' routes.

Keys (``cleanup_lock`` is this implementation's; the others are MICS v1's):

=================================  ======  ==================================================
``nodes:{nodeId}``                 HASH    ``nodeId``, ``endpoint``, ``heartbeatAtMs``; TTL
``nodes:live``                     ZSET    nodeId, score = heartbeat time + TTL (Unix ms)
``nodes:known``                    SET     every registered node id
``nodes:{nodeId}:routes``          SET     ``tenant|user|device`` routed by the node
``nodes:{nodeId}:cleanup_lock``    STRING  the cleaning node's id, ``SET NX PX``
=================================  ======  ==================================================

A node is live while its ``nodes:live`` score is at least now. Every ``cleanup_s`` each
node looks for known nodes that are not live; for each, the one node that takes the
cleanup lock removes the dead node's routes that still point to it (a route re-pointed
to another node by a reconnect is left alone), then deletes the dead node's keys. Both
steps first check, atomically, that the node is still dead, so a node that comes back
keeps its state. A dead node's routes are gone about TTL + ``cleanup_s`` after its last
heartbeat, within 2 x TTL as long as ``cleanup_s`` < TTL.

The lock is not released: it expires (``cleanup_lock_s``), so a node whose view was
stale cannot clean the same node again; a cleanup counts only when it removed the node
from ``nodes:known``, so each dead node is counted once across the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from mics.cluster.redis_routes import (
    RouteTableUnavailable,
    chunks,
    guarded,
    load_lua,
    node_routes_key,
    online_key,
    parse_node_routes_member,
    tenant_lease_member,
    tenant_leases_key,
    text,
    user_leases_key,
)
from mics.cluster.rendezvous import home_node

__all__ = [
    "NODES_KNOWN",
    "NODES_LIVE",
    "CleanupReport",
    "DirectoryStats",
    "LiveNode",
    "NodeDirectory",
    "cleanup_lock_key",
    "node_key",
]

log = logging.getLogger(__name__)

NODES_LIVE: Final = "nodes:live"
NODES_KNOWN: Final = "nodes:known"
DEFAULT_CLEANUP_BATCH: Final = 500

_DROP_NODE_ROUTE_LUA: Final = load_lua("drop_node_route.lua")
_DROP_NODE_LUA: Final = load_lua("drop_node.lua")


def node_key(node_id: str) -> str:
    return f"nodes:{node_id}"


def cleanup_lock_key(node_id: str) -> str:
    return f"nodes:{node_id}:cleanup_lock"


@dataclass(frozen=True, slots=True)
class LiveNode:
    node_id: str
    endpoint: str


@dataclass(slots=True)
class DirectoryStats:
    """Counters since start, for metrics (section 10 names in comments)."""

    heartbeats: int = 0
    heartbeat_failures: int = 0
    snapshots: int = 0
    snapshot_failures: int = 0
    cleanups: int = 0  # dead nodes cleaned by this node: mics_dead_node_cleanups_total
    routes_processed: int = 0  # their routes entries: mics_dead_node_routes_processed_total
    routes_removed: int = 0  # of which still pointed to the dead node and were deleted
    route_errors: int = 0  # routes entries whose removal failed (skipped)
    cleanup_passes: int = 0  # completed cleanup_dead_nodes passes
    cleanup_failures: int = 0


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """One :meth:`NodeDirectory.cleanup_dead_nodes` pass."""

    cleaned: tuple[str, ...] = ()  # dead nodes this node cleaned
    routes_processed: int = 0
    routes_removed: int = 0


class NodeDirectory:
    """This node's membership: heartbeats, the live-node snapshot, dead-node cleanup.

    ``ttl_s`` is the node TTL (30 s in MICS v1); ``refresh_s`` the heartbeat period,
    ``snapshot_s`` the snapshot period and ``cleanup_s`` the dead-node scan period.
    ``clock`` returns Unix time in seconds. :meth:`start` runs the three loops;
    :meth:`stop` ends them; :meth:`deregister` removes this node for a graceful exit.
    """

    def __init__(
        self,
        redis: Redis,
        node_id: str,
        endpoint: str,
        ttl_s: float = 30.0,
        refresh_s: float = 10.0,
        snapshot_s: float = 3.0,
        cleanup_s: float = 5.0,
        *,
        cleanup_lock_s: float | None = None,
        cleanup_batch_size: int = DEFAULT_CLEANUP_BATCH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not node_id or "|" in node_id:
            raise ValueError(f"node id must be non-empty without '|': {node_id!r}")
        if not endpoint or "|" in endpoint:
            raise ValueError(f"endpoint must be non-empty without '|': {endpoint!r}")
        if min(ttl_s, refresh_s, snapshot_s, cleanup_s) <= 0:
            raise ValueError("ttl and intervals must be > 0")
        if refresh_s >= ttl_s:
            raise ValueError("refresh_s must be shorter than ttl_s, or the node flaps")
        if cleanup_s >= ttl_s:
            raise ValueError("cleanup_s must be shorter than ttl_s (dead routes gone in 2 x TTL)")
        if cleanup_batch_size < 1:
            raise ValueError("cleanup_batch_size must be >= 1")
        self._redis = redis
        self.node_id = node_id
        self.endpoint = endpoint
        self.ttl_s = ttl_s
        self.refresh_s = refresh_s
        self.snapshot_s = snapshot_s
        self.cleanup_s = cleanup_s
        self.cleanup_lock_s = (
            cleanup_lock_s if cleanup_lock_s is not None else max(cleanup_s, ttl_s / 2)
        )
        self._batch = cleanup_batch_size
        self._clock = clock
        self._drop_route: AsyncScript = redis.register_script(_DROP_NODE_ROUTE_LUA)
        self._drop_node: AsyncScript = redis.register_script(_DROP_NODE_LUA)
        self._live: tuple[LiveNode, ...] = ()
        self._endpoints: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.stats = DirectoryStats()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- snapshot --------------------------------------------------------------------------

    @property
    def live_nodes(self) -> tuple[LiveNode, ...]:
        """The last snapshot: live nodes with an endpoint, by node id."""
        return self._live

    @property
    def live_node_ids(self) -> tuple[str, ...]:
        return tuple(node.node_id for node in self._live)

    def endpoint_of(self, node_id: str) -> str | None:
        return self._endpoints.get(node_id)

    def home_node(self, tenant_id: str, user_id: str) -> LiveNode | None:
        """The user's home node over the snapshot (section 7.1); None if it is empty."""
        chosen = home_node(tenant_id, user_id, self.live_node_ids)
        return None if chosen is None else LiveNode(chosen, self._endpoints[chosen])

    # -- operations (each raises RouteTableUnavailable) ------------------------------------

    async def heartbeat(self) -> None:
        """Refresh ``nodes:{me}`` (expires after TTL), ``nodes:live`` and ``nodes:known``."""
        now = self._now_ms()
        ttl_ms = int(self.ttl_s * 1000)
        key = node_key(self.node_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={"nodeId": self.node_id, "endpoint": self.endpoint, "heartbeatAtMs": now},
        )
        pipe.pexpire(key, ttl_ms)
        pipe.zadd(NODES_LIVE, {self.node_id: now + ttl_ms})
        pipe.sadd(NODES_KNOWN, self.node_id)
        try:
            await guarded("heartbeat", pipe.execute())
        except RouteTableUnavailable:
            self.stats.heartbeat_failures += 1
            raise
        self.stats.heartbeats += 1

    async def refresh_snapshot(self) -> tuple[LiveNode, ...]:
        """Read the live nodes that have an endpoint. On failure the previous snapshot
        stays in use."""
        try:
            ids = [
                text(i)
                for i in await guarded(
                    "snapshot", self._redis.zrangebyscore(NODES_LIVE, self._now_ms(), "+inf")
                )
            ]
            pipe = self._redis.pipeline(transaction=False)
            for node_id in ids:
                pipe.hget(node_key(node_id), "endpoint")
            endpoints = await guarded("snapshot", pipe.execute()) if ids else []
        except RouteTableUnavailable:
            self.stats.snapshot_failures += 1
            raise
        live = sorted(
            (
                LiveNode(node_id, text(endpoint))
                for node_id, endpoint in zip(ids, endpoints, strict=True)
                if endpoint
            ),
            key=lambda node: node.node_id,
        )
        self._live = tuple(live)
        self._endpoints = {node.node_id: node.endpoint for node in live}
        self.stats.snapshots += 1
        return self._live

    async def cleanup_dead_nodes(self) -> CleanupReport:
        """One pass: clean every known node that is not live and whose lock this node
        takes. A failure part-way leaves the rest to a later pass (after the lock
        expires), which repeats the idempotent steps."""
        try:
            report = await self._cleanup_dead_nodes()
        except RouteTableUnavailable:
            self.stats.cleanup_failures += 1
            raise
        self.stats.cleanup_passes += 1
        return report

    async def _cleanup_dead_nodes(self) -> CleanupReport:
        now = self._now_ms()
        pipe = self._redis.pipeline(transaction=False)
        pipe.smembers(NODES_KNOWN)
        pipe.zrangebyscore(NODES_LIVE, now, "+inf")
        known_raw, live_raw = await guarded("cleanup scan", pipe.execute())
        known = {text(n) for n in known_raw}
        live = {text(n) for n in live_raw}
        dead = sorted(known - live - {self.node_id})
        cleaned: list[str] = []
        processed = removed = 0
        lock_ms = max(1, int(self.cleanup_lock_s * 1000))
        for node_id in dead:
            locked = await guarded(
                "cleanup lock",
                self._redis.set(cleanup_lock_key(node_id), self.node_id, nx=True, px=lock_ms),
            )
            if not locked:
                continue
            seen, dropped, finished = await self._drop_node_routes(node_id, require_dead=True)
            processed += seen
            removed += dropped
            self.stats.routes_processed += seen
            self.stats.routes_removed += dropped
            if finished:
                cleaned.append(node_id)
                self.stats.cleanups += 1
                log.info(
                    "dead node cleaned",
                    extra={"dead_node": node_id, "routes": seen, "removed": dropped},
                )
        return CleanupReport(tuple(cleaned), processed, removed)

    async def _drop_node_routes(self, node_id: str, *, require_dead: bool) -> tuple[int, int, bool]:
        """Remove the node's routes that still point to it, then its keys. Returns
        (entries processed, routes removed, node removed from ``nodes:known``)."""
        routes_key = node_routes_key(node_id)
        flag = "1" if require_dead else "0"
        seen: set[str] = set()
        removed = 0
        cursor: Any = 0
        while True:
            cursor, members = await guarded(
                "cleanup scan", self._redis.sscan(routes_key, cursor, count=self._batch)
            )
            batch = [m for m in (text(raw) for raw in members) if m not in seen]
            seen.update(batch)
            for part in chunks(batch, self._batch):
                outcome = await self._drop_routes(node_id, part, flag)
                if outcome < 0:
                    return len(seen), removed, False  # alive again
                removed += outcome
            if int(cursor) == 0:
                break
        done = await guarded(
            "cleanup node",
            self._drop_node(
                keys=(NODES_LIVE, NODES_KNOWN, node_key(node_id), routes_key),
                args=(node_id, self._now_ms(), flag),
            ),
        )
        return len(seen), removed, int(done) == 1

    async def _drop_routes(self, node_id: str, members: Sequence[str], flag: str) -> int:
        """Routes removed from one batch, or -1 if the node turned live again."""
        now = self._now_ms()
        pipe = self._redis.pipeline(transaction=False)
        queued = 0
        for member in members:
            parts = parse_node_routes_member(member)
            if parts is None:
                continue
            tenant_id, user_id, device_id = parts
            await self._drop_route(
                keys=(
                    online_key(tenant_id, user_id),
                    tenant_leases_key(tenant_id),
                    user_leases_key(tenant_id, user_id),
                    NODES_LIVE,
                ),
                args=(device_id, node_id, tenant_lease_member(user_id, device_id), now, flag),
                client=pipe,
            )
            queued += 1
        if not queued:
            return 0
        replies = await guarded("cleanup routes", pipe.execute(raise_on_error=False))
        outcomes = []
        for reply in replies:
            if isinstance(reply, Exception):
                # e.g. WRONGTYPE: a key this layout does not own; skip, never block.
                log.warning("dead-node route cleanup failed for one route: %s", reply)
                self.stats.route_errors += 1
                continue
            outcomes.append(int(reply))
        if any(outcome < 0 for outcome in outcomes):
            return -1
        return sum(outcomes)

    async def deregister(self) -> int:
        """Graceful exit: stop the loops, remove this node's routes that still point to
        it and its keys. Returns the number of routes removed."""
        await self.stop()
        _, removed, _ = await self._drop_node_routes(self.node_id, require_dead=False)
        self._live = ()
        self._endpoints = {}
        return removed

    # -- loops -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    async def start(self) -> None:
        """Heartbeat and take a snapshot once (failures are logged, not raised), then
        run the heartbeat, snapshot and cleanup loops."""
        if self._tasks:
            return
        self._stopping = asyncio.Event()
        await _attempt("heartbeat", self.heartbeat)
        await _attempt("snapshot", self.refresh_snapshot)
        self._tasks = [
            asyncio.create_task(self._every(self.refresh_s, "heartbeat", self.heartbeat)),
            asyncio.create_task(self._every(self.snapshot_s, "snapshot", self.refresh_snapshot)),
            asyncio.create_task(self._every(self.cleanup_s, "cleanup", self.cleanup_dead_nodes)),
        ]

    async def stop(self) -> None:
        """End the loops and wait for them: an operation in flight is cancelled."""
        tasks, self._tasks = self._tasks, []
        self._stopping.set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _every(
        self, interval_s: float, what: str, operation: Callable[[], Awaitable[object]]
    ) -> None:
        # The stop event, not only the cancellation, ends the loop: redis-py 8.2 can
        # swallow a task's cancellation (seen for about 1 in 300 cancels of a command).
        stopping = self._stopping
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval_s)
            if stopping.is_set():
                return
            await _attempt(what, operation)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError  # a cancel the operation swallowed


async def _attempt(what: str, operation: Callable[[], Awaitable[object]]) -> None:
    try:
        await operation()
    except RouteTableUnavailable as exc:
        log.warning("node directory %s failed: %s", what, exc)
    except Exception:
        log.exception("node directory %s failed", what)
