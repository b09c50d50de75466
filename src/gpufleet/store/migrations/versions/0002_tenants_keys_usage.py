"""Tenants, API keys, the usage ledger and its daily rollups.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_BIGINT = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("prefix", sa.String(16), primary_key=True),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("limits", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_api_keys_updated", "api_keys", ["updated_at"])
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])
    op.create_table(
        "usage",
        sa.Column("id", _BIGINT, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(128), nullable=False, unique=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("replica", sa.String(128), nullable=False),
        sa.Column("route", sa.String(32), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("cached_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("ttft_ms", sa.Float, nullable=True),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("gpu_seconds", sa.Float, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("client_request_id", sa.String(128), nullable=True),
    )
    op.create_index("ix_usage_at", "usage", ["at"])
    op.create_index("ix_usage_tenant_at", "usage", ["tenant", "at"])
    op.create_index("ix_usage_model_at", "usage", ["model", "at"])
    op.create_index("ix_usage_key_at", "usage", ["key_prefix", "at"])
    op.create_table(
        "usage_daily",
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("requests", _BIGINT, nullable=False),
        sa.Column("errors", _BIGINT, nullable=False),
        sa.Column("prompt_tokens", _BIGINT, nullable=False),
        sa.Column("cached_tokens", _BIGINT, nullable=False),
        sa.Column("completion_tokens", _BIGINT, nullable=False),
        sa.Column("gpu_seconds", sa.Float, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("day", "tenant", "key_prefix", "model", name="pk_usage_daily"),
    )


def downgrade() -> None:
    op.drop_table("usage_daily")
    for index in ("ix_usage_key_at", "ix_usage_model_at", "ix_usage_tenant_at", "ix_usage_at"):
        op.drop_index(index, table_name="usage")
    op.drop_table("usage")
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_index("ix_api_keys_updated", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
