"""Node-to-node forwarding over gRPC: `mics.node.v1.NodeGateway` (protocol.md 7, 9.9).

Client side (`NodeClient`): one channel per peer endpoint, a 250 ms deadline per
attempt, at most 2 attempts, retried only on UNAVAILABLE, DEADLINE_EXCEEDED and
RESOURCE_EXHAUSTED after 50 ms x attempt, a circuit breaker per peer node, and the
optional cluster token in the `x-mics-node-token` metadata. A peer answers which users
it had no session for (`ForwardAck.missing_user_ids`); the caller sends those, and
everything of a failed call, to the offline path.

Server side (`NodeService`): checks the cluster token, then hands the work to the local
gateway through the small `LocalNode` interface. A retried forward never delivers twice:
the local node dedups forwarded deliveries by (tenant, sender, msg_id, recipient).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from grpc import aio

from mics.hooks.breaker import CircuitBreaker
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.pb import mics_node_pb2 as node_pb
from mics.protocol.pb import mics_node_pb2_grpc as node_grpc

log = logging.getLogger("mics.cluster.forwarding")

TOKEN_METADATA = "x-mics-node-token"
ATTEMPT_DEADLINE_S = 0.25
MAX_ATTEMPTS = 2
RETRY_DELAY_S = 0.05
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
NO_SESSION = "no session"


@dataclass(frozen=True, slots=True)
class ForwardOutcome:
    """What became of one forward: delivered, partly delivered, or not at all."""

    failed: bool  # no answer (RPC error, breaker open): every recipient goes offline
    missing: list[str] = field(default_factory=list)  # answered: no session for these
    status: str = "OK"


class ForwardMetrics:
    def __init__(self, registry: MetricsRegistry) -> None:
        r = registry
        self.failed = r.counter(
            "mics_grpc_forward_failed", "Forwards that got no answer", ("tenant", "via", "status")
        )
        self.circuit_open = r.counter(
            "mics_grpc_circuit_open",
            "Forwards skipped by an open breaker",
            ("tenant", "node", "via"),
        )
        self.duration = r.histogram_ms(
            "mics_grpc_forward_duration_ms", "Forward call duration", ("tenant", "via")
        )


def grpc_target(endpoint: str) -> str:
    """`http://host:port` (PUBLIC_ENDPOINT) -> `host:port` for a cleartext channel."""
    for prefix in ("http://", "https://", "grpc://"):
        if endpoint.startswith(prefix):
            endpoint = endpoint[len(prefix) :]
    return endpoint.rstrip("/")


class NodeClient:
    def __init__(
        self,
        metrics: MetricsRegistry,
        *,
        token: str = "",
        breaker_failure_threshold: int = 5,
        breaker_open_ms: int = 5000,
    ) -> None:
        self._m = ForwardMetrics(metrics)
        self._metadata = ((TOKEN_METADATA, token),) if token else ()
        self._threshold = breaker_failure_threshold
        self._open_ms = breaker_open_ms
        self._channels: dict[str, aio.Channel] = {}
        self._stubs: dict[str, node_grpc.NodeGatewayAsyncStub] = {}
        self._breakers: dict[str, CircuitBreaker] = {}

    def _stub(self, endpoint: str) -> node_grpc.NodeGatewayAsyncStub:
        stub = self._stubs.get(endpoint)
        if stub is None:
            channel = aio.insecure_channel(grpc_target(endpoint))
            self._channels[endpoint] = channel
            stub = self._stubs[endpoint] = node_grpc.NodeGatewayStub(channel)
        return stub

    def _breaker(self, node_id: str) -> CircuitBreaker:
        breaker = self._breakers.get(node_id)
        if breaker is None:
            breaker = self._breakers[node_id] = CircuitBreaker(self._threshold, self._open_ms)
        return breaker

    async def forward(
        self,
        *,
        node_id: str,
        endpoint: str,
        tenant_id: str,
        to_user_ids: Sequence[str],
        message: msg_pb.MessageRequest,
    ) -> ForwardOutcome:
        """ForwardSingle for one recipient, ForwardBatch for several."""
        stub = self._stub(endpoint)
        call: Callable[[], Awaitable[node_pb.ForwardAck]]
        if len(to_user_ids) == 1:
            via = "grpc_single"
            single = node_pb.ForwardSingleRequest(
                tenant_id=tenant_id, to_user_id=to_user_ids[0], message=message
            )

            async def call() -> node_pb.ForwardAck:
                return await stub.ForwardSingle(
                    single, timeout=ATTEMPT_DEADLINE_S, metadata=self._metadata
                )
        else:
            via = "grpc_batch"
            batch = node_pb.ForwardBatchRequest(
                tenant_id=tenant_id, to_user_ids=list(to_user_ids), message=message
            )

            async def call() -> node_pb.ForwardAck:
                return await stub.ForwardBatch(
                    batch, timeout=ATTEMPT_DEADLINE_S, metadata=self._metadata
                )

        breaker = self._breaker(node_id)
        if not breaker.allow():
            self._m.circuit_open.labels(tenant_id, node_id, via).inc()
            return ForwardOutcome(failed=True, status="CIRCUIT_OPEN")
        started = time.perf_counter()
        status = grpc.StatusCode.UNKNOWN
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                ack = await call()
            except aio.AioRpcError as exc:
                status = exc.code()
                if status in _RETRYABLE and attempt < MAX_ATTEMPTS:
                    await asyncio.sleep(RETRY_DELAY_S * attempt)
                    continue
                break
            except asyncio.CancelledError:
                breaker.release_probe()
                raise
            breaker.record_success()
            self._m.duration.labels(tenant_id, via).observe((time.perf_counter() - started) * 1000)
            missing = list(ack.missing_user_ids)
            if not ack.ok and not missing and ack.reason == NO_SESSION:
                missing = list(to_user_ids)  # an older peer that cannot name them
            return ForwardOutcome(failed=False, missing=missing)
        breaker.record_failure()
        self._m.failed.labels(tenant_id, via, status.name).inc()
        log.warning("forward to %s failed: %s", node_id, status.name, extra={"tenant": tenant_id})
        return ForwardOutcome(failed=True, status=status.name)

    async def pull_offline(
        self, *, node_id: str, endpoint: str, tenant_id: str, user_id: str, trace_id: str
    ) -> int:
        """Ask a peer to re-pull for its connections of the user; 0 on any failure."""
        breaker = self._breaker(node_id)
        if not breaker.allow():
            return 0
        request = node_pb.PullOfflineRequest(
            tenant_id=tenant_id, user_id=user_id, trace_id=trace_id
        )
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                response: node_pb.PullOfflineResponse = await self._stub(endpoint).PullOffline(
                    request, timeout=ATTEMPT_DEADLINE_S, metadata=self._metadata
                )
            except aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    breaker.record_success()  # a v1 node: alive, just older
                    return 0
                if exc.code() in _RETRYABLE and attempt < MAX_ATTEMPTS:
                    await asyncio.sleep(RETRY_DELAY_S * attempt)
                    continue
                breaker.record_failure()
                return 0
            breaker.record_success()
            return response.connections
        return 0

    def breaker_state(self, node_id: str) -> str:
        return self._breaker(node_id).state

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


class LocalNode(Protocol):
    """What the node service needs from the gateway it runs in."""

    def deliver_forwarded(
        self, tenant_id: str, to_user_ids: Sequence[str], message: msg_pb.MessageRequest, via: str
    ) -> list[str]:
        """Deliver to local sessions; return the users that had none."""
        ...

    def nudge(self, tenant_id: str, user_id: str) -> int: ...

    def buffer_put(self, tenant_id: str, user_id: str, frame: bytes, ttl_s: int) -> bool: ...

    def buffer_take(self, tenant_id: str, user_id: str) -> list[bytes]: ...


class NodeService(node_grpc.NodeGatewayServicer):
    def __init__(self, node: LocalNode, metrics: MetricsRegistry, *, token: str = "") -> None:
        self._node = node
        self._token = token
        self._unauthorized = metrics.counter(
            "mics_grpc_unauthorized", "Node calls refused for a wrong cluster token"
        )

    async def _check_token(self, context: aio.ServicerContext) -> None:  # type: ignore[type-arg]
        if not self._token:
            return
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(TOKEN_METADATA) != self._token:
            self._unauthorized.inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unauthorized")

    def _ack(self, missing: list[str]) -> node_pb.ForwardAck:
        if not missing:
            return node_pb.ForwardAck(ok=True)
        return node_pb.ForwardAck(ok=False, reason=NO_SESSION, missing_user_ids=missing)

    async def ForwardSingle(
        self,
        request: node_pb.ForwardSingleRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.ForwardAck:
        await self._check_token(context)
        message = request.message
        message.tenant_id = request.tenant_id
        missing = self._node.deliver_forwarded(
            request.tenant_id, [request.to_user_id], message, "grpc_in_single"
        )
        return self._ack(missing)

    async def ForwardBatch(
        self,
        request: node_pb.ForwardBatchRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.ForwardAck:
        await self._check_token(context)
        message = request.message
        message.tenant_id = request.tenant_id
        missing = self._node.deliver_forwarded(
            request.tenant_id, list(request.to_user_ids), message, "grpc_in_batch"
        )
        return self._ack(missing)

    async def PullOffline(
        self,
        request: node_pb.PullOfflineRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.PullOfflineResponse:
        await self._check_token(context)
        return node_pb.PullOfflineResponse(
            connections=self._node.nudge(request.tenant_id, request.user_id)
        )

    async def BufferOffline(
        self,
        request: node_pb.BufferOfflineRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.ForwardAck:
        await self._check_token(context)
        ttl = request.ttl_seconds if request.ttl_seconds > 0 else 300
        if self._node.buffer_put(request.tenant_id, request.to_user_id, request.server_frame, ttl):
            return node_pb.ForwardAck(ok=True)
        return node_pb.ForwardAck(ok=False, reason="offline buffer full")

    async def DrainOffline(
        self,
        request: node_pb.DrainOfflineRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.DrainOfflineResponse:
        await self._check_token(context)
        frames = self._node.buffer_take(request.tenant_id, request.user_id)
        return node_pb.DrainOfflineResponse(server_frames=frames)


async def start_node_server(service: NodeService, host: str, port: int) -> tuple[aio.Server, int]:
    """Serve the node service on host:port (0 picks a free port); return server and port."""
    server = aio.server()
    node_grpc.add_NodeGatewayServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
