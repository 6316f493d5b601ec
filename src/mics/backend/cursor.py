"""Opaque offline paging cursors (protocol.md section 9.3).

A cursor names a position in a recipient's storage order: the largest row id of the
page it was issued with. Format::

    c1.<id in base 36>.<tag>

``tag`` is the first 8 bytes of HMAC-SHA256(tenant secret, "offline-cursor|tenant|user|id")
in unpadded URL-safe Base64 (11 characters). It makes cursors unforgeable and bound to
their recipient, so the backend can tell an *unknown* cursor (answered
``invalid cursor``) from one it issued: without the tag, a made-up or misrouted cursor
``c1.zzzz`` acknowledged through ``/ack-offline-messages`` would mark messages delivered
that were never sent. The gateway treats cursors as opaque strings.

After the tenant secret changes, older cursors are invalid: the gateway then stops that
drain (``invalid cursor``) and the next connect starts again from ``""``; nothing is
marked delivered by mistake, the worst case is a duplicate delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import string

PREFIX = "c1."
_DIGITS = string.digits + string.ascii_lowercase
_TAG_BYTES = 8
_MAX_ID = 2**63 - 1


class InvalidCursor(ValueError):
    """The cursor was not issued by this backend for this recipient."""


def _base36(value: int) -> str:
    if value == 0:
        return "0"
    out = []
    while value:
        value, digit = divmod(value, 36)
        out.append(_DIGITS[digit])
    return "".join(reversed(out))


def _tag(secret: str, tenant_id: str, user_id: str, row_id: int) -> str:
    data = f"offline-cursor|{tenant_id}|{user_id}|{row_id}".encode()
    digest = hmac.new(secret.encode("utf-8"), data, hashlib.sha256).digest()[:_TAG_BYTES]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def encode_cursor(secret: str, tenant_id: str, user_id: str, row_id: int) -> str:
    """The cursor of position ``row_id`` in the recipient's storage order."""
    if not 0 <= row_id <= _MAX_ID:
        raise ValueError(f"row id out of range: {row_id}")
    return f"{PREFIX}{_base36(row_id)}.{_tag(secret, tenant_id, user_id, row_id)}"


def decode_cursor(secret: str, tenant_id: str, user_id: str, cursor: str) -> int:
    """The row id of a cursor issued for (tenant, user); raises InvalidCursor.

    Only the canonical spelling is accepted (lower-case base 36, no leading zeros).
    """
    if not cursor.startswith(PREFIX):
        raise InvalidCursor("invalid cursor")
    number, dot, tag = cursor[len(PREFIX) :].partition(".")
    if not dot or not number or len(number) > 13 or any(c not in _DIGITS for c in number):
        raise InvalidCursor("invalid cursor")
    row_id = int(number, 36)
    if row_id > _MAX_ID or _base36(row_id) != number:
        raise InvalidCursor("invalid cursor")
    if not tag.isascii() or not hmac.compare_digest(tag, _tag(secret, tenant_id, user_id, row_id)):
        raise InvalidCursor("invalid cursor")
    return row_id
