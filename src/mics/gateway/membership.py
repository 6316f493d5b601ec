"""The gateway as a member of a Redis-backed cluster.

Runs the node service (gRPC) that peers forward to, the node directory (heartbeats,
live-node snapshot, dead-node cleanup), and the lease renewal of this node's routes.
Renewal is also how a takeover elsewhere reaches us: a route that no longer names our
connection was replaced by the same device on another node, and its old session is
closed with 4409; a route that vanished (Redis restarted and lost it) is admitted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from grpc import aio
from redis.asyncio import Redis

from mics.cluster.forwarding import NodeClient, NodeService, start_node_server
from mics.cluster.home_buffer import HomeBuffer
from mics.cluster.nodes import NodeDirectory
from mics.cluster.redis_routes import (
    RedisRouteTable,
    RouteTableUnavailable,
    lease_ttl_for,
    renew_interval_for,
)
from mics.cluster.routes import AdmissionResult, Route
from mics.gateway.config import GatewaySettings
from mics.gateway.core import Gateway
from mics.protocol import codec

log = logging.getLogger("mics.gateway.membership")

ROUTE_CHANGES = "mics:route-changes"


class ClusterMembership:
    def __init__(
        self,
        settings: GatewaySettings,
        redis: Redis,
        routes: RedisRouteTable,
        forwarder: NodeClient,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self.routes = routes
        self.forwarder = forwarder
        self.directory = NodeDirectory(
            redis,
            settings.node_id,
            settings.endpoint,
            ttl_s=settings.node_ttl_seconds,
            refresh_s=settings.node_refresh_seconds,
            snapshot_s=settings.node_snapshot_seconds,
            cleanup_s=settings.node_cleanup_seconds,
        )
        self.home_buffer: HomeBuffer | None = None
        self._gateway: Gateway | None = None
        self._server: aio.Server | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._announcements: set[asyncio.Task[None]] = set()
        self.grpc_port = 0
        self._last_ok = 0.0

    @property
    def healthy(self) -> bool:
        """Redis answered within a node TTL: routing across the cluster works."""
        return time.monotonic() - self._last_ok < self._settings.node_ttl_seconds

    async def start(self, gateway: Gateway) -> None:
        self._gateway = gateway
        service = NodeService(
            gateway,
            gateway.metrics_registry,
            token=self._settings.cluster_grpc_token,
            buffered=gateway.metrics.offline_buffered,
            drained=gateway.metrics.offline_drained,
        )
        self._server, self.grpc_port = await start_node_server(
            service, self._settings.grpc_host, self._settings.resolved_grpc_port
        )
        try:
            await self.directory.heartbeat()
            self._last_ok = time.monotonic()
        except Exception:
            log.warning("Redis unreachable at startup; serving local connections only")
        await self.directory.start()
        loop = asyncio.get_running_loop()
        self._renewer = loop.create_task(self._renew_forever())
        self._listener = loop.create_task(self._listen_for_route_changes())
        gateway.announce_route_change = self.announce_route_change
        # The offline buffer lives on each user's home node (protocol.md 7.1, 7.2).
        self.home_buffer = HomeBuffer(
            gateway.buffer, self.directory, self.forwarder, node_id=self._settings.node_id
        )
        gateway.offline.home = self.home_buffer
        gateway.drainer.home = self.home_buffer
        log.info("cluster member", extra={"grpc_port": self.grpc_port})

    async def stop(self) -> None:
        tasks = [t for t in (self._renewer, self._listener, *self._announcements) if t]
        for task in tasks:
            task.cancel()
        if tasks:
            # redis-py occasionally swallows a cancellation inside a call: never wait on
            # it forever; a task still running here ends with the process.
            await asyncio.wait(tasks, timeout=2.0)
        try:
            await self.directory.deregister()
        except Exception:
            log.warning("could not deregister from Redis; peers will clean up after the TTL")
        await self.directory.stop()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        await self.forwarder.close()
        await self._redis.aclose()

    # -- route cache invalidation across nodes -----------------------------------------------

    def announce_route_change(self, tenant_id: str, user_id: str) -> None:
        """Tell every node to drop its cached routes of the user (fire and forget)."""

        async def publish() -> None:
            # On failure the cache TTL bounds how long others keep the old routes.
            with contextlib.suppress(Exception):
                await self._redis.publish(ROUTE_CHANGES, f"{tenant_id}|{user_id}")

        task = asyncio.get_running_loop().create_task(publish())
        self._announcements.add(task)
        task.add_done_callback(self._announcements.discard)

    async def _listen_for_route_changes(self) -> None:
        gateway = self._gateway
        assert gateway is not None
        cache = gateway.pipeline.router.cache
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(ROUTE_CHANGES)
                # Changes may have been missed while unsubscribed: start clean.
                cache.clear()
                async for item in pubsub.listen():
                    if item.get("type") != "message":
                        continue
                    data = item.get("data")
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    tenant_id, _, user_id = text.partition("|")
                    cache.invalidate(tenant_id, user_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.5)  # Redis away: retry; the cache TTL bounds staleness
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # -- leases ------------------------------------------------------------------------------

    def _interval(self) -> float:
        if self._settings.route_renew_interval_seconds > 0:
            return self._settings.route_renew_interval_seconds
        return renew_interval_for(30.0)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval())
            try:
                await self.renew_once()
            except Exception:
                log.exception("lease renewal failed")

    async def renew_once(self) -> None:
        gateway = self._gateway
        assert gateway is not None
        sessions = {s.conn_id: s for s in gateway.registry if not s.closed}
        if not sessions:
            self._last_ok = time.monotonic()
            return
        routes = [gateway.route_of(s) for s in sessions.values()]
        result = await self.routes.renew(routes, lease_ttl_s=self.lease_ttl())
        if not result.failed:
            self._last_ok = time.monotonic()
        for route in result.lost:
            session = sessions.get(route.conn_id)
            if session is not None:
                await self._reconcile_lost(gateway, route, session)

    async def _reconcile_lost(self, gateway: Gateway, route: Route, session: object) -> None:
        from mics.gateway.session import Session

        assert isinstance(session, Session)
        try:
            current = await self.routes.lookup(route.tenant_id, route.user_id)
        except RouteTableUnavailable:
            return
        mine = [r for r in current if r.device_id == route.device_id]
        if mine and (mine[0].node_id, mine[0].conn_id) != (route.node_id, route.conn_id):
            # The same device connected elsewhere: the newer connection wins (9.9).
            gateway.metrics.ws_takeovers.labels(route.tenant_id).inc()
            session.close(codec.CLOSE_REPLACED, "replaced")
            return
        # Gone (Redis lost it, or it expired): register the live session again.
        admission = await self.routes.admit(
            route, gateway.limits_of(session), lease_ttl_s=self.lease_ttl()
        )
        if admission.result is AdmissionResult.DENIED:
            log.warning("lost route could not be re-admitted (connection limit)")

    def lease_ttl(self) -> float:
        if self._settings.route_lease_ttl_seconds > 0:
            return self._settings.route_lease_ttl_seconds
        return lease_ttl_for(30.0)
