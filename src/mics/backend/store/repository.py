"""Async data access for offline messages (the only module that writes SQL).

Contract (protocol.md section 9.3), which the hooks and the consumer rely on:

* **Idempotent storage.** :meth:`OfflineRepository.store` inserts the batch with
  ``ON CONFLICT DO NOTHING`` on the key (tenant, recipient, sender, msg_id), in one
  transaction: storing an event twice is a no-op, and the call reports which rows were
  really new. On PostgreSQL that is one ``INSERT ... SELECT FROM unnest(...)`` on the
  asyncpg connection (:mod:`mics.backend.store.pgdriver`), on SQLite multi-row
  ``INSERT ... VALUES`` through SQLAlchemy (per 500 rows).
* **Keyset paging in storage order.** :meth:`OfflineRepository.fetch_page` returns a
  recipient's undelivered rows with ``id > after_id`` in ``id`` order (never OFFSET).
  A row stored after a page was read always has a larger id than every row of that
  page, so it is returned by a later pull from the page's cursor. On PostgreSQL this
  needs care: sequence values are taken in call order but become visible in commit
  order, so two concurrent writers for one recipient could commit ids 11 then 10, and a
  reader between the commits would hand out cursor 11 and never see 10 (and an ack of
  11 would mark 10 delivered unseen). :meth:`OfflineRepository.store` therefore takes a
  transaction-scoped advisory lock per recipient (in sorted order, so writers cannot
  deadlock) before inserting: per recipient, id order is commit order. SQLite has one
  writer at a time, which gives the same guarantee.
* **Priority does not reorder pages.** Pages follow ``id``. Ordering the backlog by
  priority across pages would break the cursor: a high-priority row stored after cursor
  c sorts *before* c and would never be returned from c (and an ack of c would mark it
  delivered). Priority is stored and exposed; with ``order_by_priority`` a page is sorted
  by (priority desc, created_at, id) *within* the page, while the page boundary and the
  cursor stay in id order. The trade-off: an urgent message behind a long backlog still
  waits for the pages before it.
* **Marking.** :meth:`OfflineRepository.mark_delivered_upto` marks every undelivered row
  of the recipient with ``id <= upto`` (the ack of a cursor); marking is idempotent.
* **Reads without a transaction.** On PostgreSQL a page that marks nothing is one
  ``SELECT`` on the driver connection, outside any transaction (one statement sees one
  snapshot); :meth:`OfflineRepository.pull_data` returns only what the hook sends, the
  stored message bytes.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Table, delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from mics.backend.store import pgdriver
from mics.backend.store.models import STAT_COLUMNS, UNDELIVERED, consume_stats, offline_messages

log = logging.getLogger("mics.backend.store")

# Execution option marking a connection that will write (SQLite: BEGIN IMMEDIATE, see
# mics.backend.store.engine).
WRITE_OPTION = "mics_write"

# Rows per INSERT statement: 10 columns x 500 rows stays far below both drivers'
# bind-parameter limits (asyncpg 32767, SQLite 32766).
INSERT_CHUNK = 500

DEFAULT_CLEANUP_BATCH = 10_000

_T = offline_messages.c
_KEY = (_T.tenant_id, _T.user_id, _T.from_user_id, _T.message_id)
_COLUMNS = (
    _T.id,
    _T.tenant_id,
    _T.user_id,
    _T.from_user_id,
    _T.message_id,
    _T.device_id,
    _T.message_type,
    _T.group_id,
    _T.message_data,
    _T.priority,
    _T.created_at,
    _T.delivered,
    _T.delivered_at,
)
_MS_PER_DAY = 86_400_000

_R = TypeVar("_R")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_EPOCH = dt.date(1970, 1, 1)


def day_of(timestamp_ms: int) -> str:
    """The UTC day (``YYYY-MM-DD``) of a Unix-ms timestamp: the stats and reconcile key."""
    return _day_name(timestamp_ms // _MS_PER_DAY)


@functools.lru_cache(maxsize=1024)
def _day_name(day_number: int) -> str:
    # Called several times per stored message, nearly always for the same day or two.
    return (_EPOCH + dt.timedelta(days=day_number)).isoformat()


def day_bounds(day: dt.date) -> tuple[int, int]:
    """[start, end) of a UTC day in Unix ms."""
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    start_ms = int(start.timestamp() * 1000)
    return start_ms, start_ms + _MS_PER_DAY


@functools.lru_cache(maxsize=16_384)
def recipient_lock_key(tenant_id: str, user_id: str) -> int:
    """The PostgreSQL advisory lock key (signed int64) of one recipient."""
    digest = hashlib.blake2b(f"{tenant_id}|{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class NewMessage(NamedTuple):
    """One row to store: a message for one recipient. Immutable; a named tuple because
    the consumer builds one per event (a frozen dataclass costs several times more), and
    :func:`mics.backend.store.pgdriver.insert_rows` transposes a batch of them into the
    insert's column arrays in this field order."""

    tenant_id: str
    user_id: str  # recipient
    from_user_id: str  # sender
    message_id: str
    device_id: str  # sender device
    message_type: int
    group_id: str
    message_data: bytes  # serialized normalized MessageRequest
    created_at: int  # Unix ms
    priority: int = 0

    def values(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "user_id": self.user_id,
            "from_user_id": self.from_user_id,
            "message_id": self.message_id,
            "device_id": self.device_id,
            "message_type": self.message_type,
            "group_id": self.group_id,
            "message_data": self.message_data,
            "priority": self.priority,
            "created_at": self.created_at,
            "delivered": False,
        }


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A stored row."""

    id: int
    tenant_id: str
    user_id: str
    from_user_id: str
    message_id: str
    device_id: str
    message_type: int
    group_id: str
    message_data: bytes
    priority: int
    created_at: int
    delivered: bool
    delivered_at: int | None


@dataclass(frozen=True, slots=True)
class Page:
    """One pull: the rows to return, whether more follow, and the cursor position.

    ``last_id`` is the largest id of the page (the next cursor), None for an empty page.
    With priority ordering ``messages`` is not in id order, but ``last_id`` still is the
    page's largest id.
    """

    messages: list[StoredMessage]
    has_more: bool
    last_id: int | None


@dataclass(frozen=True, slots=True)
class DataPage:
    """One pull as the hook serves it: the stored ``message_data`` of each row, in page
    order (see :class:`Page` for ``has_more`` and ``last_id``)."""

    messages: list[bytes]
    has_more: bool
    last_id: int | None


@dataclass(slots=True)
class Stats:
    """Counters of ``offline_consume_stats`` for one (day, tenant)."""

    consumed: int = 0
    stored: int = 0
    duplicate: int = 0
    filtered: int = 0
    invalid: int = 0

    def add(self, other: Stats) -> None:
        for name in STAT_COLUMNS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in STAT_COLUMNS}

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        """The counters in STAT_COLUMNS order."""
        return (self.consumed, self.stored, self.duplicate, self.filtered, self.invalid)

    def any(self) -> bool:
        return any(self.as_tuple())


StatsKey = tuple[str, str]  # (day, tenant_id)


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """What one :meth:`OfflineRepository.store` committed."""

    inserted: int
    # (tenant_id, user_id) of every recipient that got at least one new row.
    recipients: frozenset[tuple[str, str]] = frozenset()
    # tenant -> new rows / duplicates (rows already stored).
    inserted_by_tenant: Mapping[str, int] = field(default_factory=dict)
    duplicates_by_tenant: Mapping[str, int] = field(default_factory=dict)


def _lock_keys(rows: Sequence[NewMessage]) -> list[int]:
    """The advisory lock keys of the rows' recipients, sorted: two transactions lock
    their common recipients in the same order, so writers cannot deadlock."""
    return sorted({recipient_lock_key(r.tenant_id, r.user_id) for r in rows})


def _stored(values: Sequence[Any]) -> StoredMessage:
    """A StoredMessage from a row of every column, in field order (positional: building
    it from a mapping costs several times more)."""
    return StoredMessage(*values)


def _merge_stats(
    rows: Sequence[NewMessage],
    new_rows: Sequence[tuple[str, str, int]],
    stats: Mapping[StatsKey, Stats],
) -> dict[StatsKey, Stats]:
    """``stats`` plus ``stored`` and ``duplicate`` per (day, tenant) from the insert."""
    merged: dict[StatsKey, Stats] = defaultdict(Stats)
    for key, value in stats.items():
        merged[key].add(value)
    attempted: dict[StatsKey, int] = defaultdict(int)
    for row in rows:
        attempted[(day_of(row.created_at), row.tenant_id)] += 1
    for tenant_id, _, created_at in new_rows:
        merged[(day_of(created_at), tenant_id)].stored += 1
    for key, count in attempted.items():
        merged[key].duplicate += count - merged[key].stored
    return merged


def _outcome(rows: Sequence[NewMessage], new_rows: Sequence[tuple[str, str, int]]) -> StoreOutcome:
    inserted_by_tenant: dict[str, int] = defaultdict(int)
    attempted_by_tenant: dict[str, int] = defaultdict(int)
    for row in rows:
        attempted_by_tenant[row.tenant_id] += 1
    for tenant_id, _, _ in new_rows:
        inserted_by_tenant[tenant_id] += 1
    duplicates_by_tenant = {
        t: n - inserted_by_tenant.get(t, 0)
        for t, n in attempted_by_tenant.items()
        if n > inserted_by_tenant.get(t, 0)
    }
    return StoreOutcome(
        inserted=len(new_rows),
        recipients=frozenset((t, u) for t, u, _ in new_rows),
        inserted_by_tenant=dict(inserted_by_tenant),
        duplicates_by_tenant=duplicates_by_tenant,
    )


class OfflineRepository:
    """Offline messages on one engine. Every method is one short transaction, or on
    PostgreSQL a single read statement outside any."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._writer = engine.execution_options(**{WRITE_OPTION: True})
        # PostgreSQL reads on driver connections: at most as many at once as the pool
        # keeps connections, half of those kept between reads.
        pool_size = max(1, int(getattr(engine.sync_engine.pool, "size", lambda: 1)()))
        self._readers = pgdriver.ReadConnections(
            engine, limit=pool_size, keep=max(1, pool_size // 2)
        )

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite), committed on success."""
        async with self._writer.begin() as conn:
            yield conn

    def _insert(self, table: Table) -> postgresql.Insert | sqlite.Insert:
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    # -- storing -------------------------------------------------------------------------

    async def store_batch(self, rows: Sequence[NewMessage]) -> int:
        """Store ``rows`` in one transaction; returns how many were new (not duplicates)."""
        return (await self.store(rows)).inserted

    async def store(
        self, rows: Sequence[NewMessage], stats: Mapping[StatsKey, Stats] | None = None
    ) -> StoreOutcome:
        """Store ``rows`` and, in the same transaction, add ``stats`` to the daily
        counters (``stored`` and ``duplicate`` are filled in from the insert itself).

        With ``stats=None`` the counters are left alone. Raises the driver's error if the
        transaction failed; then nothing was stored.
        """
        if not rows and not stats:
            return StoreOutcome(0)
        if self.dialect == "postgresql":
            return await self._store_postgresql(rows, stats)
        async with self._write() as conn:
            return await self._store_in(conn, rows, stats)

    async def _store_postgresql(
        self, rows: Sequence[NewMessage], stats: Mapping[StatsKey, Stats] | None
    ) -> StoreOutcome:
        async with (
            pgdriver.driver_connection(self.engine) as conn,
            conn.transaction(),
        ):
            return await self._store_postgresql_in(conn, rows, stats)

    async def _store_postgresql_in(
        self, conn: Any, rows: Sequence[NewMessage], stats: Mapping[StatsKey, Stats] | None
    ) -> StoreOutcome:
        """:meth:`store` inside a transaction of the asyncpg connection ``conn``."""
        new_rows: list[tuple[str, str, int]] = []
        if rows:
            await pgdriver.lock_recipients(conn, _lock_keys(rows))
            new_rows = await pgdriver.insert_rows(conn, rows)
        if stats is not None:
            merged = _merge_stats(rows, new_rows, stats)
            await pgdriver.add_stats(
                conn,
                (
                    (day, tenant_id, *value.as_tuple())
                    for (day, tenant_id), value in sorted(merged.items())
                    if value.any()
                ),
            )
        return _outcome(rows, new_rows)

    async def _store_in(
        self,
        conn: AsyncConnection,
        rows: Sequence[NewMessage],
        stats: Mapping[StatsKey, Stats] | None,
    ) -> StoreOutcome:
        """:meth:`store` through SQLAlchemy, inside the transaction of ``conn`` (the
        SQLite path; on PostgreSQL equivalent to, and slower than, the driver path)."""
        new_rows: list[tuple[str, str, int]] = []
        if rows and self.dialect == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS BIGINT[])) AS k"),
                {"keys": _lock_keys(rows)},
            )
        if rows:
            # One statement, executed with a parameter list: SQLAlchemy's
            # "insertmanyvalues" sends it as multi-row INSERT ... VALUES (...), (...)
            # ... ON CONFLICT DO NOTHING RETURNING, INSERT_CHUNK rows per round trip,
            # from one cached compilation (a .values([...]) statement would be compiled
            # anew for every batch, which costs more than the database work).
            stmt = (
                self._insert(offline_messages)
                .on_conflict_do_nothing(index_elements=list(_KEY))
                .returning(_T.tenant_id, _T.user_id, _T.created_at)
            )
            result = await conn.execute(
                stmt.execution_options(insertmanyvalues_page_size=INSERT_CHUNK),
                [row.values() for row in rows],
            )
            new_rows.extend((r[0], r[1], r[2]) for r in result)
        if stats is not None:
            await self._add_stats(conn, _merge_stats(rows, new_rows, stats))
        return _outcome(rows, new_rows)

    async def _add_stats(self, conn: AsyncConnection, stats: Mapping[StatsKey, Stats]) -> None:
        rows = [
            {"day": day, "tenant_id": tenant_id, **value.as_dict()}
            for (day, tenant_id), value in sorted(stats.items())
            if value.any()
        ]
        if not rows:
            return
        stmt = self._insert(consume_stats).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=[consume_stats.c.day, consume_stats.c.tenant_id],
            set_={name: consume_stats.c[name] + stmt.excluded[name] for name in STAT_COLUMNS},
        )
        await conn.execute(stmt)

    # -- reading -------------------------------------------------------------------------

    async def fetch_page(
        self, tenant_id: str, user_id: str, after_id: int, limit: int
    ) -> list[StoredMessage]:
        """Undelivered rows of the recipient with ``id > after_id``, in id order."""
        if self.dialect == "postgresql":
            return await self._fetch_postgresql(tenant_id, user_id, after_id, limit)
        async with self.engine.connect() as conn:
            return await self._fetch(conn, tenant_id, user_id, after_id, limit)

    async def _fetch(
        self, conn: AsyncConnection, tenant_id: str, user_id: str, after_id: int, limit: int
    ) -> list[StoredMessage]:
        stmt = (
            select(*_COLUMNS)
            .where(_T.tenant_id == tenant_id, _T.user_id == user_id, UNDELIVERED)
            .where(_T.id > after_id)
            .order_by(_T.id)
            .limit(limit)
        )
        result = await conn.execute(stmt)
        # _COLUMNS is in StoredMessage's field order.
        return [_stored(row) for row in result]

    async def _fetch_postgresql(
        self, tenant_id: str, user_id: str, after_id: int, limit: int
    ) -> list[StoredMessage]:
        async def read(conn: Any) -> list[tuple[Any, ...]]:
            return await pgdriver.fetch_full_page(conn, tenant_id, user_id, after_id, limit)

        return [_stored(row) for row in await self._read(read)]

    async def pull(
        self,
        tenant_id: str,
        user_id: str,
        after_id: int,
        limit: int,
        *,
        mark_delivered: bool = False,
        order_by_priority: bool = False,
        now: int | None = None,
    ) -> Page:
        """One page for ``/get-offline-messages``: up to ``limit`` rows after ``after_id``.

        ``mark_delivered`` (MICS v1 gateways) marks the returned rows delivered in the
        same transaction. ``order_by_priority`` sorts within the page only (module doc).
        """
        if limit <= 0:
            raise ValueError("limit must be positive")
        if mark_delivered or self.dialect != "postgresql":
            engine = self._writer if mark_delivered else self.engine
            async with engine.begin() as conn:
                rows = await self._fetch(conn, tenant_id, user_id, after_id, limit + 1)
                has_more = len(rows) > limit
                rows = rows[:limit]
                if mark_delivered and rows:
                    await self._mark_ids(conn, tenant_id, user_id, [r.id for r in rows], now)
        else:
            rows = await self._fetch_postgresql(tenant_id, user_id, after_id, limit + 1)
            has_more = len(rows) > limit
            rows = rows[:limit]
        last_id = rows[-1].id if rows else None
        if order_by_priority:
            rows.sort(key=lambda r: (-r.priority, r.created_at, r.id))
        return Page(messages=rows, has_more=has_more, last_id=last_id)

    async def pull_data(
        self,
        tenant_id: str,
        user_id: str,
        after_id: int,
        limit: int,
        *,
        mark_delivered: bool = False,
        order_by_priority: bool = False,
        now: int | None = None,
    ) -> DataPage:
        """:meth:`pull` returning only each row's stored ``message_data``, the page the
        hook sends. On PostgreSQL without marking: one ``SELECT`` of the four columns a
        page needs, on the driver connection, outside any transaction."""
        if limit <= 0:
            raise ValueError("limit must be positive")
        if mark_delivered or self.dialect != "postgresql":
            page = await self.pull(
                tenant_id,
                user_id,
                after_id,
                limit,
                mark_delivered=mark_delivered,
                order_by_priority=order_by_priority,
                now=now,
            )
            return DataPage(
                messages=[m.message_data for m in page.messages],
                has_more=page.has_more,
                last_id=page.last_id,
            )

        async def read(conn: Any) -> list[Any]:
            return await pgdriver.fetch_page(
                conn, tenant_id, user_id, after_id, limit + 1, priority=order_by_priority
            )

        rows = await self._read(read)
        has_more = len(rows) > limit
        if has_more:
            del rows[limit:]
        last_id: int | None = rows[-1][0] if rows else None
        if order_by_priority:
            # (id, message_data, priority, created_at): as pull() sorts.
            rows.sort(key=lambda r: (-r[2], r[3], r[0]))
        return DataPage(messages=[r[1] for r in rows], has_more=has_more, last_id=last_id)

    async def _read(self, read: Callable[[Any], Awaitable[_R]]) -> _R:
        """A single-statement read on a driver connection (PostgreSQL)."""
        return await self._readers.read(read)

    async def close(self) -> None:
        """Give back the connections kept for reads; then the engine may be disposed."""
        await self._readers.close()

    async def max_id(self, tenant_id: str, user_id: str) -> int:
        """The largest id stored for the recipient (delivered or not), 0 if none."""
        stmt = select(func.max(_T.id)).where(_T.tenant_id == tenant_id, _T.user_id == user_id)
        async with self.engine.connect() as conn:
            value = (await conn.execute(stmt)).scalar()
        return int(value or 0)

    async def count_pending(self, tenant_id: str, user_id: str) -> int:
        """How many undelivered rows the recipient has."""
        stmt = (
            select(func.count())
            .select_from(offline_messages)
            .where(_T.tenant_id == tenant_id, _T.user_id == user_id, UNDELIVERED)
        )
        async with self.engine.connect() as conn:
            return int((await conn.execute(stmt)).scalar_one())

    # -- marking -------------------------------------------------------------------------

    async def mark_delivered_upto(
        self, tenant_id: str, user_id: str, upto_id: int, *, now: int | None = None
    ) -> int:
        """Mark the recipient's undelivered rows with ``id <= upto_id``; returns the count."""
        stmt = (
            update(offline_messages)
            .where(_T.tenant_id == tenant_id, _T.user_id == user_id, UNDELIVERED)
            .where(_T.id <= upto_id)
            .values(delivered=True, delivered_at=now_ms() if now is None else now)
        )
        async with self._write() as conn:
            result = await conn.execute(stmt)
        return int(result.rowcount)

    async def mark_delivered_ids(
        self, tenant_id: str, user_id: str, ids: Sequence[int], *, now: int | None = None
    ) -> int:
        """Mark the given rows of the recipient delivered; returns how many changed."""
        if not ids:
            return 0
        async with self._write() as conn:
            return await self._mark_ids(conn, tenant_id, user_id, ids, now)

    async def _mark_ids(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        user_id: str,
        ids: Sequence[int],
        now: int | None,
    ) -> int:
        stmt = (
            update(offline_messages)
            .where(_T.tenant_id == tenant_id, _T.user_id == user_id, UNDELIVERED)
            .where(_T.id.in_(list(ids)))
            .values(delivered=True, delivered_at=now_ms() if now is None else now)
        )
        result = await conn.execute(stmt)
        return int(result.rowcount)

    # -- operations ----------------------------------------------------------------------

    async def delete_delivered_older_than(
        self, cutoff_ms: int, batch: int = DEFAULT_CLEANUP_BATCH
    ) -> int:
        """Delete delivered rows created before ``cutoff_ms``, ``batch`` rows per
        transaction (short locks, bounded WAL); logs progress; returns the total."""
        if batch <= 0:
            raise ValueError("batch must be positive")
        victims = (
            select(_T.id)
            .where(_T.delivered.is_(True), _T.created_at < cutoff_ms)
            .order_by(_T.id)
            .limit(batch)
            .scalar_subquery()
        )
        stmt = delete(offline_messages).where(_T.id.in_(victims))
        total = 0
        batches = 0
        while True:
            async with self._write() as conn:
                deleted = int((await conn.execute(stmt)).rowcount)
            total += deleted
            batches += 1
            if deleted:
                log.info(
                    "offline cleanup progress",
                    extra={"deleted": total, "batches": batches, "cutoff_ms": cutoff_ms},
                )
            if deleted < batch:
                return total

    async def count_stored_by_day(
        self, day: dt.date, tenant_id: str | None = None
    ) -> dict[str, int]:
        """Rows (delivered or not) created on the UTC ``day``, per tenant."""
        start, end = day_bounds(day)
        stmt = (
            select(_T.tenant_id, func.count())
            .where(_T.created_at >= start, _T.created_at < end)
            .group_by(_T.tenant_id)
        )
        if tenant_id is not None:
            stmt = stmt.where(_T.tenant_id == tenant_id)
        async with self.engine.connect() as conn:
            result = await conn.execute(stmt)
            return {row[0]: int(row[1]) for row in result}

    async def consume_stats(self, day: dt.date) -> dict[str, Stats]:
        """The consumer's counters of the UTC ``day``, per tenant."""
        columns = [consume_stats.c[name] for name in STAT_COLUMNS]
        stmt = select(consume_stats.c.tenant_id, *columns).where(
            consume_stats.c.day == day.isoformat()
        )
        async with self.engine.connect() as conn:
            result = await conn.execute(stmt)
            return {row[0]: Stats(*(int(v) for v in row[1:])) for row in result}
