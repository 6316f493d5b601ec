"""ConcurrencyLimiter: bounded wait, FIFO hand-off, resize, cancellation safety."""

from __future__ import annotations

import asyncio

import pytest

from mics.hooks.limiter import ConcurrencyLimiter

LONG = 30.0  # a timeout that never expires during a test


async def _until(predicate: object, limit: int = 1000) -> None:
    """Yield to the loop until ``predicate()`` holds (no wall-clock waits)."""
    assert callable(predicate)
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def _until_waiting(limiter: ConcurrencyLimiter, n: int) -> None:
    await _until(lambda: limiter.waiting == n)


def _waiter(limiter: ConcurrencyLimiter, log: list[str], name: str) -> asyncio.Task[bool]:
    async def run() -> bool:
        ok = await limiter.acquire(LONG)
        log.append(name)
        return ok

    return asyncio.create_task(run())


def test_rejects_non_positive_size() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        ConcurrencyLimiter(0)
    limiter = ConcurrencyLimiter(1)
    with pytest.raises(ValueError, match=">= 1"):
        limiter.resize(0)


async def test_free_slots_are_immediate_up_to_max() -> None:
    limiter = ConcurrencyLimiter(3)
    assert all([await limiter.acquire(0) for _ in range(3)])
    assert limiter.active == 3
    assert not await limiter.acquire(0)
    assert not limiter.try_acquire()
    limiter.release()
    assert limiter.try_acquire()
    assert limiter.active == 3


async def test_zero_timeout_does_not_queue() -> None:
    limiter = ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    assert not await limiter.acquire(0)
    assert limiter.waiting == 0


async def test_wait_times_out_and_leaves_queue() -> None:
    limiter = ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    assert not await limiter.acquire(0.01)
    assert limiter.waiting == 0
    assert limiter.active == 1
    limiter.release()
    assert limiter.active == 0


async def test_release_hands_slot_to_waiter() -> None:
    limiter = ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    task = asyncio.create_task(limiter.acquire(LONG))
    await _until(lambda: limiter.waiting == 1)
    limiter.release()
    assert await task
    assert limiter.active == 1
    assert limiter.waiting == 0


async def test_fifo_order_and_no_overtaking() -> None:
    limiter = ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    log: list[str] = []
    tasks = []
    for name in ("a", "b", "c"):
        tasks.append(_waiter(limiter, log, name))
        await _until_waiting(limiter, len(tasks))
    # A newcomer must not take a slot while others queue, even right after a release.
    limiter.release()
    assert not limiter.try_acquire()
    assert not await limiter.acquire(0)
    for expected in ("a", "b", "c"):
        await _until(lambda e=expected: e in log)
        limiter.release()
    assert log == ["a", "b", "c"]
    assert all(await asyncio.gather(*tasks))
    assert limiter.active == 0


async def test_cancelled_waiter_does_not_leak_or_block() -> None:
    limiter = ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    log: list[str] = []
    first = _waiter(limiter, log, "first")
    await _until(lambda: limiter.waiting == 1)
    second = _waiter(limiter, log, "second")
    await _until(lambda: limiter.waiting == 2)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert limiter.waiting == 1
    limiter.release()
    assert await second
    assert log == ["second"]
    limiter.release()
    assert limiter.active == 0


async def test_cancel_after_grant_passes_slot_on() -> None:
    limiter = ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    log: list[str] = []
    first = _waiter(limiter, log, "first")
    await _until(lambda: limiter.waiting == 1)
    second = _waiter(limiter, log, "second")
    await _until(lambda: limiter.waiting == 2)
    # Grant to `first`, then cancel it before it gets to run.
    limiter.release()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second
    assert log == ["second"]
    assert limiter.active == 1
    limiter.release()
    assert limiter.active == 0


async def test_cancel_after_grant_with_no_other_waiter_frees_slot() -> None:
    limiter = ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    task = asyncio.create_task(limiter.acquire(LONG))
    await _until(lambda: limiter.waiting == 1)
    limiter.release()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limiter.active == 0
    assert limiter.try_acquire()


async def test_timed_out_waiter_does_not_consume_later_release() -> None:
    limiter = ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    assert not await limiter.acquire(0.001)
    limiter.release()
    assert limiter.active == 0
    assert limiter.try_acquire()


async def test_grow_wakes_waiters_in_order() -> None:
    limiter = ConcurrencyLimiter(1)
    assert limiter.try_acquire()
    log: list[str] = []
    tasks = []
    for name in ("a", "b", "c"):
        tasks.append(_waiter(limiter, log, name))
        await _until_waiting(limiter, len(tasks))
    limiter.resize(3)
    await _until(lambda: len(log) == 2)
    assert log == ["a", "b"]
    assert limiter.active == 3
    assert limiter.waiting == 1
    limiter.release()
    await _until(lambda: len(log) == 3)
    assert log == ["a", "b", "c"]
    await asyncio.gather(*tasks)


async def test_shrink_keeps_holders_and_drains_before_admitting() -> None:
    limiter = ConcurrencyLimiter(3)
    for _ in range(3):
        assert limiter.try_acquire()
    limiter.resize(1)
    assert limiter.max_concurrency == 1
    assert limiter.active == 3
    task = asyncio.create_task(limiter.acquire(LONG))
    await _until(lambda: limiter.waiting == 1)
    limiter.release()
    limiter.release()
    await asyncio.sleep(0)
    assert not task.done()
    assert limiter.active == 1
    limiter.release()
    assert await task
    assert limiter.active == 1


def test_over_release_raises() -> None:
    limiter = ConcurrencyLimiter(2)
    with pytest.raises(RuntimeError):
        limiter.release()
