"""Per-tenant message QPS limit over a one-second window (protocol.md 2.5 step 4).

This node-local window is the embedded implementation; the clustering work adds a
Redis window shared by all nodes behind the same `allow` call.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TenantQpsLimiter:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[str, tuple[int, int]] = {}  # tenant -> (second, count)

    def allow(self, tenant_id: str, limit: int) -> bool:
        if limit <= 0:
            return True
        second = int(self._clock())
        window_second, count = self._windows.get(tenant_id, (second, 0))
        if window_second != second:
            count = 0
        if count >= limit:
            self._windows[tenant_id] = (second, count)
            return False
        self._windows[tenant_id] = (second, count + 1)
        return True
