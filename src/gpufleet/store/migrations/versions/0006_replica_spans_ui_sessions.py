"""Replica spans (the capacity side of the cost report), the inventory the operator read, and
console sessions.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_BIGINT = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "replica_spans",
        sa.Column("id", _BIGINT, primary_key=True, autoincrement=True),
        sa.Column("namespace", sa.String(63), nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("replica", sa.String(128), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("gpus", sa.Float, nullable=False),
        sa.Column("gpu_type", sa.String(32), nullable=True),
        sa.Column("price_per_hour", sa.Float, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_replica_spans_open", "replica_spans", ["ended_at", "replica"])
    op.create_index("ix_replica_spans_started", "replica_spans", ["started_at"])
    op.create_table(
        "inventories",
        sa.Column("namespace", sa.String(63), primary_key=True),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "ui_sessions",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_ui_sessions_key", "ui_sessions", ["key_prefix"])


def downgrade() -> None:
    op.drop_index("ix_ui_sessions_key", table_name="ui_sessions")
    op.drop_table("ui_sessions")
    op.drop_table("inventories")
    op.drop_index("ix_replica_spans_open", table_name="replica_spans")
    op.drop_index("ix_replica_spans_started", table_name="replica_spans")
    op.drop_table("replica_spans")
