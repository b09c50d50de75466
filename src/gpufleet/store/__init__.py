"""Persistent state: model specs, tenants, API keys, the usage ledger and events; SQLite by
default, or PostgreSQL."""

from gpufleet.store.batches import BatchLine, BatchRecord, FileRecord
from gpufleet.store.db import (
    ApplyResult,
    Event,
    KeyRecord,
    Revision,
    Store,
    StoredModel,
    StoredTenant,
    UsageRow,
    sqlite_url,
)
from gpufleet.store.jobs import ACTIVE_PHASES, JobExists, JobRecord
from gpufleet.store.telemetry import GpuPoint
from gpufleet.store.usage import DeadLetter, RefusalKey, RowsRejected

__all__ = [
    "ACTIVE_PHASES",
    "ApplyResult",
    "BatchLine",
    "BatchRecord",
    "DeadLetter",
    "Event",
    "FileRecord",
    "GpuPoint",
    "JobExists",
    "JobRecord",
    "KeyRecord",
    "RefusalKey",
    "Revision",
    "RowsRejected",
    "Store",
    "StoredModel",
    "StoredTenant",
    "UsageRow",
    "sqlite_url",
]
