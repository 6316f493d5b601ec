"""Offline delivery: what happens to a message whose recipient has no online device.

`OfflineDelivery` chooses per tenant mode (protocol.md 9.9):
- notify_pull: publish an OFFLINE_MESSAGE event and wait (bounded) for the event
  transport to confirm it; if it is refused or not confirmed in time, fall back to the
  in-memory buffer. The ack reason says which happened.
- legacy: the in-memory TTL buffer only.
- dual: both, for verifying a rollout.

The gateway never answers SENT for a message that nothing holds.

`LegacyBuffer` is the in-memory TTL buffer: per-user message and byte caps (the
oldest message is evicted to make room, counted), a per-tenant cap on buffered users
(least recently used user evicted), drained when the user connects.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from mics.cluster.home_buffer import HomeBuffer
from mics.events.bus import EventBus
from mics.gateway.metrics import GatewayMetrics
from mics.gateway.tenants import OfflineMode, TenantRuntime
from mics.protocol.pb import mics_hook_pb2 as hook_pb

REASON_USER_OFFLINE = "user_offline"
REASON_BUFFERED = "offline_buffered"
REASON_BUFFER_FULL = "offline_buffer_full"
REASON_UNAVAILABLE = "offline_unavailable"


@dataclass(slots=True)
class RequeueResult:
    notified: int = 0
    buffered: int = 0
    lost: int = 0


@dataclass(frozen=True, slots=True)
class OfflineResult:
    notified: bool
    buffered: bool
    reason: str  # the single-chat ack reason

    @property
    def held(self) -> bool:
        return self.notified or self.buffered


class _UserBuffer:
    __slots__ = ("bytes", "items")

    def __init__(self) -> None:
        self.items: deque[tuple[float, bytes]] = deque()
        self.bytes = 0


class LegacyBuffer:
    def __init__(
        self,
        *,
        max_messages_per_user: int,
        max_bytes_per_user: int,
        max_users_per_tenant: int,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_messages = max_messages_per_user
        self._max_bytes = max_bytes_per_user
        self._max_users = max_users_per_tenant
        self._metrics = metrics
        self._clock = clock
        self._tenants: dict[str, OrderedDict[str, _UserBuffer]] = {}
        self._messages = 0
        self._bytes = 0

    def put(self, tenant_id: str, user_id: str, frame: bytes, ttl_s: float) -> bool:
        """Buffer one serialized delivery frame; False if it cannot be held at all."""
        size = len(frame)
        if self._max_bytes and size > self._max_bytes:
            return False
        users = self._tenants.setdefault(tenant_id, OrderedDict())
        buf = users.get(user_id)
        if buf is None:
            if self._max_users and len(users) >= self._max_users:
                _, evicted = users.popitem(last=False)
                self._account(-len(evicted.items), -evicted.bytes)
                self._metrics.offline_buffer_evicted_users.labels(tenant_id).inc()
            buf = users[user_id] = _UserBuffer()
        else:
            users.move_to_end(user_id)
        now = self._clock()
        self._drop_expired(buf, now)
        evicted_count = 0
        while buf.items and (
            (self._max_messages and len(buf.items) >= self._max_messages)
            or (self._max_bytes and buf.bytes + size > self._max_bytes)
        ):
            _, old = buf.items.popleft()
            buf.bytes -= len(old)
            self._account(-1, -len(old))
            evicted_count += 1
        if evicted_count:
            self._metrics.offline_buffer_evicted.labels(tenant_id).inc(evicted_count)
        buf.items.append((now + ttl_s, frame))
        buf.bytes += size
        self._account(1, size)
        return True

    def take(self, tenant_id: str, user_id: str) -> list[bytes]:
        """Remove and return the user's unexpired frames, oldest first."""
        users = self._tenants.get(tenant_id)
        buf = users.pop(user_id, None) if users is not None else None
        if buf is None:
            return []
        self._account(-len(buf.items), -buf.bytes)
        now = self._clock()
        return [frame for expiry, frame in buf.items if expiry > now]

    def purge_expired(self) -> int:
        """Drop expired frames everywhere; called from the periodic sweeper."""
        now = self._clock()
        dropped = 0
        for users in self._tenants.values():
            for user_id in list(users):
                buf = users[user_id]
                dropped += self._drop_expired(buf, now)
                if not buf.items:
                    del users[user_id]
        return dropped

    def _drop_expired(self, buf: _UserBuffer, now: float) -> int:
        dropped = 0
        while buf.items and buf.items[0][0] <= now:
            _, old = buf.items.popleft()
            buf.bytes -= len(old)
            self._account(-1, -len(old))
            dropped += 1
        return dropped

    def _account(self, messages: int, size: int) -> None:
        self._messages += messages
        self._bytes += size
        self._metrics.offline_buffer_messages.set(self._messages)
        self._metrics.offline_buffer_bytes.set(self._bytes)

    def pending(self, tenant_id: str, user_id: str) -> int:
        users = self._tenants.get(tenant_id)
        buf = users.get(user_id) if users else None
        return len(buf.items) if buf else 0


