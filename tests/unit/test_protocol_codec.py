"""Golden frame encodings (protocol.md 5.4 and 9.8) and the frame codec helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mics.protocol import codec
from mics.protocol.codec import (
    ERROR_FRAME_TOO_LARGE,
    ERROR_INVALID_PROTOBUF,
    FRAME_OVERHEAD_BYTES,
    MAX_CLOSE_REASON_BYTES,
    FrameError,
    ack_frame,
    decode_client_frame,
    delivery_frame,
    error_frame,
    frame_limit,
    offline_sync_frame,
    pong_frame,
    truncate_close_reason,
    ws_binary_header,
)
from mics.protocol.pb import mics_message_pb2 as msg_pb


def _get(message: Any, path: str) -> Any:
    value = message
    for part in path.split("."):
        value = getattr(value, part)
    if isinstance(value, str | bytes | int | bool):
        return value
    return list(value)  # repeated fields


def _message_t1_u1_d1_m1() -> msg_pb.MessageRequest:
    return msg_pb.MessageRequest(
        tenant_id="t1",
        user_id="u1",
        device_id="d1",
        msg_id="m1",
        msg_type=msg_pb.SINGLE_CHAT,
        to_user_id="u2",
        msg_body=b"hi",
        timestamp_ms=1,
    )


DELIVERED_MESSAGE_FIELDS = {
    "delivery.message.tenant_id": "t1",
    "delivery.message.user_id": "u1",
    "delivery.message.device_id": "d1",
    "delivery.message.msg_id": "m1",
    "delivery.message.msg_type": msg_pb.SINGLE_CHAT,
    "delivery.message.to_user_id": "u2",
    "delivery.message.group_id": "",
    "delivery.message.msg_body": b"hi",
    "delivery.message.timestamp_ms": 1,
}


@dataclass(frozen=True)
class Golden:
    id: str
    cls: type[Any]
    build: Callable[[], Any]
    hex: str
    payload: str  # the oneof member that must be set
    fields: dict[str, Any]


GOLDEN = [
    # protocol.md 5.4
    Golden(
        id="5.4-client-heartbeat-ping",
        cls=msg_pb.ClientFrame,
        build=lambda: msg_pb.ClientFrame(heartbeat_ping=msg_pb.HeartbeatPing(timestamp_ms=123)),
        hex="1202087b",
        payload="heartbeat_ping",
        fields={"heartbeat_ping.timestamp_ms": 123},
    ),
    Golden(
        id="5.4-server-heartbeat-pong",
        cls=msg_pb.ServerFrame,
        build=lambda: msg_pb.ServerFrame(heartbeat_pong=msg_pb.HeartbeatPong(timestamp_ms=123)),
        hex="2a02087b",
        payload="heartbeat_pong",
        fields={"heartbeat_pong.timestamp_ms": 123},
    ),
    Golden(
        id="5.4-server-connect-ack",
        cls=msg_pb.ServerFrame,
        build=lambda: msg_pb.ServerFrame(
            connect_ack=msg_pb.ConnectAck(
                code=1000,
                tenant_id="t1",
                user_id="u1",
                device_id="d1",
                node_id="n1",
                trace_id="tr1",
            )
        ),
        hex="0a1808e807120274311a027531220264312a026e313203747231",
        payload="connect_ack",
        fields={
            "connect_ack.code": 1000,
            "connect_ack.tenant_id": "t1",
            "connect_ack.user_id": "u1",
            "connect_ack.device_id": "d1",
            "connect_ack.node_id": "n1",
            "connect_ack.trace_id": "tr1",
            "connect_ack.protocol_version": "",
        },
    ),
    Golden(
        id="5.4-server-ack-failed",
        cls=msg_pb.ServerFrame,
        build=lambda: msg_pb.ServerFrame(
            ack=msg_pb.MessageAck(
                msg_id="m1",
                status=msg_pb.FAILED,
                timestamp_ms=5,
                reason="missing to_user_id",
            )
        ),
        hex="1a1c0a026d311001180522126d697373696e6720746f5f757365725f6964",
        payload="ack",
        fields={
            "ack.msg_id": "m1",
            "ack.status": msg_pb.FAILED,
            "ack.timestamp_ms": 5,
            "ack.reason": "missing to_user_id",
            "ack.partial_delivery": False,
            "ack.offline_notified_users": 0,
            "ack.offline_buffered_users": 0,
            "ack.offline_skipped_users": 0,
        },
    ),
    Golden(
        id="5.4-server-ack-sent-group",
        cls=msg_pb.ServerFrame,
        build=lambda: msg_pb.ServerFrame(
            ack=msg_pb.MessageAck(
                msg_id="g1",
                status=msg_pb.SENT,
                timestamp_ms=5,
                partial_delivery=True,
                offline_buffered_users=2,
                offline_skipped_users=3,
            )
        ),
        hex="1a0c0a0267311805280138024003",
        payload="ack",
        fields={
            "ack.msg_id": "g1",
            "ack.status": msg_pb.SENT,
            "ack.timestamp_ms": 5,
            "ack.reason": "",
            "ack.partial_delivery": True,
            "ack.offline_notified_users": 0,
            "ack.offline_buffered_users": 2,
            "ack.offline_skipped_users": 3,
        },
    ),
    Golden(
        id="5.4-server-error-4400",
        cls=msg_pb.ServerFrame,
        build=lambda: msg_pb.ServerFrame(
            error=msg_pb.ServerError(code=4400, message="invalid protobuf")
        ),
        hex="221508b0221210696e76616c69642070726f746f627566",
        payload="error",
        fields={"error.code": 4400, "error.message": "invalid protobuf"},
    ),
    Golden(
        id="5.4-server-delivery",
        cls=msg_pb.ServerFrame,
        build=lambda: msg_pb.ServerFrame(
            delivery=msg_pb.MessageDelivery(message=_message_t1_u1_d1_m1())
        ),
        hex="121c0a1a0a027431120275311a02643122026d3132027532420268694801",
        payload="delivery",
        fields={**DELIVERED_MESSAGE_FIELDS, "delivery.offline_cursor": ""},
    ),
    Golden(
        id="5.4-client-message",
        cls=msg_pb.ClientFrame,
        build=lambda: msg_pb.ClientFrame(
            message=msg_pb.MessageRequest(msg_id="m1", to_user_id="u2", msg_body=b"hi")
        ),
        hex="0a0c22026d313202753242026869",
        payload="message",
        fields={
            "message.tenant_id": "",
            "message.user_id": "",
            "message.device_id": "",
            "message.msg_id": "m1",
            "message.msg_type": msg_pb.SINGLE_CHAT,
            "message.to_user_id": "u2",
            "message.group_id": "",
            "message.msg_body": b"hi",
            "message.timestamp_ms": 0,
        },
    ),
    # protocol.md 9.8
    Golden(
        id="9.8-client-delivery-ack",
        cls=msg_pb.ClientFrame,
        build=lambda: msg_pb.ClientFrame(
            delivery_ack=msg_pb.DeliveryAck(msg_ids=["m1", "m2"], offline_cursor="c1")
        ),
        hex="82010c0a026d310a026d3212026331",
        payload="delivery_ack",
        fields={"delivery_ack.msg_ids": ["m1", "m2"], "delivery_ack.offline_cursor": "c1"},
    ),
    Golden(
        id="9.8-server-offline-sync",
        cls=msg_pb.ServerFrame,
        build=lambda: msg_pb.ServerFrame(
            offline_sync=msg_pb.OfflineSync(delivered=3, complete=True)
        ),
        hex="82010408031001",
        payload="offline_sync",
        fields={
            "offline_sync.delivered": 3,
            "offline_sync.complete": True,
            "offline_sync.reason": "",
        },
    ),
    Golden(
        id="9.8-server-connect-ack-v1.1",
        cls=msg_pb.ServerFrame,
        build=lambda: msg_pb.ServerFrame(
            connect_ack=msg_pb.ConnectAck(
                code=1000,
                tenant_id="t1",
                user_id="u1",
                device_id="d1",
                node_id="n1",
                trace_id="tr1",
                protocol_version="1.1",
            )
        ),
        hex="0a1e08e807120274311a027531220264312a026e313203747231820103312e31",
        payload="connect_ack",
        fields={
            "connect_ack.code": 1000,
            "connect_ack.tenant_id": "t1",
            "connect_ack.user_id": "u1",
            "connect_ack.device_id": "d1",
            "connect_ack.node_id": "n1",
            "connect_ack.trace_id": "tr1",
            "connect_ack.protocol_version": "1.1",
        },
    ),
    Golden(
        id="9.8-server-delivery-offline-cursor",
        cls=msg_pb.ServerFrame,
        build=lambda: msg_pb.ServerFrame(
            delivery=msg_pb.MessageDelivery(message=_message_t1_u1_d1_m1(), offline_cursor="c1")
        ),
        hex="12210a1a0a027431120275311a02643122026d31320275324202686948018201026331",
        payload="delivery",
        fields={**DELIVERED_MESSAGE_FIELDS, "delivery.offline_cursor": "c1"},
    ),
]

golden = pytest.mark.parametrize("vec", GOLDEN, ids=[g.id for g in GOLDEN])


# --- golden encodings ------------------------------------------------------------------


@golden
def test_golden_encoding(vec: Golden) -> None:
    frame = vec.build()
    assert frame.SerializeToString().hex() == vec.hex
    assert frame.SerializeToString(deterministic=True).hex() == vec.hex


@golden
def test_golden_parses_back(vec: Golden) -> None:
    parsed = vec.cls.FromString(bytes.fromhex(vec.hex))
    assert parsed.WhichOneof("payload") == vec.payload
    for path, expected in vec.fields.items():
        assert _get(parsed, path) == expected, path
    assert parsed == vec.build()
    assert parsed.SerializeToString().hex() == vec.hex


@pytest.mark.parametrize(
    "vec", [g for g in GOLDEN if g.cls is msg_pb.ClientFrame], ids=lambda g: g.id
)
def test_golden_client_frames_decode(vec: Golden) -> None:
    data = bytes.fromhex(vec.hex)
    for limit in (0, len(data), frame_limit(1_048_576)):
        frame = decode_client_frame(data, limit)
        assert frame.WhichOneof("payload") == vec.payload
        assert frame == vec.build()


def test_v1_frames_have_no_v1_1_bytes() -> None:
    """A v1 connect_ack / delivery is a strict prefix of its v1.1 extension (fields 16+)."""
    by_id = {g.id: g for g in GOLDEN}
    v1 = bytes.fromhex(by_id["5.4-server-connect-ack"].hex)[2:]
    v11 = bytes.fromhex(by_id["9.8-server-connect-ack-v1.1"].hex)[2:]
    assert v11.startswith(v1)
    assert v11[len(v1) :].hex() == "820103312e31"


# --- server frame helpers --------------------------------------------------------------


def test_error_frame_invalid_protobuf_matches_spec() -> None:
    assert error_frame(4400, "invalid protobuf").hex() == (
        "221508b0221210696e76616c69642070726f746f627566"
    )


def test_error_frame_too_large_round_trips() -> None:
    frame = msg_pb.ServerFrame.FromString(error_frame(ERROR_FRAME_TOO_LARGE, "frame too large"))
    assert frame.WhichOneof("payload") == "error"
    assert (frame.error.code, frame.error.message) == (4401, "frame too large")


def test_pong_frame_matches_spec() -> None:
    assert pong_frame(123).hex() == "2a02087b"


@pytest.mark.parametrize(
    ("ack", "expected_hex"),
    [
        pytest.param(
            msg_pb.MessageAck(
                msg_id="m1", status=msg_pb.FAILED, timestamp_ms=5, reason="missing to_user_id"
            ),
            "1a1c0a026d311001180522126d697373696e6720746f5f757365725f6964",
            id="failed",
        ),
        pytest.param(
            msg_pb.MessageAck(
                msg_id="g1",
                status=msg_pb.SENT,
                timestamp_ms=5,
                partial_delivery=True,
                offline_buffered_users=2,
                offline_skipped_users=3,
            ),
            "1a0c0a0267311805280138024003",
            id="sent-group",
        ),
    ],
)
def test_ack_frame_matches_spec(ack: msg_pb.MessageAck, expected_hex: str) -> None:
    assert ack_frame(ack).hex() == expected_hex


def test_delivery_frame_matches_spec() -> None:
    assert delivery_frame(_message_t1_u1_d1_m1()).hex() == (
        "121c0a1a0a027431120275311a02643122026d3132027532420268694801"
    )


def test_delivery_frame_with_offline_cursor_matches_spec() -> None:
    assert delivery_frame(_message_t1_u1_d1_m1(), "c1").hex() == (
        "12210a1a0a027431120275311a02643122026d31320275324202686948018201026331"
    )


def test_offline_sync_frame_matches_spec() -> None:
    assert offline_sync_frame(3, True, "").hex() == "82010408031001"


def test_offline_sync_frame_incomplete_round_trips() -> None:
    frame = msg_pb.ServerFrame.FromString(offline_sync_frame(7, False, "limit reached"))
    assert frame.WhichOneof("payload") == "offline_sync"
    sync = frame.offline_sync
    assert (sync.delivered, sync.complete, sync.reason) == (7, False, "limit reached")


# --- decode_client_frame ---------------------------------------------------------------


def test_frame_limit() -> None:
    assert FRAME_OVERHEAD_BYTES == 65_536
    assert frame_limit(1_048_576) == 1_048_576 + 65_536
    assert frame_limit(1) == 65_537
    assert frame_limit(0) == 0
    assert frame_limit(-5) == 0


def _client_frame_of_size(size: int) -> bytes:
    """A valid ClientFrame{message{msg_body}} of exactly ``size`` bytes."""
    body_len = size
    while True:
        data = msg_pb.ClientFrame(
            message=msg_pb.MessageRequest(msg_body=b"x" * body_len)
        ).SerializeToString()
        if len(data) == size:
            return data
        body_len -= len(data) - size


@pytest.mark.parametrize("max_message_bytes", [1, 1000, 1_048_576], ids=lambda n: f"max={n}")
def test_decode_client_frame_limit_boundary(max_message_bytes: int) -> None:
    limit = frame_limit(max_message_bytes)
    at_limit = _client_frame_of_size(limit)
    frame = decode_client_frame(at_limit, limit)
    assert frame.WhichOneof("payload") == "message"
    assert len(frame.message.msg_body) > max_message_bytes

    over = _client_frame_of_size(limit + 1)
    with pytest.raises(FrameError) as info:
        decode_client_frame(over, limit)
    assert info.value.code == ERROR_FRAME_TOO_LARGE == 4401
    assert info.value.text == "frame too large"


def test_decode_client_frame_size_checked_before_parsing() -> None:
    limit = frame_limit(10)
    with pytest.raises(FrameError) as info:
        decode_client_frame(b"\xff" * (limit + 1), limit)
    assert info.value.code == 4401


def test_decode_client_frame_unlimited() -> None:
    data = _client_frame_of_size(frame_limit(1_048_576) * 2)
    frame = decode_client_frame(data, frame_limit(0))
    assert len(frame.message.msg_body) > 2 * 1_048_576


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xff\xff\xff", id="ff-ff-ff"),
        pytest.param(b"\x80", id="lone-varint-continuation"),
        pytest.param(b"\x0f", id="end-group-tag"),
        pytest.param(b"\x0a\xff\xff\xff\xff\x0f", id="huge-length"),
        pytest.param(b"\x0a\x04\x22\x02\xff\xfe", id="bad-utf8-msg-id"),
        pytest.param(b"\x12\x02\x08", id="ping-truncated-varint"),
        pytest.param(b"not a protobuf frame", id="ascii-text"),
    ],
)
def test_decode_client_frame_garbage_is_4400(data: bytes) -> None:
    for limit in (0, frame_limit(1_048_576)):
        with pytest.raises(FrameError) as info:
            decode_client_frame(data, limit)
        assert info.value.code == ERROR_INVALID_PROTOBUF == 4400
        assert info.value.text == "invalid protobuf"


@pytest.mark.parametrize(
    "vec", [g for g in GOLDEN if g.cls is msg_pb.ClientFrame], ids=lambda g: g.id
)
def test_decode_client_frame_truncated_is_4400(vec: Golden) -> None:
    data = bytes.fromhex(vec.hex)
    for cut in range(1, len(data)):
        with pytest.raises(FrameError) as info:
            decode_client_frame(data[:cut], 0)
        assert info.value.code == 4400, cut


def test_decode_client_frame_empty_is_an_empty_frame() -> None:
    frame = decode_client_frame(b"", frame_limit(1_048_576))
    assert frame.WhichOneof("payload") is None


def test_decode_client_frame_ignores_unknown_fields() -> None:
    # ping plus unknown field 99 (varint 1): receivers MUST ignore unknown fields.
    frame = decode_client_frame(bytes.fromhex("1202087b" + "980601"), 0)
    assert frame.WhichOneof("payload") == "heartbeat_ping"
    assert frame.heartbeat_ping.timestamp_ms == 123


def test_frame_error_is_an_exception() -> None:
    err = FrameError(4400, "invalid protobuf")
    assert isinstance(err, Exception)
    with pytest.raises(FrameError):
        raise err


# --- close reasons ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        pytest.param("", "", id="empty"),
        pytest.param("heartbeat timeout", "heartbeat timeout", id="short"),
        pytest.param("a" * 123, "a" * 123, id="ascii-123"),
        pytest.param("a" * 124, "a" * 123, id="ascii-124"),
        pytest.param("a" * 122 + "é", "a" * 122, id="2-byte-char-straddles"),
        pytest.param("a" * 121 + "é", "a" * 121 + "é", id="2-byte-char-fits"),
        pytest.param("a" * 121 + "€x", "a" * 121, id="3-byte-char-straddles"),
        pytest.param("a" * 120 + "😀", "a" * 120, id="4-byte-char-straddles"),
        pytest.param("a" * 119 + "😀x", "a" * 119 + "😀", id="4-byte-char-fits"),
        pytest.param("é" * 100, "é" * 61, id="all-2-byte"),
    ],
)
def test_truncate_close_reason_examples(reason: str, expected: str) -> None:
    assert MAX_CLOSE_REASON_BYTES == 123
    assert truncate_close_reason(reason) == expected


# Close reasons are constants or protobuf strings (valid UTF-8), so lone surrogates,
# which have no UTF-8 encoding, are outside the domain.
REASON_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]))
MULTIBYTE_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x80, exclude_categories=["Cs"]), min_size=62
)


@given(REASON_TEXT)
def test_truncate_close_reason_property(reason: str) -> None:
    result = truncate_close_reason(reason)
    encoded = result.encode("utf-8")  # always valid UTF-8: no split character
    assert len(encoded) <= 123
    assert reason.startswith(result)
    if len(reason.encode("utf-8")) <= 123:
        assert result == reason
    else:
        # Maximal: the next character would not have fit.
        next_char = reason[len(result)]
        assert len(encoded) + len(next_char.encode("utf-8")) > 123
        assert len(encoded) >= 123 - 3


@given(MULTIBYTE_TEXT)
def test_truncate_close_reason_property_multibyte(reason: str) -> None:
    assert len(reason.encode("utf-8")) > 123  # 62 characters of at least 2 bytes each
    result = truncate_close_reason(reason)
    assert len(result.encode("utf-8")) >= 123 - 3
    assert len(result.encode("utf-8")) <= 123
    assert reason.startswith(result)


# --- WebSocket header ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected_hex"),
    [
        pytest.param(0, "8200", id="0"),
        pytest.param(1, "8201", id="1"),
        pytest.param(125, "827d", id="125-last-7-bit"),
        pytest.param(126, "827e007e", id="126-first-16-bit"),
        pytest.param(65535, "827effff", id="65535-last-16-bit"),
        pytest.param(65536, "827f0000000000010000", id="65536-first-64-bit"),
        pytest.param(1_114_112, "827f0000000000110000", id="default-frame-limit"),
    ],
)
def test_ws_binary_header(length: int, expected_hex: str) -> None:
    header = ws_binary_header(length)
    assert header.hex() == expected_hex
    # FIN set, RSV clear, opcode 2 (binary); MASK clear (server to client).
    assert header[0] == 0b1000_0010
    assert header[1] & 0x80 == 0


@given(
    body=st.binary(max_size=70_000),
    msg_id=st.text(max_size=200),
    cursor=st.text(max_size=300),
)
def test_hand_built_delivery_frame_equals_protobufs_encoding(
    body: bytes, msg_id: str, cursor: str
) -> None:
    message = msg_pb.MessageRequest(tenant_id="t1", user_id="u1", msg_id=msg_id, msg_body=body)
    expected = msg_pb.ServerFrame(
        delivery=msg_pb.MessageDelivery(message=message, offline_cursor=cursor)
    ).SerializeToString()
    assert codec.delivery_frame(message, cursor) == expected


@given(msg_id=st.text(max_size=100), status=st.sampled_from([0, 1]), reason=st.text(max_size=50))
def test_ack_server_frame_equals_protobufs_encoding(msg_id: str, status: int, reason: str) -> None:
    expected = msg_pb.ServerFrame(
        ack=msg_pb.MessageAck(msg_id=msg_id, status=status, timestamp_ms=5, reason=reason)  # type: ignore[arg-type]
    ).SerializeToString()
    frame = codec.ack_server_frame(msg_id, status, reason, 5)  # type: ignore[arg-type]
    assert frame.SerializeToString() == expected
