"""Offline drain: push a connection's backlog, then confirm it to the backend.

protocol.md 4.5, 9.2-9.5 and the offline design, section 8:

- On connect (and on every nudge), page through the tenant's /get-offline-messages
  from the connection's latest cursor, then drain the in-memory fallback buffer, then
  (v1.1) send OfflineSync, then release the live deliveries held meanwhile. So the
  backlog always reaches the client before live messages.
- Each page is fetched only when the socket has room (backpressure from the client),
  at most 10 pages / 1000 messages per drain; a failed page is retried up to 3 times
  with exponential backoff; a failing hook never breaks the connection.
- Pulled messages are checked before they are pushed: tenant and recipient must match.
- Confirmed commit: a page is committed with /ack-offline-messages only once the client
  confirmed every delivery of it and of the pages before it (v1.1 receipts); v1 clients
  have it committed once written. A disconnect leaves the rest pending for next time.
- A backend that answers 404 to /ack-offline-messages is a v1 backend (marks on fetch):
  it is remembered for 10 minutes and gets `ack_follows=false`.
- Nothing is pushed twice by one connection: a message drained from the buffer and
  also pulled from the hook (the broker confirmed it after the ack gave up waiting) is
  sent once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from mics.cluster.home_buffer import REASON_BUFFER_UNAVAILABLE, HomeBuffer
from mics.gateway.metrics import GatewayMetrics
from mics.gateway.offline import LegacyBuffer
from mics.gateway.session import Session
from mics.gateway.tenants import OfflineMode
from mics.gateway.unconfirmed import Kind
from mics.hooks.client import HookClient, HookOp, HookResult
from mics.observability.metrics import MetricsRegistry
from mics.protocol.codec import delivery_frame, offline_sync_frame
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb

log = logging.getLogger("mics.gateway.drain")

PAGE_SIZE = 100
MAX_PAGES = 10
MAX_MESSAGES = 1000
PAGE_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.05
V1_BACKEND_MEMORY_S = 600.0
# Fetch the next page only once the socket's send buffer is below this.
SEND_LOW_WATER = 256 * 1024
# How long a v1.1 drain that hit the page limit waits for the client's receipts
# before continuing with the next drain.
CONFIRM_WAIT_S = 30.0
SLOW_READER_S = 30.0
SEEN_MEMORY = 10_000

REASON_LIMIT = "limit reached"
REASON_HOOK_FAILED = "hook failed"
REASON_HOOK_UNAVAILABLE = "hook unavailable"
REASON_INVALID_CURSOR = "invalid cursor"
_HOOK_FAILURE_REASONS = frozenset(
    {REASON_HOOK_FAILED, REASON_HOOK_UNAVAILABLE, REASON_INVALID_CURSOR}
)

_HOOK_FAILED_RESULTS = {HookResult.SIGN_REQUIRED}
_NOT_RETRIED = {HookResult.SIGN_REQUIRED, HookResult.CIRCUIT_OPEN, HookResult.CANCELED}


def uses_hook_pull(session: Session) -> bool:
    runtime = session.runtime
    return runtime.offline_mode is not OfflineMode.LEGACY and bool(runtime.hook_base_url)


@dataclass(slots=True)
class _Page:
    cursor: str
    remaining: dict[str, int] = field(default_factory=dict)  # msg_id -> unconfirmed
    unconfirmed: int = 0


class OfflineState:
    """One connection's drain: running flag, cursor, and pages awaiting confirmation."""

    __slots__ = (
        "again",
        "all_confirmed",
        "buffered_pending",
        "commit_task",
        "cursor",
        "nudged",
        "pages",
        "running",
        "seen",
    )

    def __init__(self) -> None:
        self.cursor = ""
        self.pages: deque[_Page] = deque()
        self.running = False
        self.again = False
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.commit_task: asyncio.Task[None] | None = None
        self.all_confirmed = asyncio.Event()
        self.all_confirmed.set()
        # Set by a nudge that arrives while a drain runs or waits for receipts.
        self.nudged = asyncio.Event()
        # Buffer deliveries (v1.1) not confirmed yet, by msg_id: a pulled row that this
        # connection already pushed from the buffer is committed only once the client
        # confirmed that copy.
        self.buffered_pending: dict[str, int] = {}

    def remember(self, key: str) -> bool:
        """Record a pushed (sender, msg_id); False if this connection pushed it already."""
        if key in self.seen:
            return False
        self.seen[key] = None
        if len(self.seen) > SEEN_MEMORY:
            self.seen.popitem(last=False)
        return True


