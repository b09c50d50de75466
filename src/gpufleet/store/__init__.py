"""Persistent state: model specs (desired state) and events; SQLite by default, or PostgreSQL."""

from gpufleet.store.db import ApplyResult, Event, Store, StoredModel, sqlite_url

__all__ = ["ApplyResult", "Event", "Store", "StoredModel", "sqlite_url"]
