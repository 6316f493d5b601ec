"""Replay guard: freshness window, request-id memory, eviction and the hard cap."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mics.backend.replay import REPLAYED, STALE, ReplayGuard

T0 = 1_700_000_000_000
WINDOW = 300_000


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def guard(clock: FakeClock) -> ReplayGuard:
    return ReplayGuard(window_ms=WINDOW, clock=clock)


def test_fresh_then_replayed(guard: ReplayGuard) -> None:
    assert guard.check("t1", "r1", T0) is None
    assert guard.check("t1", "r1", T0) == REPLAYED
    # A replay with a different (still fresh) timestamp is a replay too.
    assert guard.check("t1", "r1", T0 + 5) == REPLAYED
    assert guard.check("t1", "r2", T0) is None


def test_request_ids_are_per_tenant(guard: ReplayGuard) -> None:
    assert guard.check("t1", "r1", T0) is None
    assert guard.check("t2", "r1", T0) is None
    assert len(guard) == 2


def test_window_boundaries(guard: ReplayGuard) -> None:
    assert guard.check("t", "past-edge", T0 - WINDOW) is None
    assert guard.check("t", "future-edge", T0 + WINDOW) is None
    assert guard.check("t", "past", T0 - WINDOW - 1) == STALE
    assert guard.check("t", "future", T0 + WINDOW + 1) == STALE
    assert guard.check("t", "zero", 0) == STALE


def test_stale_requests_are_not_remembered(guard: ReplayGuard) -> None:
    assert guard.check("t", "r", T0 - WINDOW - 1) == STALE
    assert len(guard) == 0


def test_replay_rejected_until_stale(guard: ReplayGuard, clock: FakeClock) -> None:
    assert guard.check("t", "r", T0) is None
    clock.now = T0 + WINDOW  # the copy is still fresh: must still be remembered
    assert guard.check("t", "r", T0) == REPLAYED
    clock.now = T0 + WINDOW + 1
    assert guard.check("t", "r", T0) == STALE


def test_future_dated_request_remembered_long_enough(guard: ReplayGuard, clock: FakeClock) -> None:
    ts = T0 + WINDOW  # as far in the future as is accepted
    assert guard.check("t", "r", ts) is None
    clock.now = T0 + 2 * WINDOW  # a copy is fresh right up to ts + window
    assert guard.check("t", "r", ts) == REPLAYED


def test_expired_entries_are_evicted(guard: ReplayGuard, clock: FakeClock) -> None:
    for i in range(100):
        assert guard.check("t", f"r{i}", T0) is None
    assert len(guard) == 100
    clock.now = T0 + WINDOW + 1
    assert guard.check("t", "new", clock.now) is None
    assert len(guard) == 1


def test_hard_cap_evicts_oldest_first(clock: FakeClock) -> None:
    guard = ReplayGuard(window_ms=WINDOW, clock=clock, max_entries=3)
    for i in range(3):
        assert guard.check("t", f"r{i}", T0 + i) is None
    assert guard.check("t", "r3", T0 + 3) is None
    assert len(guard) == 3
    assert guard.check("t", "r1", T0 + 1) == REPLAYED  # still remembered
    assert guard.check("t", "r0", T0) is None  # evicted: only the freshness check remains


@pytest.mark.parametrize(("window", "cap"), [(0, 1), (-1, 1), (1, 0)])
def test_invalid_arguments(window: int, cap: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        ReplayGuard(window_ms=window, max_entries=cap)


def test_default_clock_is_wall_clock() -> None:
    import time

    guard = ReplayGuard()
    assert guard.check("t", "r", time.time_ns() // 1_000_000) is None
    assert guard.check("t", "r", 0) == STALE


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # request id
            st.integers(-2 * WINDOW, 2 * WINDOW),  # timestamp offset
            st.integers(0, WINDOW // 2),  # clock advance before the request
        ),
        max_size=60,
    )
)
def test_matches_reference_model(steps: list[tuple[int, int, int]]) -> None:
    """Same answers as a naive model; an exact copy of an accepted request never passes."""
    clock = FakeClock()
    guard = ReplayGuard(window_ms=WINDOW, clock=clock, max_entries=10_000)
    expiry: dict[str, int] = {}  # request id -> last accepted timestamp + window
    accepted: set[tuple[str, int]] = set()
    for request, offset, advance in steps:
        clock.now += advance
        ts = clock.now + offset
        rid = f"r{request}"
        if abs(clock.now - ts) > WINDOW:
            expected: str | None = STALE
        elif expiry.get(rid, -1) >= clock.now:
            expected = REPLAYED
        else:
            expected = None
        result = guard.check("t", rid, ts)
        assert result == expected
        if (rid, ts) in accepted:
            assert result is not None
        if result is None:
            expiry[rid] = ts + WINDOW
            accepted.add((rid, ts))
        assert len(guard) <= len(expiry)
