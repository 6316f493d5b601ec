"""Database engines, migrations and the lazily opened store of one backend.

Two back-ends, one code path (SQLAlchemy 2.0 asyncio):

* PostgreSQL through asyncpg, for production: ``postgresql+asyncpg://user:pw@host/db``;
* SQLite through aiosqlite, embedded: ``sqlite+aiosqlite:///path/to/file.db`` (a file,
  never ``:memory:``: every pooled connection would see its own empty database).

SQLite runs in WAL mode (readers never block the writer), ``synchronous=FULL`` (a
committed batch survives a power cut: its Kafka offsets are committed right after) and
with a busy timeout. Write transactions start with ``BEGIN IMMEDIATE``: a deferred
transaction that reads and then writes would fail at once with ``SQLITE_BUSY`` whenever
another connection wrote in between, instead of waiting for the lock. Writers therefore
go through :data:`WRITE_OPTIONS` (see :meth:`Store.writer`).

Schema changes are Alembic migrations (``mics/backend/migrations``); :func:`migrate`
runs them from async code, ``mics backend migrate`` from the command line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mics.backend.store.repository import WRITE_OPTION, OfflineRepository

log = logging.getLogger("mics.backend.store")

# ``database_url = ""`` in the config: this file in the working directory.
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///mics-offline.db"

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

# Execution options of a connection that will write (SQLite: BEGIN IMMEDIATE).
WRITE_OPTIONS: dict[str, Any] = {WRITE_OPTION: True}

SQLITE_BUSY_TIMEOUT_MS = 10_000

# Connections kept in the pool, and by default also the extra ones opened under load.
DEFAULT_POOL_SIZE = 10


class StoreConfigError(ValueError):
    """The database URL is not one this backend can use."""


def resolve_database_url(url: str) -> str:
    """The URL to use for the configured ``database_url`` (``""`` = the default file)."""
    return url or DEFAULT_DATABASE_URL


def check_database_url(url: str) -> str:
    """Validate ``url`` (``""`` allowed); returns it unchanged or raises StoreConfigError."""
    if not url:
        return url
    try:
        parsed = make_url(url)
    except Exception as exc:  # ArgumentError, ValueError: both mean "not a URL"
        raise StoreConfigError(f"invalid database URL {url!r}: {exc}") from None
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend == "sqlite":
        if driver != "aiosqlite":
            raise StoreConfigError(
                "SQLite URLs must use the aiosqlite driver: sqlite+aiosqlite:///"
            )
        if parsed.database in (None, "", ":memory:") or "mode=memory" in url:
            raise StoreConfigError("SQLite needs a database file, not an in-memory database")
    elif backend == "postgresql":
        if driver != "asyncpg":
            raise StoreConfigError("PostgreSQL URLs must use asyncpg: postgresql+asyncpg://")
    else:
        raise StoreConfigError(f"unsupported database {backend!r}: use PostgreSQL or SQLite")
    return url


def create_engine(
    url: str, *, pool_size: int = DEFAULT_POOL_SIZE, max_overflow: int | None = None
) -> AsyncEngine:
    """An async engine for ``url`` (``""`` = the default SQLite file), tuned as above.

    The pool keeps ``pool_size`` connections and opens up to ``max_overflow`` more
    under load (default: as many as ``pool_size``).
    """
    url = check_database_url(resolve_database_url(url))
    if pool_size < 1 or (max_overflow is not None and max_overflow < 0):
        raise StoreConfigError("pool_size must be >= 1 and max_overflow >= 0")
    overflow = pool_size if max_overflow is None else max_overflow
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=overflow)
        _configure_sqlite(engine)
        return engine
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=overflow)
    _configure_postgresql(engine)
    return engine


def _configure_postgresql(engine: AsyncEngine) -> None:
    # No pool_pre_ping: it costs a round trip (three on asyncpg: BEGIN, ";", ROLLBACK)
    # on every checkout, i.e. every hook request. A connection whose socket the server
    # closed (restart, terminated backend) is known to asyncpg without asking: drop it
    # at checkout and let the pool open a new one. Losses noticed only in use fail that
    # use (SQLAlchemy then invalidates the pool); reads are retried once
    # (mics.backend.store.pgdriver.read_with_retry), batches by the consumer.
    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        driver = record.driver_connection
        if driver is None or driver.is_closed():
            raise sa_exc.DisconnectionError("connection closed by the server")


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over transaction control from the driver (it would emit a plain BEGIN
        # lazily, before the first write only); _on_begin emits our own.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


# -- migrations ------------------------------------------------------------------------


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for this package's migrations (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # ConfigParser interpolation: a literal % must be doubled.
        config.set_main_option("sqlalchemy.url", resolve_database_url(url).replace("%", "%%"))
    return config


def _upgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    # env.py runs the migrations on this connection instead of opening its own.
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` (``""`` = the default file) to ``revision``.

    Idempotent; safe to run from several processes at once on PostgreSQL (the
    migrations take an advisory lock). Uses the same engine set-up as the backend, so a
    new SQLite file is created in WAL mode.
    """
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.execution_options(**WRITE_OPTIONS).begin() as conn:
            await conn.run_sync(_upgrade, revision)
    finally:
        await engine.dispose()
    log.info("database migrated", extra={"revision": revision})


