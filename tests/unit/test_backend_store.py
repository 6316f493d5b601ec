"""Offline store: repository contract on SQLite and PostgreSQL, cursors, migrations.

Every repository test runs twice: on an SQLite file (tmp_path) and on a fresh database of
the session's private PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import text

from mics.backend.cursor import InvalidCursor, decode_cursor, encode_cursor
from mics.backend.store import (
    NewMessage,
    OfflineRepository,
    Stats,
    Store,
    StoreConfigError,
    StoredMessage,
    check_database_url,
    day_of,
    migrate,
    pgdriver,
)
from mics.backend.store.repository import day_bounds
from tests.support.postgres import PostgresDatabase

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
DAY_MS = 86_400_000


def msg(
    user: str = "u1",
    mid: str = "m1",
    *,
    sender: str = "s1",
    tenant: str = "t1",
    created: int = T0,
    priority: int = 0,
    data: bytes | None = None,
    group: str = "",
) -> NewMessage:
    return NewMessage(
        tenant_id=tenant,
        user_id=user,
        from_user_id=sender,
        message_id=mid,
        device_id="d1",
        message_type=1 if group else 0,
        group_id=group,
        message_data=data if data is not None else f"{sender}:{mid}".encode(),
        created_at=created,
        priority=priority,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'offline.db'}"
    database: PostgresDatabase = request.getfixturevalue("postgres_db")
    return database.async_url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = Store(database_url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def repo(store: Store) -> OfflineRepository:
    return await store.repository()


def ids(messages: Sequence[StoredMessage]) -> list[str]:
    return [m.message_id for m in messages]


# -- idempotent storage ------------------------------------------------------------------


async def test_same_event_twice_is_one_row(repo: OfflineRepository) -> None:
    assert await repo.store_batch([msg()]) == 1
    assert await repo.store_batch([msg()]) == 0
    # Also within one batch.
    assert await repo.store_batch([msg(mid="m2"), msg(mid="m2")]) == 1
    assert ids(await repo.fetch_page("t1", "u1", 0, 10)) == ["m1", "m2"]


async def test_group_message_is_one_row_per_recipient(repo: OfflineRepository) -> None:
    rows = [msg(user=u, mid="g-1", group="g1") for u in ("u1", "u2", "u3")]
    assert await repo.store_batch(rows) == 3
    assert await repo.store_batch(rows) == 0
    for user in ("u1", "u2", "u3"):
        [row] = await repo.fetch_page("t1", user, 0, 10)
        assert (row.group_id, row.message_type) == ("g1", 1)


async def test_two_senders_reusing_an_id_are_both_kept(repo: OfflineRepository) -> None:
    assert await repo.store_batch([msg(sender="a", mid="1"), msg(sender="b", mid="1")]) == 2
    page = await repo.fetch_page("t1", "u1", 0, 10)
    assert [(m.from_user_id, m.message_data) for m in page] == [("a", b"a:1"), ("b", b"b:1")]
    # Same recipient and id in another tenant: another row too.
    assert await repo.store_batch([msg(sender="a", mid="1", tenant="t2")]) == 1


async def test_store_outcome_reports_new_rows_only(repo: OfflineRepository) -> None:
    await repo.store_batch([msg(user="u1", mid="m1")])
    outcome = await repo.store([msg(user="u1", mid="m1"), msg(user="u2", mid="m1")])
    assert outcome.inserted == 1
    assert outcome.recipients == {("t1", "u2")}
    assert outcome.inserted_by_tenant == {"t1": 1}
    assert outcome.duplicates_by_tenant == {"t1": 1}


async def test_large_batch_spans_several_statements(repo: OfflineRepository) -> None:
    rows = [msg(mid=f"m{i:04d}") for i in range(1203)]
    assert await repo.store_batch(rows) == 1203
    assert await repo.store_batch(rows) == 0
    assert await repo.count_pending("t1", "u1") == 1203


async def test_stored_fields_round_trip(repo: OfflineRepository) -> None:
    data = bytes(range(256))
    await repo.store_batch([msg(data=data, priority=7, created=T0 + 5)])
    [row] = await repo.fetch_page("t1", "u1", 0, 1)
    assert row.message_data == data
    assert (row.priority, row.created_at, row.delivered, row.delivered_at) == (
        7,
        T0 + 5,
        False,
        None,
    )
    assert (row.device_id, row.from_user_id) == ("d1", "s1")


# -- keyset paging -----------------------------------------------------------------------


async def test_pages_follow_storage_order_with_has_more(repo: OfflineRepository) -> None:
    await repo.store_batch([msg(mid=f"m{i}") for i in range(5)])
    first = await repo.pull("t1", "u1", 0, 2)
    assert ids(first.messages) == ["m0", "m1"]
    assert first.has_more
    assert first.last_id == first.messages[-1].id
    second = await repo.pull("t1", "u1", first.last_id or 0, 2)
    assert ids(second.messages) == ["m2", "m3"]
    assert second.has_more
    third = await repo.pull("t1", "u1", second.last_id or 0, 2)
    assert ids(third.messages) == ["m4"]
    assert not third.has_more
    empty = await repo.pull("t1", "u1", third.last_id or 0, 2)
    assert empty.messages == []
    assert not empty.has_more
    assert empty.last_id is None
    # Exactly a full page: has_more is false.
    exact = await repo.pull("t1", "u1", 0, 5)
    assert len(exact.messages) == 5
    assert not exact.has_more


async def test_paging_is_stable_under_concurrent_inserts(repo: OfflineRepository) -> None:
    """Rows stored while a user pages are returned by later pulls; nothing is skipped or
    repeated (keyset, not OFFSET)."""
    await repo.store_batch([msg(mid=f"a{i}") for i in range(10)])
    seen: list[str] = []
    after = 0
    written = 0
    while True:
        page = await repo.pull("t1", "u1", after, 3)
        seen.extend(ids(page.messages))
        if written < 4:  # a writer keeps storing while the reader pages
            await repo.store_batch([msg(mid=f"b{written}")])
            written += 1
        if page.last_id is None:
            if written >= 4:
                break
            continue
        after = page.last_id
    assert seen == [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(4)]


async def test_row_stored_after_cursor_is_returned_from_it(repo: OfflineRepository) -> None:
    await repo.store_batch([msg(mid="m1"), msg(mid="m2")])
    page = await repo.pull("t1", "u1", 0, 100)
    assert not page.has_more
    cursor = page.last_id or 0
    await repo.store_batch([msg(mid="late")])
    again = await repo.pull("t1", "u1", cursor, 100)
    assert ids(again.messages) == ["late"]


async def test_concurrent_writers_commit_in_id_order_per_recipient(
    repo: OfflineRepository,
) -> None:
    """A writer that took an id but has not committed must not let a later writer's row
    (larger id) become visible first: a reader would hand out a cursor past the
    uncommitted row, which the ack would then mark delivered unseen."""
    reached = asyncio.Event()
    release = asyncio.Event()

    async def slow_writer() -> None:
        if repo.dialect == "postgresql":
            # The path store() takes on PostgreSQL: the asyncpg connection.
            async with pgdriver.driver_connection(repo.engine) as raw, raw.transaction():
                await repo._store_postgresql_in(raw, [msg(mid="first")], None)
                reached.set()
                await release.wait()
            return
        async with repo._write() as conn:
            await repo._store_in(conn, [msg(mid="first")], None)
            reached.set()
            await release.wait()

    slow = asyncio.create_task(slow_writer())
    await reached.wait()
    fast = asyncio.create_task(repo.store_batch([msg(mid="second")]))
    # Either the second writer waits for the first (correct), or it commits at once.
    await wait_blocked_or_done(repo, fast)
    page = await repo.pull("t1", "u1", 0, 100)
    cursor = page.last_id or 0
    release.set()
    await slow
    await fast
    later = await repo.pull("t1", "u1", cursor, 100)
    assert sorted(ids(page.messages) + ids(later.messages)) == ["first", "second"]


async def wait_blocked_or_done(repo: OfflineRepository, task: asyncio.Task[int]) -> None:
    """Until ``task`` finished or is provably waiting for a lock."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not task.done():
        if repo.dialect == "postgresql":
            async with repo.engine.connect() as conn:
                waiting = (
                    await conn.execute(
                        text(
                            "SELECT count(*) FROM pg_locks"
                            " WHERE NOT granted AND locktype = 'advisory'"
                        )
                    )
                ).scalar_one()
            if waiting:
                return
        else:
            # SQLite: the write lock is held by the first writer; its BEGIN IMMEDIATE
            # waits in the busy handler. Give the task a few turns to prove otherwise.
            for _ in range(50):
                await asyncio.sleep(0)
            await asyncio.sleep(0.05)
            if not task.done():
                return
        assert loop.time() < deadline, "second writer neither finished nor blocked"
        await asyncio.sleep(0.01)


