"""CircuitBreaker: consecutive failures, open window, single half-open probe."""

from __future__ import annotations

import pytest

from mics.hooks.breaker import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def state(breaker: CircuitBreaker) -> str:
    # A function call, so mypy does not narrow the property across mutations.
    return breaker.state


def _open(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        assert breaker.allow()
        breaker.record_failure()


def test_starts_closed_and_allows(clock: FakeClock) -> None:
    breaker = CircuitBreaker(3, 100, clock)
    assert state(breaker) == "closed"
    for _ in range(10):
        assert breaker.allow()
    assert state(breaker) == "closed"


def test_opens_after_threshold_consecutive_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker(3, 100, clock)
    _open(breaker, 2)
    assert state(breaker) == "closed"
    assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) == "open"
    assert not breaker.allow()


def test_success_resets_consecutive_count(clock: FakeClock) -> None:
    breaker = CircuitBreaker(3, 100, clock)
    _open(breaker, 2)
    breaker.record_success()
    _open(breaker, 2)
    assert state(breaker) == "closed"
    assert breaker.consecutive_failures == 2


def test_stays_open_for_open_ms_then_half_open(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 100, clock)
    _open(breaker, 1)
    clock.advance_ms(99)
    assert not breaker.allow()
    assert state(breaker) == "open"
    clock.advance_ms(2)
    assert state(breaker) == "half_open"


def test_half_open_exactly_at_open_ms(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 100, clock)
    _open(breaker, 1)
    clock.advance_ms(100)
    assert state(breaker) == "half_open"


def test_half_open_admits_exactly_one_probe(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 100, clock)
    _open(breaker, 1)
    clock.advance_ms(100)
    assert breaker.allow()
    assert state(breaker) == "half_open"
    assert not breaker.allow()
    assert not breaker.allow()
    clock.advance_ms(10_000)  # time alone never admits a second probe
    assert not breaker.allow()


def test_probe_success_closes(clock: FakeClock) -> None:
    breaker = CircuitBreaker(2, 100, clock)
    _open(breaker, 2)
    clock.advance_ms(100)
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) == "closed"
    assert breaker.consecutive_failures == 0
    # Fully closed again: it takes a full threshold of failures to reopen.
    _open(breaker, 1)
    assert state(breaker) == "closed"


def test_probe_failure_reopens_for_a_new_window(clock: FakeClock) -> None:
    breaker = CircuitBreaker(5, 100, clock)
    _open(breaker, 5)
    clock.advance_ms(100)
    assert breaker.allow()
    breaker.record_failure()  # a single probe failure suffices
    assert state(breaker) == "open"
    clock.advance_ms(99)
    assert not breaker.allow()
    clock.advance_ms(2)
    assert breaker.allow()
    assert state(breaker) == "half_open"


def test_release_probe_lets_next_caller_probe(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 100, clock)
    _open(breaker, 1)
    clock.advance_ms(100)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release_probe()
    assert state(breaker) == "half_open"
    assert breaker.allow()
    assert not breaker.allow()


def test_release_probe_is_noop_when_closed_or_open(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 100, clock)
    breaker.release_probe()
    assert state(breaker) == "closed"
    _open(breaker, 1)
    breaker.release_probe()
    assert state(breaker) == "open"
    assert not breaker.allow()


def test_late_verdicts_while_open_are_ignored(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 100, clock)
    _open(breaker, 1)
    clock.advance_ms(60)
    breaker.record_success()  # from a call admitted before opening
    assert state(breaker) == "open"
    breaker.record_failure()  # must not extend the window
    clock.advance_ms(39)
    assert not breaker.allow()
    clock.advance_ms(2)
    assert breaker.allow()


def test_zero_open_ms_goes_straight_to_half_open(clock: FakeClock) -> None:
    breaker = CircuitBreaker(1, 0, clock)
    _open(breaker, 1)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.record_success()
    assert state(breaker) == "closed"


def test_reconfigure_changes_threshold_and_window(clock: FakeClock) -> None:
    breaker = CircuitBreaker(5, 5000, clock)
    _open(breaker, 1)
    breaker.reconfigure(2, 50)
    assert breaker.failure_threshold == 2
    assert breaker.open_ms == 50
    _open(breaker, 1)
    assert state(breaker) == "open"
    clock.advance_ms(50)
    assert breaker.allow()


def test_threshold_below_one_is_treated_as_one(clock: FakeClock) -> None:
    breaker = CircuitBreaker(0, 100, clock)
    _open(breaker, 1)
    assert state(breaker) == "open"
