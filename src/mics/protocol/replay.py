"""Replay protection for signed hook requests (protocol.md section 9.9).

A signature proves who built a request, not that it is new: anyone who captured a signed
``/auth`` could send it again. The guard therefore accepts a request only if

1. its ``meta.timestamp_ms`` is within ``window_ms`` of the receiver's clock, and
2. its (tenant, request_id) has not been accepted before.

A request id only needs remembering while a copy of the request could still pass check 1,
that is until ``timestamp_ms + window_ms``; after that any replay is stale anyway. So
memory is bounded by the request rate times the window, and additionally by a hard cap
(oldest entries go first; past the cap the guard falls back to the freshness check for
the evicted ids, which is the best a bounded memory can do).

Call ``check`` only for requests whose signature verified: an unsigned forgery must not
be able to burn a legitimate request id.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable

DEFAULT_WINDOW_MS = 300_000
DEFAULT_MAX_ENTRIES = 1_000_000

STALE = "stale request"
REPLAYED = "replayed request"


def wall_clock_ms() -> int:
    """Unix time in milliseconds, the clock hook timestamps use."""
    return time.time_ns() // 1_000_000


class ReplayGuard:
    """Remembers recent (tenant, request_id) pairs; one instance per backend process.

    ``clock`` returns Unix milliseconds (inject a fake one in tests). Not thread-safe:
    use it from one event loop.
    """

    def __init__(
        self,
        window_ms: int = DEFAULT_WINDOW_MS,
        clock: Callable[[], int] = wall_clock_ms,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        if window_ms <= 0:
            raise ValueError("window_ms must be positive")
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self.window_ms = window_ms
        self.max_entries = max_entries
        self._clock = clock
        # key -> expiry (ms). The key is "tenant|request_id": tenant ids contain no "|",
        # so the first "|" separates the parts unambiguously.
        self._expiry: dict[str, int] = {}
        # (expiry, key), a min-heap: the entry that expires first is always on top.
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def check(self, tenant_id: str, request_id: str, timestamp_ms: int) -> str | None:
        """None if the request is fresh (and remember it), else the rejection reason."""
        now = self._clock()
        if abs(now - timestamp_ms) > self.window_ms:
            return STALE
        self._evict_expired(now)
        key = f"{tenant_id}|{request_id}"
        if key in self._expiry:
            return REPLAYED
        while len(self._expiry) >= self.max_entries:
            self._pop_oldest()
        expiry = timestamp_ms + self.window_ms
        self._expiry[key] = expiry
        heapq.heappush(self._heap, (expiry, key))
        return None

    def _evict_expired(self, now: int) -> None:
        # An entry is needed while its request could still pass the freshness check,
        # i.e. while now <= expiry.
        while self._heap and self._heap[0][0] < now:
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        _, key = heapq.heappop(self._heap)
        del self._expiry[key]