# -- marking -----------------------------------------------------------------------------


async def test_mark_upto_marks_only_that_recipient_up_to_the_id(repo: OfflineRepository) -> None:
    await repo.store_batch([msg(mid=f"m{i}") for i in range(4)] + [msg(user="u2", mid="x")])
    page = await repo.pull("t1", "u1", 0, 2)
    assert await repo.mark_delivered_upto("t1", "u1", page.last_id or 0, now=T0) == 2
    assert await repo.mark_delivered_upto("t1", "u1", page.last_id or 0) == 0  # idempotent
    assert ids(await repo.fetch_page("t1", "u1", 0, 10)) == ["m2", "m3"]
    assert await repo.count_pending("t1", "u2") == 1


async def test_pull_can_mark_on_fetch(repo: OfflineRepository) -> None:
    await repo.store_batch([msg(mid=f"m{i}") for i in range(3)])
    page = await repo.pull("t1", "u1", 0, 2, mark_delivered=True, now=T0 + 1)
    assert ids(page.messages) == ["m0", "m1"]
    assert page.has_more
    rest = await repo.pull("t1", "u1", 0, 10)
    assert ids(rest.messages) == ["m2"]


async def test_mark_ids(repo: OfflineRepository) -> None:
    await repo.store_batch([msg(mid=f"m{i}") for i in range(3)])
    rows = await repo.fetch_page("t1", "u1", 0, 10)
    assert await repo.mark_delivered_ids("t1", "u1", [rows[1].id], now=T0) == 1
    assert await repo.mark_delivered_ids("t1", "u2", [rows[0].id]) == 0  # not theirs
    assert ids(await repo.fetch_page("t1", "u1", 0, 10)) == ["m0", "m2"]


