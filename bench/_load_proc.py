"""One load-generator process of ``bench.throughput`` (uvloop).

    python -m bench._load_proc '{"port": 8080, "pairs": [0, 2, 4], ...}'

For each pair index ``i`` it opens receiver ``r<i>`` then sender ``s<i>`` (token = user
id, device ``d0``) and waits for each one's first frame (ConnectAck code 1000 from the
gateway). It then answers ``@@ {"connected": n}`` and waits for ``{"cmd": "go"}``.

On ``go`` every sender sends ``window`` messages and then one more per ack, until it
has sent ``per_sender``. Messages are pre-built: a ClientFrame with a 16-hex msg_id
(the sequence number) and a ``body``-byte msg_body that starts with
``BODY_MAGIC | send time (monotonic ns) | sequence``; per send only those bytes are
patched into a copy of the template. Receivers find the stamp in the delivery without
parsing it and record send->delivery latency and order; senders parse the ack
(protobuf) and record ack latency.

Modes: ``gateway`` (the above), ``echo`` (the server returns the frame to the sender:
each echo counts as ack and as delivery) and ``relay`` (``bench._echo_proc`` relay: the
ack is the 24-byte stamp, the delivery the whole frame).

Clients: ``raw`` (``bench._wsclient``, the default) or ``aiohttp`` (ClientSession
``ws_connect``, one task per connection, frames still pre-built) to cross-check.

The answer to ``go`` has counts, the measured window (absolute monotonic ns, comparable
across processes) and the paths of the latency arrays (int64 ns, native order).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from array import array
from collections.abc import Callable
from typing import Any

import aiohttp

from bench._common import (
    BODY_MAGIC,
    BODY_STAMP_LEN,
    child_arg,
    common_handlers,
    control_loop,
    raise_nofile,
    reply,
    run,
)
from bench._wsclient import WsClient, client_header, connect
from mics.protocol.pb import mics_message_pb2 as msg_pb

TENANT = "bench"
_STAMP = struct.Struct("<qq")
_ID_PLACEHOLDER = b"QQQQQQQQQQQQQQQQ"


def build_template(to_user: str, body_len: int, raw: bool) -> tuple[bytes, int, int]:
    """(frame, msg_id offset, stamp offset): a ClientFrame, with a WebSocket header if raw."""
    body = BODY_MAGIC + b"\0" * 16 + b"x" * max(0, body_len - BODY_STAMP_LEN)
    frame = msg_pb.ClientFrame(
        message=msg_pb.MessageRequest(
            msg_id=_ID_PLACEHOLDER.decode(),
            msg_type=msg_pb.SINGLE_CHAT,
            to_user_id=to_user,
            msg_body=body,
        )
    ).SerializeToString()
    if raw:
        frame = client_header(len(frame)) + frame
    return frame, frame.index(_ID_PLACEHOLDER), frame.index(BODY_MAGIC) + len(BODY_MAGIC)


class Stats:
    def __init__(self, expected_acks: int, expected_deliveries: int) -> None:
        self.ack_lat = array("q")
        self.del_lat = array("q")
        self.acked = 0
        self.failed = 0
        self.delivered = 0
        self.out_of_order = 0
        self.unexpected = 0
        self.expected_acks = expected_acks
        self.expected_deliveries = expected_deliveries
        self.first_send_ns = 0
        self.last_recv_ns = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def check_done(self, now: int) -> None:
        self.last_recv_ns = now
        if (
            self.acked >= self.expected_acks
            and self.delivered >= self.expected_deliveries
            and not self.done.done()
        ):
            self.done.set_result(None)


class Sender:
    def __init__(
        self,
        pair: int,
        mode: str,
        raw: bool,
        per_sender: int,
        window: int,
        body: int,
        stats: Stats,
        send: Callable[[bytes], None],
    ) -> None:
        self.template, self.id_off, self.stamp_off = build_template(f"r{pair}", body, raw)
        self.mode = mode
        self.total = per_sender
        self.window = window
        self.next = 0
        self.sent_ts = array("q", bytes(8 * per_sender))
        self.stats = stats
        self.send = send

    def start(self) -> None:
        for _ in range(self.window):
            self.send_next()

    def send_next(self) -> None:
        seq = self.next
        if seq >= self.total:
            return
        self.next = seq + 1
        buf = bytearray(self.template)
        buf[self.id_off : self.id_off + 16] = b"%016x" % seq
        now = time.monotonic_ns()
        _STAMP.pack_into(buf, self.stamp_off, now, seq)
        self.sent_ts[seq] = now
        if not self.stats.first_send_ns:
            self.stats.first_send_ns = now
        self.send(bytes(buf))

    def on_frame(self, payload: bytes) -> None:
        now = time.monotonic_ns()
        stats = self.stats
        if self.mode == "gateway":
            frame = msg_pb.ServerFrame.FromString(payload)
            if frame.WhichOneof("payload") != "ack":
                stats.unexpected += 1
                return
            ack = frame.ack
            seq = int(ack.msg_id, 16)
            if ack.status != msg_pb.SENT:
                stats.failed += 1
        else:
            i = payload.find(BODY_MAGIC)
            if i < 0:
                stats.unexpected += 1
                return
            _, seq = _STAMP.unpack_from(payload, i + len(BODY_MAGIC))
            if self.mode == "echo":
                stats.delivered += 1
        stats.ack_lat.append(now - self.sent_ts[seq])
        stats.acked += 1
        self.send_next()
        stats.check_done(now)


class Receiver:
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.expected = 0

    def on_frame(self, payload: bytes) -> None:
        now = time.monotonic_ns()
        stats = self.stats
        i = payload.find(BODY_MAGIC)
        if i < 0:
            stats.unexpected += 1
            return
        sent, seq = _STAMP.unpack_from(payload, i + len(BODY_MAGIC))
        stats.del_lat.append(now - sent)
        if seq != self.expected:
            stats.out_of_order += 1
        self.expected = seq + 1
        stats.delivered += 1
        stats.check_done(now)


def check_first(mode: str, payload: bytes) -> None:
    if mode == "gateway":
        frame = msg_pb.ServerFrame.FromString(payload)
        if frame.WhichOneof("payload") != "connect_ack" or frame.connect_ack.code != 1000:
            raise RuntimeError(f"expected ConnectAck 1000, got {frame}")


class RawConn:
    def __init__(self, proto: WsClient) -> None:
        self.proto = proto
        self.send = proto.send

    def attach(self, handler: Callable[[bytes], None]) -> None:
        self.proto.on_frame = handler

    async def close(self) -> None:
        self.proto.close()


class AiohttpConn:
    """aiohttp client connection driven by one task; handlers stay synchronous."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._out: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    def send(self, frame: bytes) -> None:
        self._out.append(frame)

    async def flush(self) -> None:
        out, self._out = self._out, []
        for frame in out:
            await self.ws.send_bytes(frame)

    def attach(self, handler: Callable[[bytes], None]) -> None:
        async def pump() -> None:
            await self.flush()
            async for msg in self.ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    handler(msg.data)
                    if self._out:
                        await self.flush()

        self._task = asyncio.get_running_loop().create_task(pump())

    def kick(self) -> None:
        if self._out and self._task is not None:
            asyncio.get_running_loop().create_task(self.flush())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.ws.close()


