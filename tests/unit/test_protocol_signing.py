"""Signature test vectors of protocol.md sections 5.3 and 9.8, and verifier strictness.

Every row of the spec's signature tables is pinned three ways: the object built with the
generated classes serializes (sign cleared) to exactly the spec's hex, the signing
functions produce exactly the spec's Base64, and the spec's hex parses back to the
expected field values. The verifiers must accept that signature and reject every
tampered or non-canonical variant of it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import (
    compute_event_sign,
    compute_hook_sign,
    hook_mac_input,
    sign_event,
    sign_hook_request,
    verify_event,
    verify_hook_request,
    verify_serialized_event,
)

B64_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
SIGN_FIELD_BYTES = 2 + 44  # tag 0x22, length 0x2c, 44 Base64 characters


def _get(message: Any, path: str) -> Any:
    value = message
    for part in path.split("."):
        value = getattr(value, part)
    if isinstance(value, str | bytes | int | bool):
        return value
    return list(value)  # repeated fields


def _meta(timestamp_ms: int, trace_id: str = "") -> hook_pb.HookMeta:
    return hook_pb.HookMeta(
        tenant_id="t1", request_id="r1", timestamp_ms=timestamp_ms, trace_id=trace_id
    )


@dataclass(frozen=True)
class HookVector:
    id: str
    cls: type[Any]
    build: Callable[[], Any]
    secret: str
    payload_hex: str
    sign: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class EventVector:
    id: str
    build: Callable[[], hook_pb.MqEvent]
    secret: str
    payload_hex: str
    sign: str
    fields: dict[str, Any]


CONNECT_ACK = msg_pb.ConnectAck(
    code=1000, tenant_id="t1", user_id="u1", device_id="d1", node_id="n1", trace_id="tr1"
)

HOOK_VECTORS = [
    # protocol.md 5.3
    HookVector(
        id="5.3-auth",
        cls=hook_pb.AuthRequest,
        build=lambda: hook_pb.AuthRequest(meta=_meta(123), token="valid:u1", device_id="d1"),
        secret="secret",
        payload_hex="0a0a0a02743112027231187b120876616c69643a75311a026431",
        sign="jq7PAa5MYHnmVxUXEa/c9wjyOti56Zfq08cv6hs5cds=",
        fields={
            "meta.tenant_id": "t1",
            "meta.request_id": "r1",
            "meta.timestamp_ms": 123,
            "meta.sign": "",
            "meta.trace_id": "",
            "token": "valid:u1",
            "device_id": "d1",
        },
    ),
    HookVector(
        id="5.3-auth-trace",
        cls=hook_pb.AuthRequest,
        build=lambda: hook_pb.AuthRequest(
            meta=_meta(123, trace_id="tr1"), token="valid:u1", device_id="d1"
        ),
        secret="secret",
        payload_hex="0a0f0a02743112027231187b2a03747231120876616c69643a75311a026431",
        sign="Ii3CElkvG5VA0OaaDjoFJj7nqQa+cjT4Av5sBbxM+rI=",
        fields={
            "meta.tenant_id": "t1",
            "meta.request_id": "r1",
            "meta.timestamp_ms": 123,
            "meta.sign": "",
            "meta.trace_id": "tr1",
            "token": "valid:u1",
            "device_id": "d1",
        },
    ),
    HookVector(
        id="5.3-check-message",
        cls=hook_pb.CheckMessageRequest,
        build=lambda: hook_pb.CheckMessageRequest(
            meta=_meta(123),
            message=msg_pb.MessageRequest(
                tenant_id="t1",
                user_id="u1",
                device_id="d1",
                msg_id="m1",
                msg_type=msg_pb.SINGLE_CHAT,
                to_user_id="u2",
                msg_body=b"\x01",
                timestamp_ms=1,
            ),
        ),
        secret="secret",
        payload_hex=(
            "0a0a0a02743112027231187b12190a027431120275311a02643122026d31320275324201014801"
        ),
        sign="mDHlXJNLMi/AzXjGvZWVi1SLbHA4kfkyM1DcVjclVRE=",
        fields={
            "meta.tenant_id": "t1",
            "meta.request_id": "r1",
            "meta.timestamp_ms": 123,
            "meta.sign": "",
            "message.tenant_id": "t1",
            "message.user_id": "u1",
            "message.device_id": "d1",
            "message.msg_id": "m1",
            "message.msg_type": msg_pb.SINGLE_CHAT,
            "message.to_user_id": "u2",
            "message.group_id": "",
            "message.msg_body": b"\x01",
            "message.timestamp_ms": 1,
        },
    ),
    HookVector(
        id="5.3-get-offline-messages",
        cls=hook_pb.GetOfflineMessagesRequest,
        build=lambda: hook_pb.GetOfflineMessagesRequest(
            meta=_meta(1_700_000_000_000, trace_id="abc"),
            user_id="u1",
            device_id="d1",
            max_messages=100,
            cursor="",
        ),
        secret="dev-secret-t1",
        payload_hex="0a140a027431120272311880d095ffbc312a03616263120275311a0264312064",
        sign="+kgyJWaal1Giol8hfwXVTLuAjVlmK0y1fS/e1x3wBYM=",
        fields={
            "meta.tenant_id": "t1",
            "meta.request_id": "r1",
            "meta.timestamp_ms": 1_700_000_000_000,
            "meta.sign": "",
            "meta.trace_id": "abc",
            "user_id": "u1",
            "device_id": "d1",
            "max_messages": 100,
            "cursor": "",
            "ack_follows": False,
        },
    ),
    # protocol.md 9.8
    HookVector(
        id="9.8-ack-offline-messages",
        cls=hook_pb.AckOfflineMessagesRequest,
        build=lambda: hook_pb.AckOfflineMessagesRequest(
            meta=_meta(1_700_000_000_000, trace_id="abc"),
            user_id="u1",
            device_id="d1",
            cursor="c1",
        ),
        secret="dev-secret-t1",
        payload_hex="0a140a027431120272311880d095ffbc312a03616263120275311a02643122026331",
        sign="G2rHtBfdYoZYE8+2f3Dcpi6c3gtO5S4qgio7S348li4=",
        fields={
            "meta.tenant_id": "t1",
            "meta.request_id": "r1",
            "meta.timestamp_ms": 1_700_000_000_000,
            "meta.sign": "",
            "meta.trace_id": "abc",
            "user_id": "u1",
            "device_id": "d1",
            "cursor": "c1",
        },
    ),
    HookVector(
        id="9.8-offline-available",
        cls=hook_pb.OfflineAvailableRequest,
        build=lambda: hook_pb.OfflineAvailableRequest(meta=_meta(1_700_000_000_000), user_id="u1"),
        secret="dev-secret-t1",
        payload_hex="0a0f0a027431120272311880d095ffbc3112027531",
        sign="DtGsUOlCot5lqN2BM4fNNsV+9LYlMbNa0d17yGZ6Nu0=",
        fields={
            "meta.tenant_id": "t1",
            "meta.request_id": "r1",
            "meta.timestamp_ms": 1_700_000_000_000,
            "meta.sign": "",
            "meta.trace_id": "",
            "user_id": "u1",
        },
    ),
    HookVector(
        id="9.8-get-offline-messages-ack-follows",
        cls=hook_pb.GetOfflineMessagesRequest,
        build=lambda: hook_pb.GetOfflineMessagesRequest(
            meta=_meta(1_700_000_000_000, trace_id="abc"),
            user_id="u1",
            device_id="d1",
            max_messages=100,
            cursor="",
            ack_follows=True,
        ),
        secret="dev-secret-t1",
        payload_hex="0a140a027431120272311880d095ffbc312a03616263120275311a0264312064800101",
        sign="v+JzH0um0d+OlY7+HIow5y58wumxcE2R3bM6QyW8uh8=",
        fields={
            "meta.tenant_id": "t1",
            "meta.request_id": "r1",
            "meta.timestamp_ms": 1_700_000_000_000,
            "meta.sign": "",
            "meta.trace_id": "abc",
            "user_id": "u1",
            "device_id": "d1",
            "max_messages": 100,
            "cursor": "",
            "ack_follows": True,
        },
    ),
]

EVENT_VECTORS = [
    EventVector(
        id="5.3-event-single-chat",
        build=lambda: hook_pb.MqEvent(
            tenant_id="t1",
            event_type=hook_pb.SINGLE_CHAT_MSG,
            msg_id="m1",
            user_id="u1",
            device_id="d1",
            to_user_id="u2",
            group_id="",
            event_data=bytes.fromhex("010203"),
            timestamp=999,
            node_id="n1",
        ),
        secret="secret",
        payload_hex="0a02743110021a026d31220275312a02643132027532420301020348e70752026e31",
        sign="L+JRc9aahO0xf6G0uZufdx6aR90wSjS2CqzFrKPxaks=",
        fields={
            "tenant_id": "t1",
            "event_type": hook_pb.SINGLE_CHAT_MSG,
            "msg_id": "m1",
            "user_id": "u1",
            "device_id": "d1",
            "to_user_id": "u2",
            "group_id": "",
            "event_data": b"\x01\x02\x03",
            "timestamp": 999,
            "node_id": "n1",
            "sign": "",
            "trace_id": "",
        },
    ),
    EventVector(
        id="5.3-event-connect-online",
        build=lambda: hook_pb.MqEvent(
            tenant_id="t1",
            event_type=hook_pb.CONNECT_ONLINE,
            user_id="u1",
            device_id="d1",
            event_data=CONNECT_ACK.SerializeToString(),
            timestamp=123,
            node_id="n1",
            trace_id="tr1",
        ),
        secret="secret",
        payload_hex=(
            "0a027431220275312a026431421808e807120274311a027531220264312a026e313203747231"
            "487b52026e316203747231"
        ),
        sign="+Hs2W+96f8lXnh3acgHxRqUluIhThQGxDWHK5lUdel8=",
        fields={
            "tenant_id": "t1",
            "event_type": hook_pb.CONNECT_ONLINE,
            "msg_id": "",
            "user_id": "u1",
            "device_id": "d1",
            "to_user_id": "",
            "group_id": "",
            "event_data": bytes.fromhex("08e807120274311a027531220264312a026e313203747231"),
            "timestamp": 123,
            "node_id": "n1",
            "sign": "",
            "trace_id": "tr1",
        },
    ),
]

hook_vectors = pytest.mark.parametrize("vec", HOOK_VECTORS, ids=[v.id for v in HOOK_VECTORS])
event_vectors = pytest.mark.parametrize("vec", EVENT_VECTORS, ids=[v.id for v in EVENT_VECTORS])


def _non_canonical_variants(sign: str) -> dict[str, str]:
    """Encodings a strict verifier must refuse, keyed by a readable label."""
    assert len(sign) == 44
    assert sign.endswith("=")
    assert not sign.endswith("==")
    last = sign[42]
    # 43 characters carry 258 bits for 256: the low two bits of the last one are padding.
    padding_bits_set = sign[:42] + B64_ALPHABET[B64_ALPHABET.index(last) | 0b01] + "="
    variants = {
        "padding-bits": padding_bits_set,
        "padding-bits-both": sign[:42] + B64_ALPHABET[B64_ALPHABET.index(last) | 0b11] + "=",
        "missing-padding": sign.rstrip("="),
        "extra-padding": sign + "=",
        "trailing-newline": sign + "\n",
        "leading-space": " " + sign,
        "inner-space": sign[:20] + " " + sign[20:],
        "inner-newline": sign[:20] + "\n" + sign[20:],
        "tab": sign[:10] + "\t" + sign[10:],
        "non-ascii": sign[:-2] + "é=",
        "truncated": sign[:40],
        "empty": "",
    }
    if "+" in sign or "/" in sign:
        variants["urlsafe-alphabet"] = sign.replace("+", "-").replace("/", "_")
    return variants


NON_CANONICAL_LABELS = [
    "padding-bits",
    "padding-bits-both",
    "missing-padding",
    "extra-padding",
    "trailing-newline",
    "leading-space",
    "inner-space",
    "inner-newline",
    "tab",
    "non-ascii",
    "truncated",
    "empty",
    "urlsafe-alphabet",
]


# --- MAC input -------------------------------------------------------------------------


def test_hook_mac_input_suffix_matches_spec_example() -> None:
    # protocol.md 5.3: "… + 7231 + 7b00000000000000"
    assert hook_mac_input(b"", "r1", 123).hex() == "7231" + "7b00000000000000"
    assert hook_mac_input(b"\xaa", "r1", 123) == b"\xaa" + bytes.fromhex("72317b00000000000000")


@pytest.mark.parametrize(
    ("timestamp_ms", "suffix_hex"),
    [
        pytest.param(0, "0000000000000000", id="zero"),
        pytest.param(1_700_000_000_000, "0068e5cf8b010000", id="2023"),
        pytest.param(-1, "ffffffffffffffff", id="minus-one-twos-complement"),
        pytest.param(-(2**63), "0000000000000080", id="int64-min"),
        pytest.param(2**63 - 1, "ffffffffffffff7f", id="int64-max"),
    ],
)
def test_hook_mac_input_timestamp_is_int64_le(timestamp_ms: int, suffix_hex: str) -> None:
    assert hook_mac_input(b"", "", timestamp_ms).hex() == suffix_hex


def test_hook_mac_input_request_id_is_utf8() -> None:
    assert hook_mac_input(b"", "é", 0) == "é".encode() + bytes(8)


# --- hook vectors ----------------------------------------------------------------------


@hook_vectors
def test_hook_vector_payload_hex(vec: HookVector) -> None:
    request = vec.build()
    assert request.SerializeToString().hex() == vec.payload_hex
    assert request.SerializeToString(deterministic=True).hex() == vec.payload_hex


@hook_vectors
def test_hook_vector_parses_back(vec: HookVector) -> None:
    parsed = vec.cls.FromString(bytes.fromhex(vec.payload_hex))
    for path, expected in vec.fields.items():
        assert _get(parsed, path) == expected, path
    assert parsed == vec.build()
    assert parsed.SerializeToString().hex() == vec.payload_hex


@hook_vectors
def test_hook_vector_raw_hmac(vec: HookVector) -> None:
    """The spec's hex, request id and timestamp give the spec's sign, independent of pb."""
    data = hook_mac_input(bytes.fromhex(vec.payload_hex), "r1", vec.fields["meta.timestamp_ms"])
    digest = hmac.new(vec.secret.encode(), data, hashlib.sha256).digest()
    assert base64.b64encode(digest).decode() == vec.sign


@hook_vectors
def test_hook_vector_compute_sign(vec: HookVector) -> None:
    request = vec.build()
    assert compute_hook_sign(request, vec.secret) == vec.sign
    # Computing does not modify the request.
    assert request.SerializeToString().hex() == vec.payload_hex


@hook_vectors
def test_hook_vector_compute_sign_ignores_existing_sign(vec: HookVector) -> None:
    request = vec.build()
    request.meta.sign = "not-a-signature"
    assert compute_hook_sign(request, vec.secret) == vec.sign
    assert request.meta.sign == "not-a-signature"


@hook_vectors
def test_hook_vector_sign_and_verify(vec: HookVector) -> None:
    request = vec.build()
    sign_hook_request(request, vec.secret)
    assert request.meta.sign == vec.sign
    assert verify_hook_request(request, vec.secret) is True

    signed = request.SerializeToString()
    assert signed.hex() != vec.payload_hex
    assert len(signed) == len(bytes.fromhex(vec.payload_hex)) + SIGN_FIELD_BYTES
    assert bytes([0x22, 44]) + vec.sign.encode() in signed

    received = vec.cls.FromString(signed)
    assert received.meta.sign == vec.sign
    assert verify_hook_request(received, vec.secret) is True
    # With the sign cleared again the bytes are the spec's payload.
    received.meta.sign = ""
    assert received.SerializeToString().hex() == vec.payload_hex


@hook_vectors
def test_hook_vector_sign_is_idempotent(vec: HookVector) -> None:
    request = vec.build()
    sign_hook_request(request, vec.secret)
    sign_hook_request(request, vec.secret)
    assert request.meta.sign == vec.sign


@hook_vectors
def test_hook_sign_with_empty_secret_leaves_request_unsigned(vec: HookVector) -> None:
    request = vec.build()
    request.meta.sign = "stale"
    sign_hook_request(request, "")
    assert request.meta.sign == ""
    assert request.SerializeToString().hex() == vec.payload_hex
    assert verify_hook_request(request, "") is False
    assert verify_hook_request(request, vec.secret) is False


@hook_vectors
def test_hook_verify_rejects_other_secret(vec: HookVector) -> None:
    request = vec.build()
    sign_hook_request(request, vec.secret)
    for other in ("", vec.secret + "x", vec.secret.upper(), vec.secret[:-1], " " + vec.secret):
        assert verify_hook_request(request, other) is False, other


@hook_vectors
def test_hook_verify_rejects_other_request_id(vec: HookVector) -> None:
    request = vec.build()
    sign_hook_request(request, vec.secret)
    for other in ("r2", "", "r1 ", "R1"):
        request.meta.request_id = other
        assert verify_hook_request(request, vec.secret) is False, other
    request.meta.request_id = "r1"
    assert verify_hook_request(request, vec.secret) is True


@hook_vectors
def test_hook_verify_rejects_other_timestamp(vec: HookVector) -> None:
    request = vec.build()
    sign_hook_request(request, vec.secret)
    original = request.meta.timestamp_ms
    for other in (original + 1, original - 1, 0, -original, original + (1 << 32)):
        request.meta.timestamp_ms = other
        assert verify_hook_request(request, vec.secret) is False, other
    request.meta.timestamp_ms = original
    assert verify_hook_request(request, vec.secret) is True


@hook_vectors
def test_hook_verify_rejects_other_field_values(vec: HookVector) -> None:
    request = vec.build()
    sign_hook_request(request, vec.secret)
    request.meta.tenant_id = "t2"
    assert verify_hook_request(request, vec.secret) is False
    request.meta.tenant_id = "t1"
    request.meta.trace_id = request.meta.trace_id + "x"
    assert verify_hook_request(request, vec.secret) is False


@hook_vectors
def test_hook_verify_rejects_every_flipped_byte(vec: HookVector) -> None:
    request = vec.build()
    sign_hook_request(request, vec.secret)
    signed = request.SerializeToString()
    parsed_count = 0
    for index in range(len(signed)):
        for mask in (0x01, 0x80):
            tampered = bytearray(signed)
            tampered[index] ^= mask
            received = vec.cls()
            try:
                received.ParseFromString(bytes(tampered))
            except Exception:  # unparsable is also a rejection
                continue
            parsed_count += 1
            assert verify_hook_request(received, vec.secret) is False, (index, mask)
    assert parsed_count > len(signed) // 2  # most flips still parse: the MAC must catch them


@hook_vectors
def test_hook_payload_flip_changes_raw_mac(vec: HookVector) -> None:
    payload = bytes.fromhex(vec.payload_hex)
    timestamp = vec.fields["meta.timestamp_ms"]
    for index in range(len(payload)):
        tampered = bytearray(payload)
        tampered[index] ^= 0x01
        data = hook_mac_input(bytes(tampered), "r1", timestamp)
        mac = base64.b64encode(hmac.new(vec.secret.encode(), data, hashlib.sha256).digest())
        assert mac.decode() != vec.sign, index


@hook_vectors
@pytest.mark.parametrize("label", NON_CANONICAL_LABELS)
def test_hook_verify_rejects_non_canonical_sign(vec: HookVector, label: str) -> None:
    variants = _non_canonical_variants(vec.sign)
    if label not in variants:
        pytest.skip(f"sign has no character the {label} variant would change")
    request = vec.build()
    request.meta.sign = variants[label]
    assert verify_hook_request(request, vec.secret) is False


@hook_vectors
def test_padding_bit_variant_decodes_to_the_same_mac_leniently(vec: HookVector) -> None:
    """The padding-bits variants really are the same MAC, so only strictness rejects them."""
    variants = _non_canonical_variants(vec.sign)
    for label in ("padding-bits", "padding-bits-both"):
        assert variants[label] != vec.sign
        assert base64.b64decode(variants[label]) == base64.b64decode(vec.sign)


def test_hook_verify_keeps_unknown_fields() -> None:
    """A v1 verifier re-serializing a request with a newer field must reproduce the bytes."""
    vec = HOOK_VECTORS[0]
    # Field 99, varint 1: unknown to AuthRequest, appended after the known fields.
    wire = bytes.fromhex(vec.payload_hex) + bytes.fromhex("980601")
    data = hook_mac_input(wire, "r1", 123)
    sign = base64.b64encode(hmac.new(b"secret", data, hashlib.sha256).digest()).decode()
    received = hook_pb.AuthRequest.FromString(wire)
    received.meta.sign = sign
    assert verify_hook_request(received, "secret") is True
    assert compute_hook_sign(received, "secret") == sign


def test_hook_sign_non_ascii_secret_is_utf8() -> None:
    request = HOOK_VECTORS[0].build()
    data = hook_mac_input(bytes.fromhex(HOOK_VECTORS[0].payload_hex), "r1", 123)
    expected = base64.b64encode(hmac.new("sécret".encode(), data, hashlib.sha256).digest())
    assert compute_hook_sign(request, "sécret") == expected.decode()
    sign_hook_request(request, "sécret")
    assert verify_hook_request(request, "sécret") is True
    assert verify_hook_request(request, "secret") is False


def test_hook_sign_is_standard_padded_base64_of_32_bytes() -> None:
    for vec in HOOK_VECTORS:
        sign = compute_hook_sign(vec.build(), vec.secret)
        assert len(sign) == 44
        assert set(sign[:43]) <= set(B64_ALPHABET)
        assert sign[43] == "="
        assert len(base64.b64decode(sign, validate=True)) == 32


# --- event vectors ---------------------------------------------------------------------


@event_vectors
def test_event_vector_payload_hex(vec: EventVector) -> None:
    event = vec.build()
    assert event.SerializeToString().hex() == vec.payload_hex
    assert event.SerializeToString(deterministic=True).hex() == vec.payload_hex


@event_vectors
def test_event_vector_parses_back(vec: EventVector) -> None:
    parsed = hook_pb.MqEvent.FromString(bytes.fromhex(vec.payload_hex))
    for path, expected in vec.fields.items():
        assert _get(parsed, path) == expected, path
    assert parsed == vec.build()
    assert parsed.SerializeToString().hex() == vec.payload_hex


def test_connect_online_event_data_is_the_connect_ack() -> None:
    vec = EVENT_VECTORS[1]
    parsed = hook_pb.MqEvent.FromString(bytes.fromhex(vec.payload_hex))
    ack = msg_pb.ConnectAck.FromString(parsed.event_data)
    assert ack == CONNECT_ACK
    assert (ack.code, ack.tenant_id, ack.user_id, ack.device_id) == (1000, "t1", "u1", "d1")
    assert (ack.node_id, ack.trace_id, ack.protocol_version) == ("n1", "tr1", "")


@event_vectors
def test_event_vector_raw_hmac(vec: EventVector) -> None:
    """Events sign the serialization alone: no request id or timestamp suffix."""
    digest = hmac.new(vec.secret.encode(), bytes.fromhex(vec.payload_hex), hashlib.sha256)
    assert base64.b64encode(digest.digest()).decode() == vec.sign


@event_vectors
def test_event_vector_compute_sign(vec: EventVector) -> None:
    event = vec.build()
    assert compute_event_sign(event, vec.secret) == vec.sign
    assert event.SerializeToString().hex() == vec.payload_hex
    event.sign = "not-a-signature"
    assert compute_event_sign(event, vec.secret) == vec.sign
    assert event.sign == "not-a-signature"


@event_vectors
def test_event_vector_sign_and_verify(vec: EventVector) -> None:
    event = vec.build()
    sign_event(event, vec.secret)
    assert event.sign == vec.sign
    assert verify_event(event, vec.secret) is True

    signed = event.SerializeToString()
    assert len(signed) == len(bytes.fromhex(vec.payload_hex)) + SIGN_FIELD_BYTES
    assert bytes([0x5A, 44]) + vec.sign.encode() in signed  # field 11, length-delimited

    received = hook_pb.MqEvent.FromString(signed)
    assert received.sign == vec.sign
    assert verify_event(received, vec.secret) is True
    received.sign = ""
    assert received.SerializeToString().hex() == vec.payload_hex

    verified = verify_serialized_event(signed, vec.secret)
    assert verified is not None
    assert verified.sign == vec.sign
    assert verified == hook_pb.MqEvent.FromString(signed)


@event_vectors
def test_event_sign_with_empty_secret_leaves_event_unsigned(vec: EventVector) -> None:
    event = vec.build()
    event.sign = "stale"
    sign_event(event, "")
    assert event.sign == ""
    assert event.SerializeToString().hex() == vec.payload_hex
    assert verify_event(event, "") is False
    assert verify_event(event, vec.secret) is False
    assert verify_serialized_event(event.SerializeToString(), vec.secret) is None


@event_vectors
def test_event_verify_rejects_other_secret(vec: EventVector) -> None:
    event = vec.build()
    sign_event(event, vec.secret)
    for other in ("", vec.secret + "x", vec.secret.upper(), vec.secret[:-1]):
        assert verify_event(event, other) is False, other
        assert verify_serialized_event(event.SerializeToString(), other) is None, other


@event_vectors
def test_event_verify_rejects_other_field_values(vec: EventVector) -> None:
    event = vec.build()
    sign_event(event, vec.secret)
    event.timestamp += 1
    assert verify_event(event, vec.secret) is False
    event.timestamp -= 1
    assert verify_event(event, vec.secret) is True
    event.msg_id = event.msg_id + "x"
    assert verify_event(event, vec.secret) is False


@event_vectors
def test_event_verify_rejects_every_flipped_byte(vec: EventVector) -> None:
    event = vec.build()
    sign_event(event, vec.secret)
    signed = event.SerializeToString()
    parsed_count = 0
    for index in range(len(signed)):
        for mask in (0x01, 0x80):
            tampered = bytearray(signed)
            tampered[index] ^= mask
            assert verify_serialized_event(bytes(tampered), vec.secret) is None, (index, mask)
            received = hook_pb.MqEvent()
            try:
                received.ParseFromString(bytes(tampered))
            except Exception:
                continue
            parsed_count += 1
            assert verify_event(received, vec.secret) is False, (index, mask)
    assert parsed_count > len(signed) // 2


@event_vectors
@pytest.mark.parametrize("label", NON_CANONICAL_LABELS)
def test_event_verify_rejects_non_canonical_sign(vec: EventVector, label: str) -> None:
    variants = _non_canonical_variants(vec.sign)
    if label not in variants:
        pytest.skip(f"sign has no character the {label} variant would change")
    event = vec.build()
    event.sign = variants[label]
    assert verify_event(event, vec.secret) is False
    assert verify_serialized_event(event.SerializeToString(), vec.secret) is None


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xff\xff\xff", id="garbage"),
        pytest.param(bytes.fromhex(EVENT_VECTORS[0].payload_hex)[:-1], id="truncated"),
        pytest.param(b"", id="empty-unsigned"),
        pytest.param(bytes.fromhex("0a02ffff"), id="bad-utf8"),
    ],
)
def test_verify_serialized_event_rejects_unparsable_or_unsigned(data: bytes) -> None:
    assert verify_serialized_event(data, "secret") is None


@hook_vectors
def test_hook_verify_with_empty_secret_rejects_even_an_empty_key_mac(vec: HookVector) -> None:
    """No key means nothing verifies, not "HMAC under the empty key" (anyone could forge)."""
    request = vec.build()
    request.meta.sign = compute_hook_sign(request, "")
    assert _non_canonical_variants(request.meta.sign)  # a well-formed 44-character sign
    assert verify_hook_request(request, "") is False
    assert verify_hook_request(request, vec.secret) is False


@event_vectors
def test_event_verify_with_empty_secret_rejects_even_an_empty_key_mac(vec: EventVector) -> None:
    event = vec.build()
    event.sign = compute_event_sign(event, "")
    assert verify_event(event, "") is False
    assert verify_serialized_event(event.SerializeToString(), "") is None
    assert verify_event(event, vec.secret) is False