async def test_priority_orders_within_the_page_only(repo: OfflineRepository) -> None:
    await repo.store_batch(
        [
            msg(mid="low", priority=0, created=T0),
            msg(mid="vip", priority=5, created=T0 + 1),
            msg(mid="mid", priority=1, created=T0 + 2),
            msg(mid="next-page-vip", priority=9, created=T0 + 3),
        ]
    )
    page = await repo.pull("t1", "u1", 0, 3, order_by_priority=True)
    assert ids(page.messages) == ["vip", "mid", "low"]
    # The cursor is still the page's largest id: the next page starts after it.
    assert page.last_id == max(m.id for m in page.messages)
    plain = await repo.pull("t1", "u1", 0, 3)
    assert ids(plain.messages) == ["low", "vip", "mid"]
    nxt = await repo.pull("t1", "u1", page.last_id or 0, 3, order_by_priority=True)
    assert ids(nxt.messages) == ["next-page-vip"]


# -- operations --------------------------------------------------------------------------


async def test_cleanup_deletes_old_delivered_rows_in_batches(
    repo: OfflineRepository, caplog: pytest.LogCaptureFixture
) -> None:
    old = [msg(mid=f"old{i}", created=T0) for i in range(25)]
    await repo.store_batch(
        [*old, msg(mid="old-pending", created=T0), msg(mid="new", created=T0 + 40 * DAY_MS)]
    )
    rows = await repo.fetch_page("t1", "u1", 0, 100)
    by_id = {r.message_id: r.id for r in rows}
    await repo.mark_delivered_ids("t1", "u1", [by_id[m.message_id] for m in old] + [by_id["new"]])
    caplog.set_level("INFO", logger="mics.backend.store")
    deleted = await repo.delete_delivered_older_than(T0 + DAY_MS, batch=10)
    assert deleted == 25
    progress = [r for r in caplog.records if r.getMessage() == "offline cleanup progress"]
    assert [r.__dict__["deleted"] for r in progress] == [10, 20, 25]
    # Undelivered old rows and young delivered rows stay.
    assert ids(await repo.fetch_page("t1", "u1", 0, 100)) == ["old-pending"]
    assert await repo.max_id("t1", "u1") == by_id["new"]
    assert await repo.delete_delivered_older_than(T0 + DAY_MS, batch=10) == 0