@dataclass(frozen=True, slots=True)
class DrainOutcome:
    delivered: int
    complete: bool
    reason: str


class DrainMetrics:
    def __init__(self, registry: MetricsRegistry) -> None:
        r = registry
        self.requests = r.counter(
            "mics_offline_drain_requests", "Offline drains started", ("tenant", "trigger")
        )
        self.from_hook = r.counter(
            "mics_offline_drained_from_hook",
            "Messages pushed from the hook pull",
            ("tenant", "node"),
        )
        self.failed = r.counter(
            "mics_offline_drain_failed", "Drains stopped by a failure", ("tenant", "reason")
        )
        self.get_duration = r.histogram_ms(
            "mics_hook_get_offline_duration_ms", "/get-offline-messages call duration", ("tenant",)
        )
        self.get_results = r.counter(
            "mics_hook_get_offline_messages", "/get-offline-messages results", ("tenant", "result")
        )
        self.invalid = r.counter(
            "mics_offline_pull_invalid",
            "Pulled messages refused (tenant or recipient)",
            ("tenant",),
        )
        self.duplicates = r.counter(
            "mics_offline_pull_duplicates",
            "Pulled messages this connection already had",
            ("tenant",),
        )
        self.commits = r.counter(
            "mics_offline_commits", "/ack-offline-messages calls by result", ("tenant", "result")
        )


