"""The cluster route table in Redis, in the MICS v1 layout (protocol section 8).

Keys (the ids are substituted as they are; tenant and user ids never contain ``|``):

=====================================  =====  =================================================
``{tenant}:online:{user}``             HASH   device -> ``nodeId|endpoint|connId|onlineAtMs``
``{tenant}:conn_leases``               ZSET   ``user|device``, score = lease expiry (Unix ms)
``{tenant}:user:{user}:conn_leases``   ZSET   ``device``, score = lease expiry (Unix ms)
``nodes:{nodeId}:routes``              SET    ``tenant|user|device`` registered by the node
=====================================  =====  =================================================

The hash and both lease sets expire 2 x lease TTL after their last write. Admission and
removal are Lua scripts, so the limit check and the write are one atomic step on the
server. Leases count connections: a lease whose expiry passed no longer holds a slot, and
admission drops it (and that user's stale hash field with it).

All methods raise :class:`RouteTableUnavailable` when Redis cannot be reached or answers
with an error; callers treat the users concerned as offline. :meth:`RedisRouteTable.renew`
reports failures in its result instead.

The client should fail fast rather than retry for seconds, e.g.
``Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5,
retry=redis.asyncio.retry.Retry(NoBackoff(), 1))``; redis-py's default retries a dead
server for about 4 s.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from mics.cluster.routes import Admission, AdmissionLimits, AdmissionResult, Route

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "GROUP_ROUTE_CHUNK_SIZE",
    "RENEW_CHUNK_SIZE",
    "RedisRouteTable",
    "RemoteRoute",
    "RenewResult",
    "RouteTableUnavailable",
    "format_route_value",
    "lease_ttl_for",
    "node_routes_key",
    "node_routes_member",
    "online_key",
    "parse_node_routes_member",
    "parse_route_value",
    "renew_interval_for",
    "tenant_lease_member",
    "tenant_leases_key",
    "user_leases_key",
]

DEFAULT_LEASE_TTL_S: Final = 30.0
DEFAULT_HEARTBEAT_TIMEOUT_S: Final = 30.0
GROUP_ROUTE_CHUNK_SIZE: Final = 256
RENEW_CHUNK_SIZE: Final = 512
SEPARATOR: Final = "|"

T = TypeVar("T")


class RouteTableUnavailable(Exception):
    """Redis could not be reached or failed the operation; treat the user as offline."""


@dataclass(frozen=True, slots=True)
class RemoteRoute(Route):
    """A route read from Redis: a :class:`Route` plus what forwarding needs.

    Being a dataclass subclass, it never compares equal to a plain ``Route``; compare
    routes by ``node_id`` and ``conn_id``.
    """

    endpoint: str  # the owning node's PUBLIC_ENDPOINT
    online_at_ms: int  # when the route was written, Unix ms


@dataclass(frozen=True, slots=True)
class RenewResult:
    """The outcome of one :meth:`RedisRouteTable.renew` call."""

    renewed: int
    # No longer registered under this connection (taken over, expired and dropped, or
    # lost with Redis's data): re-admit the session, or close it if admission is denied.
    lost: tuple[Route, ...] = ()
    # Redis failed: whether these were renewed is unknown; retry on the next round.
    failed: tuple[Route, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.lost and not self.failed


# --- layout ------------------------------------------------------------------------------


def online_key(tenant_id: str, user_id: str) -> str:
    return f"{tenant_id}:online:{user_id}"


def tenant_leases_key(tenant_id: str) -> str:
    return f"{tenant_id}:conn_leases"


def user_leases_key(tenant_id: str, user_id: str) -> str:
    return f"{tenant_id}:user:{user_id}:conn_leases"


def node_routes_key(node_id: str) -> str:
    return f"nodes:{node_id}:routes"


def tenant_lease_member(user_id: str, device_id: str) -> str:
    return f"{user_id}{SEPARATOR}{device_id}"


def node_routes_member(tenant_id: str, user_id: str, device_id: str) -> str:
    return f"{tenant_id}{SEPARATOR}{user_id}{SEPARATOR}{device_id}"


def parse_node_routes_member(member: str) -> tuple[str, str, str] | None:
    """``tenant|user|device`` -> its parts; None if malformed. Tenant and user ids
    never contain ``|``, so anything after the second separator is the device id."""
    parts = member.split(SEPARATOR, 2)
    if len(parts) != 3 or not parts[0]:
        return None
    return parts[0], parts[1], parts[2]


def format_route_value(node_id: str, endpoint: str, conn_id: str, online_at_ms: int) -> str:
    return SEPARATOR.join((node_id, endpoint, conn_id, str(online_at_ms)))


def parse_route_value(
    tenant_id: str, user_id: str, device_id: str, value: str
) -> RemoteRoute | None:
    """A hash value ``nodeId|endpoint|connectionId|onlineAtUnixMs``; None if malformed
    (not four fields, an empty node or connection id, or a non-integer time)."""
    parts = value.split(SEPARATOR)
    if len(parts) != 4:
        return None
    node_id, endpoint, conn_id, online_at = parts
    if not node_id or not conn_id:
        return None
    try:
        online_at_ms = int(online_at)
    except ValueError:
        return None
    return RemoteRoute(tenant_id, user_id, device_id, node_id, conn_id, endpoint, online_at_ms)


def lease_ttl_for(heartbeat_timeout_s: float) -> float:
    """Lease TTL in seconds: max(30 s, 2 x heartbeat timeout); a timeout <= 0 means 30 s."""
    timeout = heartbeat_timeout_s if heartbeat_timeout_s > 0 else DEFAULT_HEARTBEAT_TIMEOUT_S
    return max(DEFAULT_LEASE_TTL_S, 2.0 * timeout)


def renew_interval_for(heartbeat_timeout_s: float) -> float:
    """How often a live session's lease is renewed: max(1 s, heartbeat timeout / 2)."""
    timeout = heartbeat_timeout_s if heartbeat_timeout_s > 0 else DEFAULT_HEARTBEAT_TIMEOUT_S
    return max(1.0, timeout / 2.0)