async def test_ids_are_never_reused_after_cleanup(repo: OfflineRepository) -> None:
    """A cursor issued for the newest row must stay below every later row, even when
    cleanup deleted that row (SQLite: AUTOINCREMENT, not a reusable rowid)."""
    await repo.store_batch([msg(mid="m1"), msg(mid="m2")])
    page = await repo.pull("t1", "u1", 0, 10, mark_delivered=True)
    assert await repo.delete_delivered_older_than(T0 + 1) == 2
    await repo.store_batch([msg(mid="m3")])
    assert ids((await repo.pull("t1", "u1", page.last_id or 0, 10)).messages) == ["m3"]


async def test_count_stored_by_day_and_stats(repo: OfflineRepository) -> None:
    day = dt.date(2023, 11, 14)
    start, end = day_bounds(day)
    assert day_of(start) == day_of(end - 1) == "2023-11-14"
    assert day_of(end) == "2023-11-15"
    rows = [msg(mid="a", created=start), msg(mid="b", created=end - 1), msg(mid="c", created=end)]
    stats = {("2023-11-14", "t1"): Stats(consumed=3, filtered=1)}
    outcome = await repo.store([*rows, msg(mid="a", created=start)], stats)
    assert outcome.inserted == 3
    assert await repo.count_stored_by_day(day) == {"t1": 2}
    assert await repo.count_stored_by_day(day, "t2") == {}
    got = await repo.consume_stats(day)
    assert got["t1"] == Stats(consumed=3, stored=2, duplicate=1, filtered=1)
    nxt = await repo.consume_stats(dt.date(2023, 11, 15))
    assert nxt["t1"] == Stats(stored=1)
    # Counters add up across transactions.
    await repo.store([], {("2023-11-14", "t1"): Stats(invalid=2)})
    assert (await repo.consume_stats(day))["t1"].invalid == 2


# -- batch insert, fast reads (on PostgreSQL: the asyncpg driver paths) --------------------


def test_insert_arrays_follow_new_message_fields() -> None:
    # insert_rows passes the columns of NewMessage in field order as $1..$10.
    listed = pgdriver.INSERT_SQL.split("AS r(", 1)[1].split(")", 1)[0]
    assert [c.strip() for c in listed.split(",")] == list(NewMessage._fields)


def test_day_of_matches_the_calendar() -> None:
    for ts in (0, 1, T0, -1, -DAY_MS, 253_402_300_799_999, 951_782_400_000):  # 2000-02-29
        expected = dt.datetime.fromtimestamp(ts / 1000, tz=dt.UTC).date().isoformat()
        assert day_of(ts) == expected


async def test_batch_insert_is_idempotent_and_keeps_batch_order(repo: OfflineRepository) -> None:
    """One batch as the consumer stores it: thousands of rows, several tenants and
    recipients, duplicates inside the batch and across batches, any bytes."""
    data = bytes(range(256)) * 2  # NUL bytes and everything else
    rows = [
        msg(
            user=f"ü{i % 7}",
            mid=f"m{i:05d}",
            sender=f"s{i % 3}",
            tenant="t1" if i % 5 else "t2",
            created=T0 + i,
            priority=i % 4,
            data=data + i.to_bytes(4, "big"),
            group="g1" if i % 11 == 0 else "",
        )
        for i in range(2500)
    ]
    batch = [*rows, rows[0], rows[1234]]  # a redelivery inside the batch
    stats = {(day_of(T0), "t1"): Stats(consumed=len(batch))}
    outcome = await repo.store(batch, stats)
    assert outcome.inserted == 2500
    assert outcome.inserted_by_tenant == {"t1": 2000, "t2": 500}
    assert sum(outcome.duplicates_by_tenant.values()) == 2
    assert len(outcome.recipients) == 14

    again = await repo.store(rows[::2], None)  # Kafka redelivering part of it
    assert again.inserted == 0
    assert again.recipients == frozenset()
    assert again.duplicates_by_tenant == {"t1": 1000, "t2": 250}
    assert (await repo.consume_stats(dt.date(2023, 11, 14)))["t1"].stored == 2000

    # Per recipient, ids follow the batch: the stored order is the consumed order.
    for tenant in ("t1", "t2"):
        for user in {r.user_id for r in rows if r.tenant_id == tenant}:
            stored = await repo.fetch_page(tenant, user, 0, 10_000)
            expected = [r for r in rows if (r.tenant_id, r.user_id) == (tenant, user)]
            assert [m.message_id for m in stored] == [r.message_id for r in expected]
            assert [m.id for m in stored] == sorted(m.id for m in stored)
            for got, want in zip(stored, expected, strict=True):
                assert (
                    got.from_user_id,
                    got.message_data,
                    got.priority,
                    got.created_at,
                    got.group_id,
                    got.message_type,
                    got.delivered,
                ) == (
                    want.from_user_id,
                    want.message_data,
                    want.priority,
                    want.created_at,
                    want.group_id,
                    want.message_type,
                    False,
                )


