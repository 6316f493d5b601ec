"""The gateway's HTTP surface and server lifecycle.

One port serves the WebSocket endpoint and the operational endpoints:
`GET /` (text), `/healthz`, `/readyz` (503 once draining), `/metrics` (Prometheus) and
`/ws` (protocol.md 1 and 2).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from aiohttp import web

from mics.cluster.forwarding import NodeClient
from mics.cluster.routes import MemoryRouteTable, RouteTable
from mics.events.bus import EventBus
from mics.events.inprocess import InProcessTransport
from mics.gateway.config import GatewaySettings
from mics.gateway.core import Gateway
from mics.gateway.nudge import NudgeEndpoint
from mics.gateway.wiring import build_event_bus, kafka_settings
from mics.observability.metrics import CONTENT_TYPE, MetricsRegistry

if TYPE_CHECKING:
    from mics.gateway.membership import ClusterMembership

log = logging.getLogger("mics.gateway")

GATEWAY_KEY = web.AppKey("gateway", Gateway)


def create_gateway_app(gateway: Gateway) -> web.Application:
    app = web.Application(handler_args={"max_field_size": 16_384})
    app[GATEWAY_KEY] = gateway

    async def index(_: web.Request) -> web.Response:
        return web.Response(text="MICS Gateway")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(_: web.Request) -> web.Response:
        if gateway.ready:
            return web.Response(text="ok")
        return web.Response(status=503)

    async def metrics(_: web.Request) -> web.Response:
        body = gateway.metrics_registry.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ws", gateway.handle_ws)
    app.router.add_route("*", "/v1/offline-available", NudgeEndpoint(gateway).handle)
    return app


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_membership(settings: GatewaySettings, registry: MetricsRegistry) -> ClusterMembership:
    """The Redis route table, node directory and peer client of a clustered node."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from mics.cluster.redis_routes import RedisRouteTable
    from mics.gateway.membership import ClusterMembership

    url = settings.redis_connection
    # Fail fast: a Redis that is away makes users look offline (offline path) and the
    # node not ready; redis-py's default retries would stall every call for seconds.
    redis = Redis.from_url(
        url if "://" in url else f"redis://{url}",
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 1),
    )
    routes = RedisRouteTable(
        redis,
        node_id=settings.node_id,
        endpoint=settings.endpoint,
        lease_ttl_s=settings.route_lease_ttl_seconds or 30.0,
        chunk_size=settings.group_route_chunk_size,
    )
    forwarder = NodeClient(
        registry,
        token=settings.cluster_grpc_token,
        breaker_failure_threshold=settings.grpc_breaker_failure_threshold,
        breaker_open_ms=settings.grpc_breaker_open_ms,
    )
    return ClusterMembership(settings, redis, routes, forwarder)


class GatewayServer:
    """A gateway listening on a port (0 picks a free one); start/stop for embedding."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        routes: RouteTable | None = None,
        events: EventBus | None = None,
    ) -> None:
        if settings.redis_connection and not settings.resolved_grpc_port:
            # Peers must learn the real node-service port before we register anywhere.
            settings = settings.model_copy(update={"grpc_port": _free_port(settings.grpc_host)})
        self.settings = settings
        registry = MetricsRegistry()
        self.inprocess: InProcessTransport | None = None
        if events is None:
            events, self.inprocess = build_event_bus(settings, registry)
        self.membership: ClusterMembership | None = None
        forwarder: NodeClient | None = None
        if routes is None and settings.redis_connection:
            self.membership = build_membership(settings, registry)
            routes = self.membership.routes
            forwarder = self.membership.forwarder
        self.gateway = Gateway(
            settings,
            routes=routes or MemoryRouteTable(),
            events=events,
            metrics=registry,
            forwarder=forwarder,
        )
        self._runner: web.AppRunner | None = None
        self._port = settings.port

    async def start(self) -> None:
        if self.settings.resolved_event_bus == "kafka" and self.settings.kafka_provision_topics:
            await self._provision_topics()
        await self.gateway.start()
        if self.membership is not None:
            await self.membership.start(self.gateway)
            self.gateway.cluster_healthy = lambda: (
                self.membership is not None and (self.membership.healthy)
            )
        app = create_gateway_app(self.gateway)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port, backlog=4096)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        for sock in sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self._port = sock.getsockname()[1]
                break
        log.info(
            "gateway listening",
            extra={"port": self._port, "node_id": self.gateway.node_id},
        )

    async def _provision_topics(self) -> None:
        from mics.events.kafka import provision_topics

        kafka = kafka_settings(self.settings)
        tenants = list(self.settings.tenant_auth_map)
        loop = asyncio.get_running_loop()
        created = await loop.run_in_executor(
            None, provision_topics, kafka.bootstrap_servers, tenants, kafka.topics
        )
        log.info("event topics ready", extra={"created": len(created)})

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self._port}"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/ws"

    async def stop(self) -> None:
        """Graceful: readiness off, sessions closed with 4200, events flushed."""
        await self.gateway.shutdown()
        if self.membership is not None:
            await self.membership.stop()
            self.membership = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
