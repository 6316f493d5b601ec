"""Waiting on conditions in tests, never on fixed sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_until(
    predicate: Callable[[], bool], within_s: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``within_s`` seconds.

    Polling is deliberate: the conditions are counters and registries owned by the code
    under test, which has no event to signal them. The deadline only bounds a failing
    test; a passing one returns as soon as the condition holds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.002)
