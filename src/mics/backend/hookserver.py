"""The hook endpoints the gateway calls (protocol.md sections 4 and 5).

Every hook is ``POST``, body = one serialized ``mics.hook.v1`` request, answer = the
matching response message, ``Content-Type: application/protobuf``. Each request goes
through the same admission steps before its handler runs (:meth:`HookServer._admit`):

1. parse the body                         -> 400, reason "malformed request"
2. find the tenant of ``meta.tenant_id``  -> 400, reason "unknown tenant"
3. verify ``meta.sign`` with its secret   -> 401, reason "invalid sign"
   (a wrong signature is always rejected, a missing one when ``sign_required``)
4. replay guard (protocol.md 9.9)         -> 401, reason "stale request" / "replayed request"

A handler then answers with HTTP 200, also when its answer is "no" (``ok=false``,
``allow=false``): that is a business decision, not a hook failure, and the gateway's
breaker must not count it (section 4.2). Responses echo the request's meta, unsigned
(the gateway does not verify response signatures).

To add a hook: write a handler that takes the admitted :class:`HookCall` and the parsed
request, fills the response and returns a result label (or a coroutine returning one),
and register it in :meth:`HookServer.routes` with :meth:`HookServer._serve`.

Offline hooks (protocol.md sections 4.5 and 9.3), served from the offline store:

* ``/get-offline-messages``: the recipient's undelivered messages after ``cursor``
  (``""`` = from the start) in storage order, ``max_messages`` clamped to 1..1000
  (``<= 0`` means 100). ``next_cursor`` is the cursor of the page's last row on every
  non-empty page (also with ``has_more=false``); an empty page echoes the request's
  cursor. With ``ack_follows=false`` (a MICS v1 gateway), or when ``mark_on_fetch`` is
  configured, the returned rows are marked delivered in the same transaction; with
  ``ack_follows=true`` nothing is marked. An unknown cursor answers ``ok=false``,
  ``invalid cursor``.
* ``/ack-offline-messages``: marks every undelivered message of the recipient up to and
  including the cursor's row delivered; ``ok=true`` also when nothing changed; an
  unknown or blank cursor answers ``ok=false``, ``invalid cursor``. Never 404.

A database failure answers HTTP 500, which the gateway counts as a hook failure.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from google.protobuf.message import DecodeError

from mics.backend.config import TenantConfig
from mics.backend.cursor import InvalidCursor, decode_cursor, encode_cursor
from mics.backend.directory import Directory
from mics.backend.state import (
    RESULT_BAD_REQUEST,
    RESULT_BAD_SIGN,
    RESULT_DENIED,
    RESULT_ERROR,
    RESULT_OK,
    RESULT_REPLAYED,
    RESULT_STALE,
    RESULT_UNKNOWN_TENANT,
    BackendMetrics,
    BackendState,
)
from mics.backend.store.repository import DataPage
from mics.observability.logging import log_context
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import verify_hook_request

log = logging.getLogger("mics.backend")

PROTOBUF = "application/protobuf"

# Hook names as in the `op` metric label (protocol.md section 10).
OP_AUTH = "Auth"
OP_CHECK_MESSAGE = "CheckMessage"
OP_GET_GROUP_MEMBERS = "GetGroupMembers"
OP_GET_OFFLINE_MESSAGES = "GetOfflineMessages"
OP_ACK_OFFLINE_MESSAGES = "AckOfflineMessages"

# Reasons put in AuthResponse.reason / CheckMessageResponse.reason.
REASON_MALFORMED = "malformed request"
REASON_UNKNOWN_TENANT = "unknown tenant"
REASON_INVALID_SIGN = "invalid sign"
REASON_INVALID_TOKEN = "invalid token"
REASON_USER_BLOCKED = "user blocked"
REASON_SENDER_UNKNOWN = "sender unknown"
REASON_SENDER_BLOCKED = "sender blocked"
REASON_TENANT_MISMATCH = "tenant mismatch"
REASON_RECIPIENT_UNKNOWN = "recipient unknown"
REASON_GROUP_UNKNOWN = "group unknown"
REASON_NOT_GROUP_MEMBER = "not a group member"
REASON_BLOCKED_WORD = "blocked word"
REASON_UNSUPPORTED_TYPE = "unsupported message type"
REASON_INVALID_CURSOR = "invalid cursor"
REASON_MISSING_USER = "missing user_id"

# /get-offline-messages page size (protocol.md section 4.5).
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# offline_message_delivered_total{via}
DELIVERED_VIA_ACK = "ack"
DELIVERED_VIA_FETCH = "fetch"

# Map replay-guard reasons to metric results.
_REPLAY_RESULTS = {"stale request": RESULT_STALE, "replayed request": RESULT_REPLAYED}


class HookMessage(Protocol):
    """A hook request or response: a protobuf message with a ``meta`` field."""

    meta: hook_pb.HookMeta

    def ParseFromString(self, serialized: bytes, /) -> int: ...

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


@dataclass(frozen=True, slots=True)
class HookCall:
    """A request that passed admission: its tenant is known and it is authentic."""

    tenant_id: str
    tenant: TenantConfig
    meta: hook_pb.HookMeta


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why admission refused a request, and how to answer."""

    status: int  # HTTP status
    result: str  # metric result label
    reason: str  # response reason text
    tenant_id: str = ""  # metric tenant label; "" while the tenant is unknown


