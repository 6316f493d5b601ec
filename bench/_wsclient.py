"""A minimal WebSocket client protocol for the load generator (RFC 6455, client side).

Why not aiohttp's client: per frame it costs an ``await``, a ``WSMessage`` and a
masking pass, and the load process must stay well below the server's cost per message
so that the server, not the load, is what saturates. Here:

- frames are sent pre-built (header, mask key and payload in one ``bytes``); the mask
  key is all zeros, which RFC 6455 allows (the key must be present, masking with it is
  the identity), so no per-frame masking work;
- received frames are parsed from one buffer per ``data_received`` call and handed to a
  synchronous callback; frames the callbacks send while one chunk is parsed leave in a
  single ``transport.write``;
- pings are answered, a close frame is answered and closes the transport.

Only what the benchmarks need: no fragmentation (neither the gateway nor aiohttp
fragment small frames), no extensions, no TLS.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ZERO_MASK = b"\x00\x00\x00\x00"

OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def client_header(length: int, opcode: int = OP_BINARY) -> bytes:
    """Header of one final, masked (zero key) client frame of ``length`` payload bytes."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, 0x80 | length)) + _ZERO_MASK
    if length < 1 << 16:
        return bytes((first, 0x80 | 126)) + struct.pack(">H", length) + _ZERO_MASK
    return bytes((first, 0x80 | 127)) + struct.pack(">Q", length) + _ZERO_MASK


def client_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    return client_header(len(payload), opcode) + payload


class WsClient(asyncio.Protocol):
    """One client connection. ``on_frame`` gets each binary message's payload."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self._request_line = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        self._key = base64.b64encode(os.urandom(16)).decode()
        self._handshaking = True
        self._buf = bytearray()
        self._out: list[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.upgraded: asyncio.Future[None] = loop.create_future()
        self.first_frame: asyncio.Future[bytes] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.on_frame: Callable[[bytes], None] = self._first

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but has its methods.
        tcp: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = tcp
        tcp.write(
            (
                self._request_line + "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {self._key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode("ascii")
        )

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.upgraded, self.first_frame):
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if self._handshaking and not self._handshake(buf):
            return
        out: list[bytes] = []
        self._out = out
        try:
            self._parse(buf)
        finally:
            self._out = None
            if out and self.transport is not None:
                self.transport.write(b"".join(out))

    # -- sending ------------------------------------------------------------------------

    def send(self, frame: bytes | bytearray) -> None:
        """Send one pre-built frame (see ``client_frame``); batched while parsing."""
        out = self._out
        if out is not None:
            out.append(frame)  # type: ignore[arg-type]
        elif self.transport is not None:
            self.transport.write(frame)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(struct.pack(">H", 1000), OP_CLOSE))
            self.transport.close()

    # -- receiving ----------------------------------------------------------------------

    def _handshake(self, buf: bytearray) -> bool:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(buf[:end]).decode("latin-1")
        del buf[: end + 4]
        self._handshaking = False
        status = head.split("\r\n", 1)[0]
        expected = base64.b64encode(hashlib.sha1(self._key.encode() + _GUID).digest()).decode()
        if " 101 " not in status + " " or expected not in head:
            err = ConnectionError(f"upgrade refused: {status}")
            self.upgraded.set_exception(err)
            if not self.first_frame.done():
                self.first_frame.set_exception(err)
            assert self.transport is not None
            self.transport.close()
            return False
        self.upgraded.set_result(None)
        return True

    def _parse(self, buf: bytearray) -> None:
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            masked = b1 & 0x80
            if masked:
                head += 4
            end = pos + head + length
            if end > size:
                break
            payload = bytes(buf[pos + head : end])
            if masked:  # servers must not mask; tolerate it anyway
                key = buf[pos + head - 4 : pos + head]
                payload = bytes(c ^ key[i & 3] for i, c in enumerate(payload))
            pos = end
            opcode = b0 & 0x0F
            if opcode == OP_BINARY:
                self.on_frame(payload)
            elif opcode == OP_PING:
                self.send(client_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self.send(client_frame(payload[:2], OP_CLOSE))
                if self.transport is not None:
                    self.transport.close()
                break
        if pos:
            del buf[:pos]

    def _first(self, payload: bytes) -> None:
        if not self.first_frame.done():
            self.first_frame.set_result(payload)


async def connect(
    host: str, port: int, path: str, *, local_addr: tuple[str, int] | None = None
) -> WsClient:
    """Open a connection and complete the upgrade; the first frame is awaited separately."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: WsClient(host, port, path), host, port, local_addr=local_addr
    )
    await proto.upgraded
    return proto
