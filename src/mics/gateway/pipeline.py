"""Message processing: normalize, validate, dedup, limit, check, deliver, event, ack.

protocol.md sections 2.5-2.7 with the v1.1 behaviour of 9.9. Each message ends in
exactly one ack. Messages that need no I/O (no hook configured, nothing in flight on the
connection) are processed inline by the reader; the rest run as tasks, at most
`max_inflight_per_connection` per connection, and deliver in the order they arrived: a
message holds the connection's turn (mics.gateway.session) until it is delivered, or
until its recipients are known to be offline; from there it waits only for the
connection's earlier messages to the same recipients, so the broker's confirmation of
one offline message does not hold up the connection's messages to anyone else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import Counter

from mics.events.build import message_event
from mics.events.bus import EventBus
from mics.gateway.dedup import DedupCache
from mics.gateway.metrics import GatewayMetrics
from mics.gateway.offline import OfflineDelivery, OfflineResult
from mics.gateway.ratelimit import TenantQpsLimiter
from mics.gateway.routing import Router
from mics.gateway.session import Session
from mics.gateway.tenants import OfflineMode
from mics.hooks.client import HookClient, HookOp, HookResult
from mics.observability.logging import now_ms
from mics.protocol.codec import ack_server_frame, delivery_frame
from mics.protocol.ids import new_trace_id
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb

log = logging.getLogger("mics.gateway.pipeline")

_T = TypeVar("_T")

SENT = msg_pb.SENT
FAILED = msg_pb.FAILED
TYPE_LABEL = {msg_pb.SINGLE_CHAT: "SingleChat", msg_pb.GROUP_CHAT: "GroupChat"}

# Members-hook failures and the ack reasons they produce (protocol.md 2.6).
_MEMBERS_FAILURE_REASON = {
    HookResult.CIRCUIT_OPEN: "hook circuit open",
    HookResult.QUEUE_REJECTED: "hook queue rejected",
    HookResult.CANCELED: "canceled",
    HookResult.SIGN_REQUIRED: "hook sign required",
}


@dataclass(frozen=True, slots=True)
class PipelineLimits:
    max_message_bytes: int
    max_inflight: int
    group_members_max: int
    group_offline_buffer_max: int


class _TenantCounters:
    """The per-message metric children of one tenant, bound once."""

    __slots__ = ("_in", "deliveries_local", "offline_notified")

    def __init__(self, metrics: GatewayMetrics, tenant_id: str) -> None:
        self._in: dict[int, Counter] = {
            int(msg_type): metrics.messages_in.labels(tenant_id, label)
            for msg_type, label in TYPE_LABEL.items()
        }
        self._in[-1] = metrics.messages_in.labels(tenant_id, "Unknown")
        self.deliveries_local = metrics.deliveries.labels(tenant_id, "local")
        self.offline_notified = metrics.offline_notified.labels(tenant_id)

    def messages_in(self, msg_type: int) -> Counter:
        return self._in.get(msg_type) or self._in[-1]


class _Deny:
    """A check-message verdict that refuses the message with ``reason``."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class MessagePipeline:
    def __init__(
        self,
        *,
        node_id: str,
        limits: PipelineLimits,
        router: Router,
        hooks: HookClient,
        events: EventBus,
        offline: OfflineDelivery,
        dedup: DedupCache,
        qps: TenantQpsLimiter,
        metrics: GatewayMetrics,
    ) -> None:
        self._node_id = node_id
        self._limits = limits
        self._router = router
        self.router = router
        self._hooks = hooks
        self._events = events
        self._offline = offline
        self._dedup = dedup
        self._qps = qps
        self._m = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._tenant_counters: dict[str, _TenantCounters] = {}

    def _counters(self, tenant_id: str) -> _TenantCounters:
        # labels() costs a lock and a dict lookup per call; bind the hot children once.
        counters = self._tenant_counters.get(tenant_id)
        if counters is None:
            counters = self._tenant_counters[tenant_id] = _TenantCounters(self._m, tenant_id)
        return counters

    # -- entry point (called by the connection reader, one frame at a time) ---------------

    async def on_message(self, session: Session, req: msg_pb.MessageRequest) -> None:
        session.touch()
        self._normalize(session, req)
        tenant = session.tenant_id
        self._counters(tenant).messages_in(req.msg_type).inc()
        reason = self._validate(req)
        if reason is not None:
            self._reject(session, req, reason)
            return
        key = DedupCache.key(tenant, req.user_id, req.msg_id)
        if not self._dedup.claim(key):
            self._m.dedup_hits.labels(tenant).inc()
            session.send(_ack(req.msg_id, SENT, "duplicate").SerializeToString())
            return
        if session.order_idle and not self._needs_io(session, req):
            await self._process(session, req, key, None, None)
            return
        await session.acquire_slot(self._limits.max_inflight)
        prev, mine = session.enter_order()
        task = asyncio.get_running_loop().create_task(self._process(session, req, key, prev, mine))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, session))

    def _task_done(self, task: asyncio.Task[None], session: Session) -> None:
        self._tasks.discard(task)
        session.release_slot()

    async def wait_idle(self) -> None:
        """Wait for in-flight message tasks (used by graceful shutdown and tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- steps ------------------------------------------------------------------------------

    @staticmethod
    def _normalize(session: Session, req: msg_pb.MessageRequest) -> None:
        # The session decides who is speaking: a client can never send as someone else.
        req.tenant_id = session.tenant_id
        req.user_id = session.user_id
        req.device_id = session.device_id
        if not req.msg_id:
            req.msg_id = new_trace_id()
        if req.timestamp_ms == 0:
            req.timestamp_ms = now_ms()

    def _validate(self, req: msg_pb.MessageRequest) -> str | None:
        limit = self._limits.max_message_bytes
        if limit and len(req.msg_body) > limit:
            return "msg_body_too_large"
        if req.msg_type == msg_pb.SINGLE_CHAT:
            return None if req.to_user_id.strip() else "missing to_user_id"
        if req.msg_type == msg_pb.GROUP_CHAT:
            return None if req.group_id.strip() else "missing group_id"
        return "invalid msg_type"

    def _needs_io(self, session: Session, req: msg_pb.MessageRequest) -> bool:
        if req.msg_type != msg_pb.SINGLE_CHAT or session.runtime.hook_base_url:
            return True
        if not self._router.local_only:
            return True  # route lookups and forwards
        # A notify_pull offline recipient waits (bounded) for the broker's confirmation.
        return self._events.enabled and session.runtime.offline_mode is not OfflineMode.LEGACY

    def _reject(self, session: Session, req: msg_pb.MessageRequest, reason: str) -> None:
        self._m.messages_rejected.labels(session.tenant_id, reason).inc()
        self._m.messages_failed.labels(session.tenant_id).inc()
        session.send(_ack(req.msg_id, FAILED, reason).SerializeToString())

    async def _process(
        self,
        session: Session,
        req: msg_pb.MessageRequest,
        key: str,
        prev: asyncio.Future[None] | None,
        mine: asyncio.Future[None] | None,
    ) -> None:
        try:
            if req.msg_type == msg_pb.SINGLE_CHAT:
                ack = await self._single(session, req, key, prev, mine)
            else:
                ack = await self._group(session, req, key, prev, mine)
        except asyncio.CancelledError:
            self._dedup.release(key)
            raise
        except Exception:
            log.exception("message processing failed", extra={"msg_id": req.msg_id})
            self._m.internal_errors.labels(session.tenant_id, "pipeline").inc()
            self._dedup.release(key)
            ack = _ack(req.msg_id, FAILED, "internal error")
        finally:
            if mine is not None:
                session.leave_order(mine)
        if ack.ack.status == FAILED:
            self._m.messages_failed.labels(session.tenant_id).inc()
        session.send(ack.SerializeToString())

    def _fail_before_delivery(
        self, session: Session, req: msg_pb.MessageRequest, key: str, reason: str
    ) -> msg_pb.ServerFrame:
        # A message refused before delivery does not consume its id (section 9.7).
        self._dedup.release(key)
        self._m.messages_rejected.labels(session.tenant_id, _reason_label(reason)).inc()
        return _ack(req.msg_id, FAILED, reason)

    async def _single(
        self,
        session: Session,
        req: msg_pb.MessageRequest,
        key: str,
        prev: asyncio.Future[None] | None,
        mine: asyncio.Future[None] | None,
    ) -> msg_pb.ServerFrame:
        runtime = session.runtime
        if not self._qps.allow(session.tenant_id, runtime.tenant_max_message_qps):
            self._m.rate_limited.labels(session.tenant_id, "message_qps").inc()
            return self._fail_before_delivery(session, req, key, "tenant qps limited")
        if runtime.hook_base_url:
            verdict = await self._check(session, req)
            if verdict is not None:
                return self._fail_before_delivery(session, req, key, verdict.reason)
        if prev is not None and not prev.done():
            await prev
        frame = delivery_frame(req)
        if self._router.local_only:
            offline = not self._deliver_local(session.tenant_id, req.to_user_id, frame, req.msg_id)
        else:
            reach = await self._router.deliver(session.tenant_id, [req.to_user_id], frame, req)
            self._count_local(session.tenant_id, reach.local)
            offline = bool(reach.offline)
        if not offline:
            reason = ""
        else:
            result = await self._in_offline_order(
                session,
                (req.to_user_id,),
                mine,
                lambda: self._offline_store(session, req, req.to_user_id, frame),
            )
            if result.notified:
                self._counters(session.tenant_id).offline_notified.inc()
            if result.buffered:
                self._m.offline_buffered.labels(session.tenant_id, "local").inc()
            if not result.held:
                self._m.offline_buffer_skipped.labels(session.tenant_id, "local").inc()
                self._dedup.release(key)
                return _ack(req.msg_id, FAILED, result.reason)
            reason = result.reason
        self._emit(session, hook_pb.SINGLE_CHAT_MSG, req, req.to_user_id)
        return _ack(req.msg_id, SENT, reason)

    async def _group(
        self,
        session: Session,
        req: msg_pb.MessageRequest,
        key: str,
        prev: asyncio.Future[None] | None,
        mine: asyncio.Future[None] | None,
    ) -> msg_pb.ServerFrame:
        tenant = session.tenant_id
        runtime = session.runtime
        self._m.group_messages.labels(tenant).inc()
        if not self._qps.allow(tenant, runtime.tenant_max_message_qps):
            self._m.rate_limited.labels(tenant, "message_qps").inc()
            return self._fail_before_delivery(session, req, key, "tenant qps limited")
        if not runtime.hook_base_url:
            return self._fail_before_delivery(session, req, key, "hook degraded")
        loop = asyncio.get_running_loop()
        members_task = loop.create_task(self._members(session, req.group_id))
        try:
            verdict = await self._check(session, req)
        except BaseException:
            members_task.cancel()
            raise
        if verdict is not None:
            members_task.cancel()
            return self._fail_before_delivery(session, req, key, verdict.reason)
        members = await members_task
        if isinstance(members, str):
            return self._fail_before_delivery(session, req, key, members)
        self._m.group_members.labels(tenant).inc(len(members))
        if prev is not None and not prev.done():
            await prev
        return await self._fan_out(session, req, key, members, mine)

    async def _fan_out(
        self,
        session: Session,
        req: msg_pb.MessageRequest,
        key: str,
        members: list[str],
        mine: asyncio.Future[None] | None,
    ) -> msg_pb.ServerFrame:
        tenant = session.tenant_id
        frame = delivery_frame(req)
        delivered = 0
        offline_members: list[str] = []
        if self._router.local_only:
            for member in members:
                if self._deliver_local(tenant, member, frame, req.msg_id):
                    delivered += 1
                else:
                    offline_members.append(member)
        else:
            reach = await self._router.deliver(tenant, members, frame, req)
            self._count_local(tenant, reach.local)
            delivered = reach.delivered
            offline_members = reach.offline
            if reach.nodes:
                self._m.group_fanout_nodes.labels(tenant).inc(reach.nodes)
        notified = buffered = skipped = 0
        if offline_members:
            notified, buffered, skipped = await self._in_offline_order(
                session,
                offline_members,
                mine,
                lambda: self._group_offline(session, req, frame, offline_members),
            )
        m = self._m
        if notified:
            m.group_offline_notified.labels(tenant).inc(notified)
        if buffered:
            m.group_offline_buffered.labels(tenant).inc(buffered)
            m.offline_buffered.labels(tenant, "local").inc(buffered)
        if skipped:
            m.group_offline_buffer_skipped.labels(tenant).inc(skipped)
        if delivered or notified or buffered:
            reply = _ack(req.msg_id, SENT, "")
            self._emit(session, hook_pb.GROUP_CHAT_MSG, req, req.to_user_id)
        else:
            self._dedup.release(key)
            reply = _ack(req.msg_id, FAILED, "delivery failed")
        ack = reply.ack
        ack.partial_delivery = skipped > 0
        ack.offline_notified_users = notified
        ack.offline_buffered_users = buffered
        ack.offline_skipped_users = skipped
        return reply

    @staticmethod
    async def _in_offline_order(
        session: Session,
        recipients: Sequence[str],
        mine: asyncio.Future[None] | None,
        work: Callable[[], Awaitable[_T]],
    ) -> _T:
        """Run ``work`` (the offline path of a message to ``recipients``) after the
        connection's earlier offline messages to any of them. The connection's turn is
        handed on first: later messages to other users need not wait for the broker's
        confirmation of this one (protocol.md 9.9)."""
        before, turn = session.enter_offline_order(recipients)
        if mine is not None:
            session.leave_order(mine)
        try:
            if before:
                await asyncio.wait(before)
            return await work()
        finally:
            session.leave_offline_order(recipients, turn)

    async def _group_offline(
        self, session: Session, req: msg_pb.MessageRequest, frame: bytes, offline_members: list[str]
    ) -> tuple[int, int, int]:
        """Notify or buffer a group message's offline members: (notified, buffered, skipped)."""
        notified = buffered = skipped = 0
        buffer_room = self._limits.group_offline_buffer_max
        results: list[OfflineResult]
        if self._events.enabled and (session.runtime.offline_mode is not OfflineMode.LEGACY):
            # Broker confirmations overlap instead of queuing one behind another.
            results = list(
                await asyncio.gather(
                    *(
                        self._offline_store(session, req, m, frame, allow_buffer=False)
                        for m in offline_members
                    )
                )
            )
        else:
            results = [OfflineResult(False, False, "")] * len(offline_members)
        to_buffer: list[tuple[str, bool]] = []  # (member, notified)
        for member, result in zip(offline_members, results, strict=True):
            if result.notified:
                notified += 1
                if session.runtime.offline_mode is OfflineMode.NOTIFY_PULL:
                    continue
            if len(to_buffer) < buffer_room:
                to_buffer.append((member, result.notified))
            elif not result.notified:
                skipped += 1
        # In a cluster each member's buffer is on their home node: the puts overlap.
        held = await asyncio.gather(
            *(self._offline.hold(session.runtime, m, frame) for m, _ in to_buffer)
        )
        for (_, was_notified), ok in zip(to_buffer, held, strict=True):
            if ok:
                buffered += 1
            elif not was_notified:
                skipped += 1
        return notified, buffered, skipped

    # -- delivery helpers ---------------------------------------------------------------

    def _deliver_local(self, tenant_id: str, user_id: str, frame: bytes, msg_id: str) -> bool:
        written = self._router.deliver_local(tenant_id, user_id, frame, msg_id)
        if written:
            self._counters(tenant_id).deliveries_local.inc(written)
        return written > 0

    def _count_local(self, tenant_id: str, delivered: int) -> None:
        if delivered:
            self._counters(tenant_id).deliveries_local.inc(delivered)

    async def _offline_store(
        self,
        session: Session,
        req: msg_pb.MessageRequest,
        recipient: str,
        frame: bytes,
        *,
        allow_buffer: bool = True,
    ) -> OfflineResult:
        def build() -> hook_pb.MqEvent:
            return self._event(session, hook_pb.OFFLINE_MESSAGE, req, recipient)

        return await self._offline.store(
            session.runtime, recipient, frame, build, allow_buffer=allow_buffer
        )

    # -- hooks ----------------------------------------------------------------------------

    async def _check(self, session: Session, req: msg_pb.MessageRequest) -> _Deny | None:
        runtime = session.runtime
        tenant = session.tenant_id
        outcome = await self._hooks.call(
            tenant_id=tenant,
            op=HookOp.CHECK_MESSAGE,
            base_url=runtime.hook_base_url,
            request=hook_pb.CheckMessageRequest(message=req),
            response_type=hook_pb.CheckMessageResponse,
            secret=runtime.tenant_secret,
            policy=runtime.hook_policy,
            trace_id=session.trace_id,
        )
        if outcome.result is HookResult.SIGN_REQUIRED:
            return _Deny("hook sign required")
        if outcome.ok and outcome.response is not None:
            if outcome.response.allow:
                self._check_counter(tenant, "allow")
                return None
            self._check_counter(tenant, "deny")
            return _Deny(outcome.response.reason)
        self._check_counter(tenant, "degraded")
        if runtime.check_message_fail_closed:
            return _Deny("hook unavailable")
        return None  # fail open (section 4.4)

    def _check_counter(self, tenant: str, result: str) -> None:
        self._m.hook_check_message.labels(tenant, result).inc()

    async def _members(self, session: Session, group_id: str) -> list[str] | str:
        runtime = session.runtime
        tenant = session.tenant_id
        outcome = await self._hooks.call(
            tenant_id=tenant,
            op=HookOp.GET_GROUP_MEMBERS,
            base_url=runtime.hook_base_url,
            request=hook_pb.GetGroupMembersRequest(group_id=group_id),
            response_type=hook_pb.GetGroupMembersResponse,
            secret=runtime.tenant_secret,
            policy=runtime.hook_policy,
            trace_id=session.trace_id,
        )
        if not outcome.ok or outcome.response is None:
            failed = outcome.result is HookResult.SIGN_REQUIRED
            self._members_counter(tenant, "fail" if failed else "degraded")
            return _MEMBERS_FAILURE_REASON.get(outcome.result, "hook degraded")
        self._members_counter(tenant, "ok")
        # Blanks dropped, duplicates removed, first occurrence's order kept.
        members = list(dict.fromkeys(u for u in outcome.response.user_ids if u.strip()))
        if not members:
            return "group members empty"
        if len(members) > self._limits.group_members_max:
            self._m.group_members_over_limit.labels(tenant).inc()
            return "group too large"
        return members

    def _members_counter(self, tenant: str, result: str) -> None:
        self._m.hook_get_group_members.labels(tenant, result).inc()

    # -- events ---------------------------------------------------------------------------

    def _event(
        self,
        session: Session,
        event_type: hook_pb.EventType,
        req: msg_pb.MessageRequest,
        to_user_id: str,
    ) -> hook_pb.MqEvent:
        return message_event(
            req,
            event_type,
            to_user_id,
            tenant_id=session.tenant_id,
            secret=session.runtime.tenant_secret,
            node_id=self._node_id,
            trace_id=session.trace_id,
        )

    def _emit(
        self,
        session: Session,
        event_type: hook_pb.EventType,
        req: msg_pb.MessageRequest,
        to_user_id: str,
    ) -> None:
        if self._events.enabled:
            self._events.publish(self._event(session, event_type, req, to_user_id))


def _ack(msg_id: str, status: msg_pb.AckStatus, reason: str) -> msg_pb.ServerFrame:
    return ack_server_frame(msg_id, status, reason, now_ms())


def _reason_label(reason: str) -> str:
    # Hook deny reasons are free text; keep metric label cardinality bounded.
    return reason if reason in _KNOWN_REASONS else "hook_denied"


_KNOWN_REASONS = frozenset(
    {
        "tenant qps limited",
        "hook sign required",
        "hook unavailable",
        "hook degraded",
        "hook circuit open",
        "hook queue rejected",
        "canceled",
        "group members empty",
        "group too large",
    }
)
