"""Consecutive-failure circuit breaker with a single half-open probe (protocol.md 4.3).

closed    -> counts consecutive failures; at ``failure_threshold`` it opens.
open      -> rejects everything for ``open_ms``; afterwards it is half-open.
half_open -> lets exactly one probe through; its success closes the breaker, its failure
             reopens it for another ``open_ms``. A probe that ends without a verdict
             (cancelled, queue rejected) is handed back with ``release_probe`` so the next
             caller may probe.

Verdicts from calls admitted before the breaker opened may arrive while it is open;
they are ignored there. In half-open any verdict counts, since it is fresh evidence.

Single-threaded (asyncio) use only; the clock is injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]

_CLOSED = 0
_OPEN = 1
_HALF_OPEN = 2
_NAMES: tuple[BreakerState, BreakerState, BreakerState] = ("closed", "open", "half_open")


class CircuitBreaker:
    __slots__ = (
        "_clock",
        "_failures",
        "_half_open_at",
        "_open_s",
        "_probe_in_flight",
        "_state",
        "_threshold",
    )

    def __init__(
        self,
        failure_threshold: int,
        open_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._threshold = 1
        self._open_s = 0.0
        self.reconfigure(failure_threshold, open_ms)
        self._state = _CLOSED
        self._failures = 0
        self._half_open_at = 0.0
        self._probe_in_flight = False

    def reconfigure(self, failure_threshold: int, open_ms: int) -> None:
        """Change the settings; state, failure count and a running open window are kept."""
        self._threshold = max(1, failure_threshold)
        self._open_s = max(0, open_ms) / 1000.0

    @property
    def failure_threshold(self) -> int:
        return self._threshold

    @property
    def open_ms(self) -> int:
        return round(self._open_s * 1000)

    @property
    def state(self) -> BreakerState:
        self._refresh()
        return _NAMES[self._state]

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def _refresh(self) -> None:
        if self._state == _OPEN and self._clock() >= self._half_open_at:
            self._state = _HALF_OPEN
            self._probe_in_flight = False

    def allow(self) -> bool:
        """May a call proceed? In half-open this reserves the single probe."""
        if self._state == _CLOSED:
            return True
        self._refresh()
        if self._state == _HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        if self._state == _OPEN:
            return
        self._state = _CLOSED
        self._failures = 0
        self._probe_in_flight = False

    def record_failure(self) -> None:
        state = self._state
        if state == _CLOSED:
            self._failures += 1
            if self._failures >= self._threshold:
                self._open()
        elif state == _HALF_OPEN:
            self._open()
        # _OPEN: a late verdict from a call admitted before opening; keep the open window.

    def release_probe(self) -> None:
        """The half-open probe ended without a verdict: let the next caller probe."""
        if self._state == _HALF_OPEN:
            self._probe_in_flight = False

    def _open(self) -> None:
        self._state = _OPEN
        self._half_open_at = self._clock() + self._open_s
        self._probe_in_flight = False