# -- policy (pure functions: a tenant copying this backend replaces these) -------------


def runtime_config(tenant: TenantConfig, hook_base_url: str) -> hook_pb.TenantRuntimeConfig:
    """The TenantRuntimeConfig returned by a successful /auth (protocol.md section 3.2)."""
    config = hook_pb.TenantRuntimeConfig(
        hook_base_url=hook_base_url,
        heartbeat_timeout_seconds=tenant.heartbeat_timeout_seconds,
        offline_buffer_ttl_seconds=tenant.offline_buffer_ttl_seconds,
        tenant_max_connections=tenant.tenant_max_connections,
        user_max_connections=tenant.user_max_connections,
        tenant_max_message_qps=tenant.tenant_max_message_qps,
        tenant_secret=tenant.secret,
        offline_mode=tenant.offline_mode,
    )
    # Optional fields are set only when configured, so that the gateway's own settings
    # apply otherwise (presence matters for proto3 `optional`).
    if tenant.hook_max_concurrency is not None:
        config.hook_max_concurrency = tenant.hook_max_concurrency
    if tenant.hook_queue_timeout_ms is not None:
        config.hook_queue_timeout_ms = tenant.hook_queue_timeout_ms
    if tenant.hook_breaker_failure_threshold is not None:
        config.hook_breaker_failure_threshold = tenant.hook_breaker_failure_threshold
    if tenant.hook_breaker_open_ms is not None:
        config.hook_breaker_open_ms = tenant.hook_breaker_open_ms
    if tenant.sign_required:
        # This backend rejects unsigned hooks; tell the gateway not to send any.
        config.hook_sign_required = True
    if tenant.check_message_fail_closed is not None:
        config.check_message_fail_closed = tenant.check_message_fail_closed
    # For MICS v1 gateways, which only know the flag; v1.1 gateways use offline_mode.
    # Unset otherwise, so that "" keeps leaving the choice to the gateway.
    if tenant.offline_mode in ("notify_pull", "dual"):
        config.offline_use_hook_pull = True
    return config


def page_size(max_messages: int) -> int:
    """GetOfflineMessagesRequest.max_messages clamped: <= 0 -> 100, at most 1000."""
    if max_messages <= 0:
        return DEFAULT_PAGE_SIZE
    return min(max_messages, MAX_PAGE_SIZE)


def check_message(
    directory: Directory, tenant_id: str, tenant: TenantConfig, message: msg_pb.MessageRequest
) -> str | None:
    """None to allow ``message``, else the deny reason (CheckMessageResponse.reason)."""
    if message.tenant_id and message.tenant_id != tenant_id:
        return REASON_TENANT_MISMATCH
    sender = message.user_id
    if not directory.has_user(tenant_id, sender):
        return REASON_SENDER_UNKNOWN
    if directory.is_blocked(tenant_id, sender):
        return REASON_SENDER_BLOCKED
    if message.msg_type == msg_pb.SINGLE_CHAT:
        if not directory.has_user(tenant_id, message.to_user_id):
            return REASON_RECIPIENT_UNKNOWN
    elif message.msg_type == msg_pb.GROUP_CHAT:
        members = directory.group_members(tenant_id, message.group_id)
        if members is None:
            return REASON_GROUP_UNKNOWN
        if sender not in members:
            return REASON_NOT_GROUP_MEMBER
    else:  # proto3 enums are open: a newer client may send a type we do not know
        return REASON_UNSUPPORTED_TYPE
    if tenant.blocked_words:
        body = message.msg_body.decode("utf-8", errors="ignore").casefold()
        if any(word.casefold() in body for word in tenant.blocked_words):
            return REASON_BLOCKED_WORD
    return None


# -- HTTP layer ----------------------------------------------------------------------


