"""Property-based fuzzing of the client WebSocket against one real, long-lived stack.

How hypothesis and asyncio fit together here: hypothesis drives *synchronous* test
functions, one call per example, while the gateway needs a running event loop. Starting
a stack per example would be slow and would hide state-dependent bugs (a frame that
corrupts a connection for the frames after it). So each test function starts ONE stack
(gateway + scripted backend) on an event loop running in a background thread
(``LiveStack``), opens its WebSocket connections there, and then runs an inner
``@given`` function; each example submits coroutines to that loop with
``run_coroutine_threadsafe`` and blocks on the result. The inner function uses no pytest
fixtures, so no per-example fixture scoping is involved, and after all examples the test
checks the stack as a whole: every delivery was legitimate, ``mics_internal_errors`` is
0, ``/healthz`` answers 200 and nothing was logged at ERROR.

Each example's oracle is computed from the bytes alone: parse them as a ``ClientFrame``
locally and the protocol (sections 2.3-2.6) says what the gateway must answer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.scripted_backend import TENANT, ScriptedBackend, ScriptedStack

T = TypeVar("T")

SENDER = ("u1", "fuzzer")
RECIPIENT = ("u2", "target")
GROUP = "g1"  # members: the sender and the recipient
FRAME_OVERHEAD = 65_536  # protocol.md 2.4: frame limit = MAX_MESSAGE_BYTES + 64 KiB
VALIDATION_REASONS = ("missing to_user_id", "missing group_id", "invalid msg_type")
HEX32 = re.compile(r"[0-9a-f]{32}")

FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- a stack on a background event loop ------------------------------------------------------


class LiveStack:
    """A ``ScriptedStack`` served by an event loop in a daemon thread."""

    def __init__(self, **gateway_overrides: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        backend = ScriptedBackend(
            groups={GROUP: [SENDER[0], RECIPIENT[0]]},
            # The recipient only listens: keep it from timing out during a long run.
            runtime={"heartbeat_timeout_seconds": 600},
        )
        try:
            self.stack = self.run(ScriptedStack.start(backend, **gateway_overrides))
        except BaseException:
            self._stop_loop()
            raise

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def connect(self, user: str, device: str) -> RawConn:
        return self.run(RawConn.open(self.stack, user, device))

    def close(self) -> None:
        try:
            self.run(self.stack.stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_rest(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()

    # -- whole-stack checks ------------------------------------------------------------

    def assert_healthy(self) -> None:
        async def probe() -> tuple[int, str]:
            async with aiohttp.ClientSession() as http:
                async with http.get(self.stack.gateway.url + "/healthz") as health:
                    status = health.status
                async with http.get(self.stack.gateway.url + "/metrics") as metrics:
                    return status, await metrics.text()

        status, exposition = self.run(probe())
        assert status == 200
        internal = [
            float(line.rsplit(" ", 1)[1])
            for line in exposition.splitlines()
            if line.startswith("mics_internal_errors_total")
        ]
        assert sum(internal) == 0, internal

    def frames_rejected(self, reason: str) -> float:
        return self.stack.metric(
            "mics_ws_frames_rejected_total", {"tenant": TENANT, "reason": reason}
        )


@dataclass
class RawConn:
    """A plain WebSocket whose server frames a reader task collects (no SDK logic)."""

    ws: aiohttp.ClientWebSocketResponse
    frames: asyncio.Queue[msg_pb.ServerFrame | None] = field(default_factory=asyncio.Queue)
    received: list[msg_pb.ServerFrame] = field(default_factory=list)
    closed: tuple[Any, Any] | None = None
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, stack: ScriptedStack, user: str, device: str) -> RawConn:
        conn = cls(await stack.raw_ws(user, device))
        conn.reader = asyncio.get_running_loop().create_task(conn._read())
        return conn

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                frame = msg_pb.ServerFrame.FromString(msg.data)
                self.received.append(frame)
                self.frames.put_nowait(frame)
        self.closed = (self.ws.close_code, self.ws.exception())
        self.frames.put_nowait(None)

    async def exchange(
        self,
        data: bytes,
        *,
        pongs: int,
        ack: bool,
        timeout: float = 10.0,  # noqa: ASYNC109 (bounded wait for a list of frames)
    ) -> list[msg_pb.ServerFrame]:
        """Send ``data`` and a ping; collect frames until ``pongs`` pongs (and an ack)."""
        await self.ws.send_bytes(data)
        await self.ws.send_bytes(PING)
        frames: list[msg_pb.ServerFrame] = []
        seen_pongs = seen_acks = 0
        async with asyncio.timeout(timeout):
            while seen_pongs < pongs or (ack and seen_acks == 0):
                frame = await self.frames.get()
                if frame is None:
                    raise AssertionError(f"gateway closed the connection: {self.closed}")
                frames.append(frame)
                kind = frame.WhichOneof("payload")
                seen_pongs += kind == "heartbeat_pong"
                seen_acks += kind == "ack"
        return frames

    async def send_marker(self, to_user_id: str, msg_id: str) -> None:
        message = msg_pb.MessageRequest(msg_id=msg_id, to_user_id=to_user_id, msg_body=b"marker")
        frames = await self.exchange(
            msg_pb.ClientFrame(message=message).SerializeToString(), pongs=1, ack=True
        )
        acks = [f.ack for f in frames if f.WhichOneof("payload") == "ack"]
        assert [(a.msg_id, a.status, a.reason) for a in acks] == [(msg_id, msg_pb.SENT, "")]

    async def wait_for_delivery(self, msg_id: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while not any(
                f.WhichOneof("payload") == "delivery" and f.delivery.message.msg_id == msg_id
                for f in self.received
            ):
                if self.closed is not None:
                    raise AssertionError(f"connection closed: {self.closed}")
                await asyncio.sleep(0.01)


PING = msg_pb.ClientFrame(heartbeat_ping=msg_pb.HeartbeatPing(timestamp_ms=7)).SerializeToString()


# -- the oracle -------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the sender did, to judge every delivery at the end."""

    # msg_id -> body of each message acked SENT (not "duplicate") to the recipient / sender.
    to_recipient: dict[str, bytes] = field(default_factory=dict)
    to_sender: dict[str, bytes] = field(default_factory=dict)
    invalid: int = 0
    too_large: int = 0


