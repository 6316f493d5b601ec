"""Configuration of the reference tenant backend.

The backend is configured by one TOML or JSON file (chosen by suffix: ``.json`` is JSON,
anything else TOML). The file declares the listen address, the optional admin token and,
per tenant, the hook secret, the runtime policy handed to the gateway in ``/auth`` and
the initial users, tokens and groups; :data:`EXAMPLE_TOML` shows every section.

The models are immutable: they describe the *initial* state. Everything the admin API
changes at run time (users, tokens, groups) lives in :class:`mics.backend.directory.Directory`.
"""

from __future__ import annotations

import ipaddress
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

# Values a TenantRuntimeConfig int32 field can carry; the gateway applies its own
# defaults and clamps (protocol.md sections 3.2 and 4.3), the backend passes them through.
Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]

# protocol.md section 9.9; "" leaves the choice to the gateway's default.
OFFLINE_MODES = ("", "notify_pull", "legacy", "dual")

# A complete, commented example (the tests check that it loads).
EXAMPLE_TOML = """\
host = "127.0.0.1"
port = 8090
# public_url = "http://backend.internal:8090"   # base URL the gateway calls back
admin_token = "change-me"                        # omit: admin API on loopback only
clock_skew_seconds = 300                         # replay window (protocol.md 9.9)

# Offline store (the tenant side of the offline path, offline-design.md 3.2).
# database_url = "postgresql+asyncpg://mics:pw@db/mics"  # "" = ./mics-offline.db
# database_auto_migrate = true                   # false: run `mics backend migrate` yourself
# database_pool_size = 10                        # pooled connections (+ as many on demand)
# database_max_overflow = 10                     # extra connections under load
# kafka_bootstrap_servers = "127.0.0.1:9092"     # "" = no Kafka consumer
# consumer_group_mode = "per_tenant"             # or "shared"
# gateway_urls = ["http://gateway-1:8080"]       # nudged after storing (protocol.md 9.5)
mark_on_fetch = false                            # true: v1 semantics for old gateways
retention_days = 30                              # delivered rows kept this long
# order_by_priority = false                      # sort each page by priority

[tenants.demo]
secret = "dev-secret-demo"        # TENANT_HOOK_SECRETS[demo] on the gateway
sign_required = true
heartbeat_timeout_seconds = 30
offline_mode = "legacy"           # "", "notify_pull", "legacy" or "dual"
# check_message_fail_closed = true
# hook_max_concurrency = 64
blocked_words = ["forbidden"]
# mark_on_fetch = true            # overrides the global switch for this tenant
# offline_sender_priority = { alice = 10 }   # stored priority of alice's offline messages

[tenants.demo.users.alice]
tokens = ["alice-token"]

[tenants.demo.users.bob]
tokens = ["bob-token"]
blocked = false

[tenants.demo.groups]
friends = ["alice", "bob"]
"""


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid; the message says why."""


def check_id(kind: str, value: str) -> str:
    """Validate a tenant, user or group id: non-empty and without ``|`` (protocol.md 1.1).

    Returns the value, or raises ValueError with a message naming ``kind``.
    """
    if not value:
        raise ValueError(f"{kind} id must not be empty")
    if "|" in value:
        raise ValueError(f"{kind} id {value!r} must not contain '|'")
    return value


class _Model(BaseModel):
    # Unknown keys are almost always typos ("sign_requried"): reject them loudly.
    model_config = ConfigDict(extra="forbid", frozen=True)


class UserConfig(_Model):
    """One user: the tokens that authenticate as this user, and whether it is blocked."""

    tokens: list[str] = Field(default_factory=list)
    blocked: bool = False

    @field_validator("tokens")
    @classmethod
    def _tokens_non_empty(cls, tokens: list[str]) -> list[str]:
        if any(not token for token in tokens):
            raise ValueError("tokens must not be empty strings")
        if len(set(tokens)) != len(tokens):
            raise ValueError("tokens must not repeat")
        return tokens


class TenantConfig(_Model):
    """One tenant: hook secret, policy sent to the gateway, and initial directory."""

    # Key of the HMAC over hook requests (protocol.md section 5.1) and, returned in
    # TenantRuntimeConfig.tenant_secret, of later hooks and Kafka events.
    secret: str = Field(min_length=1)
    # Reject hook requests without a signature. A wrong signature is always rejected.
    sign_required: bool = True

    # TenantRuntimeConfig fields (protocol.md section 3.2); <= 0 means the gateway default.
    heartbeat_timeout_seconds: Int32 = 30
    offline_buffer_ttl_seconds: Int32 = 300
    tenant_max_connections: Int32 = 0
    user_max_connections: Int32 = 0
    tenant_max_message_qps: Int32 = 0
    offline_mode: str = "legacy"
    # Optional fields: None leaves them unset on the wire, so the gateway's own
    # settings apply (protocol.md section 4.3).
    check_message_fail_closed: bool | None = None
    hook_max_concurrency: Int32 | None = None
    hook_queue_timeout_ms: Int32 | None = None
    hook_breaker_failure_threshold: Int32 | None = None
    hook_breaker_open_ms: Int32 | None = None

    users: dict[str, UserConfig] = Field(default_factory=dict)
    # group id -> member user ids; every member must be a user of this tenant.
    groups: dict[str, list[str]] = Field(default_factory=dict)
    # /check-message denies bodies containing any of these (case-insensitive); the
    # offline consumer drops offline messages containing them too.
    blocked_words: list[str] = Field(default_factory=list)

    # Offline store overrides; None uses BackendConfig's setting.
    mark_on_fetch: bool | None = None
    order_by_priority: bool | None = None
    # sender user id -> priority stored with its offline messages (default 0).
    offline_sender_priority: dict[str, int] = Field(default_factory=dict)

    @field_validator("offline_mode")
    @classmethod
    def _known_offline_mode(cls, mode: str) -> str:
        if mode not in OFFLINE_MODES:
            allowed = ", ".join(repr(m) for m in OFFLINE_MODES)
            raise ValueError(f"offline_mode must be one of {allowed}, not {mode!r}")
        return mode

    @field_validator("blocked_words")
    @classmethod
    def _words_non_empty(cls, words: list[str]) -> list[str]:
        # An empty word would match every message.
        if any(not word for word in words):
            raise ValueError("blocked_words must not contain empty strings")
        return words

    @model_validator(mode="after")
    def _check_directory(self) -> TenantConfig:
        for user_id in self.users:
            check_id("user", user_id)
        for group_id, members in self.groups.items():
            check_id("group", group_id)
            for member in members:
                if member not in self.users:
                    raise ValueError(f"group {group_id!r}: member {member!r} is not a user")
            if len(set(members)) != len(members):
                raise ValueError(f"group {group_id!r}: members must not repeat")
        return self


class BackendConfig(_Model):
    """The whole backend: listen address, admin access and tenants."""

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)  # 0 = any free port
    # Base URL the gateway uses for the hooks after /auth (TenantRuntimeConfig.hook_base_url).
    # None: http://host:port with the bound port (wildcard hosts become 127.0.0.1).
    public_url: str | None = None
    # Bearer token for /admin/*. None: the admin API is served only on a loopback host.
    admin_token: str | None = None
    # Replay protection window (protocol.md section 9.9): requests whose timestamp is
    # further than this from the backend's clock are stale; request ids are remembered
    # for this long.
    clock_skew_seconds: int = Field(default=300, gt=0)
    # Largest accepted hook request body (a /check-message carries the message body).
    max_request_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)

    # -- offline store, consumer and nudges (offline-design.md 3.2, protocol.md 9) --
    # SQLAlchemy async URL: postgresql+asyncpg://user:pw@host/db (production) or
    # sqlite+aiosqlite:///path.db (embedded). "" = the SQLite file mics-offline.db in the
    # working directory, opened on first use (a configured URL is opened at start-up).
    database_url: str = ""
    # Apply the schema migrations when the store opens. Turn off where migrations are a
    # deployment step (`mics backend migrate`).
    database_auto_migrate: bool = True
    # Connections the store's pool keeps open, and how many more it may open under load
    # (None: as many as database_pool_size). Each hook request and each consumer batch
    # holds one connection while it runs.
    database_pool_size: int = Field(default=10, ge=1, le=1000)
    database_max_overflow: int | None = Field(default=None, ge=0, le=1000)
    # Kafka consumer of the tenants' event topics; "" = none (events may still arrive
    # in-process, see BackendServer.event_subscriber).
    kafka_bootstrap_servers: str = ""
    # per_tenant: group offline-message-consumer-{tenant} per tenant topic;
    # shared: one group offline-message-consumer over every tenant topic.
    consumer_group_mode: Literal["per_tenant", "shared"] = "per_tenant"
    # Extra librdkafka settings of the consumer (security, timeouts, ...).
    kafka_consumer_options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # Gateway nodes to nudge with POST /v1/offline-available after storing a message
    # (any node will do; the next is tried on failure). Empty: no nudges.
    gateway_urls: list[str] = Field(default_factory=list)
    # Nudges for one user within this window are coalesced into one call.
    nudge_debounce_ms: int = Field(default=50, ge=0, le=10_000)
    # Mark messages delivered when /get-offline-messages returns them even if the
    # gateway promises an ack (MICS v1 semantics, for old gateways). Per-tenant override.
    mark_on_fetch: bool = False
    # Sort each page by priority (desc), then creation time. Pages and cursors stay in
    # storage order: see mics.backend.store.repository. Per-tenant override.
    order_by_priority: bool = False
    # Delivered rows older than this are deleted by the cleanup job.
    retention_days: int = Field(default=30, ge=1)
    # How often the periodic jobs (cleanup, daily reconciliation) run; 0 = never.
    jobs_interval_seconds: int = Field(default=3600, ge=0)

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"public_url must start with http:// or https://, not {url!r}")
        return url.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, url: str) -> str:
        from mics.backend.store.engine import check_database_url

        return check_database_url(url)  # StoreConfigError is a ValueError

    @field_validator("gateway_urls")
    @classmethod
    def _gateway_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"gateway_urls must start with http:// or https://: {url!r}")
        return [url.rstrip("/") for url in urls]

    @field_validator("admin_token")
    @classmethod
    def _token_non_empty(cls, token: str | None) -> str | None:
        if token is not None and not token:
            raise ValueError("admin_token must not be empty (omit it to disable)")
        return token

    @model_validator(mode="after")
    def _check_tenants(self) -> BackendConfig:
        # Tokens map to exactly one (tenant, user): /auth looks them up globally.
        owners: dict[str, str] = {}
        for tenant_id, tenant in self.tenants.items():
            check_id("tenant", tenant_id)
            for user_id, user in tenant.users.items():
                for token in user.tokens:
                    owner = f"{tenant_id}/{user_id}"
                    if token in owners:
                        raise ValueError(
                            f"token of user {owner!r} is already used by {owners[token]!r}"
                        )
                    owners[token] = owner
        return self

    def mark_on_fetch_for(self, tenant_id: str) -> bool:
        """Whether /get-offline-messages marks on fetch for ``tenant_id``."""
        tenant = self.tenants.get(tenant_id)
        override = tenant.mark_on_fetch if tenant is not None else None
        return self.mark_on_fetch if override is None else override

    def order_by_priority_for(self, tenant_id: str) -> bool:
        """Whether pages of ``tenant_id`` are sorted by priority (within the page)."""
        tenant = self.tenants.get(tenant_id)
        override = tenant.order_by_priority if tenant is not None else None
        return self.order_by_priority if override is None else override

    @property
    def admin_enabled(self) -> bool:
        """Whether /admin/* is served: with a token, or without one on loopback only."""
        return self.admin_token is not None or is_loopback(self.host)

    def resolved_public_url(self, bound_port: int) -> str:
        """The hook base URL given to the gateway, once the listen port is known."""
        if self.public_url is not None:
            return self.public_url.rstrip("/")  # also when built without validation
        return default_public_url(self.host, bound_port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_public_url(host: str, port: int) -> str:
    """``http://host:port``; a wildcard host is not callable, so use loopback instead."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}"


def parse_config(data: dict[str, Any], source: str = "<config>") -> BackendConfig:
    """Validate already-decoded TOML/JSON data; raise ConfigError naming ``source``."""
    try:
        return BackendConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid backend config {source}: {exc}") from exc


def load_config(path: str | Path) -> BackendConfig:
    """Read a TOML (or, for ``*.json``, JSON) backend config file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read backend config {path}: {exc}") from exc
    try:
        data: Any = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot parse backend config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"backend config {path} must be an object/table at the top level")
    return parse_config(data, str(path))
