"""Tenants: static directory (auth URL, hook secret) and per-session runtime config.

The runtime config arrives with every successful /auth. Sessions of one tenant usually
get identical configs, so parsed configs are interned by their serialized bytes: ten
thousand sessions share one `TenantRuntime` instead of holding ten thousand copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mics.hooks.policy import HookDefaults, HookPolicy, resolve_policy
from mics.protocol.pb import mics_hook_pb2 as hook_pb


class OfflineMode(StrEnum):
    NOTIFY_PULL = "notify_pull"
    LEGACY = "legacy"
    DUAL = "dual"


DEFAULT_HEARTBEAT_TIMEOUT_S = 30
DEFAULT_OFFLINE_TTL_S = 300


@dataclass(frozen=True, slots=True)
class TenantRuntime:
    """What one /auth response configured, parsed once."""

    tenant_id: str
    hook_base_url: str
    heartbeat_timeout_s: int
    offline_ttl_s: int
    tenant_max_connections: int
    user_max_connections: int
    tenant_max_message_qps: int
    tenant_secret: str
    offline_mode: OfflineMode
    check_message_fail_closed: bool
    hook_policy: HookPolicy
    raw: hook_pb.TenantRuntimeConfig


def parse_offline_mode(config: hook_pb.TenantRuntimeConfig) -> OfflineMode:
    """Section 9.9: `offline_mode` wins when set, else the v1 flag, else notify_pull."""
    if config.offline_mode:
        try:
            return OfflineMode(config.offline_mode)
        except ValueError:
            return OfflineMode.NOTIFY_PULL
    if config.HasField("offline_use_hook_pull"):
        return OfflineMode.NOTIFY_PULL if config.offline_use_hook_pull else OfflineMode.LEGACY
    return OfflineMode.NOTIFY_PULL


class TenantDirectory:
    """Known tenants and their latest runtime config (used for the next /auth policy)."""

    def __init__(
        self,
        auth_map: dict[str, str],
        hook_secrets: dict[str, str],
        hook_defaults: HookDefaults,
    ) -> None:
        self._auth_map = dict(auth_map)
        self._secrets = dict(hook_secrets)
        self._defaults = hook_defaults
        self._interned: dict[tuple[str, bytes], TenantRuntime] = {}
        self._latest: dict[str, TenantRuntime] = {}

    def known(self, tenant_id: str) -> bool:
        return bool(tenant_id) and tenant_id in self._auth_map

    def auth_base_url(self, tenant_id: str) -> str:
        return self._auth_map[tenant_id]

    def hook_secret(self, tenant_id: str) -> str:
        return self._secrets.get(tenant_id, "")

    def tenants(self) -> list[str]:
        return list(self._auth_map)

    def auth_policy(self, tenant_id: str) -> HookPolicy:
        latest = self._latest.get(tenant_id)
        if latest is not None:
            return latest.hook_policy
        return resolve_policy(self._defaults, tenant_id, None)

    def latest(self, tenant_id: str) -> TenantRuntime | None:
        return self._latest.get(tenant_id)

    def runtime_from_auth(
        self, tenant_id: str, config: hook_pb.TenantRuntimeConfig
    ) -> TenantRuntime:
        key = (tenant_id, config.SerializeToString(deterministic=True))
        runtime = self._interned.get(key)
        if runtime is None:
            if len(self._interned) > 10_000:  # configs churn only on redeploys; cap anyway
                self._interned.clear()
            runtime = TenantRuntime(
                tenant_id=tenant_id,
                hook_base_url=config.hook_base_url,
                heartbeat_timeout_s=config.heartbeat_timeout_seconds
                if config.heartbeat_timeout_seconds > 0
                else DEFAULT_HEARTBEAT_TIMEOUT_S,
                offline_ttl_s=config.offline_buffer_ttl_seconds
                if config.offline_buffer_ttl_seconds > 0
                else DEFAULT_OFFLINE_TTL_S,
                tenant_max_connections=config.tenant_max_connections,
                user_max_connections=config.user_max_connections,
                tenant_max_message_qps=config.tenant_max_message_qps,
                tenant_secret=config.tenant_secret,
                offline_mode=parse_offline_mode(config),
                check_message_fail_closed=config.HasField("check_message_fail_closed")
                and config.check_message_fail_closed,
                hook_policy=resolve_policy(self._defaults, tenant_id, config),
                raw=config,
            )
            self._interned[key] = runtime
        self._latest[tenant_id] = runtime
        return runtime