class OfflineDrainer:
    # Set by the cluster membership: the user's home node buffers too (protocol 7.2).
    home: HomeBuffer | None = None

    def __init__(
        self,
        *,
        node_id: str,
        hooks: HookClient,
        buffer: LegacyBuffer,
        metrics: GatewayMetrics,
    ) -> None:
        self._node_id = node_id
        self._hooks = hooks
        self._buffer = buffer
        self._gm = metrics
        self._m = DrainMetrics(metrics.registry)
        self._v1_backends: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- entry points ------------------------------------------------------------------------

    def start(self, session: Session, trigger: str) -> bool:
        """Start a drain for ``session``, or fold it into the one running; True if new."""
        home = self.home
        if (
            trigger == "connect"
            and not uses_hook_pull(session)
            and (home is None or home.remote_home(session.tenant_id, session.user_id) is None)
        ):
            # Nothing to pull: drain the buffer right here, with no task and no state
            # kept for the connection's lifetime (most of them have nothing to drain).
            self._m.requests.labels(session.tenant_id, trigger).inc()
            delivered = self._drain_buffer(session, None)
            if session.v11:
                session.send(offline_sync_frame(delivered, True, ""))
            session.release_held()
            return True
        state = session.offline
        if not isinstance(state, OfflineState):
            state = OfflineState()
            session.offline = state
        if state.running:
            state.again = True
            state.nudged.set()
            return False
        state.running = True
        session.hold()
        task = asyncio.get_running_loop().create_task(self._run(session, state, trigger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def on_receipt(self, session: Session, receipt: msg_pb.DeliveryAck) -> None:
        """A v1.1 DeliveryAck: confirm deliveries, then commit what is fully confirmed."""
        ledger = session.ledger
        state = session.offline
        if not isinstance(state, OfflineState) or not (state.pages or state.buffered_pending):
            if ledger is not None:
                for msg_id in receipt.msg_ids:
                    ledger.confirm(msg_id)
            return
        for msg_id in receipt.msg_ids:
            if ledger is not None and ledger.confirm(msg_id) is Kind.LIVE:
                continue  # a live delivery: nothing offline to commit
            pending = state.buffered_pending.get(msg_id)
            if pending:
                # The earliest unconfirmed delivery with this id is the buffered copy.
                if pending == 1:
                    del state.buffered_pending[msg_id]
                else:
                    state.buffered_pending[msg_id] = pending - 1
                continue
            for page in state.pages:
                count = page.remaining.get(msg_id)
                if count:
                    page.remaining[msg_id] = count - 1
                    page.unconfirmed -= 1
                    break
        cursor = receipt.offline_cursor
        # A cursor confirms every offline delivery up to the one carrying it.
        if cursor and any(p.cursor == cursor for p in state.pages):
            for page in state.pages:
                page.unconfirmed = 0
                page.remaining.clear()
                if page.cursor == cursor:
                    break
        self._commit_confirmed(session, state)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the drain loop ------------------------------------------------------------------------

    async def _run(self, session: Session, state: OfflineState, trigger: str) -> None:
        try:
            while not session.closed:
                self._m.requests.labels(session.tenant_id, trigger).inc()
                outcome = await self._drain_once(session, state)
                if session.closed:
                    return
                if session.v11:
                    session.send(
                        offline_sync_frame(outcome.delivered, outcome.complete, outcome.reason)
                    )
                session.release_held()
                if outcome.reason == REASON_LIMIT and session.v11 and not state.again:
                    # More backlog: continue once the client confirmed what it got, or
                    # at once if a nudge comes in meanwhile.
                    await self._wait_confirmed_or_nudged(state)
                    if session.closed:
                        return
                    if not state.all_confirmed.is_set() and not state.again:
                        return  # receipts never came: the next connect or nudge continues
                elif not state.again:
                    return
                state.again = False
                state.nudged.clear()
                trigger = "nudge" if trigger == "connect" else trigger
                session.hold()
        except Exception:
            log.exception("offline drain failed")
            self._m.failed.labels(session.tenant_id, "exception").inc()
            session.release_held()
        finally:
            state.running = False

    async def _wait_confirmed_or_nudged(self, state: OfflineState) -> None:
        waiters = [
            asyncio.ensure_future(state.all_confirmed.wait()),
            asyncio.ensure_future(state.nudged.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=CONFIRM_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _drain_once(self, session: Session, state: OfflineState) -> DrainOutcome:
        delivered = 0
        complete, reason = True, ""
        if uses_hook_pull(session):
            delivered, complete, reason = await self._pull(session, state)
            if reason in _HOOK_FAILURE_REASONS and not session.closed:
                self._m.failed.labels(session.tenant_id, "hook_fail").inc()
        if session.closed:
            return DrainOutcome(delivered, False, reason)
        frames: list[bytes] | None = None
        if self.home is not None:  # the user's home node's buffer and this node's
            taken = await self.home.take(session.tenant_id, session.user_id)
            frames = taken.frames
            if session.closed:
                ttl = session.runtime.offline_ttl_s
                self.home.restore(session.tenant_id, session.user_id, frames, ttl)
                return DrainOutcome(delivered, False, reason)
            if not taken.complete:
                complete, reason = False, reason or REASON_BUFFER_UNAVAILABLE
        buffered = self._drain_buffer(session, state, frames)
        return DrainOutcome(delivered + buffered, complete, reason)

    def _drain_buffer(
        self, session: Session, state: OfflineState | None, frames: list[bytes] | None = None
    ) -> int:
        """Push the user's buffered frames (``frames`` if already taken); with ``state``,
        skip what was pulled already."""
        if session.closed:
            return 0  # they stay buffered for the next connection
        if frames is None:
            frames = self._buffer.take(session.tenant_id, session.user_id)
        sent = 0
        for frame in frames:
            if state is None and not session.v11:
                session.send(frame)  # v1: no receipts, nothing to match or remember
                sent += 1
                continue
            message = msg_pb.ServerFrame.FromString(frame).delivery.message
            if state is None:
                session.send_tracked(frame, message.msg_id, Kind.BUFFERED)
                sent += 1
                continue
            if state.remember(f"{message.user_id}|{message.msg_id}"):
                session.send_tracked(frame, message.msg_id, Kind.BUFFERED)
                sent += 1
                if session.v11:
                    pending = state.buffered_pending
                    pending[message.msg_id] = pending.get(message.msg_id, 0) + 1
        if sent:
            self._gm.offline_drained.labels(session.tenant_id, self._node_id).inc(sent)
        return sent

    async def _pull(self, session: Session, state: OfflineState) -> tuple[int, bool, str]:
        sent = 0
        for _ in range(MAX_PAGES):
            if sent >= MAX_MESSAGES:
                break
            await self._room_to_send(session)
            if session.closed:
                return sent, False, ""
            response, failure = await self._fetch(session, state.cursor)
            if session.closed:
                return sent, False, ""  # nothing of this page was written: it stays pending
            if response is None:
                return sent, False, failure
            if not response.messages:
                return sent, True, ""
            sent += self._push_page(session, state, response)
            if not response.has_more:
                return sent, True, ""
            if not response.next_cursor:
                return sent, False, REASON_INVALID_CURSOR
        return sent, False, REASON_LIMIT

    async def _room_to_send(self, session: Session) -> None:
        """Backpressure: wait until the client has read most of what was sent.

        A client that stops reading for `SLOW_READER_S` is closed as a slow consumer:
        otherwise the live deliveries held behind its drain would grow without bound.
        """
        delay = 0.005
        waited = 0.0
        while not session.closed and session.write_buffer_size() > SEND_LOW_WATER:
            if waited >= SLOW_READER_S:
                session.close(1013, "slow consumer")
                return
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.2)

    def _push_page(
        self, session: Session, state: OfflineState, response: hook_pb.GetOfflineMessagesResponse
    ) -> int:
        tenant = session.tenant_id
        page = _Page(cursor=response.next_cursor)
        valid: list[msg_pb.MessageRequest] = []
        carried: dict[str, int] = {}
        for message in response.messages:
            if not _belongs_to(message, session):
                self._m.invalid.labels(tenant).inc()
                log.warning(
                    "pulled message refused: wrong tenant or recipient",
                    extra={"msg_id": message.msg_id},
                )
                continue
            if not state.remember(f"{message.user_id}|{message.msg_id}"):
                self._m.duplicates.labels(tenant).inc()
                # Pushed before from the buffer: if that copy is not confirmed yet, this
                # page waits for its receipt before it may be committed.
                pending = state.buffered_pending.get(message.msg_id, 0)
                if pending:
                    state.buffered_pending[message.msg_id] = pending - 1
                    carried[message.msg_id] = carried.get(message.msg_id, 0) + 1
                continue
            valid.append(message)
        for index, message in enumerate(valid):
            last = index == len(valid) - 1
            cursor = response.next_cursor if last and session.v11 else ""
            session.send(delivery_frame(message, cursor))
            page.remaining[message.msg_id] = page.remaining.get(message.msg_id, 0) + 1
        for msg_id, count in carried.items():
            page.remaining[msg_id] = page.remaining.get(msg_id, 0) + count
        page.unconfirmed = len(valid) + sum(carried.values())
        if response.next_cursor:
            state.cursor = response.next_cursor
        if valid:
            self._m.from_hook.labels(tenant, self._node_id).inc(len(valid))
        if not session.v11:
            # v1 clients send no receipts: written to the socket is as good as it gets.
            session.flush_now()
            if session.closed:
                return len(valid)  # not written after all: leave the page uncommitted
            page.unconfirmed = 0
            page.remaining.clear()
        state.pages.append(page)
        state.all_confirmed.clear()
        self._commit_confirmed(session, state)
        return len(valid)

    async def _fetch(
        self, session: Session, cursor: str
    ) -> tuple[hook_pb.GetOfflineMessagesResponse | None, str]:
        runtime = session.runtime
        tenant = session.tenant_id
        failure = REASON_HOOK_UNAVAILABLE
        for attempt in range(PAGE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
                if session.closed:
                    break
            request = hook_pb.GetOfflineMessagesRequest(
                user_id=session.user_id,
                device_id=session.device_id,
                max_messages=PAGE_SIZE,
                cursor=cursor,
                ack_follows=not self._is_v1_backend(runtime.hook_base_url),
            )
            started = time.perf_counter()
            outcome = await self._hooks.call(
                tenant_id=tenant,
                op=HookOp.GET_OFFLINE_MESSAGES,
                base_url=runtime.hook_base_url,
                request=request,
                response_type=hook_pb.GetOfflineMessagesResponse,
                secret=runtime.tenant_secret,
                policy=runtime.hook_policy,
                trace_id=session.trace_id,
            )
            self._m.get_duration.labels(tenant).observe((time.perf_counter() - started) * 1000)
            response = outcome.response
            if outcome.ok and response is not None:
                if response.ok:
                    self._m.get_results.labels(tenant, "ok").inc()
                    return response, ""
                self._m.get_results.labels(tenant, "fail").inc()
                log.warning("offline pull refused", extra={"reason": response.reason})
                return None, REASON_HOOK_FAILED
            self._m.get_results.labels(tenant, "degraded").inc()
            if outcome.result in _HOOK_FAILED_RESULTS:
                return None, REASON_HOOK_FAILED
            if outcome.result in _NOT_RETRIED:
                break
        return None, failure

    # -- commits -----------------------------------------------------------------------------------

    def _commit_confirmed(self, session: Session, state: OfflineState) -> None:
        """Pop the fully confirmed prefix of pages and commit the newest cursor in it."""
        cursor = ""
        while state.pages and state.pages[0].unconfirmed <= 0:
            page = state.pages.popleft()
            if page.cursor:
                cursor = page.cursor
        if not state.pages:
            state.all_confirmed.set()
        if cursor:
            self._schedule_commit(session, state, cursor)

    def _schedule_commit(self, session: Session, state: OfflineState, cursor: str) -> None:
        if self._is_v1_backend(session.runtime.hook_base_url):
            return  # a v1 backend marked the rows when it returned them
        previous = state.commit_task

        async def commit() -> None:
            if previous is not None and not previous.done():
                await asyncio.gather(previous, return_exceptions=True)
            await self._commit(session, cursor)

        task = asyncio.get_running_loop().create_task(commit())
        state.commit_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _commit(self, session: Session, cursor: str) -> None:
        runtime = session.runtime
        outcome = await self._hooks.call(
            tenant_id=session.tenant_id,
            op=HookOp.ACK_OFFLINE_MESSAGES,
            base_url=runtime.hook_base_url,
            request=hook_pb.AckOfflineMessagesRequest(
                user_id=session.user_id, device_id=session.device_id, cursor=cursor
            ),
            response_type=hook_pb.AckOfflineMessagesResponse,
            secret=runtime.tenant_secret,
            policy=runtime.hook_policy,
            trace_id=session.trace_id,
            benign_statuses=frozenset({404}),
        )
        if outcome.http_status == 404:
            self._v1_backends[runtime.hook_base_url] = time.monotonic() + V1_BACKEND_MEMORY_S
            self._m.commits.labels(session.tenant_id, "v1_backend").inc()
            return
        if outcome.ok and outcome.response is not None and outcome.response.ok:
            self._m.commits.labels(session.tenant_id, "ok").inc()
            return
        # Not retried: a later cursor covers this page, and the rows return on the next
        # pull otherwise (duplicates, never loss).
        self._m.commits.labels(session.tenant_id, "fail").inc()

    def _is_v1_backend(self, base_url: str) -> bool:
        until = self._v1_backends.get(base_url)
        if until is None:
            return False
        if until < time.monotonic():
            del self._v1_backends[base_url]
            return False
        return True


def _belongs_to(message: msg_pb.MessageRequest, session: Session) -> bool:
    if message.tenant_id != session.tenant_id or not message.msg_id:
        return False
    if message.msg_type == msg_pb.SINGLE_CHAT:
        return message.to_user_id == session.user_id
    return message.msg_type == msg_pb.GROUP_CHAT and bool(message.group_id)
