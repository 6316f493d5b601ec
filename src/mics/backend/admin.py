"""Admin API (JSON) to change the directory at run time, mounted under ``/admin``.

    GET    /admin/tenants                        {"tenants": [...]}
    GET    /admin/tenants/{tenant}               users (token counts, not values), groups
    POST   /admin/tenants/{tenant}/users         {"user_id", "tokens": [...], "blocked"?}
    DELETE /admin/tenants/{tenant}/users/{user}  also drops its tokens and memberships
    PUT    /admin/tenants/{tenant}/groups/{group} {"members": [...]}
    DELETE /admin/tenants/{tenant}/groups/{group}

Access: with ``admin_token`` configured every request needs
``Authorization: Bearer <admin_token>``; without one the API is mounted only when the
backend listens on a loopback address (see :func:`mics.backend.app.create_backend_app`).

Errors are ``{"error": "..."}`` with 400 (bad JSON or ids), 401 (token), 404 (unknown
tenant, user or group) or 409 (token owned by another user). Tenants themselves come from
the config file only: their secret must also be configured on the gateway.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel, ConfigDict, ValidationError

from mics.backend.directory import DirectoryError
from mics.backend.state import BackendState

log = logging.getLogger("mics.backend.admin")

_STATUS = {"not_found": 404, "conflict": 409, "invalid": 400}


class AddUserBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str
    tokens: list[str] = []
    blocked: bool | None = None  # None keeps an existing user's flag


class GroupBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    members: list[str]


_Body = TypeVar("_Body", bound=BaseModel)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _read_body(request: web.Request, model: type[_Body]) -> _Body:
    """Parse and validate a JSON body, or raise a 400 response."""
    try:
        data: Any = json.loads(await request.read())
        return model.model_validate(data)
    except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"invalid body: {exc}"}), content_type="application/json"
        ) from None


class AdminApi:
    """Handlers of the admin API of one backend."""

    def __init__(self, state: BackendState) -> None:
        self._state = state

    def app(self) -> web.Application:
        """The admin sub-application (mount it with ``add_subapp("/admin", ...)``)."""
        app = web.Application(middlewares=[self._authorize, self._directory_errors])
        app.add_routes(
            [
                web.get("/tenants", self.list_tenants),
                web.get("/tenants/{tenant}", self.get_tenant),
                web.post("/tenants/{tenant}/users", self.add_user),
                web.delete("/tenants/{tenant}/users/{user}", self.remove_user),
                web.put("/tenants/{tenant}/groups/{group}", self.set_group),
                web.delete("/tenants/{tenant}/groups/{group}", self.remove_group),
            ]
        )
        return app

    # -- middlewares -----------------------------------------------------------------

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        token = self._state.config.admin_token
        if token is not None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # Constant-time comparison: do not leak the token through timing.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8"), token.encode("utf-8")
            ):
                response = _error(401, "unauthorized")
                response.headers["WWW-Authenticate"] = 'Bearer realm="mics-backend-admin"'
                return response
        return await handler(request)

    @web.middleware
    async def _directory_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except DirectoryError as exc:
            return _error(_STATUS.get(exc.kind, 400), str(exc))

    # -- handlers --------------------------------------------------------------------

    async def list_tenants(self, request: web.Request) -> web.Response:
        return web.json_response({"tenants": sorted(self._state.config.tenants)})

    async def get_tenant(self, request: web.Request) -> web.Response:
        tenant_id = request.match_info["tenant"]
        summary = self._state.directory.summary(tenant_id)
        tenant = self._state.config.tenants[tenant_id]
        summary["sign_required"] = tenant.sign_required
        summary["offline_mode"] = tenant.offline_mode
        summary["blocked_words"] = len(tenant.blocked_words)
        return web.json_response(summary)

    async def add_user(self, request: web.Request) -> web.Response:
        tenant_id = request.match_info["tenant"]
        body = await _read_body(request, AddUserBody)
        created = self._state.directory.add_user(
            tenant_id, body.user_id, body.tokens, blocked=body.blocked
        )
        log.info(
            "user added" if created else "user updated",
            extra={"tenant": tenant_id, "user_id": body.user_id, "tokens": len(body.tokens)},
        )
        return web.json_response(
            {"tenant_id": tenant_id, "user_id": body.user_id, "created": created},
            status=201 if created else 200,
        )

    async def remove_user(self, request: web.Request) -> web.Response:
        tenant_id, user_id = request.match_info["tenant"], request.match_info["user"]
        self._state.directory.remove_user(tenant_id, user_id)
        log.info("user removed", extra={"tenant": tenant_id, "user_id": user_id})
        return web.json_response({"tenant_id": tenant_id, "user_id": user_id, "removed": True})

    async def set_group(self, request: web.Request) -> web.Response:
        tenant_id, group_id = request.match_info["tenant"], request.match_info["group"]
        body = await _read_body(request, GroupBody)
        created = self._state.directory.set_group_members(tenant_id, group_id, body.members)
        members = self._state.directory.group_members(tenant_id, group_id) or []
        log.info("group set", extra={"tenant": tenant_id, "group_id": group_id})
        return web.json_response(
            {"tenant_id": tenant_id, "group_id": group_id, "members": members},
            status=201 if created else 200,
        )

    async def remove_group(self, request: web.Request) -> web.Response:
        tenant_id, group_id = request.match_info["tenant"], request.match_info["group"]
        if not self._state.directory.remove_group(tenant_id, group_id):
            return _error(404, f"unknown group {group_id!r}")
        log.info("group removed", extra={"tenant": tenant_id, "group_id": group_id})
        return web.json_response({"tenant_id": tenant_id, "group_id": group_id, "removed": True})
