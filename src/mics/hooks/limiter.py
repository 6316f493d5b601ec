"""Resizable FIFO concurrency limiter with a bounded wait (protocol.md 4.3).

A counter of held slots plus a queue of waiting futures. A released slot is handed
directly to the oldest waiter (its future resolves True with the slot already counted),
so a newcomer can never overtake a queued waiter. A waiter that times out or is
cancelled leaves the queue; if it was cancelled after a slot had been handed to it,
the slot is passed on, so cancellation never leaks capacity.

Single event loop only (not thread-safe), like the rest of asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class ConcurrencyLimiter:
    __slots__ = ("_active", "_max", "_waiters")

    def __init__(self, max_concurrency: int) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self._max = max_concurrency
        self._active = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @property
    def max_concurrency(self) -> int:
        return self._max

    @property
    def active(self) -> int:
        """Slots currently held (may exceed the maximum right after a shrink)."""
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a free slot now, without queueing; never overtakes a waiter."""
        if self._active < self._max and not self._waiters:
            self._active += 1
            return True
        return False

    async def acquire(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a slot; False if none. 0 => only a free slot now.

        On True the caller holds a slot and must call ``release`` exactly once.
        """
        if self._active < self._max and not self._waiters:
            self._active += 1
            return True
        if timeout_s <= 0:
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_later(timeout_s, self._expire, fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                # Granted, but the caller was cancelled before it resumed: pass it on.
                self.release()
            else:
                self._discard(fut)
            raise
        finally:
            timer.cancel()

    def _expire(self, fut: asyncio.Future[bool]) -> None:
        if not fut.done():
            fut.set_result(False)
            self._discard(fut)

    def _discard(self, fut: asyncio.Future[bool]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def release(self) -> None:
        if self._active <= 0:
            raise RuntimeError("ConcurrencyLimiter.release() without a held slot")
        self._active -= 1
        self._wake()

    def resize(self, max_concurrency: int) -> None:
        """Change the maximum; held slots are kept, waiters get any new room at once."""
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self._max = max_concurrency
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and self._active < self._max:
            fut = waiters.popleft()
            if fut.done():  # cancelled and not yet discarded
                continue
            self._active += 1
            fut.set_result(True)