@pytest.mark.parametrize("order_by_priority", [False, True])
async def test_pull_data_is_the_pull_as_bytes(
    repo: OfflineRepository, order_by_priority: bool
) -> None:
    await repo.store_batch(
        [msg(mid=f"m{i}", priority=(i * 7) % 3, created=T0 + (i % 4)) for i in range(30)]
    )
    await repo.store_batch([msg(user="u2", mid="other")])
    full = await repo.pull("t1", "u1", 0, 100)
    for after in (0, full.messages[9].id, full.messages[28].id, full.messages[29].id):
        for limit in (1, 7, 20, 100):
            page = await repo.pull("t1", "u1", after, limit, order_by_priority=order_by_priority)
            data = await repo.pull_data(
                "t1", "u1", after, limit, order_by_priority=order_by_priority
            )
            assert data.messages == [m.message_data for m in page.messages]
            assert (data.has_more, data.last_id) == (page.has_more, page.last_id)
    with pytest.raises(ValueError, match="limit"):
        await repo.pull_data("t1", "u1", 0, 0)


async def test_pull_data_can_mark_on_fetch(repo: OfflineRepository) -> None:
    await repo.store_batch([msg(mid=f"m{i}") for i in range(3)])
    page = await repo.pull_data("t1", "u1", 0, 2, mark_delivered=True, now=T0)
    assert page.messages == [b"s1:m0", b"s1:m1"]
    assert ids(await repo.fetch_page("t1", "u1", 0, 10)) == ["m2"]


async def test_reads_and_writes_survive_connections_ended_by_the_server(
    repo: OfflineRepository, postgres_db: PostgresDatabase
) -> None:
    """No pre-ping: pooled connections that the server ended (a restart, an
    administrator) are dropped or retried, and the next read or write works."""
    if repo.dialect != "postgresql":
        pytest.skip("PostgreSQL connections")
    await repo.store_batch([msg(mid="m1")])
    # Several connections in the pool and kept for reads.
    await asyncio.gather(*(repo.pull_data("t1", "u1", 0, 10) for _ in range(6)))
    admin = await asyncpg.connect(postgres_db.dsn)
    try:
        ended = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert ended >= 1

        async def others() -> int:
            return int(
                await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )

        deadline = asyncio.get_running_loop().time() + 10
        while await others():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
    finally:
        await admin.close()
    for _ in range(3):
        page = await repo.pull_data("t1", "u1", 0, 10)
        assert page.messages == [b"s1:m1"]
    assert ids(await repo.fetch_page("t1", "u1", 0, 10)) == ["m1"]
    assert await repo.store_batch([msg(mid="m2")]) == 1
    assert await repo.mark_delivered_upto("t1", "u1", 10**9) == 2


async def test_pool_size_is_configurable(database_url: str) -> None:
    default = Store(database_url)
    sized = Store(database_url, pool_size=3, max_overflow=2)
    try:
        for store, size, overflow in ((default, 10, 10), (sized, 3, 2)):
            repo = await store.open()
            pool: Any = repo.engine.sync_engine.pool
            assert (pool.size(), pool._max_overflow) == (size, overflow)
            assert await repo.count_pending("t1", "u1") == 0
    finally:
        await default.close()
        await sized.close()
    with pytest.raises(StoreConfigError):
        await Store(database_url, pool_size=0).open()


