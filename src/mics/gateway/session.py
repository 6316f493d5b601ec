"""One client connection: identity, the single ordered writer, and per-connection order.

Writing: every frame for a connection goes through `send`, which appends to an outbox
and schedules one flush per event-loop iteration. The flush writes all queued frames as
whole WebSocket frames in a single transport write, so a burst of deliveries costs one
syscall instead of one per frame, and nothing else ever writes data frames to the
socket: one writer, one order.

Holding: while the connection's offline backlog drains, live deliveries are held and
released after it (protocol.md 9.4), so the backlog always comes first.

Ordering: a connection may have several messages in processing (hooks are slow), but
each one delivers only after its predecessor has delivered, so every recipient sees one
connection's messages in the order they were sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from mics.gateway.tenants import TenantRuntime
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
        "_loop",
        "_out",
        "_send_limit",
        "_slot_free",
        "_tail",
        "_transport",
        "close_code",
        "closed",
        "conn_id",
        "device_id",
        "inflight",
        "last_seen",
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
        self._held: list[bytes] | None = []
        self._tail: asyncio.Future[None] | None = None
        self._slot_free: asyncio.Future[None] | None = None
        self.inflight = 0
        # Offline drain state (mics.gateway.drain), created on the first drain.
        self.offline: object | None = None
        self.closed = False
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

    def deliver(self, frame: bytes) -> bool:
        """Queue a live delivery, held behind the offline backlog while it drains."""
        if self.closed:
            return False
        if self._held is not None:
            self._held.append(frame)
        else:
            self.send(frame)
        return True

    def hold(self) -> None:
        """Start holding live deliveries (a drain is about to run)."""
        if self._held is None:
            self._held = []

    def release_held(self) -> None:
        """End the hold: queue the live deliveries that arrived during the drain."""
        held, self._held = self._held, None
        if held:
            for frame in held:
                self.send(frame)

    def take_held(self) -> list[bytes]:
        """The live deliveries still held (the connection ended during its drain)."""
        held, self._held = self._held, None
        return held or []

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
        if not mine.done():
            mine.set_result(None)
        if self._tail is mine:
            self._tail = None

    @property
    def order_idle(self) -> bool:
        return self._tail is None

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
