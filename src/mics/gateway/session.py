"""One client connection: identity, the single ordered writer, and per-connection order.

Writing: every frame for a connection goes through `send`, which appends to an outbox
and schedules one flush per event-loop iteration. The flush writes all queued frames as
whole WebSocket frames in a single transport write, so a burst of deliveries costs one
syscall instead of one per frame, and nothing else ever writes data frames to the
socket: one writer, one order.

Holding: while the connection's offline backlog drains, live deliveries are held and
released after it (protocol.md 9.4), so the backlog always comes first.

Confirming: on a connection that speaks receipts (v1.1), every live delivery written
stays in an `Unconfirmed` ledger until a DeliveryAck confirms it; what is left when the
connection ends goes back to the offline path (mics.gateway.unconfirmed).

Ordering: a connection may have several messages in processing (hooks are slow), but
each one delivers only after its predecessor has delivered, so every recipient sees one
connection's messages in the order they were sent (protocol.md 9.9). A message whose
recipient is offline hands its turn on as soon as that is known, instead of holding it
for the broker's confirmation: from there it keeps its place in a per-recipient order
(`enter_offline_order`), so messages to other users overlap while each recipient's
offline messages still go offline in the order they were sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from mics.gateway.tenants import TenantRuntime
from mics.gateway.unconfirmed import Kind, Unconfirmed
from mics.protocol.codec import truncate_close_reason, ws_binary_header

log = logging.getLogger("mics.gateway.session")


class Transport(Protocol):
    """The part of an asyncio transport a session writes to."""

    def write(self, data: bytes) -> None: ...

    def is_closing(self) -> bool: ...

    def get_write_buffer_size(self) -> int: ...


CloseCallback = Callable[["Session", int, str], None]


class Session:
    __slots__ = (
        "_close_cb",
        "_held",
        "_ledger_limits",
        "_loop",
        "_offline_tails",
        "_out",
        "_send_limit",
        "_slot_free",
        "_tail",
        "_transport",
        "accepting",
        "close_code",
        "closed",
        "conn_id",
        "device_id",
        "inflight",
        "last_seen",
        "ledger",
        "offline",
        "runtime",
        "tenant_id",
        "trace_id",
        "user_id",
        "v11",
    )

    def __init__(
        self,
        *,
        tenant_id: str,
        user_id: str,
        device_id: str,
        conn_id: str,
        trace_id: str,
        runtime: TenantRuntime,
        v11: bool,
        transport: Transport,
        loop: asyncio.AbstractEventLoop,
        send_limit: int,
        close_cb: CloseCallback,
        ledger_limits: tuple[int, int] = (1024, 8 << 20),
    ) -> None:
        self.tenant_id = tenant_id
        self.user_id = user_id
        self.device_id = device_id
        self.conn_id = conn_id
        self.trace_id = trace_id
        self.runtime = runtime
        self.v11 = v11
        self._transport = transport
        self._loop = loop
        self._send_limit = send_limit
        self._close_cb = close_cb
        self._out: list[bytes] | None = None
        # Start held: nothing may overtake ConnectAck and the offline backlog.
        self._held: list[tuple[str, bytes]] | None = []
        # v1.1 only, created with the first tracked delivery (idle connections have none);
        # (max messages, max bytes), 0 messages: no tracking.
        self.ledger: Unconfirmed | None = None
        self._ledger_limits = ledger_limits if v11 and ledger_limits[0] > 0 else None
        self._tail: asyncio.Future[None] | None = None
        # Recipient -> the last of this connection's messages going offline to them;
        # created with the first offline message (idle connections have none).
        self._offline_tails: dict[str, asyncio.Future[None]] | None = None
        self._slot_free: asyncio.Future[None] | None = None
        self.inflight = 0
        # Offline drain state (mics.gateway.drain), created on the first drain.
        self.offline: object | None = None
        self.closed = False
        # False while the node drains: no new deliveries, receipts still read.
        self.accepting = True
        self.close_code = 0
        self.last_seen = time.monotonic()

    # -- writing -------------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue a frame for this connection in order; flushed at the end of this tick."""
        if self.closed:
            return
        out = self._out
        if out is None:
            self._out = [frame]
            self._loop.call_soon(self._flush)
        else:
            out.append(frame)

    def deliver(self, frame: bytes, msg_id: str = "") -> bool:
        """Queue a live delivery, held behind the offline backlog while it drains."""
        if self.closed or not self.accepting:
            return False
        if self._held is not None:
            self._held.append((msg_id, frame))
        else:
            self.send_tracked(frame, msg_id, Kind.LIVE)
        return True

    def send_tracked(self, frame: bytes, msg_id: str, kind: Kind) -> None:
        """Send a delivery that exists only in this gateway; on a v1.1 connection it is
        kept in the ledger until a receipt confirms it."""
        if self.closed:
            return
        self.send(frame)
        if self._ledger_limits is not None:
            self._track(msg_id, frame, kind)

    def _track(self, msg_id: str, frame: bytes, kind: Kind) -> None:
        ledger = self.ledger
        if ledger is None:
            assert self._ledger_limits is not None
            ledger = self.ledger = Unconfirmed(*self._ledger_limits)
        ledger.add(msg_id, frame, kind)

    def hold(self) -> None:
        """Start holding live deliveries (a drain is about to run)."""
        if self._held is None:
            self._held = []

    def release_held(self) -> None:
        """End the hold: queue the live deliveries that arrived during the drain."""
        held, self._held = self._held, None
        if held:
            for msg_id, frame in held:
                self.send_tracked(frame, msg_id, Kind.LIVE)

    def take_undelivered(self) -> list[tuple[str, bytes]]:
        """Deliveries this connection never confirmed, oldest first: the written ones
        a v1.1 client did not acknowledge, then the live ones still held behind a drain.
        Called once the connection ended; the caller hands them to the offline path."""
        taken = self.ledger.take() if self.ledger is not None else []
        held, self._held = self._held, None
        if held:
            taken.extend(held)
        return taken

    @property
    def holding(self) -> bool:
        return self._held is not None

    def _flush(self) -> None:
        out, self._out = self._out, None
        if not out or self.closed:
            return
        transport = self._transport
        if transport.is_closing():
            self.closed = True
            return
        if len(out) == 1:
            frame = out[0]
            transport.write(ws_binary_header(len(frame)) + frame)
        else:
            parts: list[bytes] = []
            for frame in out:
                parts.append(ws_binary_header(len(frame)))
                parts.append(frame)
            transport.write(b"".join(parts))
        if self._send_limit and transport.get_write_buffer_size() > self._send_limit:
            # The client stopped reading. Holding more would grow memory without bound.
            self.close(1013, "slow consumer")

    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def flush_now(self) -> None:
        if self._out is not None:
            self._flush()

    # -- closing -------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Flush what is queued, then close with ``code``; idempotent."""
        if self.closed:
            return
        self.flush_now()
        self.closed = True
        self.close_code = code
        self._close_cb(self, code, truncate_close_reason(reason))

    # -- per-connection ordering and in-flight limit --------------------------------------

    def enter_order(self) -> tuple[asyncio.Future[None] | None, asyncio.Future[None]]:
        """Take the next place in this connection's delivery order."""
        prev = self._tail
        mine: asyncio.Future[None] = self._loop.create_future()
        self._tail = mine
        return prev, mine

    def leave_order(self, mine: asyncio.Future[None]) -> None:
        """End this message's turn (idempotent): the next one may deliver."""
        if not mine.done():
            mine.set_result(None)
        if self._tail is mine:
            self._tail = None

    @property
    def order_idle(self) -> bool:
        return self._tail is None

    def enter_offline_order(
        self, recipients: Sequence[str]
    ) -> tuple[list[asyncio.Future[None]], asyncio.Future[None]]:
        """Take the next place in the offline order of each of ``recipients``.

        Called during the message's turn, so the places follow the connection's order.
        Returns the earlier messages still going offline to any of them (wait for
        those first) and this message's place, for `leave_offline_order`.
        """
        mine: asyncio.Future[None] = self._loop.create_future()
        tails = self._offline_tails
        if tails is None:
            tails = self._offline_tails = {}
        before: dict[asyncio.Future[None], None] = {}
        for user in recipients:
            prev = tails.get(user)
            if prev is not None and not prev.done():
                before[prev] = None
            tails[user] = mine
        return list(before), mine

    def leave_offline_order(self, recipients: Sequence[str], mine: asyncio.Future[None]) -> None:
        """This message is offline (or failed): the next ones to the same users may go."""
        if not mine.done():
            mine.set_result(None)
        tails = self._offline_tails
        if tails:
            for user in recipients:
                if tails.get(user) is mine:
                    del tails[user]

    async def acquire_slot(self, limit: int) -> None:
        while self.inflight >= limit:
            if self._slot_free is None:
                self._slot_free = self._loop.create_future()
            await self._slot_free
        self.inflight += 1

    def release_slot(self) -> None:
        self.inflight -= 1
        waiter = self._slot_free
        if waiter is not None:
            self._slot_free = None
            if not waiter.done():
                waiter.set_result(None)

    def touch(self) -> None:
        self.last_seen = time.monotonic()
