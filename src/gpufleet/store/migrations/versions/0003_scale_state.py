"""The autoscaler's persisted state.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scale_state",
        sa.Column("namespace", sa.String(63), nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("desired", sa.Integer, nullable=False),
        sa.Column("last_active", sa.Float, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("namespace", "model", name="pk_scale_state"),
    )


def downgrade() -> None:
    op.drop_table("scale_state")
