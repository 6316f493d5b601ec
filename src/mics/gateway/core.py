"""The gateway core: connection sequence, reader loop, heartbeat sweeper, shutdown.

`Gateway` wires the parts together explicitly (no globals) so tests and `mics dev` can
run several gateways in one process. The HTTP layer (`app.py`) hands it upgraded
WebSocket connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from mics.cluster.forwarding import NodeClient
from mics.cluster.redis_routes import RouteTableUnavailable
from mics.cluster.routes import Admission, AdmissionLimits, AdmissionResult, Route, RouteTable
from mics.events.build import message_event, signed_event
from mics.events.bus import EventBus
from mics.gateway.config import GatewaySettings
from mics.gateway.dedup import DedupCache
from mics.gateway.drain import OfflineDrainer, uses_hook_pull
from mics.gateway.metrics import GatewayMetrics
from mics.gateway.offline import LegacyBuffer, OfflineDelivery, RequeueResult
from mics.gateway.pipeline import MessagePipeline, PipelineLimits
from mics.gateway.ratelimit import TenantQpsLimiter
from mics.gateway.registry import SessionRegistry
from mics.gateway.routing import RouteCache, Router
from mics.gateway.session import Session
from mics.gateway.tenants import TenantDirectory, TenantRuntime
from mics.hooks.client import HookClient, HookOp, HookResult
from mics.hooks.policy import HookDefaults
from mics.observability.logging import bind_log_context, now_ms
from mics.observability.metrics import MetricsRegistry
from mics.protocol import codec
from mics.protocol.ids import new_trace_id
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb

log = logging.getLogger("mics.gateway")

# /auth failures and the 4001 close reasons they produce (protocol.md 2.2 step 5).
_AUTH_FAILURE_REASON = {
    HookResult.SIGN_REQUIRED: "auth hook sign required",
    HookResult.CIRCUIT_OPEN: "auth hook circuit open",
    HookResult.QUEUE_REJECTED: "hook queue rejected",
    HookResult.CANCELED: "canceled",
}


@dataclass(frozen=True, slots=True)
class AuthOk:
    user_id: str
    runtime: TenantRuntime


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        routes: RouteTable,
        events: EventBus,
        metrics: MetricsRegistry | None = None,
        forwarder: NodeClient | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.metrics_registry = metrics or MetricsRegistry()
        self.metrics = GatewayMetrics(self.metrics_registry)
        self.routes = routes
        self.events = events
        hook_defaults = HookDefaults(
            max_concurrency=settings.hook_max_concurrency,
            queue_timeout_ms=settings.hook_queue_timeout_ms,
            breaker_failure_threshold=settings.hook_breaker_failure_threshold,
            breaker_open_ms=settings.hook_breaker_open_ms,
            sign_required=settings.hook_sign_required,
            timeout_ms=settings.hook_timeout_ms,
            tenant_max_concurrency=dict(settings.tenant_hook_max_concurrency),
        )
        self.tenants = TenantDirectory(
            settings.tenant_auth_map, settings.tenant_hook_secrets, hook_defaults
        )
        self.hooks = HookClient(self.metrics_registry, hook_defaults)
        self.registry = SessionRegistry()
        self.buffer = LegacyBuffer(
            max_messages_per_user=settings.offline_buffer_max_messages_per_user,
            max_bytes_per_user=settings.offline_buffer_max_bytes_per_user,
            max_users_per_tenant=settings.offline_buffer_max_users_per_tenant,
            metrics=self.metrics,
        )
        self.offline = OfflineDelivery(
            buffer=self.buffer,
            events=events,
            notify_wait_s=settings.offline_notify_wait_ms / 1000,
            metrics=self.metrics,
        )
        self.pipeline = MessagePipeline(
            node_id=self.node_id,
            limits=PipelineLimits(
                max_message_bytes=settings.max_message_bytes,
                max_inflight=settings.max_inflight_per_connection,
                group_members_max=settings.group_members_max_users,
                group_offline_buffer_max=settings.group_offline_buffer_max_users,
            ),
            router=Router(
                node_id=self.node_id,
                registry=self.registry,
                routes=routes,
                forwarder=forwarder,
                metrics=self.metrics,
                chunk_size=settings.group_route_chunk_size,
                cache=RouteCache(
                    settings.local_route_cache_ttl_seconds, settings.local_route_cache_entries
                ),
            ),
            hooks=self.hooks,
            events=events,
            offline=self.offline,
            dedup=DedupCache(settings.dedup_ttl_seconds, settings.dedup_max_entries),
            qps=TenantQpsLimiter(),
            metrics=self.metrics,
        )
        self.drainer = OfflineDrainer(
            node_id=self.node_id, hooks=self.hooks, buffer=self.buffer, metrics=self.metrics
        )
        self.frame_limit = codec.frame_limit(settings.max_message_bytes)
        self.draining = False
        self._sweeper: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[object]] = set()
        self._close_tasks: set[asyncio.Task[object]] = set()
        self._requeues: set[asyncio.Task[None]] = set()
        # Set on a receipt or a session end while draining (see _await_receipts).
        self._receipts_changed = asyncio.Event()
        self._ws: dict[str, web.WebSocketResponse] = {}
        self._close_cb = self._close_session  # one bound method shared by all sessions
        self._forwarder = forwarder
        # Set by the cluster membership: is Redis answering? / tell the others a route
        # of this user changed (they drop it from their route caches).
        self.cluster_healthy: Callable[[], bool] | None = None
        self.announce_route_change: Callable[[str, str], None] | None = None
        # A retried forward must not deliver twice (protocol.md 7).
        self._forwarded = DedupCache(ttl_s=60, max_entries=200_000)
        self._started = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.hooks.start()
        await self.events.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())
        self.metrics.ws_connections.labels(self.node_id).set(0)
        self._started = True

    @property
    def ready(self) -> bool:
        """Serving and, in a cluster, able to reach the route table."""
        if not self._started or self.draining:
            return False
        return self.cluster_healthy is None or self.cluster_healthy()

    async def shutdown(self) -> None:
        """Readiness off, close every session with 4200, flush events; bounded in time."""
        if self.draining:
            return
        self.draining = True
        timeout = self.settings.drain_timeout_seconds or None
        started = time.monotonic()
        sessions = list(self.registry)
        for session in sessions:
            await self._unregister(session)
            session.accepting = False  # from here on, messages for it go elsewhere
        await self._await_receipts(sessions, started, timeout)
        for session in sessions:
            session.close(codec.CLOSE_DRAINING, "server draining")
            self.metrics.shutdown_drain.labels(self.node_id).inc()
        pending = [t for t in self._connections if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.drainer.close()
        remaining = None if timeout is None else max(0.1, timeout - (time.monotonic() - started))
        await self.events.stop(remaining if remaining is not None else 30.0)
        for task in list(self._requeues):
            task.cancel()
        await asyncio.gather(*self._requeues, return_exceptions=True)
        await self.hooks.close()
        log.info("gateway drained", extra={"sessions": len(sessions)})

    async def _await_receipts(
        self, sessions: list[Session], started: float, budget_s: float | None
    ) -> None:
        """Give v1.1 clients a moment to confirm what they were sent before their
        connections close: what they confirm is not handed back to the offline path,
        so their next connection does not get it again (clients confirm within 1 s,
        protocol.md 9.2). Bounded by the receipt wait and the drain timeout."""
        limit = self.settings.drain_receipt_wait_ms / 1000
        if budget_s is not None:
            limit = min(limit, max(0.0, budget_s / 2 - (time.monotonic() - started)))
        deadline = time.monotonic() + limit
        changed = self._receipts_changed
        while any(s.ledger and not s.closed for s in sessions):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    # -- connection sequence (protocol.md 2.2) -----------------------------------------------

    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return web.Response(status=503)
        ws = web.WebSocketResponse(
            autoping=True,
            heartbeat=self.settings.ws_keepalive_interval_seconds or None,
            # Frames over the protocol limit get error 4401 and the connection stays
            # open, up to twice the limit. aiohttp buffers a whole message before we see
            # it, so beyond that it closes the connection (1009) rather than hold an
            # unbounded frame in memory: the one place we knowingly differ from 2.3.
            max_msg_size=2 * self.frame_limit + 1 if self.frame_limit else 0,
            compress=False,
            timeout=2.0,
        )
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="WebSocket upgrade required")
        await ws.prepare(request)
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            # The handshake returns before the long-lived part starts, so an idle
            # connection keeps only two frames of ours alive (memory per connection).
            session = await self._handshake(request, ws)
            if session is not None:
                try:
                    await self._run_session(ws, session)
                    if not ws.closed:
                        await ws.close()
                except Exception:
                    # _run_session cleaned up after itself; tell the client plainly.
                    log.exception("session failed")
                    self.metrics.internal_errors.labels(session.tenant_id, "session").inc()
                    if not ws.closed:
                        await ws.close(code=1011, message=b"internal error")
        finally:
            if task is not None:
                self._connections.discard(task)
        return ws

    async def _handshake(self, request: web.Request, ws: web.WebSocketResponse) -> Session | None:
        """Steps 3-5 of the connection sequence; a Session, or None once refused."""
        query = request.query
        tenant_id = query.get("tenantId", "")
        token = query.get("token", "")
        device_id = query.get("deviceId", "")
        v11 = query.get("protocolVersion", "") == "1.1"
        trace_id = new_trace_id()
        # This handler runs in its own task, so the ids stay bound for its lifetime.
        bind_log_context(tenant=tenant_id, trace=trace_id, node=self.node_id)
        if not self.tenants.known(tenant_id):
            await self._refuse(ws, tenant_id, codec.CLOSE_INVALID_TENANT, "invalid tenant")
            return None
        auth = await self._authenticate(tenant_id, token, device_id, trace_id)
        if isinstance(auth, str):
            await self._refuse(ws, tenant_id, codec.CLOSE_AUTH_FAILED, auth)
            return None
        if self.draining:
            await self._refuse(ws, tenant_id, codec.CLOSE_DRAINING, "server draining")
            return None
        transport = request.transport
        if transport is None:
            return None
        return Session(
            tenant_id=tenant_id,
            user_id=auth.user_id,
            device_id=device_id,
            conn_id=new_trace_id(),
            trace_id=trace_id,
            runtime=auth.runtime,
            v11=v11,
            transport=transport,
            loop=asyncio.get_running_loop(),
            send_limit=self.settings.max_send_buffer_bytes,
            ledger_limits=(
                self.settings.unconfirmed_max_messages,
                self.settings.unconfirmed_max_bytes,
            ),
            close_cb=self._close_cb,
        )

    async def _run_session(self, ws: web.WebSocketResponse, session: Session) -> None:
        self._ws[session.conn_id] = ws
        registered = routed = connected = False
        try:
            previous = self.registry.add(session)
            registered = True
            self.routes_changed(session.tenant_id, session.user_id)
            if previous is not None:
                # Same device again: the new connection wins (section 9.9 takeover).
                self.metrics.ws_takeovers.labels(session.tenant_id).inc()
                previous.close(codec.CLOSE_REPLACED, "replaced")
            try:
                admission = await self.routes.admit(self.route_of(session), self.limits_of(session))
            except RouteTableUnavailable:
                # Redis is down: serve the connection locally; the lease renewal
                # registers it once Redis is back. Readiness is already off.
                log.warning("route table unavailable: session served locally only")
                admission = Admission(AdmissionResult.ADMITTED)
            if admission.result is AdmissionResult.DENIED:
                self.metrics.rate_limited.labels(session.tenant_id, "connection_limit").inc()
                self.registry.remove(session)
                registered = False
                await self._refuse(ws, session.tenant_id, codec.CLOSE_RATE_LIMITED, "rate limited")
                return
            routed = True
            session.send(self._connect_ack(session))
            connected = True
            self._count_connect(session, +1)
            self._emit_connect(session, hook_pb.CONNECT_ONLINE)
            self.drainer.start(session, "connect")
            # Reader (inline: one coroutine frame less per idle connection).
            pipeline = self.pipeline
            limit = self.frame_limit
            async for msg in ws:
                if msg.type is not WSMsgType.BINARY:
                    continue  # text frames are discarded and are not activity (section 2.4)
                try:
                    frame = codec.decode_client_frame(msg.data, limit)
                except codec.FrameError as err:
                    reason = (
                        "frame_too_large" if err.code == codec.ERROR_FRAME_TOO_LARGE else "invalid"
                    )
                    self.metrics.ws_frames_rejected.labels(session.tenant_id, reason).inc()
                    session.send(codec.error_frame(err.code, err.text))
                    continue
                kind = frame.WhichOneof("payload")
                if kind == "message":
                    await pipeline.on_message(session, frame.message)
                elif kind == "heartbeat_ping":
                    session.touch()
                    session.send(codec.pong_frame(now_ms()))
                elif kind == "delivery_ack":
                    session.touch()  # receipts are activity, and they confirm offline pages
                    self.drainer.on_receipt(session, frame.delivery_ack)
                    if self.draining:
                        self._receipts_changed.set()
                if session.closed:
                    break
        finally:
            if registered:
                self.registry.remove(session)
            session.flush_now()
            session.closed = True
            self._requeue_undelivered(session)
            if self.draining:
                self._receipts_changed.set()
            self._ws.pop(session.conn_id, None)
            if connected:
                self._count_connect(session, -1)
                self._emit_connect(session, hook_pb.CONNECT_OFFLINE)
            if routed:
                await self._remove_route(session)
            self.routes_changed(session.tenant_id, session.user_id)

    def _requeue_undelivered(self, session: Session) -> None:
        """Hand what the ended connection never confirmed back to the offline path.

        Live deliveries still held behind an unfinished drain were acked SENT to their
        senders; on a v1.1 connection, so were the ones written but not confirmed by a
        receipt (the socket may have died with them, the client may have stopped
        reading). Nothing else holds them: they go offline now, in order, before any
        message that goes offline after this connection ended (protocol.md 9.2)."""
        tenant = session.tenant_id
        ledger = session.ledger
        if ledger is not None and ledger.evicted:
            self.metrics.unconfirmed_forgotten.labels(tenant).inc(ledger.evicted)
        taken = session.take_undelivered()
        if not taken:
            return
        items = [(frame, self._offline_event_builder(session, frame)) for _, frame in taken]
        settle = self.offline.requeue(session.runtime, session.user_id, items)
        task = asyncio.get_running_loop().create_task(self._after_requeue(session, settle))
        self._requeues.add(task)
        task.add_done_callback(self._requeues.discard)

    def _offline_event_builder(
        self, session: Session, frame: bytes
    ) -> Callable[[], hook_pb.MqEvent]:
        def build() -> hook_pb.MqEvent:
            message = msg_pb.ServerFrame.FromString(frame).delivery.message
            return message_event(
                message,
                hook_pb.OFFLINE_MESSAGE,
                session.user_id,
                tenant_id=session.tenant_id,
                secret=session.runtime.tenant_secret,
                node_id=self.node_id,
                trace_id=session.trace_id,
            )

        return build

    async def _after_requeue(
        self, session: Session, settle: Coroutine[Any, Any, RequeueResult]
    ) -> None:
        result = await settle
        tenant, user = session.tenant_id, session.user_id
        requeued = self.metrics.offline_requeued
        for outcome, count in (
            ("notified", result.notified),
            ("buffered", result.buffered),
            ("lost", result.lost),
        ):
            if count:
                requeued.labels(tenant, outcome).inc(count)
        if result.lost:
            log.error(
                "unconfirmed deliveries lost: the broker and the buffer refused them",
                extra={"user_id": user, "count": result.lost},
            )
        # A newer connection of the user here may have drained the buffer already.
        devices = self.registry.devices(tenant, user)
        for other in list(devices.values()) if devices else []:
            if not other.closed:
                self.drainer.start(other, "nudge")

    async def _refuse(
        self, ws: web.WebSocketResponse, tenant_id: str, code: int, reason: str
    ) -> None:
        self.metrics.ws_connect_rejected.labels(tenant_id or "-", str(code)).inc()
        log.info("connection refused", extra={"code": code, "reason": reason})
        await ws.close(code=code, message=codec.truncate_close_reason(reason).encode("utf-8"))

    async def _authenticate(
        self, tenant_id: str, token: str, device_id: str, trace_id: str
    ) -> AuthOk | str:
        outcome = await self.hooks.call(
            tenant_id=tenant_id,
            op=HookOp.AUTH,
            base_url=self.tenants.auth_base_url(tenant_id),
            request=hook_pb.AuthRequest(token=token, device_id=device_id),
            response_type=hook_pb.AuthResponse,
            secret=self.tenants.hook_secret(tenant_id),
            policy=self.tenants.auth_policy(tenant_id),
            trace_id=trace_id,
        )
        response = outcome.response
        if not outcome.ok or response is None:
            return _AUTH_FAILURE_REASON.get(outcome.result, "hook timeout/failure")
        user_id = response.user_id.strip()
        if not response.ok or not response.HasField("config") or not user_id:
            return response.reason or "unauthorized"
        if "|" in user_id:
            return "invalid user id"
        return AuthOk(user_id, self.tenants.runtime_from_auth(tenant_id, response.config))

    def route_of(self, session: Session) -> Route:
        return Route(
            session.tenant_id, session.user_id, session.device_id, self.node_id, session.conn_id
        )

    @staticmethod
    def limits_of(session: Session) -> AdmissionLimits:
        return AdmissionLimits(
            session.runtime.tenant_max_connections, session.runtime.user_max_connections
        )

    def _connect_ack(self, session: Session) -> bytes:
        ack = msg_pb.ConnectAck(
            code=codec.CONNECT_OK,
            tenant_id=session.tenant_id,
            user_id=session.user_id,
            device_id=session.device_id,
            node_id=self.node_id,
            trace_id=session.trace_id,
            protocol_version="1.1" if session.v11 else "",
        )
        return msg_pb.ServerFrame(connect_ack=ack).SerializeToString()

    # -- reader -------------------------------------------------------------------------------

    # -- nudge (protocol.md 9.5) ----------------------------------------------------------

    def nudge(self, tenant_id: str, user_id: str) -> int:
        """Re-drain every local connection of the user that pulls from the hook."""
        devices = self.registry.devices(tenant_id, user_id)
        count = 0
        for session in list(devices.values()) if devices else []:
            # A session whose connect drain has not started yet needs no nudge: that
            # drain starts after the message was stored and will find it.
            if not session.closed and session.offline is not None and uses_hook_pull(session):
                self.drainer.start(session, "nudge")
                count += 1
        return count

    def routes_changed(self, tenant_id: str, user_id: str) -> None:
        """A route of the user changed here: forget cached routes, tell the cluster."""
        self.pipeline.router.cache.invalidate(tenant_id, user_id)
        if self.announce_route_change is not None:
            self.announce_route_change(tenant_id, user_id)

    async def nudge_everywhere(self, tenant_id: str, user_id: str) -> int:
        """Re-drain the user's connections on this node and, in a cluster, on the
        other nodes holding a route of the user (PullOffline)."""
        count = self.nudge(tenant_id, user_id)
        if self.routes.local_only or self._forwarder is None:
            return count
        try:
            routes = await self.routes.lookup(tenant_id, user_id)
        except Exception:
            log.warning("route lookup failed for a nudge; local connections only")
            return count
        peers = {r.node_id: getattr(r, "endpoint", "") for r in routes if r.node_id != self.node_id}
        forwarder = self._forwarder
        results = await asyncio.gather(
            *(
                forwarder.pull_offline(
                    node_id=node,
                    endpoint=endpoint,
                    tenant_id=tenant_id,
                    user_id=user_id,
                    trace_id="",
                )
                for node, endpoint in peers.items()
                if endpoint
            )
        )
        return count + sum(results)

    # -- the node service's side (mics.cluster.forwarding.LocalNode) -----------------------

    def deliver_forwarded(
        self, tenant_id: str, to_user_ids: Sequence[str], message: msg_pb.MessageRequest, via: str
    ) -> list[str]:
        frame = codec.delivery_frame(message)
        missing: list[str] = []
        written_total = 0
        for user in to_user_ids:
            key = f"{tenant_id}|{message.user_id}|{message.msg_id}|{user}"
            if not self._forwarded.claim(key):
                continue  # a retry of a forward this node already delivered
            written = self.pipeline.router.deliver_local(tenant_id, user, frame, message.msg_id)
            if written:
                written_total += written
            else:
                self._forwarded.release(key)
                missing.append(user)
        if written_total:
            self.metrics.deliveries.labels(tenant_id, via).inc(written_total)
        return missing

    def buffer_put(self, tenant_id: str, user_id: str, frame: bytes, ttl_s: int) -> bool:
        return self.buffer.put(tenant_id, user_id, frame, ttl_s)

    def buffer_take(self, tenant_id: str, user_id: str) -> list[bytes]:
        return self.buffer.take(tenant_id, user_id)

    def nudge_secrets(self, tenant_id: str) -> list[str]:
        """Keys a nudge may be signed with: the configured one, and the latest /auth one."""
        keys = [self.tenants.hook_secret(tenant_id)]
        latest = self.tenants.latest(tenant_id)
        if latest is not None:
            keys.append(latest.tenant_secret)
        return [k for k in dict.fromkeys(keys) if k]

    # -- closing -------------------------------------------------------------------------------

    def _close_session(self, session: Session, code: int, reason: str) -> None:
        ws = self._ws.get(session.conn_id)
        if ws is None or ws.closed:
            return
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(
            ws.close(code=code, message=reason.encode("utf-8"))
        )
        self._close_tasks.add(task)
        task.add_done_callback(self._close_tasks.discard)

    async def _unregister(self, session: Session) -> None:
        self.registry.remove(session)
        await self._remove_route(session)

    async def _remove_route(self, session: Session) -> None:
        try:
            await self.routes.remove(self.route_of(session))
        except Exception:
            # The route expires with its lease; a failed removal must not break cleanup.
            log.exception("route removal failed")

    # -- heartbeat sweeper ----------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        interval = self.settings.heartbeat_sweep_interval_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
            except Exception:
                log.exception("sweep failed")

    def sweep(self) -> int:
        """Close sessions idle past their tenant's heartbeat timeout; purge the buffer."""
        now = time.monotonic()
        closed = 0
        for session in self.registry:
            if now - session.last_seen > session.runtime.heartbeat_timeout_s:
                self.metrics.ws_heartbeat_timeouts.labels(session.tenant_id).inc()
                session.close(codec.CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")
                closed += 1
        self.buffer.purge_expired()
        return closed

    # -- events and counters --------------------------------------------------------------

    def _count_connect(self, session: Session, delta: int) -> None:
        m = self.metrics
        m.ws_connections.labels(self.node_id).set(len(self.registry))
        direction = "inc" if delta > 0 else "dec"
        m.ws_connection_events.labels(session.tenant_id, self.node_id, direction).inc()
        if delta > 0:
            m.ws_connected.labels(session.tenant_id, self.node_id).inc()
        else:
            m.ws_disconnected.labels(session.tenant_id, self.node_id).inc()

    def _emit_connect(self, session: Session, event_type: hook_pb.EventType) -> None:
        if not self.events.enabled:
            return
        ack = msg_pb.ConnectAck(
            code=codec.CONNECT_OK,
            tenant_id=session.tenant_id,
            user_id=session.user_id,
            device_id=session.device_id,
            node_id=self.node_id,
            trace_id=session.trace_id,
        )
        event = signed_event(
            tenant_id=session.tenant_id,
            event_type=event_type,
            secret=session.runtime.tenant_secret,
            node_id=self.node_id,
            trace_id=session.trace_id,
            user_id=session.user_id,
            device_id=session.device_id,
            event_data=ack.SerializeToString(),
        )
        self.events.publish(event)
