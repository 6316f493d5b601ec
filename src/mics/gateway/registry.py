"""Sessions on this node, by tenant, user and device."""

from __future__ import annotations

from collections.abc import Iterator

from mics.gateway.session import Session


class SessionRegistry:
    def __init__(self) -> None:
        self._by_tenant: dict[str, dict[str, dict[str, Session]]] = {}
        self._count = 0

    def add(self, session: Session) -> Session | None:
        """Register ``session``; return the session it replaced on the same device."""
        devices = self._by_tenant.setdefault(session.tenant_id, {}).setdefault(session.user_id, {})
        previous = devices.get(session.device_id)
        devices[session.device_id] = session
        if previous is None:
            self._count += 1
        return previous

    def remove(self, session: Session) -> bool:
        """Unregister ``session`` if it is still the registered one for its device."""
        users = self._by_tenant.get(session.tenant_id)
        devices = users.get(session.user_id) if users else None
        if devices is None or devices.get(session.device_id) is not session:
            return False
        assert users is not None
        del devices[session.device_id]
        if not devices:
            del users[session.user_id]
            if not users:
                del self._by_tenant[session.tenant_id]
        self._count -= 1
        return True

    def devices(self, tenant_id: str, user_id: str) -> dict[str, Session] | None:
        users = self._by_tenant.get(tenant_id)
        return users.get(user_id) if users else None

    def __iter__(self) -> Iterator[Session]:
        for users in list(self._by_tenant.values()):
            for devices in list(users.values()):
                yield from list(devices.values())

    def __len__(self) -> int:
        return self._count
