"""GPU jobs: one row per job across its attempts (``kind: GpuJob``).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gpu_jobs",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("preemptions", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("placement", sa.JSON, nullable=True),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("gpu_seconds", sa.Float, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_gpu_jobs_phase", "gpu_jobs", ["phase"])


def downgrade() -> None:
    op.drop_index("ix_gpu_jobs_phase", table_name="gpu_jobs")
    op.drop_table("gpu_jobs")
