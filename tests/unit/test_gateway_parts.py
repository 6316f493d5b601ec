"""Unit tests of the gateway's small parts: dedup, QPS window, legacy buffer, routes."""

from __future__ import annotations

import pytest

from mics.cluster.routes import AdmissionLimits, AdmissionResult, MemoryRouteTable, Route
from mics.gateway.dedup import DedupCache
from mics.gateway.metrics import GatewayMetrics
from mics.gateway.offline import LegacyBuffer
from mics.gateway.ratelimit import TenantQpsLimiter
from mics.gateway.tenants import OfflineMode, parse_offline_mode
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_hook_pb2 as hook_pb


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- dedup -------------------------------------------------------------------------------


def test_dedup_claims_once_within_ttl_and_again_after() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl_s=600, clock=clock)
    key = DedupCache.key("t1", "u1", "m1")
    assert cache.claim(key)
    assert not cache.claim(key)
    clock.now += 599
    assert not cache.claim(key)
    clock.now += 2
    assert cache.claim(key)


def test_dedup_key_is_per_sender() -> None:
    cache = DedupCache()
    assert cache.claim(DedupCache.key("t1", "u1", "1"))
    assert cache.claim(DedupCache.key("t1", "u2", "1"))
    assert cache.claim(DedupCache.key("t2", "u1", "1"))


def test_dedup_release_lets_a_retry_through() -> None:
    cache = DedupCache()
    key = DedupCache.key("t1", "u1", "m1")
    assert cache.claim(key)
    cache.release(key)
    assert cache.claim(key)


def test_dedup_memory_is_bounded_and_expired_entries_are_evicted() -> None:
    clock = FakeClock()
    cache = DedupCache(ttl_s=10, max_entries=100, clock=clock)
    for i in range(1000):
        cache.claim(f"k{i}")
    assert len(cache) <= 100
    clock.now += 11
    cache.claim("fresh")
    assert len(cache) == 1


# -- QPS --------------------------------------------------------------------------------


def test_qps_window_per_tenant_and_second() -> None:
    clock = FakeClock(5.2)
    limiter = TenantQpsLimiter(clock=clock)
    assert [limiter.allow("t1", 2) for _ in range(3)] == [True, True, False]
    assert limiter.allow("t2", 2)  # another tenant has its own window
    clock.now = 6.0
    assert limiter.allow("t1", 2)
    assert limiter.allow("t1", 0)  # 0 disables


# -- legacy buffer ------------------------------------------------------------------------


def make_buffer(clock: FakeClock, **limits: int) -> tuple[LegacyBuffer, GatewayMetrics]:
    metrics = GatewayMetrics(MetricsRegistry())
    fields = {
        "max_messages_per_user": 3,
        "max_bytes_per_user": 100,
        "max_users_per_tenant": 2,
    }
    fields.update(limits)
    return LegacyBuffer(metrics=metrics, clock=clock, **fields), metrics


def test_buffer_drains_in_order_and_only_once() -> None:
    buffer, metrics = make_buffer(FakeClock())
    for frame in (b"a", b"b"):
        assert buffer.put("t1", "u1", frame, ttl_s=60)
    assert metrics.registry.sample("mics_offline_buffer_messages") == 2
    assert buffer.take("t1", "u1") == [b"a", b"b"]
    assert buffer.take("t1", "u1") == []
    assert metrics.registry.sample("mics_offline_buffer_messages") == 0
    assert metrics.registry.sample("mics_offline_buffer_bytes") == 0


def test_buffer_evicts_oldest_for_message_and_byte_caps() -> None:
    buffer, metrics = make_buffer(FakeClock())
    for frame in (b"1", b"2", b"3", b"4"):
        assert buffer.put("t1", "u1", frame, ttl_s=60)
    assert buffer.take("t1", "u1") == [b"2", b"3", b"4"]
    assert buffer.put("t1", "u1", b"x" * 60, ttl_s=60)
    assert buffer.put("t1", "u1", b"y" * 60, ttl_s=60)  # 120 > 100 bytes: evict the first
    assert buffer.take("t1", "u1") == [b"y" * 60]
    assert metrics.registry.sample("mics_offline_buffer_evicted_total", {"tenant": "t1"}) == 2


def test_buffer_refuses_a_frame_larger_than_the_byte_cap() -> None:
    buffer, _ = make_buffer(FakeClock())
    assert not buffer.put("t1", "u1", b"z" * 101, ttl_s=60)
    assert buffer.pending("t1", "u1") == 0


