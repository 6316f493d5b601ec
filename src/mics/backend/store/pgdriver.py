"""The PostgreSQL hot paths on the asyncpg driver connection, below SQLAlchemy.

The consumer's insert and the ``/get-offline-messages`` read run once per batch and once
per hook request; through SQLAlchemy Core they cost more backend CPU than the database
spends on them (parameter processing per row, result rows as mappings, a transaction and
a pre-ping round trip per read). Here they are plain SQL on the pooled asyncpg
connection, which SQLAlchemy's pool still owns: :func:`driver_connection` checks one out
and returns it.

* :func:`insert_rows`: one ``INSERT ... SELECT FROM unnest($1::text[], ...) ON CONFLICT
  DO NOTHING RETURNING`` for the whole batch (ten arrays, so no bind-parameter limit and
  one prepared statement whatever the batch size). ``unnest`` yields the rows in array
  order and the identity takes its values in that order: ids follow the batch, as with
  the multi-row ``VALUES`` the SQLite path sends.
* :func:`fetch_page`: the keyset query of :class:`mics.backend.store.repository.OfflineRepository`,
  as one statement outside any transaction (a single ``SELECT`` sees one snapshot
  anyway), on a connection of :class:`ReadConnections`.

Every statement uses asyncpg's per-connection prepared statement cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

if TYPE_CHECKING:
    from mics.backend.store.repository import NewMessage

log = logging.getLogger("mics.backend.store")

_R = TypeVar("_R")

# Errors that mean "this connection is gone" (server restart, terminated backend, socket
# closed): the connection is discarded, and an idempotent read is retried once on a new one.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, crash recovery
    asyncpg.exceptions.InterfaceError,
    OSError,  # ConnectionError included
)

LOCK_SQL = "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k"

# Arrays in NewMessage's field order (insert_rows transposes the batch).
INSERT_SQL = """\
INSERT INTO offline_messages (tenant_id, user_id, from_user_id, message_id, device_id,
                              message_type, group_id, message_data, created_at, priority,
                              delivered)
SELECT r.tenant_id, r.user_id, r.from_user_id, r.message_id, r.device_id,
       r.message_type, r.group_id, r.message_data, r.created_at, r.priority, false
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
            $6::integer[], $7::text[], $8::bytea[], $9::bigint[], $10::integer[])
     AS r(tenant_id, user_id, from_user_id, message_id, device_id,
          message_type, group_id, message_data, created_at, priority)
ON CONFLICT (tenant_id, user_id, from_user_id, message_id) DO NOTHING
RETURNING tenant_id, user_id, created_at"""

STATS_SQL = """\
INSERT INTO offline_consume_stats AS s (day, tenant_id, consumed, stored, duplicate,
                                        filtered, invalid)
