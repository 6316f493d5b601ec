"""Identifiers: trace and request ids (32 lowercase hex) and time-sortable msg ids."""

from __future__ import annotations

import os
import threading
import time
import uuid


def new_trace_id() -> str:
    """A random UUID without dashes, as protocol.md section 1.1 requires."""
    return uuid.uuid4().hex


new_request_id = new_trace_id


class _UUIDv7:
    """UUIDv7 (RFC 9562) generator, monotonic within one process.

    The 48-bit millisecond timestamp leads, so ids sort by creation time; a 12-bit
    counter in rand_a keeps ids created in the same millisecond in order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0

    def __call__(self) -> str:
        with self._lock:
            now = time.time_ns() // 1_000_000
            if now <= self._last_ms:
                self._counter += 1
                if self._counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                    self._last_ms += 1
                    self._counter = 0
                now = self._last_ms
            else:
                self._last_ms = now
                self._counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
            counter = self._counter
        rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
        value = (now & ((1 << 48) - 1)) << 80
        value |= 0x7 << 76
        value |= counter << 64
        value |= 0b10 << 62
        value |= rand_b
        return f"{value:032x}"


new_msg_id = _UUIDv7()
