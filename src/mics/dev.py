"""`mics dev`: the whole system on one machine, no outside services.

Starts the reference backend with the demo tenant and a gateway pointed at it, in one
process and one event loop, and prints how to connect. Embedded defaults stand in for
the production parts: the in-process event bus for Kafka (the gateway's events go
straight to the backend's offline store), SQLite for PostgreSQL, the in-memory route
table for Redis. The offline path is the real one: a message to an offline user
becomes an OFFLINE_MESSAGE event, the backend stores it, and the user's next connect
pulls it through the signed get-offline-messages hook.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

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
    # Where the offline store (SQLite) lives; "" keeps it in a temporary directory.
    data_dir: str = ".mics-dev"


class DevStack:
    """Backend + gateway wired together; also used by the end-to-end tests."""

    def __init__(self, options: DevOptions, **gateway_overrides: object) -> None:
        self.options = options
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        data_dir = options.data_dir
        if not data_dir:
            self._tmp = tempfile.TemporaryDirectory(prefix="mics-dev-")
            data_dir = self._tmp.name
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.database_path = Path(data_dir) / "offline.db"
        self.backend = BackendServer(
            demo_config(
                port=options.backend_port, database_url=f"sqlite+aiosqlite:///{self.database_path}"
            )
        )
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
            "event_bus": "inprocess",
        }
        values.update(self._gateway_overrides)
        settings = GatewaySettings.model_validate(values)
        self.gateway = GatewayServer(settings)
        # The in-process bus delivers the gateway's events to the backend's store, as a
        # Kafka consumer would; the backend nudges the gateway after storing.
        assert self.gateway.inprocess is not None
        self.gateway.inprocess.subscribe(self.backend.event_subscriber)
        await self.gateway.start()
        self.backend.state.nudger.set_gateway_urls([self.gateway.url])

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        await self.backend.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

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
        lines += [
            f"  offline store: {self.database_path}",
            "Try it:  mics chat --as bob              (one terminal: bob listens)",
            "         mics chat --as alice --to bob   (another: type lines, bob sees them)",
            "Offline: mics chat --as alice --to carol (carol is offline: stored by the backend)",
            "         mics chat --as carol            (carol connects and gets her backlog)",
        ]
        return "\n".join(lines)
