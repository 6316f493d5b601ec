"""The backend's user directory: users, their tokens, block flags and groups, per tenant.

In memory and mutable: built from the config at start-up, changed by the admin API.
It is used from one asyncio event loop only, so it needs no locks; nothing here awaits.
A real tenant backend would put the same operations in front of its user database.

Invariants:

* a token belongs to exactly one (tenant, user); ``lookup_token`` is one dict access;
* every group member is a user of the group's tenant (removing a user removes it from
  its groups);
* ids are non-empty and contain no ``|`` (protocol.md section 1.1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mics.backend.config import BackendConfig, check_id


class DirectoryError(ValueError):
    """A directory change was refused; ``kind`` tells the admin API which HTTP status fits."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "not_found" | "conflict" | "invalid"


def _check_id(kind: str, value: str) -> None:
    try:
        check_id(kind, value)
    except ValueError as exc:
        raise DirectoryError("invalid", str(exc)) from None


@dataclass(slots=True)
class UserRecord:
    tokens: set[str] = field(default_factory=set)
    blocked: bool = False


@dataclass(slots=True)
class TenantRecord:
    users: dict[str, UserRecord] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TokenOwner:
    tenant_id: str
    user_id: str


class Directory:
    """Users, tokens and groups of every configured tenant."""

    def __init__(self) -> None:
        self._tenants: dict[str, TenantRecord] = {}
        self._tokens: dict[str, TokenOwner] = {}

    @classmethod
    def from_config(cls, config: BackendConfig) -> Directory:
        directory = cls()
        for tenant_id, tenant in config.tenants.items():
            directory.add_tenant(tenant_id)
            for user_id, user in tenant.users.items():
                directory.add_user(tenant_id, user_id, user.tokens, blocked=user.blocked)
            for group_id, members in tenant.groups.items():
                directory.set_group_members(tenant_id, group_id, members)
        return directory

    # -- tenants -------------------------------------------------------------------

    def add_tenant(self, tenant_id: str) -> None:
        """Register an (empty) tenant; a no-op if it exists."""
        _check_id("tenant", tenant_id)
        self._tenants.setdefault(tenant_id, TenantRecord())

    def has_tenant(self, tenant_id: str) -> bool:
        return tenant_id in self._tenants

    def _tenant(self, tenant_id: str) -> TenantRecord:
        try:
            return self._tenants[tenant_id]
        except KeyError:
            raise DirectoryError("not_found", f"unknown tenant {tenant_id!r}") from None

    # -- users and tokens ------------------------------------------------------------

    def lookup_token(self, token: str) -> TokenOwner | None:
        """Who ``token`` authenticates as, or None. Tokens are never empty."""
        return self._tokens.get(token) if token else None

    def has_user(self, tenant_id: str, user_id: str) -> bool:
        tenant = self._tenants.get(tenant_id)
        return tenant is not None and user_id in tenant.users

    def is_blocked(self, tenant_id: str, user_id: str) -> bool:
        tenant = self._tenants.get(tenant_id)
        user = tenant.users.get(user_id) if tenant else None
        return user is not None and user.blocked

    def add_user(
        self,
        tenant_id: str,
        user_id: str,
        tokens: Iterable[str] = (),
        *,
        blocked: bool | None = None,
    ) -> bool:
        """Create the user if needed and add ``tokens``; returns True if it was created.

        ``blocked=None`` keeps an existing user's flag (a new user is not blocked).

        All tokens are checked before anything changes: a token owned by another user
        raises DirectoryError("conflict") and leaves the directory as it was.
        """
        tenant = self._tenant(tenant_id)
        _check_id("user", user_id)
        tokens = list(tokens)
        self._check_tokens(tenant_id, user_id, tokens)
        created = user_id not in tenant.users
        user = tenant.users.setdefault(user_id, UserRecord())
        if blocked is not None:
            user.blocked = blocked
        for token in tokens:
            user.tokens.add(token)
            self._tokens[token] = TokenOwner(tenant_id, user_id)
        return created

    def add_token(self, tenant_id: str, user_id: str, token: str) -> None:
        """Let ``token`` authenticate as an existing user."""
        user = self._user(tenant_id, user_id)
        self._check_tokens(tenant_id, user_id, [token])
        user.tokens.add(token)
        self._tokens[token] = TokenOwner(tenant_id, user_id)

    def revoke_token(self, token: str) -> bool:
        """Forget ``token``; returns False if it was unknown."""
        owner = self._tokens.pop(token, None)
        if owner is None:
            return False
        self._tenants[owner.tenant_id].users[owner.user_id].tokens.discard(token)
        return True

    def set_blocked(self, tenant_id: str, user_id: str, blocked: bool) -> None:
        self._user(tenant_id, user_id).blocked = blocked

    def remove_user(self, tenant_id: str, user_id: str) -> None:
        """Delete a user, its tokens and its group memberships."""
        tenant = self._tenant(tenant_id)
        user = self._user(tenant_id, user_id)
        for token in user.tokens:
            del self._tokens[token]
        del tenant.users[user_id]
        for group_id, members in tenant.groups.items():
            if user_id in members:
                tenant.groups[group_id] = [m for m in members if m != user_id]

    def _user(self, tenant_id: str, user_id: str) -> UserRecord:
        tenant = self._tenant(tenant_id)
        try:
            return tenant.users[user_id]
        except KeyError:
            raise DirectoryError("not_found", f"unknown user {user_id!r}") from None

    def _check_tokens(self, tenant_id: str, user_id: str, tokens: list[str]) -> None:
        for token in tokens:
            if not token:
                raise DirectoryError("invalid", "tokens must not be empty")
            owner = self._tokens.get(token)
            if owner is not None and owner != TokenOwner(tenant_id, user_id):
                # Do not name the owner: it may belong to another tenant.
                raise DirectoryError("conflict", "token already belongs to another user")

    # -- groups ----------------------------------------------------------------------

    def group_members(self, tenant_id: str, group_id: str) -> list[str] | None:
        """Members of a group (a copy), or None if the tenant or group is unknown."""
        tenant = self._tenants.get(tenant_id)
        members = tenant.groups.get(group_id) if tenant else None
        return None if members is None else list(members)

    def set_group_members(self, tenant_id: str, group_id: str, members: Iterable[str]) -> bool:
        """Create or replace a group; returns True if it was created.

        Members must be users of the tenant; repeats are dropped, order is kept.
        """
        tenant = self._tenant(tenant_id)
        _check_id("group", group_id)
        unique = list(dict.fromkeys(members))
        unknown = [m for m in unique if m not in tenant.users]
        if unknown:
            raise DirectoryError("invalid", f"not users of tenant {tenant_id!r}: {unknown}")
        created = group_id not in tenant.groups
        tenant.groups[group_id] = unique
        return created

    def remove_group(self, tenant_id: str, group_id: str) -> bool:
        return self._tenant(tenant_id).groups.pop(group_id, None) is not None

    # -- inspection --------------------------------------------------------------------

    def summary(self, tenant_id: str) -> dict[str, Any]:
        """JSON-ready view of one tenant for the admin API; token values are not shown."""
        tenant = self._tenant(tenant_id)
        return {
            "tenant_id": tenant_id,
            "users": {
                user_id: {"tokens": len(user.tokens), "blocked": user.blocked}
                for user_id, user in sorted(tenant.users.items())
            },
            "groups": {group_id: list(m) for group_id, m in sorted(tenant.groups.items())},
        }
