"""resolve_policy: sources in order and clamps (protocol.md 4.3)."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from mics.hooks.policy import HookDefaults, HookPolicy, resolve_policy
from mics.protocol.pb import mics_hook_pb2 as hook_pb


def test_no_runtime_uses_defaults() -> None:
    assert resolve_policy(HookDefaults(), "t1", None) == HookPolicy(
        max_concurrency=32,
        queue_timeout_ms=10,
        breaker_failure_threshold=5,
        breaker_open_ms=5000,
        sign_required=False,
        timeout_ms=150,
    )


def test_empty_runtime_equals_no_runtime() -> None:
    defaults = HookDefaults(max_concurrency=7, queue_timeout_ms=3, sign_required=True)
    assert resolve_policy(defaults, "t1", hook_pb.TenantRuntimeConfig()) == resolve_policy(
        defaults, "t1", None
    )


def test_runtime_values_win() -> None:
    runtime = hook_pb.TenantRuntimeConfig(
        hook_max_concurrency=4,
        hook_queue_timeout_ms=25,
        hook_breaker_failure_threshold=9,
        hook_breaker_open_ms=777,
        hook_sign_required=True,
    )
    defaults = HookDefaults(tenant_max_concurrency=MappingProxyType({"t1": 11}))
    policy = resolve_policy(defaults, "t1", runtime)
    assert policy == HookPolicy(4, 25, 9, 777, True, 150)


def test_runtime_sign_required_false_overrides_default_true() -> None:
    runtime = hook_pb.TenantRuntimeConfig(hook_sign_required=False)
    assert not resolve_policy(HookDefaults(sign_required=True), "t", runtime).sign_required
    assert resolve_policy(HookDefaults(sign_required=True), "t", None).sign_required


def test_concurrency_source_order() -> None:
    defaults = HookDefaults(max_concurrency=20, tenant_max_concurrency={"t1": 11})
    assert resolve_policy(defaults, "t1", None).max_concurrency == 11
    assert resolve_policy(defaults, "t2", None).max_concurrency == 20
    for ignored in (0, -3):
        runtime = hook_pb.TenantRuntimeConfig(hook_max_concurrency=ignored)
        assert resolve_policy(defaults, "t1", runtime).max_concurrency == 11
        assert resolve_policy(defaults, "t2", runtime).max_concurrency == 20


@pytest.mark.parametrize("value", [0, -1])
def test_concurrency_non_positive_clamps_to_32(value: int) -> None:
    assert resolve_policy(HookDefaults(max_concurrency=value), "t", None).max_concurrency == 32
    per_tenant = HookDefaults(max_concurrency=20, tenant_max_concurrency={"t": value})
    assert resolve_policy(per_tenant, "t", None).max_concurrency == 32


@pytest.mark.parametrize(
    ("value", "expected"), [(-5, 0), (0, 0), (1, 1), (10_000, 10_000), (10_001, 10_000)]
)
def test_queue_timeout_clamp(value: int, expected: int) -> None:
    runtime = hook_pb.TenantRuntimeConfig(hook_queue_timeout_ms=value)
    assert resolve_policy(HookDefaults(), "t", runtime).queue_timeout_ms == expected
    assert resolve_policy(HookDefaults(queue_timeout_ms=value), "t", None).queue_timeout_ms == (
        expected
    )


def test_runtime_queue_timeout_zero_wins_over_default() -> None:
    runtime = hook_pb.TenantRuntimeConfig(hook_queue_timeout_ms=0)
    assert resolve_policy(HookDefaults(queue_timeout_ms=50), "t", runtime).queue_timeout_ms == 0


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (100, 100), (101, 100), (5000, 100)])
def test_threshold_clamp(value: int, expected: int) -> None:
    runtime = hook_pb.TenantRuntimeConfig(hook_breaker_failure_threshold=value)
    assert resolve_policy(HookDefaults(), "t", runtime).breaker_failure_threshold == expected


@pytest.mark.parametrize("value", [0, -1])
def test_threshold_non_positive_runtime_ignored(value: int) -> None:
    runtime = hook_pb.TenantRuntimeConfig(hook_breaker_failure_threshold=value)
    defaults = HookDefaults(breaker_failure_threshold=7)
    assert resolve_policy(defaults, "t", runtime).breaker_failure_threshold == 7


@pytest.mark.parametrize(("value", "expected"), [(0, 1), (-4, 1), (250, 100)])
def test_threshold_default_clamp(value: int, expected: int) -> None:
    defaults = HookDefaults(breaker_failure_threshold=value)
    assert resolve_policy(defaults, "t", None).breaker_failure_threshold == expected


@pytest.mark.parametrize(
    ("value", "expected"), [(-1, 0), (0, 0), (60_000, 60_000), (60_001, 60_000)]
)
def test_open_ms_clamp(value: int, expected: int) -> None:
    runtime = hook_pb.TenantRuntimeConfig(hook_breaker_open_ms=value)
    assert resolve_policy(HookDefaults(), "t", runtime).breaker_open_ms == expected
    assert resolve_policy(HookDefaults(breaker_open_ms=value), "t", None).breaker_open_ms == (
        expected
    )


def test_timeout_comes_from_defaults() -> None:
    runtime = hook_pb.TenantRuntimeConfig(hook_max_concurrency=3)
    assert resolve_policy(HookDefaults(timeout_ms=80), "t", runtime).timeout_ms == 80


def test_types_are_frozen_and_hashable() -> None:
    defaults = HookDefaults(tenant_max_concurrency={"t": 1})
    policy = resolve_policy(defaults, "t", None)
    assert hash(policy) == hash(resolve_policy(defaults, "t", None))
    assert hash(defaults) == hash(HookDefaults(tenant_max_concurrency={"t": 1}))
    with pytest.raises(AttributeError):
        policy.max_concurrency = 3  # type: ignore[misc]