class OfflineDelivery:
    """Routes a message for an offline recipient according to the tenant's mode."""

    # Set by the cluster membership: buffer on the recipient's home node (protocol 7.2).
    home: HomeBuffer | None = None

    def __init__(
        self,
        *,
        buffer: LegacyBuffer,
        events: EventBus,
        notify_wait_s: float,
        metrics: GatewayMetrics,
    ) -> None:
        self.buffer = buffer
        self._events = events
        self._notify_wait_s = notify_wait_s
        self._metrics = metrics

    async def store(
        self,
        runtime: TenantRuntime,
        recipient: str,
        frame: bytes,
        build_event: Callable[[], hook_pb.MqEvent] | None,
        *,
        allow_buffer: bool = True,
    ) -> OfflineResult:
        """Hand one message for one offline recipient to the offline path.

        ``build_event`` builds the signed OFFLINE_MESSAGE event (only called when a
        bus is enabled); ``allow_buffer`` is False for group members past the group
        buffer cap.
        """
        mode = runtime.offline_mode
        notified = False
        if mode is not OfflineMode.LEGACY and self._events.enabled and build_event is not None:
            notified = await self._notify(build_event())
        buffered = False
        if allow_buffer and (mode is not OfflineMode.NOTIFY_PULL or not notified):
            buffered = await self.hold(runtime, recipient, frame)
        if notified:
            reason = REASON_USER_OFFLINE
        elif buffered:
            reason = REASON_BUFFERED
        elif mode is OfflineMode.LEGACY:
            reason = REASON_BUFFER_FULL
        else:
            reason = REASON_UNAVAILABLE
        return OfflineResult(notified=notified, buffered=buffered, reason=reason)

    async def hold(self, runtime: TenantRuntime, recipient: str, frame: bytes) -> bool:
        """Put one frame in the fallback buffer: the user's home node's in a cluster."""
        if self.home is not None:
            return await self.home.put(runtime.tenant_id, recipient, frame, runtime.offline_ttl_s)
        return self.buffer.put(runtime.tenant_id, recipient, frame, runtime.offline_ttl_s)

    async def _notify(self, event: hook_pb.MqEvent) -> bool:
        confirmation = self._events.publish_confirmed(event)
        if confirmation is None:
            return False
        started = time.perf_counter()
        confirmed = await _confirmed_within(confirmation, self._notify_wait_s)
        self._metrics.offline_notify_wait.observe((time.perf_counter() - started) * 1000)
        return confirmed

    def requeue(
        self,
        runtime: TenantRuntime,
        recipient: str,
        items: Sequence[tuple[bytes, Callable[[], hook_pb.MqEvent]]],
    ) -> Coroutine[Any, Any, RequeueResult]:
        """Hand deliveries a connection never confirmed back to the offline path.

        Every frame goes into the buffer, so the user's next connection to this node
        gets it at once, and (unless the tenant is legacy) an OFFLINE_MESSAGE event goes
        to the backend, so it survives this node and reaches the user's other devices.
        A connection that gets both copies pushes one (mics.gateway.drain). Unlike
        `store`, all of it happens before this returns, in the order given, so messages
        that go offline after the connection ended cannot overtake these. The returned
        coroutine waits (bounded) for the broker's confirmations and counts outcomes.
        """
        confirmations: list[asyncio.Future[bool] | None] = []
        if runtime.offline_mode is not OfflineMode.LEGACY and self._events.enabled:
            confirmations = [self._events.publish_confirmed(build()) for _, build in items]
        held = [
            self.buffer.put(runtime.tenant_id, recipient, frame, runtime.offline_ttl_s)
            for frame, _ in items
        ]
        return self._settle(runtime, recipient, confirmations, held)

    async def _settle(
        self,
        runtime: TenantRuntime,
        recipient: str,
        confirmations: list[asyncio.Future[bool] | None],
        held: list[bool],
    ) -> RequeueResult:
        if self.home is not None and any(held):
            # Buffered here to keep the order; in a cluster they belong on the user's
            # home node, where the user's next connection looks, whichever node it is.
            await self.home.hand_home(runtime.tenant_id, recipient, runtime.offline_ttl_s)
        waiting = [c for c in confirmations if c is not None]
        if waiting:
            await asyncio.wait(waiting, timeout=self._notify_wait_s)
        result = RequeueResult()
        for index, buffered in enumerate(held):
            confirmation = confirmations[index] if confirmations else None
            if confirmation is not None and confirmation.done() and _verdict(confirmation):
                result.notified += 1
            elif buffered:
                result.buffered += 1
            else:
                result.lost += 1
        return result


async def _confirmed_within(confirmation: asyncio.Future[bool], wait_s: float) -> bool:
    """True if ``confirmation`` resolves True within ``wait_s``.

    This is on every offline ack's path, so the task waits on the confirmation itself:
    it runs again in the loop turn after the broker's report, the soonest it can (a
    separate waiter, as in wait_for, costs a turn more). Past the bound the
    confirmation is resolved False here: it is this waiter's alone, and the dispatcher
    resolves only the ones not yet done.
    """
    if not confirmation.done():
        timer = asyncio.get_running_loop().call_later(wait_s, _give_up, confirmation)
        try:
            await confirmation
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task was cancelled, not just its confirmation
        except Exception:
            pass  # a failed confirmation: the verdict below says False
        finally:
            timer.cancel()
    return _verdict(confirmation)


def _give_up(confirmation: asyncio.Future[bool]) -> None:
    if not confirmation.done():
        confirmation.set_result(False)


def _verdict(confirmation: asyncio.Future[bool]) -> bool:
    return (
        not confirmation.cancelled()
        and confirmation.exception() is None
        and bool(confirmation.result())
    )
