"""End-to-end fixtures: a real reference backend and a real gateway on free ports.

Everything talks over real sockets: the SDK to the gateway over WebSocket, the gateway
to the backend over signed HTTP hooks. Each test gets its own stack, torn down after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from mics.backend.app import BackendServer
from mics.backend.config import BackendConfig, TenantConfig, UserConfig
from mics.client import ClientOptions, MicsClient
from mics.cluster.routes import RouteTable
from mics.gateway.app import GatewayServer
from mics.gateway.config import GatewaySettings

TENANT = "t1"
SECRET = "secret-t1"
USERS = ("u1", "u2", "u3", "u4", "u5")


def tenant_config(**overrides: Any) -> TenantConfig:
    users = overrides.pop("users", USERS)
    if not isinstance(users, dict):
        users = {u: UserConfig(tokens=[f"{u}-token"]) for u in users}
    fields: dict[str, Any] = {
        "secret": SECRET,
        "sign_required": True,
        "heartbeat_timeout_seconds": 30,
        "offline_mode": "legacy",
        "users": users,
        "groups": {"g1": ["u1", "u2", "u3"]},
        "blocked_words": ["forbidden"],
    }
    fields.update(overrides)
    return TenantConfig(**fields)


@dataclass
class Stack:
    backend: BackendServer
    gateway: GatewayServer
    clients: list[MicsClient] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        return self.gateway.ws_url

    def client(
        self,
        user: str,
        device: str = "d1",
        *,
        tenant: str = TENANT,
        token: str | None = None,
        **options: Any,
    ) -> MicsClient:
        opts: dict[str, Any] = {"reconnect": False, "heartbeat_interval_s": 0, "ack_timeout_s": 5}
        opts.update(options)
        client = MicsClient(
            ClientOptions(
                url=self.ws_url,
                tenant_id=tenant,
                token=token if token is not None else f"{user}-token",
                device_id=device,
                **opts,
            )
        )
        self.clients.append(client)
        return client

    async def connect(self, user: str, device: str = "d1", **options: Any) -> MicsClient:
        client = self.client(user, device, **options)
        await client.connect()
        return client

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.gateway.gateway.metrics_registry.sample(name, labels)


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack() -> AsyncIterator[StackFactory]:
    stacks: list[Stack] = []

    async def factory(
        tenant: TenantConfig | None = None,
        extra_tenants: dict[str, TenantConfig] | None = None,
        routes: RouteTable | None = None,
        **gateway_overrides: Any,
    ) -> Stack:
        tenants = {TENANT: tenant or tenant_config(), **(extra_tenants or {})}
        backend = BackendServer(BackendConfig(host="127.0.0.1", port=0, tenants=tenants))
        await backend.start()
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "node_id": "node-test",
            "tenant_auth_map": {t: backend.url for t in tenants},
            "tenant_hook_secrets": {t: cfg.secret for t, cfg in tenants.items()},
            "hook_sign_required": True,
            # Generous for a loaded CI machine; the timeout tests set their own.
            "hook_timeout_ms": 2000,
            "heartbeat_sweep_interval_seconds": 0.1,
        }
        settings.update(gateway_overrides)
        gateway = GatewayServer(GatewaySettings(**settings), routes=routes)
        await gateway.start()
        stack = Stack(backend, gateway)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        for client in stack.clients:
            await client.close()
        await stack.gateway.stop()
        await stack.backend.stop()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()
