"""The ledger's write path on SQLite and the real PostgreSQL: rows bound through the driver are
stored exactly as SQLAlchemy Core's ``insert(usage)`` stores them and read back identical; a
value the store cannot hold is a refusal (``RowsRejected``), an unreachable store an outage."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gpufleet.errors import StoreError
from gpufleet.store import RowsRejected, Store, UsageRow, sqlite_url
from gpufleet.store.tables import usage
from tests.unit.test_ledger import DAY, row

COLUMNS = [c.name for c in usage.c if c.name not in ("id", "request_id")]


def edge_rows(prefix: str) -> list[UsageRow]:
    """Values whose storage depends on the dialect's bind processing."""
    return [
        row(f"{prefix}-utc", DAY + dt.timedelta(hours=1, microseconds=123456)),
        # SQLite's DATETIME string is the wall time in the value's own zone.
        row(f"{prefix}-offset", DAY.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))),
        row(f"{prefix}-naive", DAY.replace(tzinfo=None) + dt.timedelta(seconds=59)),
        # Integers in float columns, nulls, a float that needs all its digits.
        row(
            f"{prefix}-values",
            DAY,
            ttft_ms=None,
            duration_ms=80,
            gpu_seconds=0,
            cost_usd=0.1 + 0.2,
            client_request_id=None,
        ),
        row(f"{prefix}-client", DAY, client_request_id="client's id ✓"),
    ]


def stored(store: Store, prefix: str) -> dict[str, tuple[Any, ...]]:
    """The rows as the database holds them (SQLite: each value's literal, with its type)."""
    sqlite = store._engine.dialect.name == "sqlite"
    cols = ", ".join(f"quote({c})" if sqlite else c for c in COLUMNS)
    query = f"SELECT request_id, {cols} FROM usage WHERE request_id LIKE '{prefix}-%'"
    with store._engine.connect() as conn:
        return {r[0].split("-", 1)[1]: tuple(r[1:]) for r in conn.execute(sa.text(query))}


def test_rows_are_stored_as_sqlalchemy_core_stores_them(store: Store) -> None:
    assert store.record_usage(edge_rows("fast")) == 5
    with store._engine.begin() as conn:
        conn.execute(sa.insert(usage), [r.values() for r in edge_rows("core")])
    fast, core = stored(store, "fast"), stored(store, "core")
    assert len(fast) == 5
    assert fast == core


def test_a_row_reads_back_identical(store: Store) -> None:
    rows = [r for r in edge_rows("back") if r.at.tzinfo is dt.UTC]
    assert store.record_usage(rows) == len(rows) == 3
    assert store.usage_rows(since=DAY) == rows


def test_a_value_the_store_cannot_hold_is_refused(store: Store) -> None:
    bad = row("bad-at", "not a time")  # type: ignore[arg-type]
    with pytest.raises(RowsRejected):
        store.record_usage([row("fine", DAY), bad])
    with pytest.raises(RowsRejected):
        store.record_usage([row("no-model", DAY, model=None)])
    assert store.usage_rows() == []  # a batch is one transaction
    # Already in the ledger, the row is skipped: it is never bound, so never refused.
    assert store.record_usage([row("bad-at", DAY)]) == 1
    assert store.record_usage([bad]) == 0


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("sqlite", id="sqlite"),
        pytest.param(
            "postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2",
            id="postgresql",
            marks=pytest.mark.postgres,
        ),
    ],
)
def test_an_unreachable_store_is_an_outage_not_a_refusal(url: str, tmp_path: Path) -> None:
    store = Store(sqlite_url(tmp_path / "missing") if url == "sqlite" else url)
    try:
        with pytest.raises(StoreError) as info:
            store.record_usage([row("r", DAY)])
        assert "OperationalError" in str(info.value)
    finally:
        store.close()
