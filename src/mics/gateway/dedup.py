"""Message dedup: (tenant, sender, msg_id) seen within the TTL (protocol.md 9.7).

Bounded memory: entries live in insertion order, which is also expiry order because
the TTL is fixed, so expired entries are evicted from the front in O(1) each; a hard
cap evicts the oldest entries first when traffic outruns the TTL.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class DedupCache:
    def __init__(
        self,
        ttl_s: float = 600.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_s
        self._max = max(1, max_entries)
        self._clock = clock
        self._entries: OrderedDict[str, float] = OrderedDict()

    @staticmethod
    def key(tenant_id: str, user_id: str, msg_id: str) -> str:
        # Tenant and user ids never contain '|'; msg_id comes last, so keys are unambiguous.
        return f"{tenant_id}|{user_id}|{msg_id}"

    def claim(self, key: str) -> bool:
        """Record the key; False if it was already seen and has not expired."""
        now = self._clock()
        self._evict(now)
        expiry = self._entries.get(key)
        if expiry is not None and expiry > now:
            return False
        self._entries[key] = now + self._ttl
        self._entries.move_to_end(key)
        return True

    def release(self, key: str) -> None:
        """Forget a key whose message failed before delivery, so its retry is processed."""
        self._entries.pop(key, None)

    def _evict(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest_key, expiry = next(iter(entries.items()))
            if expiry > now and len(entries) < self._max:
                break
            del entries[oldest_key]

    def __len__(self) -> int:
        return len(self._entries)