class _MetricChildren:
    """Labelled children of the hook metrics, looked up once per label set (a
    ``labels()`` call validates and locks each time; these are hit per request).

    The metrics are never cleared or their children removed, so cached children stay
    the ones the registry exports.
    """

    def __init__(self, metrics: BackendMetrics) -> None:
        self._metrics = metrics
        self._requests: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[str, Any] = {}
        self._queries: dict[str, _QueryMetrics] = {}

    def request(self, tenant_id: str, op: str, result: str) -> Any:
        key = (tenant_id, op, result)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self._metrics.hook_requests.labels(*key)
        return child

    def duration(self, op: str) -> Any:
        child = self._durations.get(op)
        if child is None:
            child = self._durations[op] = self._metrics.hook_duration_ms.labels(op)
        return child

    def query(self, tenant_id: str) -> _QueryMetrics:
        children = self._queries.get(tenant_id)
        if children is None:
            m = self._metrics
            children = self._queries[tenant_id] = _QueryMetrics(
                total=m.query_total.labels(tenant_id),
                duration_ms=m.query_duration_ms.labels(tenant_id),
                count=m.query_count.labels(tenant_id),
            )
        return children


@dataclass(frozen=True, slots=True)
class _QueryMetrics:
    """The offline_message_query_* children of one tenant."""

    total: Any
    duration_ms: Any
    count: Any


# GetOfflineMessagesResponse.messages: its tag (length-delimited), and the fields
# serialized before it (lower numbers: meta, ok).
_MESSAGES_FIELD = hook_pb.GetOfflineMessagesResponse.DESCRIPTOR.fields_by_name["messages"]
_MESSAGES_TAG = bytes([(_MESSAGES_FIELD.number << 3) | 2])
_FIELDS_BEFORE_MESSAGES = tuple(
    f.name
    for f in hook_pb.GetOfflineMessagesResponse.DESCRIPTOR.fields
    if f.number < _MESSAGES_FIELD.number
)


@functools.lru_cache(maxsize=4096)
def _message_prefix(length: int) -> bytes:
    """The tag and length (varint) before one serialized message of ``length`` bytes."""
    out = bytearray(_MESSAGES_TAG)
    while length > 0x7F:
        out.append((length & 0x7F) | 0x80)
        length >>= 7
    out.append(length)
    return bytes(out)


def encode_offline_page(resp: hook_pb.GetOfflineMessagesResponse, messages: list[bytes]) -> bytes:
    """``resp`` (whose ``messages`` is empty) serialized with ``messages``, serialized
    MessageRequests, as its ``messages`` field.

    The stored bytes are written as they are: the same bytes as parsing each into
    ``resp.messages`` and serializing ``resp`` (fields in number order), for a fraction
    of the cost. They were checked to be a MessageRequest of the tenant when stored.
    """
    if not messages:
        return resp.SerializeToString()
    whole = resp.SerializeToString()
    after = hook_pb.GetOfflineMessagesResponse()
    after.CopyFrom(resp)
    for name in _FIELDS_BEFORE_MESSAGES:
        after.ClearField(name)
    tail = after.SerializeToString()
    framed = zip(map(_message_prefix, map(len, messages)), messages, strict=True)
    return b"".join(itertools.chain((whole[: len(whole) - len(tail)],), *framed, (tail,)))


