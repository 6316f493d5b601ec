"""Alembic environment of the offline store.

Two ways in (the "sync-or-async bridge"):

* programmatic, from async code (:func:`mics.backend.store.engine.migrate`): the caller
  opens an async connection and hands its synchronous facade in
  ``config.attributes["connection"]``; the migrations run on it;
* the ``alembic`` command line (``-x`` not needed): ``sqlalchemy.url`` names an async URL,
  and this file opens its own async engine and runs the migrations under
  ``asyncio.run``.

On PostgreSQL the migrations hold a transaction-scoped advisory lock, so backends that
start together migrate one after the other.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, text

from mics.backend.store.engine import create_engine
from mics.backend.store.models import metadata

# Any fixed number; only migrations take this lock.
_MIGRATION_LOCK_KEY = 0x6D6963735F6D6967  # "mics_mig"

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # ALTER TABLE on SQLite
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: set sqlalchemy.url or pass a connection")
    asyncio.run(_run_async(url))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