def test_buffer_expires_by_ttl() -> None:
    clock = FakeClock()
    buffer, metrics = make_buffer(clock)
    buffer.put("t1", "u1", b"old", ttl_s=10)
    clock.now += 5
    buffer.put("t1", "u1", b"new", ttl_s=10)
    clock.now += 6
    assert buffer.take("t1", "u1") == [b"new"]
    buffer.put("t1", "u2", b"gone", ttl_s=1)
    clock.now += 2
    assert buffer.purge_expired() == 1
    assert metrics.registry.sample("mics_offline_buffer_messages") == 0


def test_buffer_evicts_least_recently_used_user_per_tenant() -> None:
    buffer, metrics = make_buffer(FakeClock())
    buffer.put("t1", "u1", b"a", ttl_s=60)
    buffer.put("t1", "u2", b"b", ttl_s=60)
    buffer.put("t1", "u1", b"c", ttl_s=60)  # u1 is now the most recent
    buffer.put("t1", "u3", b"d", ttl_s=60)  # evicts u2
    buffer.put("t2", "u9", b"e", ttl_s=60)  # other tenant, own cap
    assert buffer.pending("t1", "u2") == 0
    assert buffer.take("t1", "u1") == [b"a", b"c"]
    assert buffer.pending("t2", "u9") == 1
    assert metrics.registry.sample("mics_offline_buffer_evicted_users_total", {"tenant": "t1"}) == 1


# -- offline mode ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "mode"),
    [
        (hook_pb.TenantRuntimeConfig(), OfflineMode.NOTIFY_PULL),
        (hook_pb.TenantRuntimeConfig(offline_use_hook_pull=False), OfflineMode.LEGACY),
        (hook_pb.TenantRuntimeConfig(offline_use_hook_pull=True), OfflineMode.NOTIFY_PULL),
        (
            hook_pb.TenantRuntimeConfig(offline_use_hook_pull=True, offline_mode="legacy"),
            OfflineMode.LEGACY,
        ),
        (hook_pb.TenantRuntimeConfig(offline_mode="dual"), OfflineMode.DUAL),
    ],
)
def test_offline_mode_resolution(config: hook_pb.TenantRuntimeConfig, mode: OfflineMode) -> None:
    assert parse_offline_mode(config) is mode


# -- memory route table -----------------------------------------------------------------------


def route(user: str, device: str, conn: str) -> Route:
    return Route("t1", user, device, "n1", conn)


async def test_route_admission_limits_and_replacement() -> None:
    table = MemoryRouteTable()
    limits = AdmissionLimits(tenant_max_connections=3, user_max_connections=2)
    assert (await table.admit(route("u1", "a", "c1"), limits)).result is AdmissionResult.ADMITTED
    assert (await table.admit(route("u1", "b", "c2"), limits)).result is AdmissionResult.ADMITTED
    denied = await table.admit(route("u1", "c", "c3"), limits)
    assert denied.result is AdmissionResult.DENIED
    replaced = await table.admit(route("u1", "a", "c4"), limits)
    assert replaced.result is AdmissionResult.REPLACED
    assert replaced.previous == route("u1", "a", "c1")
    assert (await table.admit(route("u2", "a", "c5"), limits)).result is AdmissionResult.ADMITTED
    tenant_full = await table.admit(route("u3", "a", "c6"), limits)
    assert tenant_full.result is AdmissionResult.DENIED
    assert table.count("t1") == 3


async def test_route_remove_is_compare_and_delete() -> None:
    table = MemoryRouteTable()
    await table.admit(route("u1", "a", "old"), AdmissionLimits())
    await table.admit(route("u1", "a", "new"), AdmissionLimits())
    assert not await table.remove(route("u1", "a", "old"))  # the old connection's cleanup
    assert [r.conn_id for r in await table.lookup("t1", "u1")] == ["new"]
    assert await table.remove(route("u1", "a", "new"))
    assert await table.lookup("t1", "u1") == []
    assert table.count("t1") == 0


# -- route cache ------------------------------------------------------------------------------


def test_route_cache_expires_invalidates_and_is_bounded() -> None:
    from mics.gateway.routing import RouteCache

    clock = FakeClock()
    cache = RouteCache(ttl_s=5, max_entries=2, clock=clock)
    routes = [route("u1", "a", "c1")]
    cache.put("t1", "u1", routes)
    assert cache.get("t1", "u1") == routes
    clock.now += 5
    assert cache.get("t1", "u1") is None  # expired
    cache.put("t1", "u1", routes)
    cache.invalidate("t1", "u1")
    assert cache.get("t1", "u1") is None
    for user in ("u1", "u2", "u3"):
        cache.put("t1", user, [])
    assert cache.get("t1", "u1") is None  # the oldest went first
    assert cache.get("t1", "u3") == []
    disabled = RouteCache(ttl_s=0, max_entries=10)
    disabled.put("t1", "u1", routes)
    assert disabled.get("t1", "u1") is None
