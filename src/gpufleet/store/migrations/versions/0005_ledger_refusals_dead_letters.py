"""The ledger's refusal counts per day, and its dead letters.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_BIGINT = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "usage_refusals_daily",
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("refused", _BIGINT, nullable=False),
        sa.PrimaryKeyConstraint(
            "day",
            "tenant",
            "key_prefix",
            "model",
            "status",
            "reason",
            name="pk_usage_refusals_daily",
        ),
    )
    op.create_table(
        "usage_dead_letters",
        sa.Column("id", _BIGINT, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(128), nullable=False, unique=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("line", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("usage_dead_letters")
    op.drop_table("usage_refusals_daily")