def expect_reply(live: LiveStack, conn: RawConn, data: bytes, limit: int, ledger: Ledger) -> None:
    """Send ``data`` on ``conn`` and check the gateway's answer against the protocol."""
    if limit and len(data) > limit:
        kind, frame = "too_large", None
    else:
        frame = msg_pb.ClientFrame()
        try:
            frame.ParseFromString(data)
        except Exception:
            kind, frame = "invalid", None
        else:
            kind = frame.WhichOneof("payload") or "empty"
    pongs = 2 if kind == "heartbeat_ping" else 1
    frames = live.run(conn.exchange(data, pongs=pongs, ack=kind == "message"))
    kinds = [f.WhichOneof("payload") for f in frames]

    errors = [f.error for f in frames if f.WhichOneof("payload") == "error"]
    acks = [f.ack for f in frames if f.WhichOneof("payload") == "ack"]
    deliveries = [f.delivery.message for f in frames if f.WhichOneof("payload") == "delivery"]
    assert set(kinds) <= {"error", "ack", "delivery", "heartbeat_pong"}, kinds
    for delivered in deliveries:  # only possible for a message to oneself / the group
        assert (delivered.tenant_id, delivered.user_id, delivered.device_id) == (
            TENANT,
            *SENDER,
        )

    if kind in ("invalid", "too_large"):
        code, text = (4400, "invalid protobuf") if kind == "invalid" else (4401, "frame too large")
        assert [(e.code, e.message) for e in errors] == [(code, text)]
        # Frames are handled in order: the error comes before the pong of the next ping.
        assert kinds.index("error") < kinds.index("heartbeat_pong")
        assert not acks
        assert not deliveries
        if kind == "invalid":
            ledger.invalid += 1
        else:
            ledger.too_large += 1
        return

    assert not errors, errors
    if kind != "message":  # ping: one more pong; receipts and empty frames: nothing
        assert not acks
        assert not deliveries
        return
    assert frame is not None
    message = frame.message
    (ack,) = acks
    if message.msg_id:
        assert ack.msg_id == message.msg_id
    else:
        assert HEX32.fullmatch(ack.msg_id), ack.msg_id
    assert ack.timestamp_ms > 0
    validation = validation_reason(message)
    if validation is not None:
        assert (ack.status, ack.reason) == (msg_pb.FAILED, validation)
    else:
        assert ack.reason not in VALIDATION_REASONS
    if ack.status != msg_pb.SENT or ack.reason == "duplicate":
        assert not deliveries
        return
    to_sender = to_recipient = False
    if message.msg_type == msg_pb.SINGLE_CHAT:
        to_sender = message.to_user_id == SENDER[0]
        to_recipient = message.to_user_id == RECIPIENT[0]
    elif message.group_id == GROUP:
        to_sender = to_recipient = True
    if to_recipient:
        ledger.to_recipient[ack.msg_id] = message.msg_body
    if to_sender:
        ledger.to_sender[ack.msg_id] = message.msg_body
        assert [(d.msg_id, d.msg_body) for d in deliveries] == [(ack.msg_id, message.msg_body)]
    else:
        assert not deliveries


