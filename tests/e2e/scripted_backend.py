"""A scriptable tenant backend for end-to-end tests of hook failures and the offline path.

The reference backend (``mics.backend``) answers like a well-behaved tenant. The tests
of protocol.md 4.2-4.5 and 9.2-9.5 need a tenant that misbehaves on demand:
``ScriptedBackend`` is a real aiohttp server on a free port whose every hook answers as
the test scripts it:

=====================  ==================================================================
behaviour              answer
=====================  ==================================================================
``"ok"``               HTTP 200 with a normal answer (auth: token ``<user>-token`` -> user;
                       check: allow; members: the configured list of the group; offline
                       pull / commit: served from the in-memory ``OfflineStore``)
``"status:NNN"``       HTTP NNN, empty body
``"garbage"``          HTTP 200, a body that is not protobuf
``"hang"``             never answers until ``release_hangs()`` or ``stop()`` (then 503)
``"deny:REASON"``      auth: ``ok=false, reason``; check: ``allow=false, reason`` (may be "")
``"fail:REASON"``      offline pull / commit only: HTTP 200 with ``ok=false, reason``
``"fail_n_times:N"``   the next N calls answer HTTP 500, later calls answer as ``"ok"``
``"blank_cursor"``     offline pull only: a normal page, but ``has_more=true`` and a blank
                       ``next_cursor``
=====================  ==================================================================

A backend that answers ``"status:404"`` on ``/ack-offline-messages`` is a MICS v1
backend as far as the gateway can tell (protocol.md 9.3).

Besides the behaviours:

- ``hold(path)`` / ``release(path)``: requests to ``path`` are answered as scripted, but
  the answer (for a pull: the page as it was on arrival) leaves only once released;
  held requests count in ``in_progress``. Unlike ``"hang"``, the answer is a normal one.
- ``on_get``: an optional callback (sync or async) run for every offline pull after the
  request was recorded and before the page is computed, with the parsed request and the
  1-based number of the pull; it may add messages to the store while a drain runs, or
  hold the pull on an event of its own. (A ``fail_n_times`` failure skips it.)
- ``nudge(...)``: a client for the gateway's ``POST /v1/offline-available`` (section 9.5).

It counts calls per path, tracks the calls currently in progress, and verifies the
signature of every request (protocol.md 5.1) with ``verify_hook_request``: ``/auth``
under the gateway's ``TENANT_HOOK_SECRETS`` value, every other hook under the
``tenant_secret`` it handed out in the runtime config.

``ScriptedStack`` pairs it with a real ``GatewayServer`` and hands out SDK clients.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from mics.client import ClientOptions, MicsClient
from mics.gateway.app import GatewayServer
from mics.gateway.config import GatewaySettings
from mics.protocol.ids import new_request_id
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import sign_hook_request, verify_hook_request

TENANT = "t1"
AUTH_SECRET = "auth-secret-t1"
TENANT_SECRET = "tenant-secret-t1"

AUTH = "/auth"
CHECK = "/check-message"
MEMBERS = "/get-group-members"
GET_OFFLINE = "/get-offline-messages"
ACK_OFFLINE = "/ack-offline-messages"
NUDGE_PATH = "/v1/offline-available"

OFFLINE_PATHS = (GET_OFFLINE, ACK_OFFLINE)

# Not a protobuf encoding of anything: 0xff starts a tag varint that never ends.
GARBAGE = b"\xff\xff\xff\xff\xff"

_PROTOBUF = "application/protobuf"

_REQUEST_TYPES: dict[str, type[Any]] = {
    AUTH: hook_pb.AuthRequest,
    CHECK: hook_pb.CheckMessageRequest,
    MEMBERS: hook_pb.GetGroupMembersRequest,
    GET_OFFLINE: hook_pb.GetOfflineMessagesRequest,
    ACK_OFFLINE: hook_pb.AckOfflineMessagesRequest,
}

DEFAULT_PAGE_SIZE = 100

GetCallback = Callable[[hook_pb.GetOfflineMessagesRequest, int], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class HookRequest:
    """One request as the backend received it."""

    path: str
    request: Any  # the parsed mics.hook.v1 request
    signed_ok: bool


def offline_message(
    sender: str,
    recipient: str,
    msg_id: str,
    body: bytes | None = None,
    *,
    tenant_id: str = TENANT,
    group_id: str = "",
    device_id: str = "dev-sender",
    timestamp_ms: int = 1_700_000_000_000,
) -> msg_pb.MessageRequest:
    """A normalized message (protocol.md 2.5) as a business backend would store it.

    With ``group_id`` it is a group message (no ``to_user_id``), else a single chat.
    """
    message = msg_pb.MessageRequest(
        tenant_id=tenant_id,
        user_id=sender,
        device_id=device_id,
        msg_id=msg_id,
        msg_body=msg_id.encode() if body is None else body,
        timestamp_ms=timestamp_ms,
    )
    if group_id:
        message.msg_type = msg_pb.GROUP_CHAT
        message.group_id = group_id
    else:
        message.msg_type = msg_pb.SINGLE_CHAT
        message.to_user_id = recipient
    return message


@dataclass(slots=True)
class StoredMessage:
    id: int
    message: msg_pb.MessageRequest
    delivered: bool = False


@dataclass(frozen=True, slots=True)
class OfflinePage:
    messages: list[msg_pb.MessageRequest]
    next_cursor: str
    has_more: bool


class InvalidCursor(ValueError):
    pass


class OfflineStore:
    """Per (tenant, recipient) offline messages with increasing ids; cursor = str(id).

    Follows protocol.md 9.3 for a v1.1 backend: a pull returns undelivered messages
    after the cursor (``""`` = from the start) and marks nothing unless the gateway says
    no commit follows (``ack_follows=false``); a commit marks every message of the
    recipient up to and including the cursor delivered.
    """

    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id
        self._next_id = 0
        self._users: dict[tuple[str, str], list[StoredMessage]] = {}

    def _rows(self, user_id: str, tenant_id: str | None = None) -> list[StoredMessage]:
        return self._users.setdefault((tenant_id or self.tenant_id, user_id), [])

    def add(
        self, recipient: str, message: msg_pb.MessageRequest, *, tenant_id: str | None = None
    ) -> int:
        """Store ``message`` (as is) for ``recipient``; returns its id."""
        self._next_id += 1
        stored = msg_pb.MessageRequest()
        stored.CopyFrom(message)
        self._rows(recipient, tenant_id).append(StoredMessage(self._next_id, stored))
        return self._next_id

    def add_many(
        self, recipient: str, count: int, *, sender: str = "u1", prefix: str = "off"
    ) -> list[str]:
        """Store ``count`` single-chat messages ``{prefix}-{i}``; returns their msg_ids."""
        ids = [f"{prefix}-{i}" for i in range(count)]
        for msg_id in ids:
            self.add(recipient, offline_message(sender, recipient, msg_id))
        return ids

    def inject_wrong_tenant(self, recipient: str, msg_id: str, sender: str = "u1") -> int:
        """A message in the recipient's list whose ``tenant_id`` is another tenant."""
        return self.add(
            recipient, offline_message(sender, recipient, msg_id, tenant_id="other-tenant")
        )

    def inject_wrong_recipient(self, recipient: str, msg_id: str, sender: str = "u1") -> int:
        """A message in the recipient's list that is addressed to somebody else."""
        return self.add(recipient, offline_message(sender, "somebody-else", msg_id))

    def page(
        self,
        user_id: str,
        cursor: str,
        limit: int,
        *,
        mark: bool,
        tenant_id: str | None = None,
    ) -> OfflinePage:
        if cursor and not cursor.isdigit():
            raise InvalidCursor(cursor)
        after = int(cursor) if cursor else 0
        pending = [r for r in self._rows(user_id, tenant_id) if not r.delivered and r.id > after]
        taken = pending[: max(1, limit)]
        if mark:
            for row in taken:
                row.delivered = True
        return OfflinePage(
            messages=[r.message for r in taken],
            next_cursor=str(taken[-1].id) if taken else "",
            has_more=len(pending) > len(taken),
        )

    def ack(self, user_id: str, cursor: str, *, tenant_id: str | None = None) -> None:
        rows = self._rows(user_id, tenant_id)
        if not cursor.isdigit() or not any(r.id == int(cursor) for r in rows):
            raise InvalidCursor(cursor)
        upto = int(cursor)
        for row in rows:
            if row.id <= upto:
                row.delivered = True

    def undelivered(self, user_id: str, tenant_id: str | None = None) -> list[str]:
        return [r.message.msg_id for r in self._rows(user_id, tenant_id) if not r.delivered]

    def delivered(self, user_id: str, tenant_id: str | None = None) -> list[str]:
        return [r.message.msg_id for r in self._rows(user_id, tenant_id) if r.delivered]

    def cursor_of(self, user_id: str, msg_id: str, tenant_id: str | None = None) -> str:
        """The cursor (id) under which ``msg_id`` is stored for ``user_id``."""
        for row in self._rows(user_id, tenant_id):
            if row.message.msg_id == msg_id:
                return str(row.id)
        raise KeyError(msg_id)


