"""The offline store: tables, engine set-up and migrations, repository.

See :mod:`mics.backend.store.repository` for the storage contract (idempotency, keyset
paging, per-recipient commit order) and :mod:`mics.backend.store.engine` for the
supported databases.
"""

from mics.backend.store.engine import (
    DEFAULT_DATABASE_URL,
    Store,
    StoreConfigError,
    check_database_url,
    create_engine,
    migrate,
    migrate_sync,
    resolve_database_url,
)
from mics.backend.store.repository import (
    DataPage,
    NewMessage,
    OfflineRepository,
    Page,
    Stats,
    StoredMessage,
    StoreOutcome,
    day_of,
)

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DataPage",
    "NewMessage",
    "OfflineRepository",
    "Page",
    "Stats",
    "Store",
    "StoreConfigError",
    "StoreOutcome",
    "StoredMessage",
    "check_database_url",
    "create_engine",
    "day_of",
    "migrate",
    "migrate_sync",
    "resolve_database_url",
]
