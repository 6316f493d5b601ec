"""offline_messages and offline_consume_stats

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "offline_messages",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("from_user_id", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("message_type", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Text(), nullable=False, server_default=""),
        sa.Column("message_data", sa.LargeBinary(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("delivered", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("delivered_at", sa.BigInteger(), nullable=True),
        # SQLite: AUTOINCREMENT, ids of deleted rows are never reused (cursor safety).
        sqlite_autoincrement=True,
    )
    op.create_index(
        "uq_offline_messages_key",
        "offline_messages",
        ["tenant_id", "user_id", "from_user_id", "message_id"],
        unique=True,
    )
    op.create_index(
        "ix_offline_messages_user_state",
        "offline_messages",
        ["tenant_id", "user_id", "delivered", "priority", "created_at"],
    )
    op.create_index("ix_offline_messages_created_at", "offline_messages", ["created_at"])
    # Partial index for keyset paging; the predicate is spelled as the queries render it.
    op.create_index(
        "ix_offline_messages_pending",
        "offline_messages",
        ["tenant_id", "user_id", "id"],
        postgresql_where=sa.text("NOT delivered"),
        sqlite_where=sa.text("delivered = 0"),
    )

    op.create_table(
        "offline_consume_stats",
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("tenant_id", sa.Text(), primary_key=True),
        sa.Column("consumed", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("stored", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("duplicate", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("filtered", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("invalid", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    )


def downgrade() -> None:
    op.drop_table("offline_consume_stats")
    op.drop_index("ix_offline_messages_pending", table_name="offline_messages")
    op.drop_index("ix_offline_messages_created_at", table_name="offline_messages")
    op.drop_index("ix_offline_messages_user_state", table_name="offline_messages")
    op.drop_index("uq_offline_messages_key", table_name="offline_messages")
    op.drop_table("offline_messages")