def validation_reason(message: msg_pb.MessageRequest) -> str | None:
    """protocol.md 2.5 step 2 (bodies here are far below MAX_MESSAGE_BYTES)."""
    if message.msg_type == msg_pb.SINGLE_CHAT:
        return None if message.to_user_id.strip() else "missing to_user_id"
    if message.msg_type == msg_pb.GROUP_CHAT:
        return None if message.group_id.strip() else "missing group_id"
    return "invalid msg_type"


def check_recipient(live: LiveStack, sender: RawConn, recipient: RawConn, ledger: Ledger) -> None:
    """Every message acked SENT to the recipient arrived exactly once, and nothing else."""
    marker = "fuzz-end-marker"
    live.run(sender.send_marker(RECIPIENT[0], marker))
    live.run(recipient.wait_for_delivery(marker))
    kinds = {f.WhichOneof("payload") for f in recipient.received}
    assert kinds == {"delivery"}, kinds
    delivered = [f.delivery.message for f in recipient.received]
    for message in delivered:
        # Whatever the sender put in the frame, the gateway speaks for the session.
        assert (message.tenant_id, message.user_id, message.device_id) == (TENANT, *SENDER)
    got = [(m.msg_id, m.msg_body) for m in delivered]
    assert got == [*ledger.to_recipient.items(), (marker, b"marker")]


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def live_stack() -> Iterator[Any]:
    """Factory of ``(LiveStack, sender, recipient)``, torn down after the test."""
    stacks: list[LiveStack] = []

    def factory(**gateway_overrides: Any) -> tuple[LiveStack, RawConn, RawConn]:
        live = LiveStack(**gateway_overrides)
        stacks.append(live)
        sender = live.connect(*SENDER)
        recipient = live.connect(*RECIPIENT)
        return live, sender, recipient

    yield factory
    for live in stacks:
        live.close()


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


# -- strategies ---------------------------------------------------------------------------------

ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=12)

valid_messages = st.builds(
    msg_pb.MessageRequest,
    # Spoofed identity fields: the gateway must overwrite them.
    tenant_id=st.sampled_from(["", TENANT, "t2"]),
    user_id=st.sampled_from(["", "u2", "u3", "admin"]),
    device_id=st.sampled_from(["", "evil", RECIPIENT[1]]),
    msg_id=ids,
    msg_type=st.sampled_from([msg_pb.SINGLE_CHAT, msg_pb.GROUP_CHAT]),
    to_user_id=st.sampled_from([RECIPIENT[0], SENDER[0], "u3"]),
    group_id=st.sampled_from(["", GROUP]),
    msg_body=st.binary(max_size=64),
    timestamp_ms=st.sampled_from([0, 1, 1_700_000_000_000]),
)

mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "set"]),
        st.integers(min_value=0, max_value=1 << 16),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=3,  # more damage makes almost every frame unparsable
)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, position, value in ops:
        if op == "insert":
            buf.insert(position % (len(buf) + 1), value)
            continue
        if not buf:
            continue
        i = position % len(buf)
        if op == "flip":
            buf[i] ^= 1 << (value % 8)
        elif op == "set":
            buf[i] = value
        else:
            del buf[i]
    return bytes(buf)


def wrap_message(encoded: bytes) -> bytes:
    """ClientFrame{message = encoded}, built by hand so ``encoded`` may be malformed."""
    length = len(encoded)
    prefix = bytearray(b"\x0a")
    while True:
        byte, length = length & 0x7F, length >> 7
        prefix.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(prefix) + encoded


# -- properties ---------------------------------------------------------------------------------


