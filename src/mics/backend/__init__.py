"""Reference tenant backend: the hook server a tenant runs next to the MICS gateway.

It serves ``/auth``, ``/check-message`` and ``/get-group-members`` (protocol.md
section 4), verifies hook signatures (section 5) and rejects stale or replayed requests
(section 9.9). It is both the demo backend (:func:`demo_config`) and the model a tenant
copies: the policy lives in small pure functions (:func:`mics.backend.hookserver.runtime_config`,
:func:`mics.backend.hookserver.check_message`) over an in-memory
:class:`~mics.backend.directory.Directory`.

Modules: ``config`` (file format), ``directory`` (users, tokens, groups), ``replay``
(replay guard), ``state`` (per-instance wiring and metrics), ``hookserver`` (hook
endpoints), ``admin`` (JSON admin API), ``app`` (application factory and server),
``demo`` (demo tenant).
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
