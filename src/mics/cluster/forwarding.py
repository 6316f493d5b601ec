"""Node-to-node forwarding over gRPC: `mics.node.v1.NodeGateway` (protocol.md 7, 9.9).

Client side (`NodeClient`): one channel per peer endpoint, a 250 ms deadline per
attempt, at most 2 attempts, retried only on UNAVAILABLE, DEADLINE_EXCEEDED and
RESOURCE_EXHAUSTED after 50 ms x attempt, a circuit breaker per peer node, and the
optional cluster token in the `x-mics-node-token` metadata. A peer answers which users
it had no session for (`ForwardAck.missing_user_ids`); the caller sends those, and
everything of a failed call, to the offline path.

Coalescing: the forwards to one peer issued within one event-loop iteration go out as
one `ForwardMany` call (this project's addition to the service), each item carrying
what a `ForwardSingle` / `ForwardBatch` would, and each caller gets its own item's
answer. A forward alone in its iteration still goes as `ForwardSingle` /
`ForwardBatch`, and a peer that answers `ForwardMany` with UNIMPLEMENTED (an older
node) gets one call per forward, so both stay wire-compatible. One call shares one
deadline, one breaker verdict and one retry among its items.

`buffer_offline` / `drain_offline` are the home-node buffer calls (protocol.md 7.2,
`mics.cluster.home_buffer`). They are not idempotent, so a call that may have been
applied (DEADLINE_EXCEEDED) is not retried.

Server side (`NodeService`): checks the cluster token, then hands the work to the local
gateway through the small `LocalNode` interface. A retried forward never delivers twice:
the local node dedups forwarded deliveries by (tenant, sender, msg_id, recipient). All
items of one `ForwardMany` are delivered in one go, so the frames a session gets from
one call are written to its socket in one write (`Session` flushes once per iteration).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
from grpc import aio
from prometheus_client import Counter, Histogram

from mics.hooks.breaker import CircuitBreaker
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.pb import mics_node_pb2 as node_pb
from mics.protocol.pb import mics_node_pb2_grpc as node_grpc

_Reply = TypeVar("_Reply")

log = logging.getLogger("mics.cluster.forwarding")

TOKEN_METADATA = "x-mics-node-token"
ATTEMPT_DEADLINE_S = 0.25
# DrainOffline removes what it returns: an answer lost to a deadline loses the frames,
# so it gets more time than a forward.
DRAIN_DEADLINE_S = 1.0
MAX_ATTEMPTS = 2
RETRY_DELAY_S = 0.05
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# For calls that must not be applied twice: errors that mean "not processed".
_RETRYABLE_UNAPPLIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# What a node that predates a call answers: alive, just older.
_OLDER_PEER = frozenset({grpc.StatusCode.UNIMPLEMENTED})
CIRCUIT_OPEN = "CIRCUIT_OPEN"
NO_SESSION = "no session"
BUFFER_FULL = "offline buffer full"
SERVER_DRAINING = "server draining"
DEFAULT_BUFFER_TTL_S = 300

# One ForwardMany carries at most this many forwards and about this many bytes (gRPC's
# default receive limit is 4 MiB); more in one iteration go as several calls.
MANY_MAX_ITEMS = 256
MANY_MAX_BYTES = 1 << 20
# A peer that answered ForwardMany with UNIMPLEMENTED gets one call per forward for
# this long; then ForwardMany is tried again (the node may have been upgraded).
OLD_PEER_RECHECK_S = 60.0


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
        self.calls = r.counter(
            "mics_grpc_forward_calls",
            "Forward RPC attempts made, by RPC (ForwardMany carries several forwards)",
            ("rpc",),
        )
        self.buffer_failed = r.counter(
            "mics_grpc_offline_buffer_failed",
            "BufferOffline calls to a home node that got no answer or were refused",
            ("tenant", "status"),
        )
        self.drain_failed = r.counter(
            "mics_grpc_offline_drain_failed",
            "DrainOffline calls to a home node that got no answer",
            ("tenant", "status"),
        )
        self._durations: dict[tuple[str, str], Histogram] = {}

    def duration_of(self, tenant_id: str, via: str) -> Histogram:
        child = self._durations.get((tenant_id, via))
        if child is None:
            child = self._durations[(tenant_id, via)] = self.duration.labels(tenant_id, via)
        return child


def grpc_target(endpoint: str) -> str:
    """`http://host:port` (PUBLIC_ENDPOINT) -> `host:port` for a cleartext channel."""
    for prefix in ("http://", "https://", "grpc://"):
        if endpoint.startswith(prefix):
            endpoint = endpoint[len(prefix) :]
    return endpoint.rstrip("/")


def _via(to_user_ids: Sequence[str]) -> str:
    return "grpc_single" if len(to_user_ids) == 1 else "grpc_batch"


def _outcome(ack: node_pb.ForwardAck, to_user_ids: Sequence[str]) -> ForwardOutcome:
    missing = list(ack.missing_user_ids)
    if not ack.ok and not missing and ack.reason == NO_SESSION:
        missing = list(to_user_ids)  # an older peer that cannot name them
    return ForwardOutcome(failed=False, missing=missing)


class _Forward:
    """One queued forward; its future gets the outcome, or None: "call it yourself"."""

    __slots__ = ("future", "message", "tenant_id", "to_user_ids")

    def __init__(
        self,
        tenant_id: str,
        to_user_ids: Sequence[str],
        message: msg_pb.MessageRequest,
        future: asyncio.Future[ForwardOutcome | None],
    ) -> None:
        self.tenant_id = tenant_id
        self.to_user_ids = to_user_ids
        self.message = message
        self.future = future

    def resolve(self, outcome: ForwardOutcome | None) -> None:
        if not self.future.done():
            self.future.set_result(outcome)


def _chunks(forwards: list[_Forward]) -> list[list[_Forward]]:
    if len(forwards) <= MANY_MAX_ITEMS:
        size = sum(f.message.ByteSize() + 12 * len(f.to_user_ids) for f in forwards)
        if size <= MANY_MAX_BYTES:
            return [forwards]
    chunks: list[list[_Forward]] = []
    current: list[_Forward] = []
    size = 0
    for forward in forwards:
        item = forward.message.ByteSize() + 12 * len(forward.to_user_ids)
        if current and (len(current) >= MANY_MAX_ITEMS or size + item > MANY_MAX_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(forward)
        size += item
    if current:
        chunks.append(current)
    return chunks


class NodeClient:
    def __init__(
        self,
        metrics: MetricsRegistry,
        *,
        token: str = "",
        breaker_failure_threshold: int = 5,
        breaker_open_ms: int = 5000,
        coalesce: bool = True,
    ) -> None:
        self._m = ForwardMetrics(metrics)
        self._metadata = ((TOKEN_METADATA, token),) if token else ()
        self._threshold = breaker_failure_threshold
        self._open_ms = breaker_open_ms
        self._coalesce = coalesce
        self._channels: dict[str, aio.Channel] = {}
        self._stubs: dict[str, node_grpc.NodeGatewayAsyncStub] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        # Forwards waiting for the end of this iteration, by (peer node, endpoint).
        self._queues: dict[tuple[str, str], list[_Forward]] = {}
        # Endpoints that answered ForwardMany with UNIMPLEMENTED, until when.
        self._old_peers: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._calls: dict[str, Counter] = {}

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

    def _count_call(self, rpc: str) -> None:
        counter = self._calls.get(rpc)
        if counter is None:
            counter = self._calls[rpc] = self._m.calls.labels(rpc)
        counter.inc()

    # -- forwards --------------------------------------------------------------------------

    async def forward(
        self,
        *,
        node_id: str,
        endpoint: str,
        tenant_id: str,
        to_user_ids: Sequence[str],
        message: msg_pb.MessageRequest,
    ) -> ForwardOutcome:
        """Deliver ``message`` to the users' sessions on a peer; which it had none for.

        Coalesced with the other forwards to the same peer of this event-loop iteration.
        """
        if not self._coalesce:
            return await self._forward_one(node_id, endpoint, tenant_id, to_user_ids, message)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ForwardOutcome | None] = loop.create_future()
        key = (node_id, endpoint)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = []
            loop.call_soon(self._flush, key)
        queue.append(_Forward(tenant_id, to_user_ids, message, future))
        outcome = await future
        if outcome is None:  # alone in its iteration, or an older peer
            return await self._forward_one(node_id, endpoint, tenant_id, to_user_ids, message)
        return outcome

    def _flush(self, key: tuple[str, str]) -> None:
        forwards = [f for f in self._queues.pop(key, ()) if not f.future.done()]
        try:
            if len(forwards) < 2 or self._is_old_peer(key[1]):
                chunks = [[f] for f in forwards]
            else:
                chunks = _chunks(forwards)
            loop = asyncio.get_running_loop()
            for chunk in chunks:
                if len(chunk) == 1:
                    chunk[0].resolve(None)  # its caller makes a v1 call
                    continue
                task = loop.create_task(self._forward_many(key[0], key[1], chunk))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception:
            log.exception("coalescing forwards to %s failed", key[0])
            for forward in forwards:
                forward.resolve(None)  # no caller may be left waiting

    def _is_old_peer(self, endpoint: str) -> bool:
        until = self._old_peers.get(endpoint)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._old_peers[endpoint]
            return False
        return True

    async def _forward_one(
        self,
        node_id: str,
        endpoint: str,
        tenant_id: str,
        to_user_ids: Sequence[str],
        message: msg_pb.MessageRequest,
    ) -> ForwardOutcome:
        """ForwardSingle for one recipient, ForwardBatch for several."""
        stub = self._stub(endpoint)
        call: Callable[[], Awaitable[node_pb.ForwardAck]]
        via = _via(to_user_ids)
        if len(to_user_ids) == 1:
            rpc = "ForwardSingle"
            single = node_pb.ForwardSingleRequest(
                tenant_id=tenant_id, to_user_id=to_user_ids[0], message=message
            )

            async def call() -> node_pb.ForwardAck:
                return await stub.ForwardSingle(
                    single, timeout=ATTEMPT_DEADLINE_S, metadata=self._metadata
                )
        else:
            rpc = "ForwardBatch"
            batch = node_pb.ForwardBatchRequest(
                tenant_id=tenant_id, to_user_ids=list(to_user_ids), message=message
            )

            async def call() -> node_pb.ForwardAck:
                return await stub.ForwardBatch(
                    batch, timeout=ATTEMPT_DEADLINE_S, metadata=self._metadata
                )

        started = time.perf_counter()
        ack, status = await self._guarded_call(node_id, call, retryable=_RETRYABLE, rpc=rpc)
        if ack is not None:
            self._m.duration_of(tenant_id, via).observe((time.perf_counter() - started) * 1000)
            return _outcome(ack, to_user_ids)
        if status == CIRCUIT_OPEN:
            self._m.circuit_open.labels(tenant_id, node_id, via).inc()
        else:
            self._m.failed.labels(tenant_id, via, status).inc()
            log.warning("forward to %s failed: %s", node_id, status, extra={"tenant": tenant_id})
        return ForwardOutcome(failed=True, status=status)

    async def _forward_many(self, node_id: str, endpoint: str, forwards: list[_Forward]) -> None:
        """One ForwardMany for ``forwards``; every one of them gets its outcome."""
        outcomes: list[ForwardOutcome | None]
        try:
            outcomes = await self._call_many(node_id, endpoint, forwards)
        except asyncio.CancelledError:  # the client is closing
            for forward in forwards:
                forward.resolve(ForwardOutcome(failed=True, status="CANCELLED"))
            raise
        except Exception:
            log.exception("forward of %d messages to %s failed", len(forwards), node_id)
            outcomes = [ForwardOutcome(failed=True, status="INTERNAL")] * len(forwards)
        for forward, outcome in zip(forwards, outcomes, strict=True):
            forward.resolve(outcome)

    async def _call_many(
        self, node_id: str, endpoint: str, forwards: list[_Forward]
    ) -> list[ForwardOutcome | None]:
        request = node_pb.ForwardManyRequest()
        add = request.items.add
        for forward in forwards:
            add(
                tenant_id=forward.tenant_id,
                to_user_ids=forward.to_user_ids,
                message=forward.message,
            )
        stub = self._stub(endpoint)
        started = time.perf_counter()
        response, status = await self._guarded_call(
            node_id,
            lambda: stub.ForwardMany(request, timeout=ATTEMPT_DEADLINE_S, metadata=self._metadata),
            retryable=_RETRYABLE,
            rpc="ForwardMany",
            alive_on=_OLDER_PEER,
        )
        if response is None:
            if status == grpc.StatusCode.UNIMPLEMENTED.name:
                # An older node: alive, it just wants one call per forward.
                self._old_peers[endpoint] = time.monotonic() + OLD_PEER_RECHECK_S
                return [None] * len(forwards)
            for forward in forwards:
                via = _via(forward.to_user_ids)
                if status == CIRCUIT_OPEN:
                    self._m.circuit_open.labels(forward.tenant_id, node_id, via).inc()
                else:
                    self._m.failed.labels(forward.tenant_id, via, status).inc()
            if status != CIRCUIT_OPEN:
                log.warning(
                    "forward of %d messages to %s failed: %s", len(forwards), node_id, status
                )
            return [ForwardOutcome(failed=True, status=status)] * len(forwards)
        elapsed_ms = (time.perf_counter() - started) * 1000
        acks = response.acks
        outcomes: list[ForwardOutcome | None] = []
        for index, forward in enumerate(forwards):
            if index >= len(acks):  # a peer that answered fewer: treat as no answer
                self._m.failed.labels(
                    forward.tenant_id, _via(forward.to_user_ids), "INCOMPLETE"
                ).inc()
                outcomes.append(ForwardOutcome(failed=True, status="INCOMPLETE"))
                continue
            self._m.duration_of(forward.tenant_id, _via(forward.to_user_ids)).observe(elapsed_ms)
            outcomes.append(_outcome(acks[index], forward.to_user_ids))
        return outcomes

    # -- the home node's buffer (protocol.md 7.2) ----------------------------------------------

    async def buffer_offline(
        self,
        *,
        node_id: str,
        endpoint: str,
        tenant_id: str,
        user_id: str,
        frame: bytes,
        ttl_s: float,
    ) -> bool:
        """BufferOffline on the user's home node; False if it did not take the frame
        (no answer, breaker open, refused): the caller keeps it itself."""
        request = node_pb.BufferOfflineRequest(
            tenant_id=tenant_id, to_user_id=user_id, server_frame=frame, ttl_seconds=int(ttl_s)
        )
        stub = self._stub(endpoint)
        ack = await self._call_unapplied(
            node_id,
            tenant_id,
            "offline buffer",
            self._m.buffer_failed,
            lambda: stub.BufferOffline(
                request, timeout=ATTEMPT_DEADLINE_S, metadata=self._metadata
            ),
        )
        if ack is None:
            return False
        if not ack.ok:
            reason = "DRAINING" if ack.reason == SERVER_DRAINING else "REFUSED"
            self._m.buffer_failed.labels(tenant_id, reason).inc()
        return ack.ok

    async def drain_offline(
        self, *, node_id: str, endpoint: str, tenant_id: str, user_id: str
    ) -> list[bytes] | None:
        """DrainOffline on the user's home node: its frames, oldest first; None if it
        could not be asked (its frames, if any, stay there)."""
        request = node_pb.DrainOfflineRequest(tenant_id=tenant_id, user_id=user_id)
        stub = self._stub(endpoint)
        response = await self._call_unapplied(
            node_id,
            tenant_id,
            "offline drain",
            self._m.drain_failed,
            lambda: stub.DrainOffline(request, timeout=DRAIN_DEADLINE_S, metadata=self._metadata),
        )
        return None if response is None else list(response.server_frames)

    async def _call_unapplied(
        self,
        node_id: str,
        tenant_id: str,
        what: str,
        failed: Counter,
        call: Callable[[], Awaitable[_Reply]],
    ) -> _Reply | None:
        """One call that changes the peer's state: behind the peer's breaker, retried
        only on errors that mean it was not applied; None if it got no answer."""
        reply, status = await self._guarded_call(node_id, call, retryable=_RETRYABLE_UNAPPLIED)
        if reply is None:
            failed.labels(tenant_id, status).inc()
            if status != CIRCUIT_OPEN:
                log.warning("%s on %s failed: %s", what, node_id, status)
        return reply

    async def _guarded_call(
        self,
        node_id: str,
        call: Callable[[], Awaitable[_Reply]],
        *,
        retryable: frozenset[grpc.StatusCode],
        rpc: str = "",
        alive_on: frozenset[grpc.StatusCode] = frozenset(),
    ) -> tuple[_Reply | None, str]:
        """Every node call: behind the peer's breaker, retried on ``retryable`` errors.

        Returns (reply, "") when answered, (None, CIRCUIT_OPEN) when the breaker
        refused, else (None, the last status code's name). A code in ``alive_on`` (an
        older peer's UNIMPLEMENTED) ends the call at once and counts as a live peer.
        ``rpc`` names the attempts in mics_node_calls_total.
        """
        breaker = self._breaker(node_id)
        if not breaker.allow():
            return None, CIRCUIT_OPEN
        status = grpc.StatusCode.UNKNOWN
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if rpc:
                self._count_call(rpc)
            try:
                reply = await call()
            except aio.AioRpcError as exc:
                status = exc.code()
                if status in alive_on:
                    breaker.record_success()
                    return None, status.name
                if status in retryable and attempt < MAX_ATTEMPTS:
                    await asyncio.sleep(RETRY_DELAY_S * attempt)
                    continue
                break
            except BaseException:  # cancelled (or a bug): no verdict on the peer
                breaker.release_probe()
                raise
            breaker.record_success()
            return reply, ""
        breaker.record_failure()
        return None, status.name

    # -- nudges ------------------------------------------------------------------------------

    async def pull_offline(
        self, *, node_id: str, endpoint: str, tenant_id: str, user_id: str, trace_id: str
    ) -> int:
        """Ask a peer to re-pull for its connections of the user; 0 on any failure."""
        request = node_pb.PullOfflineRequest(
            tenant_id=tenant_id, user_id=user_id, trace_id=trace_id
        )
        stub = self._stub(endpoint)
        response, _ = await self._guarded_call(
            node_id,
            lambda: stub.PullOffline(request, timeout=ATTEMPT_DEADLINE_S, metadata=self._metadata),
            retryable=_RETRYABLE,
            alive_on=_OLDER_PEER,  # a v1 node: alive, just older
        )
        return 0 if response is None else response.connections

    def breaker_state(self, node_id: str) -> str:
        return self._breaker(node_id).state

    async def close(self) -> None:
        for queue in self._queues.values():
            for forward in queue:
                forward.resolve(ForwardOutcome(failed=True, status="CANCELLED"))
        self._queues.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


class LocalNode(Protocol):
    """What the node service needs from the gateway it runs in."""

    @property
    def draining(self) -> bool:
        """Shutting down: it takes no more frames into its buffer."""
        ...

    def deliver_forwarded(
        self, tenant_id: str, to_user_ids: Sequence[str], message: msg_pb.MessageRequest, via: str
    ) -> list[str]:
        """Deliver to local sessions; return the users that had none."""
        ...

    def nudge(self, tenant_id: str, user_id: str) -> int: ...

    def buffer_put(self, tenant_id: str, user_id: str, frame: bytes, ttl_s: int) -> bool: ...

    def buffer_take(self, tenant_id: str, user_id: str) -> list[bytes]: ...


class NodeService(node_grpc.NodeGatewayServicer):
    def __init__(
        self,
        node: LocalNode,
        metrics: MetricsRegistry,
        *,
        token: str = "",
        buffered: Counter | None = None,
        drained: Counter | None = None,
    ) -> None:
        """``buffered`` / ``drained``: the gateway's ``mics_offline_buffered{tenant,via}``
        and ``mics_offline_drained{tenant,node}``, counted as ``grpc_in`` / ``home``."""
        self._node = node
        self._token = token
        self._unauthorized = metrics.counter(
            "mics_grpc_unauthorized", "Node calls refused for a wrong cluster token"
        )
        self._received = metrics.counter(
            "mics_grpc_node_calls_received", "Node service calls accepted, by RPC", ("rpc",)
        )
        self._received_by_rpc = {
            rpc: self._received.labels(rpc)
            for rpc in (
                "ForwardSingle",
                "ForwardBatch",
                "ForwardMany",
                "BufferOffline",
                "DrainOffline",
                "PullOffline",
            )
        }
        self._buffered = buffered
        self._drained = drained

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
        self._received_by_rpc["ForwardSingle"].inc()
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
        self._received_by_rpc["ForwardBatch"].inc()
        message = request.message
        message.tenant_id = request.tenant_id
        missing = self._node.deliver_forwarded(
            request.tenant_id, list(request.to_user_ids), message, "grpc_in_batch"
        )
        return self._ack(missing)

    async def ForwardMany(
        self,
        request: node_pb.ForwardManyRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.ForwardManyResponse:
        """Every item as its own ForwardSingle / ForwardBatch, all in this one step, so
        a session's frames from this call leave in one socket write."""
        await self._check_token(context)
        self._received_by_rpc["ForwardMany"].inc()
        deliver = self._node.deliver_forwarded
        response = node_pb.ForwardManyResponse()
        add = response.acks.add
        for item in request.items:
            message = item.message
            message.tenant_id = item.tenant_id
            users = list(item.to_user_ids)
            via = "grpc_in_single" if len(users) == 1 else "grpc_in_batch"
            try:
                missing = deliver(item.tenant_id, users, message, via)
            except Exception:
                # One bad item must not cost the others their answer: its users go to
                # the sender's offline path (a copy may reach some twice, none never).
                log.exception("forwarded delivery failed", extra={"msg_id": message.msg_id})
                missing = users
            if missing:
                add(ok=False, reason=NO_SESSION, missing_user_ids=missing)
            else:
                add(ok=True)
        return response

    async def PullOffline(
        self,
        request: node_pb.PullOfflineRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.PullOfflineResponse:
        await self._check_token(context)
        self._received_by_rpc["PullOffline"].inc()
        return node_pb.PullOfflineResponse(
            connections=self._node.nudge(request.tenant_id, request.user_id)
        )

    async def BufferOffline(
        self,
        request: node_pb.BufferOfflineRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.ForwardAck:
        await self._check_token(context)
        self._received_by_rpc["BufferOffline"].inc()
        if self._node.draining:
            # This node's buffer ends with it: the caller keeps the frame instead.
            return node_pb.ForwardAck(ok=False, reason=SERVER_DRAINING)
        ttl = request.ttl_seconds if request.ttl_seconds > 0 else DEFAULT_BUFFER_TTL_S
        if self._node.buffer_put(request.tenant_id, request.to_user_id, request.server_frame, ttl):
            if self._buffered is not None:
                self._buffered.labels(request.tenant_id, "grpc_in").inc()
            return node_pb.ForwardAck(ok=True)
        return node_pb.ForwardAck(ok=False, reason=BUFFER_FULL)

    async def DrainOffline(
        self,
        request: node_pb.DrainOfflineRequest,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> node_pb.DrainOfflineResponse:
        await self._check_token(context)
        self._received_by_rpc["DrainOffline"].inc()
        frames = self._node.buffer_take(request.tenant_id, request.user_id)
        if frames and self._drained is not None:
            self._drained.labels(request.tenant_id, "home").inc(len(frames))
        return node_pb.DrainOfflineResponse(server_frames=frames)


async def start_node_server(service: NodeService, host: str, port: int) -> tuple[aio.Server, int]:
    """Serve the node service on host:port (0 picks a free port); return server and port."""
    server = aio.server()
    node_grpc.add_NodeGatewayServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