def test_arbitrary_bytes_never_break_the_connection(
    live_stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    live, sender, recipient = live_stack()
    limit = live.stack.gateway.settings.max_message_bytes + FRAME_OVERHEAD
    ledger = Ledger()

    @FUZZ_SETTINGS
    @given(data=st.one_of(st.binary(max_size=48), st.binary(max_size=1500)))
    @example(data=b"")
    @example(data=b"\xff\xff\xff\xff")
    @example(data=b"\x0a\x00")  # an empty message: validation failure, still one ack
    @example(data=b"\x12\x00")  # a ping inside the fuzz frame: two pongs
    @example(data=b"\x82\x01\x00")  # an empty delivery_ack (field 16): no answer
    @example(data=b"\xa8\x1f\x01")  # only an unknown field: ignored
    def prop(data: bytes) -> None:
        expect_reply(live, sender, data, limit, ledger)

    prop()
    check_recipient(live, sender, recipient, ledger)
    assert live.frames_rejected("invalid") == ledger.invalid
    assert ledger.invalid > 0
    live.assert_healthy()
    no_errors_logged(caplog)


def test_mutated_frames_never_crash_or_spoof_the_sender(
    live_stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    live, sender, recipient = live_stack()
    limit = live.stack.gateway.settings.max_message_bytes + FRAME_OVERHEAD
    ledger = Ledger()

    # Most mutants do not parse; more examples put enough parsable ones through the pipeline.
    @settings(FUZZ_SETTINGS, max_examples=300)
    @given(message=valid_messages, ops=mutations, inner=st.booleans())
    def prop(message: msg_pb.MessageRequest, ops: list[tuple[str, int, int]], inner: bool) -> None:
        if inner:
            # Mutate the MessageRequest and re-wrap it: the frame stays well-formed around
            # a damaged message, which reaches the pipeline far more often.
            data = wrap_message(mutate(message.SerializeToString(), ops))
        else:
            data = mutate(msg_pb.ClientFrame(message=message).SerializeToString(), ops)
        expect_reply(live, sender, data, limit, ledger)

    prop()
    check_recipient(live, sender, recipient, ledger)
    assert live.frames_rejected("invalid") == ledger.invalid
    live.assert_healthy()
    no_errors_logged(caplog)


def sized_message_frame(size: int, msg_id: str, fill: int) -> bytes:
    """A ClientFrame{message to the recipient} of exactly ``size`` bytes."""
    body_len = size
    for _ in range(5):
        message = msg_pb.MessageRequest(
            msg_id=msg_id, to_user_id=RECIPIENT[0], msg_body=bytes([fill]) * body_len
        )
        data = msg_pb.ClientFrame(message=message).SerializeToString()
        if len(data) == size:
            return data
        body_len -= len(data) - size
    raise AssertionError(f"cannot build a frame of {size} bytes")


def test_frames_over_the_limit_get_4401_and_deliver_nothing(
    live_stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    max_message_bytes = 1000
    live, sender, recipient = live_stack(max_message_bytes=max_message_bytes)
    limit = max_message_bytes + FRAME_OVERHEAD
    ledger = Ledger()
    counter = iter(range(1_000_000))

    # Up to twice the limit: beyond it the gateway closes the connection (1009), see
    # test_frames_beyond_twice_the_limit_close_the_connection.
    largest = 2 * limit

    @settings(FUZZ_SETTINGS, max_examples=40)
    @given(size=st.integers(min_value=limit + 1, max_value=largest), fill=st.integers(0, 255))
    @example(size=limit + 1, fill=0x61)
    @example(size=largest, fill=0)
    def prop(size: int, fill: int) -> None:
        data = sized_message_frame(size, f"big-{next(counter)}", fill)
        expect_reply(live, sender, data, limit, ledger)

    prop()
    assert ledger.too_large > 0
    assert live.frames_rejected("frame_too_large") == ledger.too_large
    # At the limit itself the frame is read; its body is over MAX_MESSAGE_BYTES.
    at_limit = sized_message_frame(limit, "at-limit", 0x62)
    frames = live.run(sender.exchange(at_limit, pongs=1, ack=True))
    acks = [f.ack for f in frames if f.WhichOneof("payload") == "ack"]
    assert [(a.msg_id, a.status, a.reason) for a in acks] == [
        ("at-limit", msg_pb.FAILED, "msg_body_too_large")
    ]
    check_recipient(live, sender, recipient, ledger)
    assert ledger.to_recipient == {}
    live.assert_healthy()
    no_errors_logged(caplog)


async def test_frames_beyond_twice_the_limit_close_the_connection() -> None:
    """Up to 2 x the frame limit: error 4401, connection open. Beyond: 1009, by design.

    aiohttp buffers a whole message before the gateway sees it, so the gateway caps what
    it is willing to buffer instead of following protocol.md 2.3 for any size.
    """
    max_message_bytes = 1000
    limit = max_message_bytes + FRAME_OVERHEAD
    stack = await ScriptedStack.start(max_message_bytes=max_message_bytes)
    try:
        ws = await stack.raw_ws(*SENDER)
        await ws.send_bytes(sized_message_frame(2 * limit, "huge", 0))
        await ws.send_bytes(PING)
        replies = []
        for _ in range(2):
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)
            replies.append(msg_pb.ServerFrame.FromString(msg.data))
        assert replies[0].error.code == 4401
        assert replies[1].WhichOneof("payload") == "heartbeat_pong"
        await ws.send_bytes(sized_message_frame(2 * limit + 1, "huger", 0))
        closing = await ws.receive(timeout=5)
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert closing.data == 1009
    finally:
        await stack.stop()
