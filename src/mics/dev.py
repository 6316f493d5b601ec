"""`mics dev`: the whole system on one machine, no outside services.

Starts the reference backend with the demo tenant and a gateway pointed at it, in one
process and one event loop, and prints how to connect. Embedded defaults: the in-memory
route table, no Kafka (events off until the in-process bus lands), the in-memory buffer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mics.backend.app import BackendServer
from mics.backend.demo import (
    DEMO_GROUP,
    DEMO_SECRET,
    DEMO_TENANT,
    DEMO_USERS,
    demo_config,
    demo_token,
)
from mics.gateway.app import GatewayServer
from mics.gateway.config import GatewaySettings

log = logging.getLogger("mics.dev")


@dataclass(frozen=True, slots=True)
class DevOptions:
    host: str = "127.0.0.1"
    gateway_port: int = 8080
    backend_port: int = 8090
    node_id: str = "dev-node-1"


class DevStack:
    """Backend + gateway wired together; also used by the end-to-end tests."""

    def __init__(self, options: DevOptions, **gateway_overrides: object) -> None:
        self.options = options
        self.backend = BackendServer(demo_config(port=options.backend_port))
        self._gateway_overrides = gateway_overrides
        self.gateway: GatewayServer | None = None

    async def start(self) -> None:
        await self.backend.start()
        values: dict[str, object] = {
            "host": self.options.host,
            "port": self.options.gateway_port,
            "node_id": self.options.node_id,
            "tenant_auth_map": {DEMO_TENANT: self.backend.url},
            "tenant_hook_secrets": {DEMO_TENANT: DEMO_SECRET},
            "hook_sign_required": True,
            # A laptop running everything (and an editor, and a browser) is no production
            # box: allow hooks a second rather than the production 150 ms.
            "hook_timeout_ms": 1000,
        }
        values.update(self._gateway_overrides)
        settings = GatewaySettings.model_validate(values)
        self.gateway = GatewayServer(settings)
        await self.gateway.start()

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        await self.backend.stop()

    def banner(self) -> str:
        assert self.gateway is not None
        ws = self.gateway.ws_url
        lines = [
            "MICS dev stack is running (Ctrl-C stops it).",
            f"  gateway  {self.gateway.url}  (healthz, readyz, metrics)",
            f"  backend  {self.backend.url}  (hooks /auth /check-message /get-group-members)",
            f"  tenant   {DEMO_TENANT}; users {', '.join(DEMO_USERS)}; group {DEMO_GROUP}",
            "Connect a client:",
        ]
        for user in DEMO_USERS[:2]:
            lines.append(f"  {ws}?tenantId={DEMO_TENANT}&token={demo_token(user)}&deviceId=web-1")
        lines.append(
            "Try it:  mics chat --as alice --to bob   (in one terminal)  and"
            "  mics chat --as bob   (in another)"
        )
        return "\n".join(lines)
