"""Tables of the offline store (SQLAlchemy 2.0 Core).

``offline_messages`` holds one row per (recipient, message): a group message to 100
offline members is 100 rows. ``id`` is the storage order and what the opaque paging
cursor encodes (:mod:`mics.backend.cursor`); it only ever grows:

* SQLite: ``INTEGER PRIMARY KEY AUTOINCREMENT`` (``sqlite_autoincrement``), so ids of
  deleted rows are never reused (a plain rowid could hand a new row the id of a cleaned
  up one, below a cursor already issued);
* PostgreSQL: a ``BIGINT`` identity. Sequence values are handed out in call order, not
  commit order; :class:`mics.backend.store.repository.OfflineRepository` serializes the
  writers of one recipient so that, per recipient, id order is commit order.

The unique key (tenant_id, user_id, from_user_id, message_id) is the idempotency key of
protocol.md section 6 and 9.7: (tenant, recipient, sender, msg_id). A redelivered event is
a no-op; two senders reusing msg id "1" are two rows.

``offline_consume_stats`` counts, per UTC day of the event timestamp and tenant, what
the consumer saw and stored; the daily reconciliation (:mod:`mics.backend.jobs`) reads it.
The migrations in ``mics/backend/migrations`` create exactly these tables; keep both in
step.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
    text,
)

# BIGINT on PostgreSQL; SQLite only makes INTEGER PRIMARY KEY the (autoincrement) rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Longest id (tenant, user, msg, group, device) the consumer stores, in UTF-8 bytes. The
# unique index covers four of them: 4 x 512 bytes stays below PostgreSQL's btree entry
# limit (about 2700 bytes), so an over-long id is rejected at ingest instead of failing
# the insert forever (a poison event would stall its partition).
MAX_ID_BYTES = 512

metadata = MetaData()

offline_messages = Table(
    "offline_messages",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("tenant_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),  # recipient
    Column("from_user_id", Text, nullable=False),  # sender
    Column("message_id", Text, nullable=False),
    Column("device_id", Text, nullable=False),  # sender device
    Column("message_type", Integer, nullable=False),
    Column("group_id", Text, nullable=False, server_default=""),
    # The serialized, normalized MessageRequest (MqEvent.event_data), returned as is.
    Column("message_data", LargeBinary, nullable=False),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    Column("created_at", BigInteger, nullable=False),  # Unix ms (the event timestamp)
    Column("delivered", Boolean, nullable=False, server_default=false()),
    Column("delivered_at", BigInteger, nullable=True),  # Unix ms
    Index(
        "uq_offline_messages_key",
        "tenant_id",
        "user_id",
        "from_user_id",
        "message_id",
        unique=True,
    ),
    # The design's index (offline-design.md 3.2), for priority-aware queries.
    Index(
        "ix_offline_messages_user_state",
        "tenant_id",
        "user_id",
        "delivered",
        "priority",
        "created_at",
    ),
    Index("ix_offline_messages_created_at", "created_at"),  # retention cleanup
    sqlite_autoincrement=True,
)

# Keyset paging and marking: a recipient's undelivered rows in id order (partial index).
# The predicate is the expression the queries use, ``~delivered``, which each dialect
# renders its own way (``NOT delivered`` / ``delivered = 0``); SQLite only uses a partial
# index whose predicate appears literally in the query.
UNDELIVERED = ~offline_messages.c.delivered
Index(
    "ix_offline_messages_pending",
    offline_messages.c.tenant_id,
    offline_messages.c.user_id,
    offline_messages.c.id,
    postgresql_where=UNDELIVERED,
    sqlite_where=UNDELIVERED,
)

consume_stats = Table(
    "offline_consume_stats",
    metadata,
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD, UTC
    Column("tenant_id", Text, primary_key=True),
    # Signed OFFLINE_MESSAGE events processed (redeliveries included).
    Column("consumed", BigInteger, nullable=False, server_default=text("0")),
    Column("stored", BigInteger, nullable=False, server_default=text("0")),  # new rows
    Column("duplicate", BigInteger, nullable=False, server_default=text("0")),
    Column("filtered", BigInteger, nullable=False, server_default=text("0")),
    # Events not stored because they were invalid (bad sign, bad data); counted on the
    # day they were read, as their own timestamp cannot be trusted.
    Column("invalid", BigInteger, nullable=False, server_default=text("0")),
)

STAT_COLUMNS = ("consumed", "stored", "duplicate", "filtered", "invalid")
