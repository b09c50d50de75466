"""The autoscaler's persisted state, and every generation of a model's spec (rollouts).

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
    op.create_table(
        "model_revisions",
        sa.Column("namespace", sa.String(63), nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("namespace", "model", "generation", name="pk_model_revisions"),
    )
    # Models applied before revisions existed: their current generation is the active one.
    op.execute(
        "INSERT INTO model_revisions (namespace, model, generation, document, status, reason,"
        " created_at) SELECT namespace, name, generation, document, 'active', '', updated_at"
        " FROM models"
    )


def downgrade() -> None:
    op.drop_table("model_revisions")
    op.drop_table("scale_state")
