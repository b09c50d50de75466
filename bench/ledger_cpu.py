"""The usage ledger's CPU per row: a row encoded onto the spool, decoded back, written to the store.

Every answered request becomes a ledger row: ``encode_row`` on the hot path (the spool line),
``decode_row`` when a spool is replayed, and ``Store.record_usage`` in the ledger writer's
thread, which holds the GIL, so its CPU is the gateway core's. Issue 17 measured ~15 µs a row
encoding and ~48 µs writing on SQLite: ~10 % of a request's CPU, most of the write in
SQLAlchemy's per-row parameter processing. Each is timed before and after that change, in one
run, alternating round by round so that drift on a shared machine hits both alike:

- before: the previous path, our re-implementation of the code before the change (below): the
  spool line as a JSON object, and the write through SQLAlchemy Core (``in_`` for the duplicate
  check, ``insert(usage)`` with a dict a row);
- after: ``gpufleet.gateway.spool`` and ``Store.record_usage`` as they are.

``record_usage`` runs on SQLite (a temporary directory) and PostgreSQL (a scratch database made
on the server at ``--postgres``, dropped afterwards), in batches of ``--batch`` rows (the ledger
writer's default), each path on fresh request ids. CPU is this process's
(``time.process_time``): SQLite's work is in it, the PostgreSQL server's is not. Prints µs of
CPU a row, the median of the rounds, and after / before.
Run: python bench/ledger_cpu.py [--rows 20000] [--batch 500] [--postgres URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from common import postgres_database, table
from gpufleet.gateway.spool import decode_row, encode_row
from gpufleet.store import Store, UsageRow, sqlite_url
from gpufleet.store.tables import usage
from gpufleet.store.usage import daily_rollups

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
ROUNDS = 10


def previous_encode_row(row: UsageRow) -> bytes:
    """The previous path: the row as a JSON object."""
    values = row.values()
    values["at"] = row.at.isoformat()
    return json.dumps(values, separators=(",", ":")).encode() + b"\n"


def previous_decode_row(line: bytes) -> UsageRow:
    values: dict[str, Any] = json.loads(line)
    if not isinstance(values, dict):
        raise ValueError("not a JSON object")
    values["at"] = dt.datetime.fromisoformat(values["at"])
    return UsageRow(**values)


def previous_record_usage(store: Store, rows: Sequence[UsageRow]) -> int:
    """The previous path: the store's ``_record_usage`` through SQLAlchemy Core."""
    unique: dict[str, UsageRow] = {}
    for r in rows:
        unique.setdefault(r.request_id, r)
    with store._write() as conn:
        seen = set(
            conn.execute(select(usage.c.request_id).where(usage.c.request_id.in_(unique)))
            .scalars()
            .all()
        )
        fresh = {rid: r for rid, r in unique.items() if rid not in seen}
        if not fresh:
            return 0
        conn.execute(insert(usage), [r.values() for r in fresh.values()])
        store._add_rollups(conn, daily_rollups(fresh.values()))  # unchanged by the change
        return len(fresh)


def _row(i: int, side: str) -> UsageRow:
    return UsageRow(
        request_id=f"{side}-{i:08d}-8c1f0e9a-4b7d-4e3a-9f21-{secrets.token_hex(6)}",
        client_request_id=f"client-{i}" if i % 2 else None,
        at=dt.datetime.now(dt.UTC),
        tenant=f"tenant-{i % 4}",
        key_prefix=f"gpf_key{i % 8:05d}",
        model=("smollm2", "qwen")[i % 2],
        replica="smollm2-0",
        route="chat/completions",
        status=200 if i % 50 else 429,
        prompt_tokens=31 + i % 100,
        cached_tokens=i % 16,
        completion_tokens=8 + i % 200,
        ttft_ms=12.5 if i % 10 else None,
        duration_ms=40.25,
        gpu_seconds=0.0123,
        cost_usd=0.0000123,
    )


def _cpu_us(fn: Callable[[], object], n: int) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) / n * 1e6


def alternate(
    before: Callable[[int], Callable[[], object]],
    after: Callable[[int], Callable[[], object]],
    n: int,
) -> tuple[float, float]:
    """Median µs of CPU a row of each side over ``ROUNDS`` rounds, in turn (``before(r)`` and
    ``after(r)`` give round ``r``'s work, ``n`` rows)."""
    b: list[float] = []
    a: list[float] = []
    for r in range(ROUNDS):
        first, second = (before, after) if r % 2 == 0 else (after, before)
        x = _cpu_us(first(r), n)
        y = _cpu_us(second(r), n)
        b.append(x if first is before else y)
        a.append(y if first is before else x)
    return statistics.median(b), statistics.median(a)


def _each(fn: Callable[[Any], object], items: list[Any]) -> Callable[[int], Callable[[], object]]:
    return lambda _round: lambda: [fn(x) for x in items]


def spool_rows(n: int) -> list[list[str]]:
    rows = [_row(i, "spool") for i in range(n)]
    old_lines = [previous_encode_row(r) for r in rows]
    new_lines = [encode_row(r) for r in rows]
    assert [decode_row(x) for x in new_lines] == [previous_decode_row(x) for x in old_lines] == rows
    encode = alternate(_each(previous_encode_row, rows), _each(encode_row, rows), n)
    decode = alternate(_each(previous_decode_row, old_lines), _each(decode_row, new_lines), n)
    return [_line("encode_row", "", *encode), _line("decode_row", "", *decode)]


def _line(call: str, store: str, before: float, after: float) -> list[str]:
    return [call, store, f"{before:.1f}", f"{after:.1f}", f"{after / before:.2f}"]


def store_rows(name: str, url: str, n: int, batch: int) -> list[str]:
    store = Store.open(url)
    try:
        per_round = n // ROUNDS
        sides = {
            side: [
                [_row(r * per_round + i, f"{side}{r}") for i in range(per_round)]
                for r in range(ROUNDS)
            ]
            for side in ("before", "after")
        }

        def write(
            side: str, fn: Callable[[Sequence[UsageRow]], int]
        ) -> Callable[[int], Callable[[], object]]:
            def work(r: int) -> Callable[[], object]:
                rows = sides[side][r]
                return lambda: [fn(rows[i : i + batch]) for i in range(0, len(rows), batch)]

            return work

        b, a = alternate(
            write("before", lambda rows: previous_record_usage(store, rows)),
            write("after", store.record_usage),
            per_round,
        )
        assert len(store.usage_rows(limit=2 * n)) == 2 * per_round * ROUNDS
        return _line("record_usage", name, b, a)
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows a side and store")
    parser.add_argument("--batch", type=int, default=500, help="rows a record_usage call")
    parser.add_argument("--postgres", default=PG_ADMIN, help="server to make a scratch database on")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    rows = spool_rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(store_rows("SQLite", sqlite_url(Path(tmp)), args.rows, args.batch))
    if not args.no_postgres:
        pg, drop = postgres_database(args.postgres)
        try:
            rows.append(store_rows("PostgreSQL", pg, args.rows, args.batch))
        finally:
            drop()
    print(table(["call", "store", "before µs/row", "after µs/row", "after/before"], rows))
    print(
        f"\nµs of this process's CPU a row, median of {ROUNDS} rounds alternating before and"
        f" after; record_usage in batches of {args.batch}; before: the previous path, our"
        f" re-implementation of the code before the change."
    )


if __name__ == "__main__":
    main()