def migrate_sync(url: str, revision: str = "head") -> None:
    """:func:`migrate` for synchronous callers (the CLI); not from a running loop."""
    asyncio.run(migrate(url, revision))


# -- the store of one backend ------------------------------------------------------------


class Store:
    """The offline store of one backend: opened on first use, closed with the backend.

    Creating it does no I/O. :meth:`open` (or the first :meth:`repository` call) creates
    the engine and, with ``auto_migrate``, migrates the schema; concurrent first calls
    share one opening. After :meth:`close` it may be opened again.
    """

    def __init__(
        self,
        url: str,
        *,
        auto_migrate: bool = True,
        pool_size: int = DEFAULT_POOL_SIZE,
        max_overflow: int | None = None,
    ) -> None:
        self.url = resolve_database_url(check_database_url(url))
        self.auto_migrate = auto_migrate
        self.pool_size = pool_size
        self.max_overflow = pool_size if max_overflow is None else max_overflow
        self._repository: OfflineRepository | None = None
        self._lock = asyncio.Lock()

    @property
    def is_open(self) -> bool:
        return self._repository is not None

    async def open(self) -> OfflineRepository:
        async with self._lock:
            if self._repository is None:
                if self.auto_migrate:
                    await migrate(self.url)
                engine = create_engine(
                    self.url, pool_size=self.pool_size, max_overflow=self.max_overflow
                )
                self._repository = OfflineRepository(engine)
                log.info("offline store open", extra={"database": _safe_url(self.url)})
            return self._repository

    async def repository(self) -> OfflineRepository:
        repository = self._repository
        return repository if repository is not None else await self.open()

    async def reader(self) -> OfflineRepository | None:
        """The repository for a read, or None when the store is an SQLite file that
        does not exist yet: it holds nothing, and reading must not create it (a
        backend whose gateway pulls but never stores leaves no file behind)."""
        if self._repository is None:
            path = self.sqlite_path
            if path is not None and not path.exists():
                return None
        return await self.repository()

    @functools.cached_property
    def sqlite_path(self) -> Path | None:
        """The database file of an SQLite store (relative to the working directory)."""
        parsed = make_url(self.url)
        if parsed.get_backend_name() != "sqlite" or not parsed.database:
            return None
        return Path(parsed.database)

    async def close(self) -> None:
        async with self._lock:
            repository, self._repository = self._repository, None
        if repository is not None:
            await repository.close()
            await repository.engine.dispose()


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    return make_url(url).render_as_string(hide_password=True)
