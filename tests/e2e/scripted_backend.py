"""A scriptable tenant backend for end-to-end tests of hook failures.

The reference backend (``mics.backend``) answers like a well-behaved tenant. The tests
of protocol.md 4.2-4.4 need a tenant that misbehaves on demand: ``ScriptedBackend`` is a
real aiohttp server on a free port whose every hook answers as the test scripts it:

=================  ======================================================================
behaviour          answer
=================  ======================================================================
``"ok"``           HTTP 200 with a normal answer (auth: token ``<user>-token`` -> user;
                   check: allow; members: the configured list of the group)
``"status:NNN"``   HTTP NNN, empty body
``"garbage"``      HTTP 200, a body that is not protobuf
``"hang"``         never answers until ``release_hangs()`` or ``stop()``
``"deny:REASON"``  auth: ``ok=false, reason``; check: ``allow=false, reason`` (may be "")
=================  ======================================================================

It counts calls per path, tracks the calls currently in progress, and verifies the
signature of every request (protocol.md 5.1) with ``verify_hook_request``: ``/auth``
under the gateway's ``TENANT_HOOK_SECRETS`` value, every other hook under the
``tenant_secret`` it handed out in the runtime config.

``ScriptedStack`` pairs it with a real ``GatewayServer`` and hands out SDK clients.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from mics.client import ClientOptions, MicsClient
from mics.gateway.app import GatewayServer
from mics.gateway.config import GatewaySettings
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.signing import verify_hook_request

TENANT = "t1"
AUTH_SECRET = "auth-secret-t1"
TENANT_SECRET = "tenant-secret-t1"

AUTH = "/auth"
CHECK = "/check-message"
MEMBERS = "/get-group-members"

# Not a protobuf encoding of anything: 0xff starts a tag varint that never ends.
GARBAGE = b"\xff\xff\xff\xff\xff"

_REQUEST_TYPES: dict[str, type[Any]] = {
    AUTH: hook_pb.AuthRequest,
    CHECK: hook_pb.CheckMessageRequest,
    MEMBERS: hook_pb.GetGroupMembersRequest,
}


@dataclass(frozen=True, slots=True)
class HookRequest:
    """One request as the backend received it."""

    path: str
    request: Any  # the parsed mics.hook.v1 request
    signed_ok: bool


class ScriptedBackend:
    def __init__(
        self,
        *,
        tenant_id: str = TENANT,
        auth_secret: str = AUTH_SECRET,
        tenant_secret: str = TENANT_SECRET,
        runtime: dict[str, Any] | None = None,
        groups: dict[str, list[str]] | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.auth_secret = auth_secret
        self.tenant_secret = tenant_secret
        # TenantRuntimeConfig fields returned by /auth besides hook_base_url and the secret.
        self.runtime: dict[str, Any] = {"heartbeat_timeout_seconds": 30, "offline_mode": "legacy"}
        self.runtime.update(runtime or {})
        self.groups: dict[str, list[str]] = dict(groups or {})
        self.behaviour: dict[str, str] = {AUTH: "ok", CHECK: "ok", MEMBERS: "ok"}
        self.calls: Counter[str] = Counter()
        self.in_progress: Counter[str] = Counter()
        self.requests: list[HookRequest] = []
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._port = 0

    # -- scripting ------------------------------------------------------------------------

    def script(self, path: str, behaviour: str) -> None:
        """Set how ``path`` answers from now on (see the module docstring)."""
        if path not in _REQUEST_TYPES:
            raise ValueError(f"unknown hook path {path!r}")
        if not (
            behaviour in ("ok", "garbage", "hang")
            or behaviour.startswith("deny:")
            or (behaviour.startswith("status:") and behaviour[7:].isdigit())
        ):
            raise ValueError(f"unknown behaviour {behaviour!r}")
        self.behaviour[path] = behaviour

    def release_hangs(self) -> None:
        """Let every hanging handler (now and later) answer 503."""
        self._release.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def runtime_config(self) -> hook_pb.TenantRuntimeConfig:
        return hook_pb.TenantRuntimeConfig(
            hook_base_url=self.url, tenant_secret=self.tenant_secret, **self.runtime
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        for path in _REQUEST_TYPES:
            app.router.add_post(path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.release_hangs()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- the hooks ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        body = await request.read()
        parsed = _REQUEST_TYPES[path]()
        try:
            parsed.ParseFromString(body)
        except Exception:
            return web.Response(status=400)
        secret = self.auth_secret if path == AUTH else self.tenant_secret
        self.requests.append(HookRequest(path, parsed, verify_hook_request(parsed, secret)))
        self.calls[path] += 1
        behaviour = self.behaviour[path]
        self.in_progress[path] += 1
        try:
            if behaviour == "hang":
                await self._release.wait()
                return web.Response(status=503)
        finally:
            self.in_progress[path] -= 1
        if behaviour.startswith("status:"):
            return web.Response(status=int(behaviour[7:]))
        if behaviour == "garbage":
            return web.Response(body=GARBAGE, content_type="application/protobuf")
        deny = behaviour[5:] if behaviour.startswith("deny:") else None
        if path == AUTH:
            response: Any = self._auth(parsed, deny)
        elif path == CHECK:
            response = hook_pb.CheckMessageResponse(allow=deny is None, reason=deny or "")
        else:
            response = hook_pb.GetGroupMembersResponse(
                user_ids=self.groups.get(parsed.group_id, [])
            )
        response.meta.CopyFrom(parsed.meta)
        response.meta.sign = ""
        return web.Response(body=response.SerializeToString(), content_type="application/protobuf")

    def _auth(self, req: hook_pb.AuthRequest, deny: str | None) -> hook_pb.AuthResponse:
        if deny is not None:
            return hook_pb.AuthResponse(ok=False, reason=deny)
        user, sep, rest = req.token.rpartition("-token")
        if not sep or rest or not user:
            return hook_pb.AuthResponse(ok=False, reason="invalid token")
        return hook_pb.AuthResponse(
            ok=True, user_id=user, device_id=req.device_id, config=self.runtime_config()
        )


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Poll ``condition`` until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


@dataclass
class ScriptedStack:
    """A real gateway whose only tenant is served by a ``ScriptedBackend``."""

    backend: ScriptedBackend
    gateway: GatewayServer
    clients: list[MicsClient] = field(default_factory=list)
    _http: aiohttp.ClientSession | None = None

    @classmethod
    async def start(
        cls,
        backend: ScriptedBackend | None = None,
        **gateway_overrides: Any,
    ) -> ScriptedStack:
        backend = backend or ScriptedBackend()
        await backend.start()
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "node_id": "node-scripted",
            "tenant_auth_map": {backend.tenant_id: backend.url},
            "tenant_hook_secrets": {backend.tenant_id: backend.auth_secret},
            "hook_sign_required": True,
            "hook_timeout_ms": 2000,
            "heartbeat_sweep_interval_seconds": 0.1,
        }
        settings.update(gateway_overrides)
        gateway = GatewayServer(GatewaySettings(**settings))
        try:
            await gateway.start()
        except BaseException:
            await backend.stop()
            raise
        return cls(backend, gateway)

    async def stop(self) -> None:
        # Hanging handlers first, or the gateway and backend would wait for them.
        self.backend.release_hangs()
        for client in self.clients:
            await client.close()
        if self._http is not None:
            await self._http.close()
        await self.gateway.stop()
        await self.backend.stop()

    @property
    def ws_url(self) -> str:
        return self.gateway.ws_url

    def raw_url(self, user: str, device: str = "raw") -> str:
        return (
            f"{self.ws_url}?tenantId={self.backend.tenant_id}&token={user}-token&deviceId={device}"
        )

    async def raw_ws(self, user: str, device: str = "raw") -> aiohttp.ClientWebSocketResponse:
        """A plain WebSocket (no SDK) for observing frame order; connect_ack consumed."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        ws = await self._http.ws_connect(self.raw_url(user, device), max_msg_size=0)
        first = await ws.receive(timeout=5)
        assert first.type is aiohttp.WSMsgType.BINARY, first
        return ws

    def client(self, user: str, device: str = "d1", **options: Any) -> MicsClient:
        opts: dict[str, Any] = {"reconnect": False, "heartbeat_interval_s": 0, "ack_timeout_s": 10}
        opts.update(options)
        token = opts.pop("token", f"{user}-token")
        client = MicsClient(
            ClientOptions(
                url=self.ws_url,
                tenant_id=self.backend.tenant_id,
                token=token,
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

    def hook_metric(self, op: str, result: str) -> float:
        return self.metric(
            "mics_hook_requests_total",
            {"tenant": self.backend.tenant_id, "op": op, "result": result},
        )
