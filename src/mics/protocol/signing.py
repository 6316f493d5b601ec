"""HMAC signatures for hook requests and Kafka events (protocol.md section 5).

Hook requests: the MAC covers the request serialized with ``meta.sign`` cleared, then
the UTF-8 request id, then the timestamp as 8 little-endian bytes. Events: the MAC
covers the event serialized with ``sign`` cleared, nothing appended. Both use
HMAC-SHA256 keyed with the UTF-8 tenant secret and standard padded Base64.

Pure functions: no clock, no I/O. Freshness and replay checks live with the servers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from typing import Protocol

from mics.protocol.pb import mics_hook_pb2 as hook_pb


class SignedRequest(Protocol):
    """Any hook request or response: a protobuf message with a ``meta`` field."""

    @property
    def meta(self) -> hook_pb.HookMeta: ...

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


def _mac(secret: str, data: bytes) -> str:
    digest = hmac.new(secret.encode("utf-8"), data, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def hook_mac_input(serialized_unsigned: bytes, request_id: str, timestamp_ms: int) -> bytes:
    """The bytes a hook signature covers (section 5.1 step 3)."""
    return serialized_unsigned + request_id.encode("utf-8") + struct.pack("<q", timestamp_ms)


def _serialize_unsigned(request: SignedRequest) -> bytes:
    # Clearing the field (not setting "") keeps it absent from the encoding, which is
    # what proto3 does for an empty string anyway; restore it afterwards.
    saved = request.meta.sign
    request.meta.sign = ""
    try:
        return request.SerializeToString()
    finally:
        request.meta.sign = saved


def compute_hook_sign(request: SignedRequest, secret: str) -> str:
    """The signature of ``request`` as it would be with ``meta.sign`` cleared."""
    data = hook_mac_input(
        _serialize_unsigned(request), request.meta.request_id, request.meta.timestamp_ms
    )
    return _mac(secret, data)


def sign_hook_request(request: SignedRequest, secret: str) -> None:
    """Set ``request.meta.sign``; an empty secret leaves the request unsigned."""
    request.meta.sign = compute_hook_sign(request, secret) if secret else ""


def _canonical_b64(value: str) -> bytes | None:
    """Decode strict, canonical padded Base64, or return None."""
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None
    # Reject encodings with non-zero padding bits: re-encoding must give the same text.
    if base64.b64encode(raw).decode("ascii") != value:
        return None
    return raw


def verify_hook_request(request: SignedRequest, secret: str) -> bool:
    """True iff ``meta.sign`` is a canonical, valid signature under ``secret``."""
    given = _canonical_b64(request.meta.sign)
    if given is None or not secret:
        return False
    expected = base64.b64decode(compute_hook_sign(request, secret))
    return hmac.compare_digest(given, expected)


def compute_event_sign(event: hook_pb.MqEvent, secret: str) -> str:
    saved = event.sign
    event.sign = ""
    try:
        return _mac(secret, event.SerializeToString())
    finally:
        event.sign = saved


def sign_event(event: hook_pb.MqEvent, secret: str) -> None:
    """Set ``event.sign`` (section 5.2); an empty secret leaves it unsigned."""
    event.sign = compute_event_sign(event, secret) if secret else ""


def verify_event(event: hook_pb.MqEvent, secret: str) -> bool:
    given = _canonical_b64(event.sign)
    if given is None or not secret:
        return False
    expected = base64.b64decode(compute_event_sign(event, secret))
    return hmac.compare_digest(given, expected)


def verify_serialized_event(data: bytes, secret: str) -> hook_pb.MqEvent | None:
    """Parse and verify an event from the wire; None if it does not parse or verify."""
    event = hook_pb.MqEvent()
    try:
        event.ParseFromString(data)
    except Exception:  # protobuf raises DecodeError and, for some inputs, others
        return None
    return event if verify_event(event, secret) else None
