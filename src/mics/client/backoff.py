"""Exponential reconnect backoff with full jitter."""

from __future__ import annotations

import random
from collections.abc import Callable

# 2**64 times any sane initial delay already exceeds every cap; stop growing there.
_MAX_EXPONENT = 64


def backoff_delay(
    attempt: int,
    initial_s: float,
    max_s: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Delay before retry number ``attempt`` (0-based): uniform in [0, min(max, initial*2^n)).

    ``rand`` returns a float in [0, 1); inject a seeded ``random.Random().random`` in tests.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if initial_s < 0 or max_s < 0:
        raise ValueError("delays must be >= 0")
    ceiling = min(max_s, initial_s * 2.0 ** min(attempt, _MAX_EXPONENT))
    return ceiling * rand()


class Backoff:
    """Stateful wrapper: ``next()`` returns the delay of the next attempt, ``reset()`` restarts."""

    __slots__ = ("attempt", "initial_s", "max_s", "rand")

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial_s < 0 or max_s < 0:
            raise ValueError("delays must be >= 0")
        self.initial_s = initial_s
        self.max_s = max_s
        self.rand = rand
        self.attempt = 0

    def next(self) -> float:
        delay = backoff_delay(self.attempt, self.initial_s, self.max_s, self.rand)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
