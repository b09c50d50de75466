"""GPU history: the devices the telemetry has seen, and their samples in two resolutions.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gpu_devices",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("device", sa.String(96), nullable=False, unique=True),
        sa.Column("node", sa.String(253), nullable=False),
        sa.Column("gpu_index", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("parent", sa.String(96), nullable=True),
        sa.Column("memory_total", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_gpu_devices_node", "gpu_devices", ["node"])
    op.create_table(
        "gpu_samples",
        sa.Column("device_id", sa.Integer, nullable=False),
        sa.Column("resolution", sa.SmallInteger, nullable=False),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("memory_used", sa.BigInteger, nullable=True),
        sa.Column("util", sa.Float, nullable=True),
        sa.Column("sm_active", sa.Float, nullable=True),
        sa.Column("power_w", sa.Float, nullable=True),
        sa.Column("temp_c", sa.Float, nullable=True),
        sa.Column("replica", sa.String(128), nullable=True),
        sa.Column("model", sa.String(63), nullable=True),
        sa.PrimaryKeyConstraint("device_id", "resolution", "at", name="pk_gpu_samples"),
    )
    op.create_index("ix_gpu_samples_at", "gpu_samples", ["resolution", "at"])
    op.create_index("ix_gpu_samples_model", "gpu_samples", ["model", "resolution", "at"])


def downgrade() -> None:
    op.drop_index("ix_gpu_samples_model", table_name="gpu_samples")
    op.drop_index("ix_gpu_samples_at", table_name="gpu_samples")
    op.drop_table("gpu_samples")
    op.drop_index("ix_gpu_devices_node", table_name="gpu_devices")
    op.drop_table("gpu_devices")
