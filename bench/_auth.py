"""The benchmarks' own /auth hook: every token is accepted as the user of that name.

The reference backend always puts its own URL in ``TenantRuntimeConfig.hook_base_url``
(``BackendConfig.public_url`` must be an http(s) URL), so it cannot express "this
tenant has no message hooks". This server answers ``/auth`` with
``hook_base_url=""``: the gateway then skips ``/check-message`` and processes single
chat messages inline ("hooks off"). It runs inside the orchestrator process, which is
idle while the load runs, and is only called while connections are opened.
"""

from __future__ import annotations

from aiohttp import web

from mics.protocol.pb import mics_hook_pb2 as hook_pb

PROTOBUF = "application/protobuf"
# Idle benchmark connections send no heartbeat_ping; keep them well inside the timeout.
HEARTBEAT_TIMEOUT_S = 3600


def runtime_config() -> hook_pb.TenantRuntimeConfig:
    return hook_pb.TenantRuntimeConfig(
        hook_base_url="",
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        offline_mode="legacy",
    )


class AuthServer:
    """``POST /auth`` on 127.0.0.1, any free port; unsigned (no tenant secret)."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.calls = 0
        self._config = runtime_config()

    async def _auth(self, request: web.Request) -> web.Response:
        self.calls += 1
        req = hook_pb.AuthRequest.FromString(await request.read())
        resp = hook_pb.AuthResponse(ok=True, user_id=req.token)
        resp.meta.CopyFrom(req.meta)
        resp.meta.sign = ""
        resp.config.CopyFrom(self._config)
        return web.Response(body=resp.SerializeToString(), content_type=PROTOBUF)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/auth", self._auth)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