@dataclass(frozen=True, slots=True)
class NudgeAnswer:
    """The gateway's answer to ``POST /v1/offline-available``."""

    status: int
    body: bytes
    content_type: str

    @property
    def response(self) -> hook_pb.OfflineAvailableResponse:
        """The body parsed as OfflineAvailableResponse (raises if it does not parse)."""
        return hook_pb.OfflineAvailableResponse.FromString(self.body)


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
        self.behaviour: dict[str, str] = {path: "ok" for path in _REQUEST_TYPES}
        self.calls: Counter[str] = Counter()
        self.in_progress: Counter[str] = Counter()
        self.requests: list[HookRequest] = []
        self.offline = OfflineStore(tenant_id)
        self.on_get: GetCallback | None = None
        self._fail_left: Counter[str] = Counter()
        self._release = asyncio.Event()
        self._holds: dict[str, asyncio.Event] = {}
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._port = 0

    # -- scripting ------------------------------------------------------------------------

    def script(self, path: str, behaviour: str) -> None:
        """Set how ``path`` answers from now on (see the module docstring)."""
        if path not in _REQUEST_TYPES:
            raise ValueError(f"unknown hook path {path!r}")
        fail_n = behaviour.startswith("fail_n_times:") and behaviour[13:].isdigit()
        if not (
            behaviour in ("ok", "garbage", "hang")
            or behaviour.startswith("deny:")
            or (behaviour.startswith("status:") and behaviour[7:].isdigit())
            or (behaviour.startswith("fail:") and path in OFFLINE_PATHS)
            or (behaviour == "blank_cursor" and path == GET_OFFLINE)
            or fail_n
        ):
            raise ValueError(f"unknown behaviour {behaviour!r} for {path}")
        self._fail_left[path] = int(behaviour[13:]) if fail_n else 0
        self.behaviour[path] = behaviour

    def release_hangs(self) -> None:
        """Let every hanging handler (now and later) answer 503."""
        self._release.set()

    def hold(self, path: str) -> None:
        """Hold requests to ``path`` (they wait, counted in ``in_progress``) until released."""
        self._holds.setdefault(path, asyncio.Event()).clear()

    def release(self, path: str) -> None:
        """Let held requests to ``path`` (now and later) answer as scripted."""
        self._holds.setdefault(path, asyncio.Event()).set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def runtime_config(self) -> hook_pb.TenantRuntimeConfig:
        return hook_pb.TenantRuntimeConfig(
            hook_base_url=self.url, tenant_secret=self.tenant_secret, **self.runtime
        )

    # -- what the offline hooks saw ---------------------------------------------------------

    def requests_to(self, path: str) -> list[Any]:
        return [r.request for r in self.requests if r.path == path]

    @property
    def gets(self) -> list[hook_pb.GetOfflineMessagesRequest]:
        """Every /get-offline-messages request, in arrival order."""
        return self.requests_to(GET_OFFLINE)

    def gets_of(self, user_id: str) -> list[hook_pb.GetOfflineMessagesRequest]:
        """The /get-offline-messages requests for one recipient."""
        return [g for g in self.gets if g.user_id == user_id]

    @property
    def acks(self) -> list[hook_pb.AckOfflineMessagesRequest]:
        """Every /ack-offline-messages request, in arrival order."""
        return self.requests_to(ACK_OFFLINE)

    @property
    def ack_cursors(self) -> list[str]:
        return [a.cursor for a in self.acks]

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
        for gate in self._holds.values():
            gate.set()
        if self._http is not None:
            await self._http.close()
            self._http = None
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
        failing = self._fail_left[path] > 0
        if failing:
            self._fail_left[path] -= 1
        self.in_progress[path] += 1
        try:
            if behaviour == "hang":
                await self._release.wait()
                return web.Response(status=503)
            if failing:
                answer = web.Response(status=500)
            else:
                if path == GET_OFFLINE and self.on_get is not None:
                    pending = self.on_get(parsed, self.calls[path])
                    if inspect.isawaitable(pending):
                        await pending
                answer = self._answer(path, parsed, behaviour)
            # A held request has its answer ready (a page is a snapshot taken on arrival),
            # it only does not leave yet.
            gate = self._holds.get(path)
            if gate is not None:
                await gate.wait()
            return answer
        finally:
            self.in_progress[path] -= 1

    def _answer(self, path: str, parsed: Any, behaviour: str) -> web.Response:
        if behaviour.startswith("status:"):
            return web.Response(status=int(behaviour[7:]))
        if behaviour == "garbage":
            return web.Response(body=GARBAGE, content_type=_PROTOBUF)
        deny = behaviour[5:] if behaviour.startswith("deny:") else None
        fail = behaviour[5:] if behaviour.startswith("fail:") else None
        if path == AUTH:
            response: Any = self._auth(parsed, deny)
        elif path == CHECK:
            response = hook_pb.CheckMessageResponse(allow=deny is None, reason=deny or "")
        elif path == MEMBERS:
            response = hook_pb.GetGroupMembersResponse(
                user_ids=self.groups.get(parsed.group_id, [])
            )
        elif path == GET_OFFLINE:
            response = self._get_offline(parsed, fail, blank_cursor=behaviour == "blank_cursor")
        else:
            response = self._ack_offline(parsed, fail)
        response.meta.CopyFrom(parsed.meta)
        response.meta.sign = ""
        return web.Response(body=response.SerializeToString(), content_type=_PROTOBUF)

    def _auth(self, req: hook_pb.AuthRequest, deny: str | None) -> hook_pb.AuthResponse:
        if deny is not None:
            return hook_pb.AuthResponse(ok=False, reason=deny)
        user, sep, rest = req.token.rpartition("-token")
        if not sep or rest or not user:
            return hook_pb.AuthResponse(ok=False, reason="invalid token")
        return hook_pb.AuthResponse(
            ok=True, user_id=user, device_id=req.device_id, config=self.runtime_config()
        )

    def _get_offline(
        self, req: hook_pb.GetOfflineMessagesRequest, fail: str | None, *, blank_cursor: bool
    ) -> hook_pb.GetOfflineMessagesResponse:
        if fail is not None:
            return hook_pb.GetOfflineMessagesResponse(ok=False, reason=fail)
        limit = req.max_messages if req.max_messages > 0 else DEFAULT_PAGE_SIZE
        try:
            # Without ack_follows the caller is a MICS v1 gateway: mark on fetch (9.3).
            page = self.offline.page(
                req.user_id,
                req.cursor,
                limit,
                mark=not req.ack_follows,
                tenant_id=req.meta.tenant_id,
            )
        except InvalidCursor:
            return hook_pb.GetOfflineMessagesResponse(ok=False, reason="invalid cursor")
        response = hook_pb.GetOfflineMessagesResponse(
            ok=True,
            messages=page.messages,
            next_cursor=page.next_cursor,
            has_more=page.has_more,
        )
        if blank_cursor:
            response.has_more = True
            response.next_cursor = ""
        return response

    def _ack_offline(
        self, req: hook_pb.AckOfflineMessagesRequest, fail: str | None
    ) -> hook_pb.AckOfflineMessagesResponse:
        if fail is not None:
            return hook_pb.AckOfflineMessagesResponse(ok=False, reason=fail)
        try:
            self.offline.ack(req.user_id, req.cursor, tenant_id=req.meta.tenant_id)
        except InvalidCursor:
            return hook_pb.AckOfflineMessagesResponse(ok=False, reason="invalid cursor")
        return hook_pb.AckOfflineMessagesResponse(ok=True)

    # -- the nudge (protocol.md 9.5) ----------------------------------------------------------

    def nudge_request(
        self,
        user_id: str,
        *,
        tenant_id: str | None = None,
        secret: str | None = None,
        request_id: str | None = None,
        timestamp_ms: int | None = None,
    ) -> hook_pb.OfflineAvailableRequest:
        """A signed OfflineAvailableRequest: fresh request id and timestamp by default.

        Signed with ``secret`` (default: the tenant secret handed out by /auth); an
        empty secret leaves it unsigned.
        """
        request = hook_pb.OfflineAvailableRequest(user_id=user_id)
        request.meta.tenant_id = self.tenant_id if tenant_id is None else tenant_id
        request.meta.request_id = new_request_id() if request_id is None else request_id
        request.meta.timestamp_ms = (
            time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
        )
        sign_hook_request(request, self.tenant_secret if secret is None else secret)
        return request

    async def post_nudge(
        self, gateway_url: str, body: bytes, *, method: str = "POST"
    ) -> NudgeAnswer:
        """Send ``body`` to ``{gateway_url}/v1/offline-available`` as is."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        async with self._http.request(
            method,
            gateway_url.rstrip("/") + NUDGE_PATH,
            data=body,
            headers={"Content-Type": _PROTOBUF},
        ) as resp:
            return NudgeAnswer(resp.status, await resp.read(), resp.content_type)

    async def nudge(self, gateway_url: str, user_id: str, **request: Any) -> NudgeAnswer:
        """Build a signed nudge (see ``nudge_request``) and send it."""
        nudge = self.nudge_request(user_id, **request)
        return await self.post_nudge(gateway_url, nudge.SerializeToString())


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
        for path in _REQUEST_TYPES:
            self.backend.release(path)
        for client in self.clients:
            await client.close()
        if self._http is not None:
            await self._http.close()
        await self.gateway.stop()
        await self.backend.stop()

    @property
    def ws_url(self) -> str:
        return self.gateway.ws_url

    def raw_url(self, user: str, device: str = "raw", protocol_version: str = "") -> str:
        url = (
            f"{self.ws_url}?tenantId={self.backend.tenant_id}&token={user}-token&deviceId={device}"
        )
        return url + (f"&protocolVersion={protocol_version}" if protocol_version else "")

    async def raw_ws(
        self, user: str, device: str = "raw", protocol_version: str = ""
    ) -> aiohttp.ClientWebSocketResponse:
        """A plain WebSocket (no SDK) for observing frame order; connect_ack consumed."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        ws = await self._http.ws_connect(
            self.raw_url(user, device, protocol_version), max_msg_size=0
        )
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

    async def nudge(self, user_id: str, **request: Any) -> NudgeAnswer:
        """A signed nudge for ``user_id`` to this stack's gateway."""
        return await self.backend.nudge(self.gateway.url, user_id, **request)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.gateway.gateway.metrics_registry.sample(name, labels)

    def hook_metric(self, op: str, result: str) -> float:
        return self.metric(
            "mics_hook_requests_total",
            {"tenant": self.backend.tenant_id, "op": op, "result": result},
        )