async def test_page_query_uses_the_partial_index_on_postgresql(repo: OfflineRepository) -> None:
    if repo.dialect != "postgresql":
        pytest.skip("PostgreSQL query plan")
    await repo.store_batch([msg(mid=f"m{i}") for i in range(20)])
    async with pgdriver.driver_connection(repo.engine) as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        for sql in (pgdriver.PAGE_SQL, pgdriver.PAGE_PRIORITY_SQL, pgdriver.FULL_PAGE_SQL):
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, "t1", "u1", 5, 101))
            assert "ix_offline_messages_pending" in plan
            assert "Sort" not in plan  # the index gives id order


async def test_keyset_query_uses_the_partial_index(store: Store, repo: OfflineRepository) -> None:
    if repo.dialect != "sqlite":
        pytest.skip("query plan checked on SQLite")
    path = store.url.split("///", 1)[1]
    with sqlite3.connect(path) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM offline_messages WHERE tenant_id = 't' "
            "AND user_id = 'u' AND delivered = 0 AND id > 5 ORDER BY id LIMIT 3"
        ).fetchall()
        mode = conn.execute("PRAGMA journal_mode").fetchone()
    assert "ix_offline_messages_pending" in str(plan)
    assert "TEMP B-TREE" not in str(plan)  # no sort: the index gives id order
    assert mode == ("wal",)


# -- migrations and URLs -----------------------------------------------------------------


async def test_migrate_is_idempotent_and_creates_the_schema(database_url: str) -> None:
    await migrate(database_url)
    await migrate(database_url)
    store = Store(database_url, auto_migrate=False)
    try:
        repo = await store.repository()
        assert await repo.store_batch([msg()]) == 1
        async with repo.engine.connect() as conn:
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        assert version == "0001"
    finally:
        await store.close()


async def test_concurrent_first_use_opens_once(tmp_path: Path) -> None:
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'lazy.db'}")
    assert not (tmp_path / "lazy.db").exists()  # building a store does no I/O
    try:
        repos = await asyncio.gather(*(store.repository() for _ in range(5)))
        assert all(r is repos[0] for r in repos)
        assert (tmp_path / "lazy.db").exists()
    finally:
        await store.close()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///x.db",
        "sqlite+aiosqlite://",
        "sqlite+aiosqlite:///:memory:",
        "postgresql://u@h/db",
        "mysql+aiomysql://u@h/db",
        "not a url",
    ],
)
def test_unsupported_database_urls_are_rejected(url: str) -> None:
    with pytest.raises(StoreConfigError):
        check_database_url(url)


def test_supported_database_urls() -> None:
    for url in ("", "sqlite+aiosqlite:///a.db", "postgresql+asyncpg://u:p@h:5432/db"):
        assert check_database_url(url) == url


# -- cursors -----------------------------------------------------------------------------


def test_cursor_round_trip_and_binding() -> None:
    for row_id in (0, 1, 35, 36, 123456789, 2**63 - 1):
        cursor = encode_cursor("secret", "t1", "u1", row_id)
        assert cursor.startswith("c1.")
        assert decode_cursor("secret", "t1", "u1", cursor) == row_id
    cursor = encode_cursor("secret", "t1", "u1", 42)
    assert cursor.split(".")[1] == "16"  # base 36
    for secret, tenant, user in (
        ("other", "t1", "u1"),
        ("secret", "t2", "u1"),
        ("secret", "t1", "u2"),
    ):
        with pytest.raises(InvalidCursor):
            decode_cursor(secret, tenant, user, cursor)


@pytest.mark.parametrize(
    "cursor",
    ["", "c1", "c1.", "c1.16", "c2.16.x", "c1.016.", "c1.G.", "c1.-1.", "c1.16.é", "x" * 300],
)
def test_malformed_cursors_are_invalid(cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor("secret", "t1", "u1", cursor)


def test_tampered_cursor_is_invalid() -> None:
    cursor = encode_cursor("secret", "t1", "u1", 42)
    prefix, number, tag = cursor.split(".")
    forged = f"{prefix}.17.{tag}"  # another position, same tag
    with pytest.raises(InvalidCursor):
        decode_cursor("secret", "t1", "u1", forged)
    with pytest.raises(InvalidCursor):
        decode_cursor("secret", "t1", "u1", f"{prefix}.0{number}.{tag}")  # non-canonical
