"""The real-service harness: PostgreSQL and Redis started by the tests, and their crashes."""

from __future__ import annotations

import socket
import uuid

import asyncpg  # type: ignore[import-untyped]
import pytest
import redis
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from tests.support.postgres import (
    PostgresDatabase,
    PostgresServer,
    PostgresServerError,
)
from tests.support.redis import (
    RedisServer,
    RedisServerError,
)

# --- PostgreSQL ------------------------------------------------------------------------


async def test_asyncpg_round_trip_in_a_fresh_database(postgres_db: PostgresDatabase) -> None:
    assert postgres_db.dsn.startswith("postgresql://mics@127.0.0.1:")
    conn = await asyncpg.connect(postgres_db.dsn, timeout=10)
    try:
        assert await conn.fetchval("SELECT current_database()") == postgres_db.name
        assert await conn.fetchval("SELECT current_user") == "mics"
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert tables == 0, "postgres_db must start empty"
        await conn.execute("CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL)")
        await conn.executemany(
            "INSERT INTO notes (id, body) VALUES ($1, $2)", [(1, "héllo"), (2, "wörld")]
        )
        rows = await conn.fetch("SELECT id, body FROM notes ORDER BY id")
        assert [(r["id"], r["body"]) for r in rows] == [(1, "héllo"), (2, "wörld")]
        assert await conn.fetchval("SHOW fsync") == "off"
        assert await conn.fetchval("SHOW server_encoding") == "UTF8"
    finally:
        await conn.close()


async def test_sqlalchemy_async_engine_on_asyncpg(postgres_db: PostgresDatabase) -> None:
    assert postgres_db.async_url.startswith("postgresql+asyncpg://mics@127.0.0.1:")
    metadata = sa.MetaData()
    users = sa.Table(
        "users",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
    )
    engine = create_async_engine(postgres_db.async_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            await conn.execute(sa.insert(users), [{"name": "alice"}, {"name": "bob"}])
        async with engine.connect() as conn:
            names = (await conn.execute(sa.select(users.c.name).order_by(users.c.id))).all()
            assert [n for (n,) in names] == ["alice", "bob"]
            version = (await conn.execute(sa.text("SHOW server_version_num"))).scalar_one()
            assert int(version) >= 120000
    finally:
        await engine.dispose()


def test_databases_are_created_and_dropped(postgres_server: PostgresServer) -> None:
    name = f"test_{uuid.uuid4().hex}"
    database = postgres_server.create_database(name)
    assert database.dsn.endswith(f"/{name}")
    listed = postgres_server.execute("SELECT datname FROM pg_database").split()
    assert name in listed
    postgres_server.drop_database(name)
    assert name not in postgres_server.execute("SELECT datname FROM pg_database").split()
    with pytest.raises(ValueError, match="identifier"):
        postgres_server.create_database('x"; DROP DATABASE postgres; --')


async def test_postgres_kill_and_restart_keeps_committed_data(
    postgres_server: PostgresServer, postgres_db: PostgresDatabase
) -> None:
    port = postgres_server.port
    engine = create_async_engine(postgres_db.async_url, pool_pre_ping=True)
    conn = await asyncpg.connect(postgres_db.dsn, timeout=10)
    try:
        await conn.execute("CREATE TABLE acked (id int PRIMARY KEY)")
        await conn.execute("INSERT INTO acked VALUES (1), (2), (3)")
        async with engine.connect() as sa_conn:  # a pooled connection, about to go stale
            assert (await sa_conn.execute(sa.text("SELECT count(*) FROM acked"))).scalar() == 3

        postgres_server.kill()
        assert not postgres_server.running
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await conn.fetchval("SELECT 1")
        with pytest.raises(ConnectionRefusedError):
            await asyncpg.connect(postgres_db.dsn, timeout=2)

        postgres_server.start()  # crash recovery, same port, same data
        assert postgres_server.port == port
        conn2 = await asyncpg.connect(postgres_db.dsn, timeout=10)
        try:
            assert await conn2.fetchval("SELECT count(*) FROM acked") == 3
        finally:
            await conn2.close()
        async with engine.connect() as sa_conn:  # pre-ping replaces the dead connection
            assert (await sa_conn.execute(sa.text("SELECT count(*) FROM acked"))).scalar() == 3

        postgres_server.restart()  # a clean restart too
        conn3 = await asyncpg.connect(postgres_db.dsn, timeout=10)
        try:
            assert await conn3.fetchval("SELECT count(*) FROM acked") == 3
        finally:
            await conn3.close()
    finally:
        conn.terminate()
        await engine.dispose()
        if not postgres_server.running:
            postgres_server.start()


def test_postgres_start_failure_names_the_cause(postgres_server: PostgresServer) -> None:
    postgres_server.stop()
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Like the server: the port still has TIME_WAIT connections from the stopped one.
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        blocker.bind(("127.0.0.1", postgres_server.port))
        blocker.listen()
        with pytest.raises(PostgresServerError, match=r"(?s)exited.*last lines of"):
            postgres_server.start()
        assert not postgres_server.running
    finally:
        blocker.close()
        if not postgres_server.running:
            postgres_server.start()
    assert postgres_server.execute("SELECT 1").strip() == "1"


# --- Redis -----------------------------------------------------------------------------


async def test_redis_set_get(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.dbsize() == 0, "redis_url must start empty"
        await client.set("greeting", "hello", ex=60)
        assert await client.get("greeting") == b"hello"
        assert await client.incr("counter") == 1
    finally:
        await client.aclose()


async def test_redis_starts_empty_for_each_test(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.get("greeting") is None
    finally:
        await client.aclose()


async def test_redis_kill_and_restart_then_reconnect(
    redis_server: RedisServer, redis_url: str
) -> None:
    port = redis_server.port
    client = aioredis.Redis.from_url(redis_url, retry=None, socket_connect_timeout=2)
    try:
        await client.set("k", "v")
        redis_server.kill()
        with pytest.raises(redis.ConnectionError):
            await client.get("k")
        redis_server.start()
        assert redis_server.port == port
        assert redis_server.url == redis_url
        assert await client.get("k") is None  # no persistence: a crash loses everything
        await client.set("k", "v2")
        redis_server.restart()
        with pytest.raises(redis.ConnectionError):
            await client.get("k")  # the pooled connection died with the old server
        assert await client.ping()  # and the next command reconnects
    finally:
        await client.aclose()
        if not redis_server.running:
            redis_server.start()


def test_redis_start_failure_names_the_cause() -> None:
    server = RedisServer(options={"maxmemory-policy": "no-such-policy"})
    try:
        with pytest.raises(RedisServerError, match=r"(?s)exited.*last lines of"):
            server.start()
        assert not server.running
    finally:
        server.close()