class Load:
    def __init__(self, arg: dict[str, Any]) -> None:
        self.host = arg.get("host", "127.0.0.1")
        self.port = int(arg["port"])
        self.pairs: list[int] = list(arg["pairs"])
        self.mode: str = arg.get("mode", "gateway")
        self.client: str = arg.get("client", "raw")
        self.per_sender = int(arg["per_sender"])
        self.window = int(arg["window"])
        self.body = int(arg.get("body", 100))
        self.time_limit = float(arg.get("time_limit", 60))
        self.out_dir: str = arg["out_dir"]
        self.name: str = arg.get("name", "load")
        self.senders: list[tuple[Any, Sender]] = []
        self.receivers: list[tuple[Any, Receiver]] = []
        self.session: aiohttp.ClientSession | None = None
        n = len(self.pairs) * self.per_sender
        self.stats: Stats | None = None
        # Every message is acked once and delivered once (in echo mode the echo is both).
        self._expected = (n, n)

    def path(self, user: str) -> str:
        return f"/ws?tenantId={TENANT}&token={user}&deviceId=d0"

    async def _open(self, user: str) -> Any:
        if self.client == "raw":
            proto = await connect(self.host, self.port, self.path(user))
            first = await asyncio.wait_for(proto.first_frame, 30)
            check_first(self.mode, first)
            return RawConn(proto)
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        ws = await self.session.ws_connect(
            f"ws://{self.host}:{self.port}{self.path(user)}", compress=0, max_msg_size=0
        )
        hello = await ws.receive(timeout=30)
        check_first(self.mode, hello.data)
        return AiohttpConn(ws)

    async def connect(self) -> int:
        self.stats = Stats(*self._expected)
        raw = self.client == "raw"
        for pair in self.pairs:
            conn = await self._open(f"r{pair}")
            receiver = Receiver(self.stats)
            conn.attach(receiver.on_frame)
            self.receivers.append((conn, receiver))
        for pair in self.pairs:
            conn = await self._open(f"s{pair}")
            sender = Sender(
                pair,
                self.mode,
                raw,
                self.per_sender,
                self.window,
                self.body,
                self.stats,
                conn.send,
            )
            self.senders.append((conn, sender))
        return len(self.senders) + len(self.receivers)

    async def go(self, _: dict[str, Any]) -> dict[str, Any]:
        stats = self.stats
        assert stats is not None
        for conn, sender in self.senders:
            sender.start()
            conn.attach(sender.on_frame)
        completed = True
        try:
            await asyncio.wait_for(asyncio.shield(stats.done), self.time_limit)
        except TimeoutError:
            completed = False
        ack_path = os.path.join(self.out_dir, f"{self.name}-ack.bin")
        del_path = os.path.join(self.out_dir, f"{self.name}-delivery.bin")
        _write(ack_path, stats.ack_lat)
        _write(del_path, stats.ack_lat if self.mode == "echo" else stats.del_lat)
        return {
            "completed": completed,
            "sent": sum(s.next for _, s in self.senders),
            "acked": stats.acked,
            "failed": stats.failed,
            "delivered": stats.delivered,
            "out_of_order": stats.out_of_order,
            "unexpected": stats.unexpected,
            "first_send_ns": stats.first_send_ns,
            "last_recv_ns": stats.last_recv_ns,
            "ack_file": ack_path,
            "delivery_file": del_path,
        }

    async def close(self) -> None:
        for conn, _ in self.senders + self.receivers:
            with contextlib.suppress(Exception):
                await conn.close()
        if self.session is not None:
            await self.session.close()


def _write(path: str, values: array[int]) -> None:
    with open(path, "wb") as fh:
        values.tofile(fh)


async def main() -> None:
    raise_nofile()
    load = Load(child_arg())
    try:
        connected = await load.connect()
        reply({"connected": connected, "pid": os.getpid()})
        handlers = common_handlers()
        handlers["go"] = load.go
        await control_loop(handlers)
    finally:
        await load.close()


if __name__ == "__main__":
    run(main)
