"""Trace / request ids (32 lowercase hex) and UUIDv7 msg ids (protocol.md 1.1, RFC 9562)."""

from __future__ import annotations

import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from mics.protocol import ids
from mics.protocol.ids import new_msg_id, new_request_id, new_trace_id

HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize(
    "generate",
    [
        pytest.param(new_trace_id, id="trace-id"),
        pytest.param(new_request_id, id="request-id"),
        pytest.param(new_msg_id, id="msg-id"),
    ],
)
def test_ids_are_32_lowercase_hex_and_unique(generate: Callable[[], str]) -> None:
    values = [generate() for _ in range(2000)]
    for value in values:
        assert isinstance(value, str)
        assert HEX32.fullmatch(value), value
    assert len(set(values)) == len(values)


def test_trace_id_is_a_random_uuid_without_dashes() -> None:
    value = new_trace_id()
    parsed = uuid.UUID(hex=value)
    assert parsed.hex == value
    assert "-" not in value
    assert parsed.version == 4
    assert parsed.variant == uuid.RFC_4122


def _assert_uuid7_layout(value: str) -> None:
    assert HEX32.fullmatch(value), value
    assert value[12] == "7", value  # version nibble
    assert value[16] in "89ab", value  # variant bits 10
    assert (int(value, 16) >> 62) & 0b11 == 0b10
    parsed = uuid.UUID(hex=value)
    assert parsed.variant == uuid.RFC_4122
    assert parsed.version == 7


def test_msg_id_layout() -> None:
    for _ in range(1000):
        _assert_uuid7_layout(new_msg_id())


def test_msg_id_embeds_the_current_unix_ms() -> None:
    before = time.time_ns() // 1_000_000
    value = new_msg_id()
    after = time.time_ns() // 1_000_000
    embedded = int(value[:12], 16)
    # The generator may run a little ahead of the clock (counter overflow borrows a ms).
    assert before <= embedded <= after + 10


def test_msg_id_strictly_increasing_over_10000_calls() -> None:
    values = [new_msg_id() for _ in range(10_000)]
    for earlier, later in itertools.pairwise(values):
        assert earlier < later
        assert int(earlier, 16) < int(later, 16)
    for value in values:
        _assert_uuid7_layout(value)


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Drive ``ids``' clock by hand: set ``clock[0]`` to the current time in ns."""
    clock = [1_700_000_000_000 * 1_000_000]
    monkeypatch.setattr(ids, "time", SimpleNamespace(time_ns=lambda: clock[0]))
    return clock


def _fields(value: str) -> tuple[int, int]:
    number = int(value, 16)
    return number >> 80, (number >> 64) & 0xFFF


def test_msg_id_counter_overflow_in_one_millisecond(frozen_clock: list[int]) -> None:
    generate = ids._UUIDv7()
    values = [generate() for _ in range(10_000)]  # far more than 4096 in one frozen ms
    assert values == sorted(values)
    assert len(set(values)) == len(values)
    for value in values:
        _assert_uuid7_layout(value)
    first_ms, _ = _fields(values[0])
    assert first_ms == 1_700_000_000_000
    last_ms, _ = _fields(values[-1])
    assert last_ms > first_ms  # borrowed future milliseconds once the counter ran out
    for earlier, later in itertools.pairwise(values):
        (ms_a, counter_a), (ms_b, counter_b) = _fields(earlier), _fields(later)
        assert (ms_a, counter_a) < (ms_b, counter_b)


def test_msg_id_monotonic_when_clock_goes_backwards(frozen_clock: list[int]) -> None:
    generate = ids._UUIDv7()
    first = generate()
    frozen_clock[0] -= 5_000 * 1_000_000  # clock steps back 5 s
    second = generate()
    third = generate()
    assert first < second < third
    assert _fields(second)[0] == _fields(first)[0]


def test_msg_id_new_millisecond_restarts_counter_low(frozen_clock: list[int]) -> None:
    generate = ids._UUIDv7()
    first = generate()
    frozen_clock[0] += 1_000_000
    second = generate()
    assert _fields(second)[0] == _fields(first)[0] + 1
    # A fresh millisecond seeds the counter in 0..0x3ff, leaving room to count up.
    assert _fields(second)[1] <= 0x3FF
    assert first < second


def test_msg_id_thread_safe() -> None:
    results: list[list[str]] = [[] for _ in range(4)]

    def work(out: list[str]) -> None:
        out.extend(new_msg_id() for _ in range(2000))

    threads = [threading.Thread(target=work, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [value for out in results for value in out]
    assert len(set(everything)) == len(everything)
    for out in results:
        assert out == sorted(out)  # each thread sees increasing ids
