"""The msg_id dedup cache: TTL, cap eviction, release, against a reference model.

The cache keeps digests in flat arrays with a sharded open-addressing index; the
reference model below is the plain ordered dict of keys it replaced, whose behaviour
(protocol.md 9.7) the compact cache must keep exactly. Time comes from a fake clock.
"""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from mics.gateway.dedup import DedupCache


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ModelCache:
    """The semantics to keep: insertion-ordered keys with an expiry each."""

    def __init__(self, ttl_s: float, max_entries: int, clock: FakeClock) -> None:
        self.ttl = ttl_s
        self.max = max(1, max_entries)
        self.clock = clock
        self.entries: OrderedDict[str, float] = OrderedDict()

    def claim(self, key: str) -> bool:
        now = self.clock()
        while self.entries:
            oldest, expiry = next(iter(self.entries.items()))
            if expiry > now and len(self.entries) < self.max:
                break
            del self.entries[oldest]
        held = self.entries.get(key)
        if held is not None and held > now:
            return False
        self.entries[key] = now + self.ttl
        self.entries.move_to_end(key)
        return True

    def release(self, key: str) -> None:
        self.entries.pop(key, None)


def test_a_key_is_a_duplicate_until_its_ttl_has_passed() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl_s=10, clock=clock)
    assert cache.claim("a")
    clock.now += 9.999
    assert not cache.claim("a")
    clock.now = 1010.0  # expiry is claim time + TTL, exclusive
    assert cache.claim("a")
    assert not cache.claim("a")
    assert len(cache) == 1


def test_expired_entries_are_evicted_and_their_memory_returned() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl_s=10, clock=clock)
    for i in range(5000):
        assert cache.claim(f"k{i}")
    assert len(cache) == 5000
    clock.now += 10
    assert cache.claim("fresh")
    assert len(cache) == 1
    # The old keys are really gone, not only uncounted.
    assert all(cache.claim(f"k{i}") for i in range(5000))
    assert len(cache) == 5001


def test_the_cap_evicts_the_oldest_first() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl_s=600, max_entries=3, clock=clock)
    for key in ("a", "b", "c"):
        assert cache.claim(key)
    assert cache.claim("d")  # evicts "a"
    assert len(cache) == 3
    assert cache.claim("a")  # "a" was forgotten; claiming it evicts "b"
    assert not cache.claim("d")  # evicts "c" (the cache is full), "d" is still held
    assert not cache.claim("a")
    assert cache.claim("b")


def test_release_forgets_the_key_wherever_it_is() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl_s=600, clock=clock)
    for key in ("a", "b", "c"):
        assert cache.claim(key)
    cache.release("b")  # in the middle
    cache.release("c")  # the newest
    cache.release("never-claimed")
    assert len(cache) == 1
    assert not cache.claim("a")
    assert cache.claim("b")
    assert cache.claim("c")
    assert len(cache) == 3


def test_a_released_then_reclaimed_key_lives_a_full_ttl_from_its_new_claim() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl_s=10, clock=clock)
    assert cache.claim("a")
    assert cache.claim("b")
    cache.release("a")  # its first record stays behind, dead
    clock.now += 5
    assert cache.claim("a")
    clock.now += 6  # the first claims have expired, the new claim of "a" has not
    assert cache.claim("c")
    assert not cache.claim("a")
    assert cache.claim("b")
    clock.now += 5
    assert cache.claim("a")


def test_released_records_are_bounded_by_the_cap() -> None:
    # White box: messages in flight that fail after a later one was claimed leave dead
    # records behind it; they must not pile up beyond the cap (here, at most 2,000 dead
    # records besides the live ones, though only 20 entries are live).
    clock = FakeClock()
    cache = DedupCache(ttl_s=600, max_entries=2000, clock=clock)
    for round_ in range(20):
        failing = [f"failing{round_}.{i}" for i in range(1000)]
        assert all(cache.claim(k) for k in failing)
        assert cache.claim(f"ok{round_}")
        for k in failing:
            cache.release(k)
        assert len(cache._exp) - cache._head <= 2 * 2000
    assert len(cache) <= 20
    assert not cache.claim("ok19")
    assert cache.claim("failing19.0")


def test_released_newest_records_take_no_room() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl_s=600, max_entries=100, clock=clock)
    assert cache.claim("kept")
    for i in range(1000):
        assert cache.claim(f"a{i}")
        assert cache.claim(f"b{i}")
        cache.release(f"a{i}")  # dead, behind a live one
        cache.release(f"b{i}")  # the newest: goes, and takes the dead one with it
    assert len(cache._exp) - cache._head == 1  # white box: only "kept" is held
    assert not cache.claim("kept")


def test_many_keys_grow_and_shrink_the_index() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl_s=100, max_entries=1_000_000, clock=clock)
    keys = [DedupCache.key("t1", f"u{i % 97}", f"m{i}") for i in range(50_000)]
    assert all(cache.claim(k) for k in keys)
    assert not any(cache.claim(k) for k in keys)
    for k in keys[::2]:
        cache.release(k)
    assert len(cache) == 25_000
    assert not any(cache.claim(k) for k in keys[1::2])
    assert all(cache.claim(k) for k in keys[::2])
    clock.now += 100
    assert cache.claim("after")
    assert len(cache) == 1
    assert max(len(t) for t in cache._tables) <= 16  # shrunk back (white box)
    assert all(cache.claim(k) for k in keys)


def test_a_clock_that_goes_back_keeps_the_ttl_check() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl_s=10, clock=clock)
    assert cache.claim("a")
    clock.now = 900.0
    assert cache.claim("b")  # expires at 910, behind "a" (1010)
    clock.now = 1005.0
    assert not cache.claim("a")
    assert cache.claim("b")  # expired, though not yet evicted
    assert not cache.claim("b")


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("claim"), st.integers(0, 15)),
        st.tuples(st.just("release"), st.integers(0, 15)),
        st.tuples(st.just("tick"), st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0])),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops=_ops)
def test_matches_the_model_with_releases(ops: list[tuple[str, float]]) -> None:
    # A cap the operations never reach: dead records stay within their own bound.
    _run_against_model(ops, ttl_s=10.0, max_entries=1000)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("claim"), st.integers(0, 15)),
            st.tuples(st.just("tick"), st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0])),
            st.tuples(st.just("back"), st.sampled_from([0.5, 2.0])),
        ),
        max_size=200,
    ),
    max_entries=st.integers(1, 8),
)
def test_matches_the_model_at_the_cap(ops: list[tuple[str, float]], max_entries: int) -> None:
    _run_against_model(ops, ttl_s=5.0, max_entries=max_entries)


def _run_against_model(ops: list[tuple[str, float]], ttl_s: float, max_entries: int) -> None:
    clock = FakeClock()
    cache = DedupCache(ttl_s=ttl_s, max_entries=max_entries, clock=clock)
    model = ModelCache(ttl_s, max_entries, clock)
    for op, arg in ops:
        if op == "claim":
            key = DedupCache.key("t1", "u1", str(int(arg)))
            assert cache.claim(key) == model.claim(key)
        elif op == "release":
            key = DedupCache.key("t1", "u1", str(int(arg)))
            cache.release(key)
            model.release(key)
        elif op == "tick":
            clock.now += arg
        else:
            clock.now -= arg
        assert len(cache) == len(model.entries)