# --- helpers shared with mics.cluster.nodes ------------------------------------------------


def load_lua(name: str) -> str:
    """The text of ``mics/cluster/lua/<name>``."""
    return resources.files("mics.cluster").joinpath("lua", name).read_text(encoding="utf-8")


def text(value: Any) -> str:
    """A reply item as str, whatever the client's ``decode_responses``."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


async def guarded(what: str, call: Awaitable[T]) -> T:
    """Await a Redis call; its failure becomes :class:`RouteTableUnavailable`."""
    try:
        return await call
    except (RedisError, OSError) as exc:
        raise RouteTableUnavailable(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc


def chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


_ADMIT_LUA: Final = load_lua("admit.lua")
_REMOVE_LUA: Final = load_lua("remove.lua")
_RENEW_LUA: Final = load_lua("renew.lua")

_STATUS: Final = {
    "admitted": AdmissionResult.ADMITTED,
    "replaced": AdmissionResult.REPLACED,
    "denied_user": AdmissionResult.DENIED,
    "denied_tenant": AdmissionResult.DENIED,
}


# --- the table ---------------------------------------------------------------------------


class RedisRouteTable:
    """Routes of the whole cluster, shared by all nodes through Redis (section 8).

    ``node_id`` and ``endpoint`` are this node's: :meth:`admit` writes them into the
    route. ``lease_ttl_s`` is the default lease TTL (see :func:`lease_ttl_for`); admit
    and renew take a per-call override for tenants with a longer heartbeat timeout.
    ``clock`` returns Unix time in seconds (lease expiries and ``onlineAtUnixMs``).
    """

    def __init__(
        self,
        redis: Redis,
        *,
        node_id: str,
        endpoint: str,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        clock: Callable[[], float] = time.time,
        chunk_size: int = GROUP_ROUTE_CHUNK_SIZE,
        renew_chunk_size: int = RENEW_CHUNK_SIZE,
    ) -> None:
        if not node_id or SEPARATOR in node_id:
            raise ValueError(f"node id must be non-empty without {SEPARATOR!r}: {node_id!r}")
        if SEPARATOR in endpoint:
            raise ValueError(f"endpoint must not contain {SEPARATOR!r}: {endpoint!r}")
        if lease_ttl_s <= 0:
            raise ValueError("lease_ttl_s must be > 0")
        if chunk_size < 1 or renew_chunk_size < 1:
            raise ValueError("chunk sizes must be >= 1")
        self._redis = redis
        self._node_id = node_id
        self._endpoint = endpoint
        self._lease_ttl_s = lease_ttl_s
        self._clock = clock
        self._chunk_size = chunk_size
        self._renew_chunk_size = renew_chunk_size
        self._admit_script: AsyncScript = redis.register_script(_ADMIT_LUA)
        self._remove_script: AsyncScript = redis.register_script(_REMOVE_LUA)
        self._renew_script: AsyncScript = redis.register_script(_RENEW_LUA)

    @property
    def local_only(self) -> bool:
        return False

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def lease_ttl_s(self) -> float:
        return self._lease_ttl_s

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _ttl_ms(self, lease_ttl_s: float | None) -> int:
        ttl = self._lease_ttl_s if lease_ttl_s is None else lease_ttl_s
        if ttl <= 0:
            raise ValueError("lease_ttl_s must be > 0")
        return max(1, int(ttl * 1000))

    # -- RouteTable ------------------------------------------------------------------------

    async def admit(
        self, route: Route, limits: AdmissionLimits, *, lease_ttl_s: float | None = None
    ) -> Admission:
        """Register ``route`` unless a connection limit denies it (one atomic script).

        A device already routed anywhere in the cluster is replaced without a limit check
        and the overwritten route is returned (``previous``, a :class:`RemoteRoute`; None
        if the old value was malformed). Re-admitting a live route is idempotent: it is
        REPLACED by itself and its leases are refreshed.
        """
        if route.node_id != self._node_id:
            raise ValueError(f"route of node {route.node_id!r} admitted by {self._node_id!r}")
        _check_ids(route)
        now = self._now_ms()
        keys = (
            online_key(route.tenant_id, route.user_id),
            tenant_leases_key(route.tenant_id),
            user_leases_key(route.tenant_id, route.user_id),
            node_routes_key(route.node_id),
        )
        args = (
            route.device_id,
            format_route_value(route.node_id, self._endpoint, route.conn_id, now),
            tenant_lease_member(route.user_id, route.device_id),
            node_routes_member(route.tenant_id, route.user_id, route.device_id),
            now,
            self._ttl_ms(lease_ttl_s),
            limits.user_max_connections,
            limits.tenant_max_connections,
        )
        reply = await guarded("admit", self._admit_script(keys=keys, args=args))
        status, previous_value = text(reply[0]), text(reply[1])
        result = _STATUS.get(status)
        if result is None:
            raise RouteTableUnavailable(f"redis admit: unexpected reply {status!r}")
        previous = None
        if result is AdmissionResult.REPLACED:
            previous = parse_route_value(
                route.tenant_id, route.user_id, route.device_id, previous_value
            )
        return Admission(result, previous)

    async def remove(self, route: Route) -> bool:
        """Delete the route if it still names this node and connection (compare-and-
        delete); True if deleted. The node's routes entry is removed in any case, unless
        a newer connection of the same device on the same node owns the route."""
        _check_ids(route)
        keys = (
            online_key(route.tenant_id, route.user_id),
            tenant_leases_key(route.tenant_id),
            user_leases_key(route.tenant_id, route.user_id),
            node_routes_key(route.node_id),
        )
        args = (
            route.device_id,
            route.node_id,
            route.conn_id,
            tenant_lease_member(route.user_id, route.device_id),
            node_routes_member(route.tenant_id, route.user_id, route.device_id),
        )
        reply = await guarded("remove", self._remove_script(keys=keys, args=args))
        return int(reply) == 1

    async def lookup(self, tenant_id: str, user_id: str) -> list[Route]:
        """All routes of the user (HGETALL), by device id; malformed values are skipped."""
        fields = await guarded("lookup", self._redis.hgetall(online_key(tenant_id, user_id)))
        return _routes(tenant_id, user_id, fields)

    # -- additions -------------------------------------------------------------------------

    async def lookup_many(self, tenant_id: str, user_ids: Iterable[str]) -> dict[str, list[Route]]:
        """Routes of many users: HGETALL pipelined in chunks of ``chunk_size``.

        Every requested user is a key of the result (an empty list: offline), except a
        user whose own read failed (e.g. WRONGTYPE), who is left out: treat as offline.
        Any connection failure raises :class:`RouteTableUnavailable`.
        """
        users = list(dict.fromkeys(user_ids))
        result: dict[str, list[Route]] = {}
        for chunk in chunks(users, self._chunk_size):
            pipe = self._redis.pipeline(transaction=False)
            for user_id in chunk:
                pipe.hgetall(online_key(tenant_id, user_id))
            replies = await guarded("lookup_many", pipe.execute(raise_on_error=False))
            for user_id, reply in zip(chunk, replies, strict=True):
                if isinstance(reply, dict):
                    result[user_id] = _routes(tenant_id, user_id, reply)
        return result

    async def renew(
        self, routes: Iterable[Route], *, lease_ttl_s: float | None = None
    ) -> RenewResult:
        """Extend the leases of live sessions to now + lease TTL, pipelined.

        Only a route that still names its node and connection, with both lease entries
        present, is renewed (ZADD XX, then PEXPIRE of its three keys). Never raises for
        Redis failures: they are reported in ``failed``; after the first connection
        failure the remaining routes are not tried.
        """
        pending = list(routes)
        ttl_ms = self._ttl_ms(lease_ttl_s)
        renewed = 0
        lost: list[Route] = []
        failed: list[Route] = []
        for index, chunk in enumerate(chunks(pending, self._renew_chunk_size)):
            expiry = self._now_ms() + ttl_ms
            pipe = self._redis.pipeline(transaction=False)
            for route in chunk:
                await self._renew_script(
                    keys=(
                        online_key(route.tenant_id, route.user_id),
                        tenant_leases_key(route.tenant_id),
                        user_leases_key(route.tenant_id, route.user_id),
                    ),
                    args=(
                        route.device_id,
                        route.node_id,
                        route.conn_id,
                        tenant_lease_member(route.user_id, route.device_id),
                        expiry,
                        2 * ttl_ms,
                    ),
                    client=pipe,
                )
            try:
                replies = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError):
                failed.extend(pending[index * self._renew_chunk_size :])
                break
            for route, reply in zip(chunk, replies, strict=True):
                if isinstance(reply, Exception):
                    failed.append(route)
                elif int(reply) == 1:
                    renewed += 1
                else:
                    lost.append(route)
        return RenewResult(renewed, tuple(lost), tuple(failed))


def _check_ids(route: Route) -> None:
    if not route.tenant_id or SEPARATOR in route.tenant_id or SEPARATOR in route.user_id:
        raise ValueError(f"tenant and user ids must not contain {SEPARATOR!r}")


def _routes(tenant_id: str, user_id: str, fields: dict[Any, Any]) -> list[Route]:
    routes: list[Route] = []
    for field, value in fields.items():
        route = parse_route_value(tenant_id, user_id, text(field), text(value))
        if route is not None:
            routes.append(route)
    routes.sort(key=lambda r: r.device_id)
    return routes
