"""The demo tenant used by the dev launcher, the examples and the end-to-end tests."""

from __future__ import annotations

from mics.backend.config import BackendConfig, TenantConfig, UserConfig

DEMO_TENANT = "demo"
DEMO_SECRET = "dev-secret-demo"
DEMO_USERS = ("alice", "bob", "carol")
DEMO_GROUP = "friends"
DEMO_BLOCKED_WORD = "forbidden"


def demo_token(user_id: str) -> str:
    """The token of a demo user: ``alice`` -> ``alice-token``."""
    return f"{user_id}-token"


def demo_config(
    port: int = 0,
    secret: str = DEMO_SECRET,
    *,
    offline_mode: str = "notify_pull",
    database_url: str = "",
) -> BackendConfig:
    """Tenant ``demo``: alice, bob and carol (tokens ``<user>-token``), all in ``friends``.

    Signing is required, the heartbeat timeout is 30 s, messages containing
    ``forbidden`` are denied, and offline messages take the notify-pull path (events to
    the offline store, pulled on connect) unless ``offline_mode`` says otherwise.
    Listens on 127.0.0.1 (``port`` 0 picks a free port), so the admin API is available
    without a token.
    """
    tenant = TenantConfig(
        secret=secret,
        sign_required=True,
        heartbeat_timeout_seconds=30,
        offline_mode=offline_mode,
        users={user: UserConfig(tokens=[demo_token(user)]) for user in DEMO_USERS},
        groups={DEMO_GROUP: list(DEMO_USERS)},
        blocked_words=[DEMO_BLOCKED_WORD],
    )
    return BackendConfig(
        host="127.0.0.1", port=port, database_url=database_url, tenants={DEMO_TENANT: tenant}
    )
