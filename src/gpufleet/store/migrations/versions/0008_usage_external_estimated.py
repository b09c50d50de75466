"""The ledger marks rows sent to endpoints outside the company and rows whose token counts are
estimates; the daily rollups sum them apart. Rows and rollups from before read as neither.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_BIGINT = sa.BigInteger().with_variant(sa.Integer, "sqlite")

_ROLLUP_COUNTS = (
    "external_requests",
    "external_prompt_tokens",
    "external_completion_tokens",
    "estimated_requests",
)


def upgrade() -> None:
    # A constant default: PostgreSQL (11+) adds such a column without rewriting the table, and
    # SQLite's ADD COLUMN needs one for NOT NULL.
    for name in ("external", "estimated"):
        op.add_column(
            "usage", sa.Column(name, sa.Boolean, nullable=False, server_default=sa.false())
        )
    for name in _ROLLUP_COUNTS:
        op.add_column("usage_daily", sa.Column(name, _BIGINT, nullable=False, server_default="0"))
    op.add_column(
        "usage_daily",
        sa.Column("external_cost_usd", sa.Float, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_daily") as batch:
        for name in (*_ROLLUP_COUNTS, "external_cost_usd"):
            batch.drop_column(name)
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("estimated")
        batch.drop_column("external")
