"""Reference tenant backend: the hook server a tenant runs next to the MICS gateway.

It serves ``/auth``, ``/check-message``, ``/get-group-members`` and the offline hooks
``/get-offline-messages`` / ``/ack-offline-messages`` (protocol.md sections 4 and 9.3),
verifies hook signatures (section 5) and rejects stale or replayed requests (section
9.9). Its offline half stores OFFLINE_MESSAGE events from Kafka (or the in-process bus)
idempotently in PostgreSQL or SQLite and nudges the gateway when a message for a
possibly online user was stored (section 9.5). It is both the demo backend
(:func:`demo_config`) and the model a tenant copies: the policy lives in small pure
functions (:func:`mics.backend.hookserver.runtime_config`,
:func:`mics.backend.hookserver.check_message`) over an in-memory
:class:`~mics.backend.directory.Directory`, and the store-time rules are plug-ins
(:class:`mics.backend.ingest.MessageFilter`, :class:`mics.backend.ingest.PriorityRule`).

Modules: ``config`` (file format), ``directory`` (users, tokens, groups), ``replay``
(replay guard), ``state`` (per-instance wiring and metrics), ``hookserver`` (hook
endpoints), ``admin`` (JSON admin API), ``app`` (application factory and server),
``demo`` (demo tenant), ``store`` (offline tables, migrations, repository), ``cursor``
(paging cursors), ``ingest`` (events to rows), ``consumer`` (Kafka), ``nudge``
(offline-available calls), ``jobs`` (retention cleanup, reconciliation).
"""

from mics.backend.app import BackendServer, create_backend_app, run_backend
from mics.backend.config import BackendConfig, ConfigError, TenantConfig, UserConfig, load_config
from mics.backend.demo import demo_config
from mics.backend.directory import Directory
from mics.backend.replay import ReplayGuard
from mics.backend.state import BackendMetrics, BackendState

__all__ = [
    "BackendConfig",
    "BackendMetrics",
    "BackendServer",
    "BackendState",
    "ConfigError",
    "Directory",
    "ReplayGuard",
    "TenantConfig",
    "UserConfig",
    "create_backend_app",
    "demo_config",
    "load_config",
    "run_backend",
]
