"""Table definitions (SQLAlchemy Core). Migrations in ``migrations/versions`` must match them."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

__all__ = ["HEAD_REVISION", "events", "metadata", "models"]

#: The newest migration; a test checks it against the migration scripts.
HEAD_REVISION = "0001"

metadata = MetaData()

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("namespace", String(63), nullable=False),
    Column("name", String(63), nullable=False),
    # Bumped whenever the spec changes; replicas carry the generation they were started for.
    Column("generation", Integer, nullable=False),
    Column("document", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("namespace", "name", name="uq_models_namespace_name"),
)

events = Table(
    "events",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("namespace", String(63), nullable=False),
    Column("model", String(63), nullable=False),
    Column("type", String(16), nullable=False),  # Normal | Warning
    Column("reason", String(64), nullable=False),
    Column("message", Text, nullable=False),
    Index("ix_events_model_at", "namespace", "model", "at"),
)
