"""POST /v1/offline-available: the backend says a user has new offline messages.

protocol.md 9.5. The request is signed like a hook (section 5.1) with the tenant's
secret; the gateway accepts the configured TENANT_HOOK_SECRETS entry or the latest
tenant_secret from that tenant's /auth, rejects stale or replayed requests, and
schedules a re-pull on each local connection of the user. The body of every answer is
an OfflineAvailableResponse.
"""

from __future__ import annotations

import logging

from aiohttp import web
from google.protobuf.message import DecodeError

from mics.gateway.core import Gateway
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.replay import ReplayGuard
from mics.protocol.signing import verify_hook_request

log = logging.getLogger("mics.gateway.nudge")

_PROTOBUF = "application/protobuf"
MAX_BODY_BYTES = 64 * 1024


def _answer(status: int, ok: bool, reason: str = "", connections: int = 0) -> web.Response:
    body = hook_pb.OfflineAvailableResponse(ok=ok, reason=reason, connections=connections)
    return web.Response(status=status, body=body.SerializeToString(), content_type=_PROTOBUF)


class NudgeEndpoint:
    def __init__(self, gateway: Gateway, replay: ReplayGuard | None = None) -> None:
        self._gateway = gateway
        self._replay = replay or ReplayGuard()
        self._requests = gateway.metrics_registry.counter(
            "mics_offline_nudges", "Offline-available nudges by result", ("tenant", "result")
        )

    async def handle(self, request: web.Request) -> web.Response:
        gateway = self._gateway
        if request.method != "POST":
            response = _answer(405, False, "method not allowed")
            response.headers["Allow"] = "POST"
            return response
        if gateway.draining:
            return _answer(503, False, "server draining")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return self._bad("", "invalid request")
        nudge = hook_pb.OfflineAvailableRequest()
        try:
            nudge.ParseFromString(await request.read())
        except (DecodeError, ValueError, RuntimeError):
            return self._bad("", "invalid request")
        tenant = nudge.meta.tenant_id
        if not nudge.meta.request_id:
            return self._bad("", "invalid request")
        if not gateway.tenants.known(tenant):
            return self._bad("", "invalid tenant")
        if not nudge.user_id.strip():
            return self._bad(tenant, "missing user_id")
        keys = gateway.nudge_secrets(tenant)
        if not nudge.meta.sign or not any(verify_hook_request(nudge, k) for k in keys):
            self._requests.labels(tenant, "invalid_sign").inc()
            return _answer(401, False, "invalid sign")
        # Checked only after the signature: a forgery must not burn a real request id.
        if self._replay.check(tenant, nudge.meta.request_id, nudge.meta.timestamp_ms):
            self._requests.labels(tenant, "stale").inc()
            return _answer(401, False, "stale request")
        connections = await gateway.nudge_everywhere(tenant, nudge.user_id)
        self._requests.labels(tenant, "ok").inc()
        return _answer(200, True, connections=connections)

    def _bad(self, tenant: str, reason: str) -> web.Response:
        self._requests.labels(tenant, "bad_request").inc()
        return _answer(400, False, reason)
