"""asyncio client SDK for the MICS client WebSocket (protocol.md sections 2 and 9).

One ``MicsClient`` is one device connection. It opens ``/ws`` with the query parameters of
section 2.1, waits for ``connect_ack``, matches ``MessageAck`` frames to sends by msg_id,
queues deliveries (deduplicated by sender and msg_id), sends heartbeats, batches v1.1
delivery receipts and reconnects with jittered exponential backoff when the connection
drops, except after the terminal close codes 4001, 4002 and 4409.

Costs per connection are kept small for load generators: one reader task, one heartbeat
task (when enabled), a timer for receipt batching, and optionally a shared
``aiohttp.ClientSession`` (give it ``TCPConnector(limit=0)``: WebSocket connections count
against the connector limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias
from urllib.parse import quote

import aiohttp
from google.protobuf.message import DecodeError
from yarl import URL

from mics.client.backoff import Backoff
from mics.client.errors import (
    TERMINAL_CLOSE_CODES,
    AckTimeout,
    ConnectError,
    ConnectionLost,
    ConnectRejected,
    NotConnected,
)
from mics.protocol.ids import new_msg_id
from mics.protocol.pb import mics_message_pb2 as msg_pb

log = logging.getLogger("mics.client")

State = Literal["connecting", "open", "reconnecting", "closed"]

PROTOCOL_V11 = "1.1"
CLOSE_NORMAL = 1000
CLOSE_ABNORMAL = 1006  # recorded when a connection ends without a close frame
MAX_RECEIPT_BATCH = 4096  # flush early so one DeliveryAck stays far below the frame limit

_WS: TypeAlias = "aiohttp.ClientWebSocketResponse[Literal[False]]"


@dataclass
class ClientOptions:
    """Connection settings. Times are in seconds.

    0 disables: heartbeats (heartbeat_interval_s), the ack timeout (ack_timeout_s), the
    connect timeout (connect_timeout_s), the pong timeout (pong_timeout_s) and dedup
    (dedup_capacity).
    """

    url: str  # base WebSocket URL, e.g. ws://127.0.0.1:8080/ws
    tenant_id: str
    token: str
    device_id: str
    protocol_version: str | None = PROTOCOL_V11
    heartbeat_interval_s: float = 10
    ack_timeout_s: float = 10
    reconnect: bool = True
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10
    connect_timeout_s: float = 10
    send_receipts: bool = True
    # Longest a receipt waits before its DeliveryAck batch is sent (at most one per interval).
    receipt_interval_s: float = 0.2
    # No server frame for this long drops the connection (None: 3 x heartbeat interval).
    pong_timeout_s: float | None = None
    # (sender user_id, msg_id) pairs remembered for delivery dedup; 0 disables dedup.
    dedup_capacity: int = 100_000
    # How long close() waits for the server's close frame.
    close_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "heartbeat_interval_s",
            "ack_timeout_s",
            "backoff_initial_s",
            "backoff_max_s",
            "connect_timeout_s",
            "receipt_interval_s",
            "close_timeout_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.pong_timeout_s is not None and self.pong_timeout_s < 0:
            raise ValueError("pong_timeout_s must be >= 0")
        if self.dedup_capacity < 0:
            raise ValueError("dedup_capacity must be >= 0")

    def ws_url(self) -> URL:
        """The full /ws URL: base url plus the section 2.1 query, values percent-encoded."""
        params = [("tenantId", self.tenant_id), ("token", self.token), ("deviceId", self.device_id)]
        if self.protocol_version:
            params.append(("protocolVersion", self.protocol_version))
        query = "&".join(f"{name}={quote(value, safe='')}" for name, value in params)
        base = str(URL(self.url))
        return URL(base + ("&" if "?" in base else "?") + query, encoded=True)

    @property
    def effective_pong_timeout_s(self) -> float:
        if self.pong_timeout_s is not None:
            return self.pong_timeout_s
        return 3 * self.heartbeat_interval_s


@dataclass
class ClientStats:
    """Plain counters; cheap enough to keep always on."""

    connects: int = 0
    reconnect_attempts: int = 0
    messages_sent: int = 0
    acks: int = 0
    unmatched_acks: int = 0
    deliveries: int = 0
    duplicate_deliveries: int = 0
    receipt_frames: int = 0
    receipt_ids: int = 0
    pings_sent: int = 0
    pongs: int = 0
    errors: int = 0
    offline_syncs: int = 0
    invalid_frames: int = 0


class _Connection:
    """State of one WebSocket connection; replaced on every reconnect."""

    __slots__ = (
        "ack",
        "detached",
        "heartbeat",
        "last_rx",
        "local_close",
        "opened_at",
        "pending",
        "receipt_cursor",
        "receipt_ids",
        "receipt_timer",
        "receipts",
        "tasks",
        "ws",
    )

    def __init__(self, ws: _WS, ack: msg_pb.ConnectAck, now: float, receipts: bool) -> None:
        self.ws = ws
        self.ack = ack
        self.opened_at = now
        self.last_rx = now
        self.receipts = receipts
        self.pending: dict[str, list[asyncio.Future[msg_pb.MessageAck]]] = {}
        self.receipt_ids: list[str] = []
        self.receipt_cursor = ""
        self.receipt_timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.heartbeat: asyncio.Task[None] | None = None
        self.local_close: tuple[int, str] | None = None
        self.detached = False

    def take_receipts(self) -> tuple[bytes, int] | None:
        """The pending receipts as one encoded DeliveryAck frame, and the number of ids."""
        if self.receipt_timer is not None:
            self.receipt_timer.cancel()
            self.receipt_timer = None
        ids = self.receipt_ids
        if not ids and not self.receipt_cursor:
            return None
        receipt = msg_pb.DeliveryAck(msg_ids=ids, offline_cursor=self.receipt_cursor)
        self.receipt_ids = []
        self.receipt_cursor = ""
        return msg_pb.ClientFrame(delivery_ack=receipt).SerializeToString(), len(ids)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class MicsClient:
    """One MICS device connection with acks, receipts, heartbeats and reconnects.

    ``session``: share one ``aiohttp.ClientSession`` among many clients (not closed here).
    ``rng``: returns floats in [0, 1) for backoff jitter (inject for deterministic tests).
    ``on_state``: called synchronously with each new state.
    ``on_delivery``: if given, each new (non-duplicate) delivery is passed to it instead of
    being queued for ``deliveries()`` / ``next_delivery()``.
    """

    def __init__(
        self,
        options: ClientOptions,
        *,
        session: aiohttp.ClientSession | None = None,
        rng: Callable[[], float] | None = None,
        on_state: Callable[[State], None] | None = None,
        on_delivery: Callable[[msg_pb.MessageRequest], None] | None = None,
    ) -> None:
        self.options = options
        self._url = options.ws_url()
        self._session = session
        self._owns_session = session is None
        self._backoff = Backoff(
            options.backoff_initial_s, options.backoff_max_s, rng or random.random
        )
        self._on_state = on_state
        self._on_delivery = on_delivery
        self._state: State = "closed"
        self._closing = False
        self._conn: _Connection | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._state_waiters: list[asyncio.Future[None]] = []
        self._connect_ack: msg_pb.ConnectAck | None = None
        self._close_code: int | None = None
        self._close_reason = ""
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._deliveries: asyncio.Queue[msg_pb.MessageRequest | None] = asyncio.Queue()
        self.errors: asyncio.Queue[msg_pb.ServerError] = asyncio.Queue()
        self.offline_syncs: asyncio.Queue[msg_pb.OfflineSync] = asyncio.Queue()
        self.last_pong_ms: int | None = None  # server timestamp of the last heartbeat_pong
        self.last_pong_at: float | None = None  # loop.time() when it arrived
        self.last_offline_cursor = ""  # latest offline_cursor seen on a delivery
        self.stats = ClientStats()

    # ------------------------------------------------------------------ properties

    @property
    def state(self) -> State:
        return self._state

    @property
    def connect_ack(self) -> msg_pb.ConnectAck | None:
        """ConnectAck of the current (or most recent) connection."""
        return self._connect_ack

    @property
    def close_code(self) -> int | None:
        """How the most recent connection ended (1006: no close frame); None if none ended."""
        return self._close_code

    @property
    def close_reason(self) -> str:
        return self._close_reason

    @property
    def is_open(self) -> bool:
        return self._state == "open"

    @property
    def pending_acks(self) -> int:
        conn = self._conn
        return 0 if conn is None else sum(len(v) for v in conn.pending.values())

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> msg_pb.ConnectAck:
        """Open the connection and return its ConnectAck.

        Raises ConnectRejected if the gateway closes before connect_ack, ConnectError on
        network errors, HTTP refusals and timeouts. A failed connect() never reconnects.
        """
        if self._state != "closed" or self._run_task is not None:
            raise RuntimeError(f"connect() while {self._state}")
        self._closing = False
        self._backoff.reset()
        self._set_state("connecting")
        try:
            conn = await self._open()
        except BaseException:
            self._finish()
            raise
        if self._closing:  # close() ran while we were connecting
            await self._discard(conn)
            raise ConnectionLost(CLOSE_NORMAL, "client closed")
        self._attach(conn)
        self._run_task = asyncio.get_running_loop().create_task(self._run(conn))
        return conn.ack

    async def close(self) -> None:
        """Close the connection (flushing receipts), stop reconnecting, fail pending acks."""
        self._closing = True
        run_task, self._run_task = self._run_task, None
        if run_task is not None and run_task is not asyncio.current_task():
            run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run_task
        conn = self._conn
        if conn is not None:
            await self._flush_receipts_now(conn)
            self._detach(conn, CLOSE_NORMAL, "client closed")
            await self._close_ws(conn.ws, CLOSE_NORMAL)
        if self._state != "closed":
            self._finish()
        await self._close_owned_session()

    async def __aenter__(self) -> MicsClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_closed(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (API)
        """Wait until the client is closed for good (close(), terminal code, no reconnect)."""
        await self._wait_until(lambda: self._state == "closed", timeout)

    async def wait_open(self, timeout: float | None = None) -> msg_pb.ConnectAck:  # noqa: ASYNC109 (API)
        """Wait until a connection is open; raises NotConnected if the client closes."""
        await self._wait_until(lambda: self._state in ("open", "closed"), timeout)
        if self._state != "open" or self._connect_ack is None:
            raise NotConnected(self._state)
        return self._connect_ack

    # ------------------------------------------------------------------ sending

    async def send_single(
        self, to_user_id: str, body: bytes, msg_id: str | None = None
    ) -> msg_pb.MessageAck:
        """Send a single-chat message and wait for its ack (SENT or FAILED)."""
        frame = msg_pb.ClientFrame()
        message = frame.message
        message.msg_type = msg_pb.SINGLE_CHAT
        message.to_user_id = to_user_id
        message.msg_body = body
        return await self._send_frame(frame, message, msg_id)

    async def send_group(
        self, group_id: str, body: bytes, msg_id: str | None = None
    ) -> msg_pb.MessageAck:
        """Send a group-chat message and wait for its ack (SENT or FAILED)."""
        frame = msg_pb.ClientFrame()
        message = frame.message
        message.msg_type = msg_pb.GROUP_CHAT
        message.group_id = group_id
        message.msg_body = body
        return await self._send_frame(frame, message, msg_id)

    async def send(self, message: msg_pb.MessageRequest) -> msg_pb.MessageAck:
        """Send an arbitrary MessageRequest (copied); a blank msg_id is filled in."""
        frame = msg_pb.ClientFrame()
        frame.message.CopyFrom(message)
        return await self._send_frame(frame, frame.message, message.msg_id or None)

    async def send_raw(self, data: bytes) -> None:
        """Write one binary WebSocket message as is (for tests of malformed frames)."""
        conn = self._require_open()
        try:
            await conn.ws.send_bytes(data)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            raise ConnectionLost(CLOSE_ABNORMAL, str(exc)) from exc

    async def _send_frame(
        self, frame: msg_pb.ClientFrame, message: msg_pb.MessageRequest, msg_id: str | None
    ) -> msg_pb.MessageAck:
        conn = self._require_open()
        message.msg_id = msg_id = msg_id or new_msg_id()
        if not message.timestamp_ms:
            message.timestamp_ms = _now_ms()
        data = frame.SerializeToString()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[msg_pb.MessageAck] = loop.create_future()
        waiters = conn.pending.get(msg_id)
        if waiters is None:
            conn.pending[msg_id] = [fut]
        else:  # same msg_id outstanding twice: acks resolve in send order
            waiters.append(fut)
        timeout_s = self.options.ack_timeout_s
        timer = loop.call_later(timeout_s, _expire, fut, msg_id, timeout_s) if timeout_s else None
        try:
            try:
                await conn.ws.send_bytes(data)
            except (aiohttp.ClientError, OSError, RuntimeError) as exc:
                raise ConnectionLost(CLOSE_ABNORMAL, str(exc)) from exc
            self.stats.messages_sent += 1
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            _remove_waiter(conn.pending, msg_id, fut)

    def _require_open(self) -> _Connection:
        conn = self._conn
        if conn is None or self._state != "open":
            raise NotConnected(self._state)
        return conn

    # ------------------------------------------------------------------ receiving

    async def deliveries(self) -> AsyncIterator[msg_pb.MessageRequest]:
        """Yield new deliveries until the client is closed for good and the queue is empty."""
        while True:
            if self._deliveries.empty() and self._state == "closed":
                return
            item = await self._deliveries.get()
            if item is not None:  # None only wakes the consumer on close
                yield item

    async def next_delivery(self, timeout: float | None = None) -> msg_pb.MessageRequest:  # noqa: ASYNC109 (API)
        """The next new delivery; TimeoutError on timeout, NotConnected once closed and empty."""
        async with asyncio.timeout(timeout):
            while True:
                if self._deliveries.empty() and self._state == "closed":
                    raise NotConnected(self._state)
                item = await self._deliveries.get()
                if item is not None:
                    return item

    async def next_error(self, timeout: float | None = None) -> msg_pb.ServerError:  # noqa: ASYNC109 (API)
        """The next ServerError frame (4400 / 4401); TimeoutError on timeout."""
        async with asyncio.timeout(timeout):
            return await self.errors.get()

    async def next_offline_sync(self, timeout: float | None = None) -> msg_pb.OfflineSync:  # noqa: ASYNC109 (API)
        """The next OfflineSync frame (v1.1); TimeoutError on timeout."""
        async with asyncio.timeout(timeout):
            return await self.offline_syncs.get()

    # ------------------------------------------------------------------ internals: connect

    def _shared_session_closed(self) -> bool:
        return not self._owns_session and self._session is not None and self._session.closed

    def _get_session(self) -> aiohttp.ClientSession:
        if self._shared_session_closed():
            raise ConnectError("the shared aiohttp session is closed")
        if self._session is None or (self._owns_session and self._session.closed):
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    async def _open(self) -> _Connection:
        """Open one WebSocket and wait for connect_ack (no retries)."""
        opts = self.options
        session = self._get_session()
        ws: _WS | None = None
        try:
            async with asyncio.timeout(opts.connect_timeout_s or None):
                ws = await session.ws_connect(
                    self._url,
                    autoping=True,
                    autoclose=True,
                    compress=0,
                    max_msg_size=0,
                    decode_text=False,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=opts.close_timeout_s),
                )
                ack = await self._first_frame(ws)
        except TimeoutError as exc:
            if ws is not None:
                await self._close_ws(ws, CLOSE_NORMAL)
            raise ConnectError("connect timeout") from exc
        except aiohttp.WSServerHandshakeError as exc:
            raise ConnectError(f"upgrade refused: HTTP {exc.status}", exc.status) from exc
        except (aiohttp.ClientError, OSError) as exc:
            if ws is not None:
                await self._close_ws(ws, CLOSE_NORMAL)
            raise ConnectError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:  # rejection, protocol error or cancellation
            if ws is not None:
                await self._close_ws(ws, CLOSE_NORMAL)
            raise
        loop = asyncio.get_running_loop()
        receipts = (
            opts.send_receipts
            and opts.protocol_version == PROTOCOL_V11
            and ack.protocol_version == PROTOCOL_V11
        )
        return _Connection(ws, ack, loop.time(), receipts)

    async def _first_frame(self, ws: _WS) -> msg_pb.ConnectAck:
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                frame = msg_pb.ServerFrame()
                try:
                    frame.ParseFromString(msg.data)
                except DecodeError as exc:
                    raise ConnectError("invalid first frame") from exc
                kind = frame.WhichOneof("payload")
                if kind != "connect_ack":
                    raise ConnectError(f"first frame is {kind}, not connect_ack")
                return frame.connect_ack
            if msg.type is aiohttp.WSMsgType.TEXT:
                continue  # text messages carry no data (section 2.4)
            if msg.type is aiohttp.WSMsgType.CLOSE:
                code, reason = int(msg.data), msg.extra or ""
                self._close_code, self._close_reason = code, reason
                raise ConnectRejected(code, reason)
            error = ws.exception()
            raise ConnectError(f"connection ended before connect_ack: {error or msg.type.name}")

    def _attach(self, conn: _Connection) -> None:
        self._conn = conn
        self._connect_ack = conn.ack
        self.stats.connects += 1
        interval = self.options.heartbeat_interval_s
        if interval > 0:
            conn.heartbeat = asyncio.get_running_loop().create_task(
                self._heartbeat_loop(conn, interval)
            )
        self._set_state("open")

    def _detach(self, conn: _Connection, code: int, reason: str) -> None:
        """Forget a finished connection: stop its tasks and fail its pending acks."""
        if conn.detached:
            return
        conn.detached = True
        if self._conn is conn:
            self._conn = None
        self._close_code, self._close_reason = code, reason
        if conn.receipt_timer is not None:
            conn.receipt_timer.cancel()
            conn.receipt_timer = None
        if conn.heartbeat is not None and conn.heartbeat is not asyncio.current_task():
            conn.heartbeat.cancel()
        for task in conn.tasks:
            task.cancel()
        pending, conn.pending = conn.pending, {}
        for waiters in pending.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(ConnectionLost(code, reason))

    async def _discard(self, conn: _Connection) -> None:
        self._detach(conn, CLOSE_NORMAL, "client closed")
        await self._close_ws(conn.ws, CLOSE_NORMAL)

    @staticmethod
    async def _close_ws(ws: _WS, code: int) -> None:
        with contextlib.suppress(Exception):
            await ws.close(code=code)

    async def _close_owned_session(self) -> None:
        session = self._session
        if self._owns_session and session is not None and not session.closed:
            await session.close()

    # ------------------------------------------------------------------ internals: run loop

    async def _run(self, conn: _Connection) -> None:
        """Own the connection(s) until closed for good; close() cancels this task."""
        try:
            await self._serve(conn)
        except Exception:  # a bug or a closed shared session: end cleanly, never hang
            log.exception("mics client connection loop failed")
            current = self._conn
            if current is not None:
                self._detach(current, CLOSE_ABNORMAL, "client error")
                await self._close_ws(current.ws, CLOSE_NORMAL)
        if self._closing:
            return
        # Closed for good without close(): release resources ourselves.
        self._run_task = None
        self._finish()
        await self._close_owned_session()

    async def _serve(self, conn: _Connection) -> None:
        """Read the connection; on a drop, reconnect unless closing or terminal."""
        while True:
            code, reason = await self._read_loop(conn)
            uptime = asyncio.get_running_loop().time() - conn.opened_at
            self._detach(conn, code, reason)
            if not conn.ws.closed:
                await self._close_ws(conn.ws, CLOSE_NORMAL)
            if self._closing:
                return
            log.info("mics client connection ended: %s %s", code, reason)
            if not self.options.reconnect or code in TERMINAL_CLOSE_CODES:
                return
            if uptime >= self.options.backoff_max_s:
                self._backoff.reset()  # a long-lived connection restarts the backoff
            self._set_state("reconnecting")
            new_conn = await self._reconnect()
            if new_conn is None:
                return
            conn = new_conn
            self._attach(conn)

    async def _reconnect(self) -> _Connection | None:
        while True:
            await asyncio.sleep(self._backoff.next())
            if self._shared_session_closed():
                log.info("mics client: shared session closed, not reconnecting")
                return None
            self.stats.reconnect_attempts += 1
            try:
                return await self._open()
            except ConnectRejected as exc:
                log.info("mics client reconnect rejected: %s %s", exc.code, exc.reason)
                if exc.terminal:
                    return None
            except ConnectError as exc:
                log.info("mics client reconnect failed: %s", exc.reason)

    async def _read_loop(self, conn: _Connection) -> tuple[int, str]:
        ws = conn.ws
        loop = asyncio.get_running_loop()
        binary = aiohttp.WSMsgType.BINARY
        while True:
            msg = await ws.receive()
            if msg.type is binary:
                conn.last_rx = loop.time()
                self._on_frame(conn, msg.data)
                continue
            if msg.type is aiohttp.WSMsgType.TEXT:
                continue
            if msg.type is aiohttp.WSMsgType.CLOSE:
                return int(msg.data), msg.extra or ""
            if conn.local_close is not None:
                return conn.local_close
            error = ws.exception()
            return CLOSE_ABNORMAL, str(error) if error is not None else "connection lost"

    def _on_frame(self, conn: _Connection, data: bytes) -> None:
        frame = msg_pb.ServerFrame()
        try:
            frame.ParseFromString(data)
        except DecodeError:
            self.stats.invalid_frames += 1
            return
        kind = frame.WhichOneof("payload")
        if kind == "ack":
            self._on_ack(conn, frame.ack)
        elif kind == "delivery":
            self._on_delivery_frame(conn, frame.delivery)
        elif kind == "heartbeat_pong":
            self.stats.pongs += 1
            self.last_pong_ms = frame.heartbeat_pong.timestamp_ms
            self.last_pong_at = conn.last_rx
        elif kind == "error":
            self.stats.errors += 1
            self.errors.put_nowait(frame.error)
        elif kind == "offline_sync":
            self.stats.offline_syncs += 1
            self.offline_syncs.put_nowait(frame.offline_sync)
        # connect_ack again or an unknown/empty payload: ignored (section 1.1)

    def _on_ack(self, conn: _Connection, ack: msg_pb.MessageAck) -> None:
        self.stats.acks += 1
        waiters = conn.pending.get(ack.msg_id)
        while waiters:
            fut = waiters.pop(0)
            if not waiters:
                del conn.pending[ack.msg_id]
            if not fut.done():
                fut.set_result(ack)
                return
        self.stats.unmatched_acks += 1  # e.g. the ack of a send that already timed out

    def _on_delivery_frame(self, conn: _Connection, delivery: msg_pb.MessageDelivery) -> None:
        message = delivery.message
        cursor = delivery.offline_cursor
        if cursor:
            self.last_offline_cursor = cursor
        if conn.receipts:
            self._queue_receipt(conn, message.msg_id, cursor)
        capacity = self.options.dedup_capacity
        if capacity:
            key = (message.user_id, message.msg_id)
            seen = self._seen
            if key in seen:
                seen.move_to_end(key)
                self.stats.duplicate_deliveries += 1
                return
            seen[key] = None
            if len(seen) > capacity:
                seen.popitem(last=False)
        self.stats.deliveries += 1
        if self._on_delivery is not None:
            try:
                self._on_delivery(message)
            except Exception:
                log.exception("mics client on_delivery callback failed")
        else:
            self._deliveries.put_nowait(message)

    # ------------------------------------------------------------------ internals: receipts

    def _queue_receipt(self, conn: _Connection, msg_id: str, cursor: str) -> None:
        conn.receipt_ids.append(msg_id)
        if cursor:
            conn.receipt_cursor = cursor
        if len(conn.receipt_ids) >= MAX_RECEIPT_BATCH:
            self._spawn_receipt_flush(conn)
        elif conn.receipt_timer is None:
            conn.receipt_timer = asyncio.get_running_loop().call_later(
                self.options.receipt_interval_s, self._spawn_receipt_flush, conn
            )

    def _spawn_receipt_flush(self, conn: _Connection) -> None:
        conn.receipt_timer = None
        if conn.detached:
            return
        batch = conn.take_receipts()
        if batch is None:
            return
        task = asyncio.get_running_loop().create_task(self._send_receipts(conn, *batch))
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    async def _send_receipts(self, conn: _Connection, data: bytes, count: int) -> None:
        try:
            await conn.ws.send_bytes(data)
        except (aiohttp.ClientError, OSError, RuntimeError):
            return  # the connection is going away; the gateway redelivers unconfirmed offline
        self.stats.receipt_frames += 1
        self.stats.receipt_ids += count

    async def _flush_receipts_now(self, conn: _Connection) -> None:
        if conn.detached or conn.ws.closed:
            return
        if conn.tasks:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        batch = conn.take_receipts()
        if batch is not None:
            await self._send_receipts(conn, *batch)

    # ------------------------------------------------------------------ internals: heartbeats

    async def _heartbeat_loop(self, conn: _Connection, interval: float) -> None:
        loop = asyncio.get_running_loop()
        dead_after = self.options.effective_pong_timeout_s
        ws = conn.ws
        while not conn.detached:
            await asyncio.sleep(interval)
            if dead_after and loop.time() - conn.last_rx > dead_after:
                log.info("mics client: no server frame for %.1fs, dropping connection", dead_after)
                conn.local_close = (CLOSE_ABNORMAL, "pong timeout")
                await self._close_ws(ws, 1001)
                return
            ping = msg_pb.ClientFrame()
            ping.heartbeat_ping.timestamp_ms = _now_ms()
            try:
                await ws.send_bytes(ping.SerializeToString())
            except (aiohttp.ClientError, OSError, RuntimeError):
                return
            self.stats.pings_sent += 1

    # ------------------------------------------------------------------ internals: state

    def _set_state(self, state: State) -> None:
        if state == self._state:
            return
        self._state = state
        waiters, self._state_waiters = self._state_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                log.exception("mics client on_state callback failed")

    def _finish(self) -> None:
        self._set_state("closed")
        self._deliveries.put_nowait(None)  # wake a consumer blocked in deliveries()

    async def _wait_until(self, predicate: Callable[[], bool], limit_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(limit_s):
            while not predicate():
                fut: asyncio.Future[None] = loop.create_future()
                self._state_waiters.append(fut)
                await fut


def _expire(fut: asyncio.Future[msg_pb.MessageAck], msg_id: str, timeout_s: float) -> None:
    if not fut.done():
        fut.set_exception(AckTimeout(msg_id, timeout_s))


def _remove_waiter(
    pending: dict[str, list[asyncio.Future[msg_pb.MessageAck]]],
    msg_id: str,
    fut: asyncio.Future[msg_pb.MessageAck],
) -> None:
    waiters = pending.get(msg_id)
    if waiters is None:
        return
    with contextlib.suppress(ValueError):
        waiters.remove(fut)
    if not waiters:
        del pending[msg_id]
