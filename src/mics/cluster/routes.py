"""The online route table: which node holds each (tenant, user, device).

One implementation per deployment shape behind one interface:
- `MemoryRouteTable`: a single node; every route is local.
- a Redis table (clustering issue): routes shared by all nodes, admission in Lua.

Admission applies the tenant and per-user connection limits atomically with the
registration, and a device that is already routed is replaced without a limit check
(takeover). Removal is compare-and-delete on the connection id so that a reconnect
that already replaced a route is never erased by the old connection's cleanup.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Route:
    tenant_id: str
    user_id: str
    device_id: str
    node_id: str
    conn_id: str


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    tenant_max_connections: int = 0  # <= 0: no limit
    user_max_connections: int = 0


class AdmissionResult(Enum):
    ADMITTED = "admitted"
    REPLACED = "replaced"  # the device was routed already; its old route was overwritten
    DENIED = "denied"


@dataclass(frozen=True, slots=True)
class Admission:
    result: AdmissionResult
    previous: Route | None = None  # the overwritten route when REPLACED


class RouteTable(Protocol):
    @property
    def local_only(self) -> bool:
        """True when every route is on this node: callers may skip remote lookups."""
        ...

    async def admit(self, route: Route, limits: AdmissionLimits) -> Admission: ...

    async def remove(self, route: Route) -> bool:
        """Delete the route if it still names this connection; True if deleted."""
        ...

    async def lookup(self, tenant_id: str, user_id: str) -> list[Route]: ...


class MemoryRouteTable:
    """Routes of a single node, with the same admission rules as the cluster table."""

    def __init__(self) -> None:
        # tenant -> user -> device -> route
        self._routes: dict[str, dict[str, dict[str, Route]]] = {}
        self._tenant_counts: dict[str, int] = {}

    @property
    def local_only(self) -> bool:
        return True

    async def admit(self, route: Route, limits: AdmissionLimits) -> Admission:
        users = self._routes.setdefault(route.tenant_id, {})
        devices = users.get(route.user_id)
        previous = devices.get(route.device_id) if devices else None
        if previous is not None:
            assert devices is not None
            devices[route.device_id] = route
            return Admission(AdmissionResult.REPLACED, previous)
        tenant_count = self._tenant_counts.get(route.tenant_id, 0)
        user_count = len(devices) if devices else 0
        if 0 < limits.user_max_connections <= user_count:
            return Admission(AdmissionResult.DENIED)
        if 0 < limits.tenant_max_connections <= tenant_count:
            return Admission(AdmissionResult.DENIED)
        users.setdefault(route.user_id, {})[route.device_id] = route
        self._tenant_counts[route.tenant_id] = tenant_count + 1
        return Admission(AdmissionResult.ADMITTED)

    async def remove(self, route: Route) -> bool:
        users = self._routes.get(route.tenant_id)
        devices = users.get(route.user_id) if users else None
        current = devices.get(route.device_id) if devices else None
        if current is None or current.conn_id != route.conn_id:
            return False
        assert users is not None
        assert devices is not None
        del devices[route.device_id]
        if not devices:
            del users[route.user_id]
        self._tenant_counts[route.tenant_id] -= 1
        return True

    async def lookup(self, tenant_id: str, user_id: str) -> list[Route]:
        devices = self._routes.get(tenant_id, {}).get(user_id)
        return list(devices.values()) if devices else []

    def count(self, tenant_id: str) -> int:
        return self._tenant_counts.get(tenant_id, 0)
