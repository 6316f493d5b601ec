"""Frame codec: bytes <-> ClientFrame / ServerFrame, plus helpers that build server frames.

Pure: no sockets, no clock (callers pass timestamps). The gateway hands this module the
payload of one binary WebSocket message and gets back a parsed frame or a FrameError
carrying the error code the protocol prescribes (section 2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from mics.protocol.pb import mics_message_pb2 as msg_pb

CONNECT_OK = 1000
CLOSE_AUTH_FAILED = 4001
CLOSE_INVALID_TENANT = 4002
CLOSE_HEARTBEAT_TIMEOUT = 4100
CLOSE_DRAINING = 4200
CLOSE_REPLACED = 4409  # v1.1 takeover (section 9.9)
CLOSE_RATE_LIMITED = 4429
ERROR_INVALID_PROTOBUF = 4400
ERROR_FRAME_TOO_LARGE = 4401

FRAME_OVERHEAD_BYTES = 65_536  # frame limit = MAX_MESSAGE_BYTES + 64 KiB
MAX_CLOSE_REASON_BYTES = 123


@dataclass(frozen=True, slots=True)
class FrameError(Exception):
    code: int
    text: str


def frame_limit(max_message_bytes: int) -> int:
    """Largest accepted client frame; 0 means unlimited."""
    return 0 if max_message_bytes <= 0 else max_message_bytes + FRAME_OVERHEAD_BYTES


def decode_client_frame(data: bytes, limit: int) -> msg_pb.ClientFrame:
    """Parse one client frame or raise FrameError (4401 too large, 4400 unparsable)."""
    if limit and len(data) > limit:
        raise FrameError(ERROR_FRAME_TOO_LARGE, "frame too large")
    frame = msg_pb.ClientFrame()
    try:
        frame.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise FrameError(ERROR_INVALID_PROTOBUF, "invalid protobuf") from exc
    return frame


def truncate_close_reason(reason: str) -> str:
    """Cut a close reason to 123 bytes of UTF-8 without splitting a character."""
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return raw[:MAX_CLOSE_REASON_BYTES].decode("utf-8", errors="ignore")


def error_frame(code: int, text: str) -> bytes:
    return msg_pb.ServerFrame(error=msg_pb.ServerError(code=code, message=text)).SerializeToString()


def pong_frame(now_ms: int) -> bytes:
    return msg_pb.ServerFrame(
        heartbeat_pong=msg_pb.HeartbeatPong(timestamp_ms=now_ms)
    ).SerializeToString()


def ack_frame(ack: msg_pb.MessageAck) -> bytes:
    return msg_pb.ServerFrame(ack=ack).SerializeToString()


def ack_server_frame(
    msg_id: str, status: msg_pb.AckStatus, reason: str, now_ms: int
) -> msg_pb.ServerFrame:
    """ServerFrame{ack{msg_id, status, timestamp_ms, reason}}, filled in place: no
    MessageAck copied into the frame on the hot path. Group acks add their counters to
    ``.ack`` before serializing."""
    frame = msg_pb.ServerFrame()
    ack = frame.ack
    ack.msg_id = msg_id
    ack.status = status
    ack.timestamp_ms = now_ms
    ack.reason = reason
    return frame


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Tags: ServerFrame.delivery (2, LEN), MessageDelivery.message (1, LEN),
# MessageDelivery.offline_cursor (16, LEN).
_TAG_DELIVERY = b"\x12"
_TAG_MESSAGE = b"\x0a"
_TAG_CURSOR = b"\x82\x01"


def delivery_frame(message: msg_pb.MessageRequest, offline_cursor: str = "") -> bytes:
    """ServerFrame{delivery{message, offline_cursor}}, byte-identical to protobuf's encoder.

    Built by hand around the serialized message: a delivery is written on the hot path
    of every message, and wrapping it in two more message objects to serialize them
    costs twice as much as the message itself.
    """
    return delivery_frame_from_bytes(message.SerializeToString(), offline_cursor)


def delivery_frame_from_bytes(serialized_message: bytes, offline_cursor: str = "") -> bytes:
    inner = _TAG_MESSAGE + _varint(len(serialized_message)) + serialized_message
    if offline_cursor:
        cursor = offline_cursor.encode("utf-8")
        inner += _TAG_CURSOR + _varint(len(cursor)) + cursor
    return _TAG_DELIVERY + _varint(len(inner)) + inner


def offline_sync_frame(delivered: int, complete: bool, reason: str) -> bytes:
    sync = msg_pb.OfflineSync(delivered=delivered, complete=complete, reason=reason)
    return msg_pb.ServerFrame(offline_sync=sync).SerializeToString()


def ws_binary_header(length: int) -> bytes:
    """RFC 6455 header of one unmasked, final, binary frame (server to client).

    The gateway writes whole frames straight to the transport so that several frames
    queued for one connection in one loop iteration leave in a single write.
    """
    if length < 126:
        return bytes((0x82, length))
    if length < 1 << 16:
        return bytes((0x82, 126)) + length.to_bytes(2, "big")
    return bytes((0x82, 127)) + length.to_bytes(8, "big")