SELECT * FROM unnest($1::varchar[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                     $6::bigint[], $7::bigint[])
ON CONFLICT (day, tenant_id) DO UPDATE SET
    consumed = s.consumed + excluded.consumed,
    stored = s.stored + excluded.stored,
    duplicate = s.duplicate + excluded.duplicate,
    filtered = s.filtered + excluded.filtered,
    invalid = s.invalid + excluded.invalid"""

# The page queries of the hook: only what a page needs, (id, message_data) and, to sort a
# page by priority, (priority, created_at). The predicate matches the partial index
# ix_offline_messages_pending (tenant_id, user_id, id) WHERE NOT delivered.
PAGE_SQL = """\
SELECT id, message_data FROM offline_messages
WHERE tenant_id = $1 AND user_id = $2 AND NOT delivered AND id > $3
ORDER BY id LIMIT $4"""

PAGE_PRIORITY_SQL = """\
SELECT id, message_data, priority, created_at FROM offline_messages
WHERE tenant_id = $1 AND user_id = $2 AND NOT delivered AND id > $3
ORDER BY id LIMIT $4"""

# Every column, in StoredMessage's field order.
FULL_PAGE_SQL = """\
SELECT id, tenant_id, user_id, from_user_id, message_id, device_id, message_type,
       group_id, message_data, priority, created_at, delivered, delivered_at
FROM offline_messages
WHERE tenant_id = $1 AND user_id = $2 AND NOT delivered AND id > $3
ORDER BY id LIMIT $4"""


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A pooled connection's asyncpg ``Connection``, returned to the pool afterwards.

    No transaction is opened (SQLAlchemy's adapter only begins one for its own
    statements, so returning the connection costs no round trip). A connection that
    failed other than with a plain SQL error is discarded instead of being pooled again.
    """
    proxied = await engine.raw_connection()
    try:
        driver = proxied.driver_connection
        if driver is None:  # pragma: no cover - a checked-out connection has one
            raise RuntimeError("pooled connection without a driver connection")
        try:
            yield driver
        except BaseException as exc:
            if not _reusable(exc, driver):
                await greenlet_spawn(proxied.invalidate, exc)
            raise
    finally:
        await greenlet_spawn(proxied.close)


def _reusable(exc: BaseException, driver: Any) -> bool:
    """Whether a connection whose use raised ``exc`` may be used again: after a plain
    SQL error, yes; lost, cancelled mid-statement or left in a transaction, no."""
    return (
        isinstance(exc, asyncpg.PostgresError)
        and not isinstance(exc, CONNECTION_LOST)
        and not driver.is_closed()
        and not driver.is_in_transaction()
    )


class ReadConnections:
    """Driver connections for single-statement reads (no transaction), taken from the
    engine's pool and kept between reads.

    A read takes an idle connection from a list instead of a pool checkout and return
    (which cost about as much CPU as the page query itself). Up to ``keep`` connections
    stay checked out while idle; more go back to the pool. At most ``limit`` reads run at
    once: a burst of hook requests waits here rather than making the pool open overflow
    connections, which it closes again as they come back (a new connection costs far
    more than a page).

    A connection found closed (the server restarted or ended it) is discarded; a read
    that fails because its connection turns out to be lost is retried once on another
    one. That replaces a pre-ping round trip before every read.
    """

    def __init__(self, engine: AsyncEngine, *, limit: int, keep: int) -> None:
        self._engine = engine
        self._keep = keep
        self._slots = asyncio.Semaphore(max(1, limit))
        self._idle: list[Any] = []  # PoolProxiedConnection

    async def read(self, read: Callable[[Any], Awaitable[_R]]) -> _R:
        """``read(connection)`` on an asyncpg connection; retried once on another
        connection if this one was lost."""
        async with self._slots:
            try:
                return await self._read_once(read)
            except CONNECTION_LOST as exc:
                log.info("database connection lost; read retried", extra={"error": str(exc)})
            return await self._read_once(read)

    async def close(self) -> None:
        """Return the idle connections to the pool (before the engine is disposed)."""
        idle, self._idle = self._idle, []
        for proxied in idle:
            await greenlet_spawn(proxied.close)

    async def _read_once(self, read: Callable[[Any], Awaitable[_R]]) -> _R:
        proxied = await self._take()
        driver = proxied.driver_connection
        try:
            result = await read(driver)
        except BaseException as exc:
            if _reusable(exc, driver):
                await self._give_back(proxied)
            else:
                await greenlet_spawn(proxied.invalidate, exc)
                await greenlet_spawn(proxied.close)
            raise
        await self._give_back(proxied)
        return result

    async def _take(self) -> Any:
        while self._idle:
            proxied = self._idle.pop()
            driver = proxied.driver_connection
            if driver is not None and not driver.is_closed():
                return proxied
            await greenlet_spawn(proxied.invalidate)
            await greenlet_spawn(proxied.close)
        return await self._engine.raw_connection()

    async def _give_back(self, proxied: Any) -> None:
        if len(self._idle) < self._keep:
            self._idle.append(proxied)
        else:
            await greenlet_spawn(proxied.close)


async def lock_recipients(conn: Any, keys: Sequence[int]) -> None:
    """Transaction-scoped advisory locks on the (sorted) recipient keys."""
    await conn.execute(LOCK_SQL, list(keys))


async def insert_rows(conn: Any, rows: Sequence[NewMessage]) -> list[tuple[str, str, int]]:
    """Insert ``rows`` (duplicates skipped); (tenant_id, user_id, created_at) of each new row."""
    # NewMessage is a named tuple: zip(*rows) gives its ten columns, in INSERT_SQL's order.
    records = await conn.fetch(INSERT_SQL, *zip(*rows, strict=True))
    return [(r[0], r[1], r[2]) for r in records]


async def add_stats(conn: Any, rows: Iterable[tuple[str, str, int, int, int, int, int]]) -> None:
    """Add (day, tenant_id, consumed, stored, duplicate, filtered, invalid) to the daily
    counters; each (day, tenant_id) at most once."""
    columns: list[list[Any]] = [[], [], [], [], [], [], []]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    if columns[0]:
        await conn.execute(STATS_SQL, *columns)


async def fetch_page(
    conn: Any, tenant_id: str, user_id: str, after_id: int, limit: int, *, priority: bool
) -> list[Any]:
    """Up to ``limit`` undelivered rows of the recipient after ``after_id``, in id order,
    as asyncpg records: (id, message_data), with ``priority`` (id, message_data,
    priority, created_at)."""
    sql = PAGE_PRIORITY_SQL if priority else PAGE_SQL
    return await conn.fetch(sql, tenant_id, user_id, after_id, limit)  # type: ignore[no-any-return]


async def fetch_full_page(
    conn: Any, tenant_id: str, user_id: str, after_id: int, limit: int
) -> list[tuple[Any, ...]]:
    """Like :func:`fetch_page` with every column, in StoredMessage's field order."""
    records = await conn.fetch(FULL_PAGE_SQL, tenant_id, user_id, after_id, limit)
    return [tuple(r) for r in records]