class HookServer:
    """aiohttp handlers of the hook endpoints of one backend."""

    def __init__(self, state: BackendState) -> None:
        self._state = state
        self._metrics = _MetricChildren(state.metrics)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/auth", self.auth),
            web.post("/check-message", self.check_message),
            web.post("/get-group-members", self.get_group_members),
            web.post("/get-offline-messages", self.get_offline_messages),
            web.post("/ack-offline-messages", self.ack_offline_messages),
        ]

    # -- endpoints -------------------------------------------------------------------

    async def auth(self, request: web.Request) -> web.Response:
        req = hook_pb.AuthRequest()
        resp = hook_pb.AuthResponse()

        def reject(reason: str) -> None:
            resp.ok = False
            resp.reason = reason

        def handle(call: HookCall) -> str:
            owner = self._state.directory.lookup_token(req.token)
            # A token of another tenant is as invalid as an unknown one, and says so
            # in the same words: do not reveal that it exists elsewhere.
            if owner is None or owner.tenant_id != call.tenant_id:
                reject(REASON_INVALID_TOKEN)
                return RESULT_DENIED
            if self._state.directory.is_blocked(call.tenant_id, owner.user_id):
                reject(REASON_USER_BLOCKED)
                return RESULT_DENIED
            resp.ok = True
            resp.user_id = owner.user_id
            resp.config.CopyFrom(runtime_config(call.tenant, self._state.public_url))
            log.debug("auth ok", extra={"user_id": owner.user_id, "device_id": req.device_id})
            return RESULT_OK

        return await self._serve(request, OP_AUTH, req, resp, reject, handle)

    async def check_message(self, request: web.Request) -> web.Response:
        req = hook_pb.CheckMessageRequest()
        resp = hook_pb.CheckMessageResponse()

        def reject(reason: str) -> None:
            resp.allow = False
            resp.reason = reason

        def handle(call: HookCall) -> str:
            reason = check_message(self._state.directory, call.tenant_id, call.tenant, req.message)
            if reason is not None:
                reject(reason)
                log.debug("message denied", extra={"reason": reason})
                return RESULT_DENIED
            resp.allow = True
            return RESULT_OK

        return await self._serve(request, OP_CHECK_MESSAGE, req, resp, reject, handle)

    async def get_group_members(self, request: web.Request) -> web.Response:
        req = hook_pb.GetGroupMembersRequest()
        resp = hook_pb.GetGroupMembersResponse()

        def reject(reason: str) -> None:
            pass  # GetGroupMembersResponse has no reason field: the status says it all

        def handle(call: HookCall) -> str:
            # An unknown group has no members: an empty list, not an error.
            members = self._state.directory.group_members(call.tenant_id, req.group_id)
            resp.user_ids.extend(members or ())
            return RESULT_OK

        return await self._serve(request, OP_GET_GROUP_MEMBERS, req, resp, reject, handle)

    async def get_offline_messages(self, request: web.Request) -> web.Response:
        req = hook_pb.GetOfflineMessagesRequest()
        resp = hook_pb.GetOfflineMessagesResponse()
        # The page's stored MessageRequest bytes: sent as they are (field 3), not parsed
        # and serialized again (see encode_offline_page).
        messages: list[bytes] = []

        def reject(reason: str) -> None:
            resp.ok = False
            resp.reason = reason

        async def handle(call: HookCall) -> str:
            user_id = req.user_id
            if not user_id:
                reject(REASON_MISSING_USER)
                return RESULT_DENIED
            after_id = 0
            if req.cursor:
                try:
                    after_id = decode_cursor(
                        call.tenant.secret, call.tenant_id, user_id, req.cursor
                    )
                except InvalidCursor:
                    reject(REASON_INVALID_CURSOR)
                    return RESULT_DENIED
            config = self._state.config
            # ack_follows=false: a MICS v1 gateway, which never acks (section 9.3).
            mark = not req.ack_follows or config.mark_on_fetch_for(call.tenant_id)
            started = time.perf_counter()
            repository = await self._state.store.reader()
            page = DataPage(messages=[], has_more=False, last_id=None)  # no database file yet
            if repository is not None:
                page = await repository.pull_data(
                    call.tenant_id,
                    user_id,
                    after_id,
                    page_size(req.max_messages),
                    mark_delivered=mark,
                    order_by_priority=config.order_by_priority_for(call.tenant_id),
                )
            elapsed_ms = (time.perf_counter() - started) * 1000
            count = len(page.messages)
            metrics = self._metrics.query(call.tenant_id)
            metrics.total.inc()
            metrics.duration_ms.observe(elapsed_ms)
            metrics.count.observe(count)
            messages.extend(page.messages)
            if mark and count:
                self._state.metrics.delivered.labels(call.tenant_id, DELIVERED_VIA_FETCH).inc(count)
            resp.ok = True
            resp.has_more = page.has_more
            if page.last_id is None:
                resp.next_cursor = req.cursor
            else:
                resp.next_cursor = encode_cursor(
                    call.tenant.secret, call.tenant_id, user_id, page.last_id
                )
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "offline page served",
                    extra={
                        "user_id": user_id,
                        "messages": count,
                        "has_more": page.has_more,
                        "marked": mark,
                    },
                )
            return RESULT_OK

        return await self._serve(
            request,
            OP_GET_OFFLINE_MESSAGES,
            req,
            resp,
            reject,
            handle,
            encode=lambda: encode_offline_page(resp, messages),
        )

    async def ack_offline_messages(self, request: web.Request) -> web.Response:
        req = hook_pb.AckOfflineMessagesRequest()
        resp = hook_pb.AckOfflineMessagesResponse()

        def reject(reason: str) -> None:
            resp.ok = False
            resp.reason = reason

        async def handle(call: HookCall) -> str:
            user_id = req.user_id
            if not user_id:
                reject(REASON_MISSING_USER)
                return RESULT_DENIED
            try:
                upto = decode_cursor(call.tenant.secret, call.tenant_id, user_id, req.cursor)
            except InvalidCursor:
                reject(REASON_INVALID_CURSOR)
                return RESULT_DENIED
            repository = await self._state.store.reader()
            marked = 0
            if repository is not None:
                marked = await repository.mark_delivered_upto(call.tenant_id, user_id, upto)
            if marked:
                self._state.metrics.delivered.labels(call.tenant_id, DELIVERED_VIA_ACK).inc(marked)
            resp.ok = True
            log.debug("offline messages acked", extra={"user_id": user_id, "marked": marked})
            return RESULT_OK

        return await self._serve(request, OP_ACK_OFFLINE_MESSAGES, req, resp, reject, handle)

    # -- shared pipeline -------------------------------------------------------------

    async def _serve(
        self,
        request: web.Request,
        op: str,
        req: HookMessage,
        resp: HookMessage,
        reject: Callable[[str], None],
        handle: Callable[[HookCall], str | Awaitable[str]],
        *,
        encode: Callable[[], bytes] | None = None,
    ) -> web.Response:
        """Admit ``req``, run ``handle`` on success, record metrics, answer ``resp``.

        ``reject`` writes a failure reason into ``resp`` (it is a no-op for responses
        without a reason field); ``handle`` fills ``resp`` and returns the result label.
        ``encode`` serializes the answer instead of ``resp.SerializeToString``.
        """
        started = time.perf_counter()
        tenant_label = ""
        result = RESULT_ERROR
        try:
            admitted = await self._admit(request, req)
            if isinstance(admitted, Rejection):
                tenant_label, result = admitted.tenant_id, admitted.result
                if admitted.result != RESULT_BAD_REQUEST:
                    _echo_meta(resp, req.meta)
                reject(admitted.reason)
                with log_context(tenant=admitted.tenant_id, trace=req.meta.trace_id):
                    log.info(
                        "hook request rejected",
                        extra={"op": op, "result": result, "reason": admitted.reason},
                    )
                status = admitted.status
            else:
                tenant_label = admitted.tenant_id
                _echo_meta(resp, req.meta)
                with log_context(tenant=admitted.tenant_id, trace=admitted.meta.trace_id):
                    outcome = handle(admitted)
                    result = await outcome if inspect.isawaitable(outcome) else outcome
                status = 200
            body = resp.SerializeToString() if encode is None else encode()
            return web.Response(body=body, status=status, content_type=PROTOBUF)
        except web.HTTPRequestEntityTooLarge:
            result = RESULT_BAD_REQUEST
            raise
        except Exception:
            log.exception("hook handler failed", extra={"op": op})
            raise
        finally:
            self._metrics.request(tenant_label, op, result).inc()
            self._metrics.duration(op).observe((time.perf_counter() - started) * 1000)

    async def _admit(self, request: web.Request, req: HookMessage) -> HookCall | Rejection:
        """Steps 1-4 of the module docstring; parses the body into ``req``."""
        body = await request.read()
        try:
            req.ParseFromString(body)
        except (DecodeError, RuntimeError, ValueError):
            return Rejection(400, RESULT_BAD_REQUEST, REASON_MALFORMED)

        meta = req.meta
        tenant_id = meta.tenant_id
        tenant = self._state.config.tenants.get(tenant_id)
        if tenant is None:
            return Rejection(400, RESULT_UNKNOWN_TENANT, REASON_UNKNOWN_TENANT)

        # A present signature must be right even when signing is optional; verification
        # rejects non-canonical Base64 (protocol.md section 5.1).
        signed = bool(meta.sign)
        if (signed or tenant.sign_required) and not verify_hook_request(req, tenant.secret):
            return Rejection(401, RESULT_BAD_SIGN, REASON_INVALID_SIGN, tenant_id)

        # Only authentic requests reach the guard, so forgeries cannot burn request ids.
        replay = self._state.replay.check(tenant_id, meta.request_id, meta.timestamp_ms)
        if replay is not None:
            return Rejection(401, _REPLAY_RESULTS[replay], replay, tenant_id)

        return HookCall(tenant_id=tenant_id, tenant=tenant, meta=meta)


def _echo_meta(resp: HookMessage, meta: hook_pb.HookMeta) -> None:
    """Copy the request's ids into the response meta; responses are not signed."""
    resp.meta.tenant_id = meta.tenant_id
    resp.meta.request_id = meta.request_id
    resp.meta.timestamp_ms = meta.timestamp_ms
    resp.meta.trace_id = meta.trace_id
