"""The usage ledger at scale: write rate, and report time at 10 million rows.

1. Write rate: rows per second through ``Store.record_usage`` in the batches the gateway's
   ledger writer uses (at-most-once check, insert, daily rollups in one transaction).
2. The ledger is then filled to ``--rows`` inside the database (generated in SQL: 90 days, 200
   tenants, 1,000 keys, 20 models) and its daily rollups rebuilt from it.
3. Report time at that size: ``Store.usage_report`` (rollups for whole days + raw rows for the
   first partial day) against the anchor, the same totals by ``GROUP BY`` over the raw ledger
   (what a spend log without rollups costs each time someone asks).

Run: python bench/usage_ledger.py [--rows 10000000] [--store sqlite|postgresql|both]
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from common import table
from gpufleet.store import Store, UsageRow, sqlite_url

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
NOW = dt.datetime.now(dt.UTC)
DAYS = 90


def rows(n: int, offset: int) -> list[UsageRow]:
    out = []
    for i in range(offset, offset + n):
        out.append(
            UsageRow(
                request_id=f"w{i}",
                at=NOW - dt.timedelta(seconds=(i * 7919) % (DAYS * 86400)),
                tenant=f"t{i % 200}",
                key_prefix=f"gpf_k{i % 1000:07d}",
                model=f"m{i % 20}",
                replica=f"m{i % 20}-r{i % 3}",
                route="chat/completions",
                status=200 if i % 50 else 502,
                prompt_tokens=100 + i % 900,
                cached_tokens=i % 100,
                completion_tokens=20 + i % 300,
                ttft_ms=50.0,
                duration_ms=900.0,
                gpu_seconds=0.01,
                cost_usd=0.00001,
            )
        )
    return out


FILL_PG = """
INSERT INTO usage (request_id, at, tenant, key_prefix, model, replica, route, status,
  prompt_tokens, cached_tokens, completion_tokens, ttft_ms, duration_ms, gpu_seconds, cost_usd)
SELECT 'f' || g, now() - ((g * 7919) % (:days * 86400)) * interval '1 second',
  't' || (g % 200), 'gpf_k' || lpad((g % 1000)::text, 7, '0'), 'm' || (g % 20),
  'm' || (g % 20) || '-r' || (g % 3), 'chat/completions', CASE WHEN g % 50 = 0 THEN 502 ELSE 200 END,
  100 + g % 900, g % 100, 20 + g % 300, 50.0, 900.0, 0.01, 0.00001
FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint)) AS g
"""
FILL_SQLITE = """
WITH RECURSIVE s(g) AS (SELECT :start UNION ALL SELECT g + 1 FROM s WHERE g < :stop)
INSERT INTO usage (request_id, at, tenant, key_prefix, model, replica, route, status,
  prompt_tokens, cached_tokens, completion_tokens, ttft_ms, duration_ms, gpu_seconds, cost_usd)
SELECT 'f' || g, strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ((g * 7919) % (:days * 86400)) || ' seconds'),
  't' || (g % 200), 'gpf_k' || substr('0000000' || (g % 1000), -7), 'm' || (g % 20),
  'm' || (g % 20) || '-r' || (g % 3), 'chat/completions', CASE WHEN g % 50 = 0 THEN 502 ELSE 200 END,
  100 + g % 900, g % 100, 20 + g % 300, 50.0, 900.0, 0.01, 0.00001
FROM s
"""
ROLLUP = """
INSERT INTO usage_daily (day, tenant, key_prefix, model, requests, errors, prompt_tokens,
  cached_tokens, completion_tokens, gpu_seconds, cost_usd)
SELECT {day}, tenant, key_prefix, model, count(*), sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END),
  sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens), sum(gpu_seconds), sum(cost_usd)
FROM usage GROUP BY 1, 2, 3, 4
"""
RAW = """
SELECT {dim}, count(*), sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END), sum(prompt_tokens),
  sum(cached_tokens), sum(completion_tokens), sum(gpu_seconds), sum(cost_usd)
FROM usage WHERE at >= :since GROUP BY {dim}
"""


def timed(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(kind: str, url: str, total: int, written: int) -> list[list[str]]:
    store = Store.open(url)
    engine: sa.Engine = store._engine
    pg = engine.dialect.name == "postgresql"
    # 1. the gateway's write path
    batch = 2000
    t = time.perf_counter()
    for off in range(0, written, batch):
        store.record_usage(rows(batch, off))
    write_rate = written / (time.perf_counter() - t)
    # 2. fill to size inside the database, then rebuild the rollups from the ledger
    t = time.perf_counter()
    step = 1_000_000
    for start in range(written, total, step):
        stop = min(total, start + step) - 1
        with engine.begin() as conn:
            conn.execute(
                sa.text(FILL_PG if pg else FILL_SQLITE),
                {"start": start, "stop": stop, "days": DAYS},
            )
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM usage_daily"))
        day = "date(at AT TIME ZONE 'UTC')" if pg else "date(at)"
        conn.execute(sa.text(ROLLUP.format(day=day)))
        if pg:
            conn.execute(sa.text("ANALYZE"))
        count = conn.execute(sa.text("SELECT count(*) FROM usage")).scalar_one()
    fill_s = time.perf_counter() - t
    # 3. reports
    out = []
    for label, since in (
        ("30 days", NOW - dt.timedelta(days=30)),
        ("today + 6 h", NOW - dt.timedelta(hours=6)),
    ):
        for by, dim in (("tenant", "tenant"), ("model", "model")):
            ours = timed(lambda b=by, t=since: store.usage_report(b, since=t))  # type: ignore[misc]

            def raw(dim: str = dim, since: dt.datetime = since) -> None:
                with engine.connect() as conn:
                    conn.execute(sa.text(RAW.format(dim=dim)), {"since": since}).all()

            anchor = timed(raw, repeat=1 if count > 2_000_000 else 3)
            out.append(
                [
                    kind,
                    f"{count:,}",
                    f"by {by}, since {label}",
                    f"{ours * 1000:.1f}",
                    f"{anchor * 1000:.0f}",
                    f"{anchor / ours:.0f}×",
                ]
            )
    print(
        f"{kind}: gateway write path {write_rate:,.0f} rows/s; filled to {count:,} rows in {fill_s:.0f} s"
    )
    out.insert(
        0,
        [
            kind,
            f"{written:,}",
            "write path (record_usage, 2k batches)",
            f"{write_rate:,.0f} rows/s",
            "",
            "",
        ],
    )
    store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--written", type=int, default=100_000, help="rows through the write path")
    parser.add_argument("--store", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args()
    results: list[list[str]] = []
    if args.store in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            results += run("SQLite", sqlite_url(Path(tmp)), args.rows, args.written)
    if args.store in ("postgresql", "both"):
        admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        name = f"gpufleet_bench_{secrets.token_hex(4)}"
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
        try:
            results += run(
                "PostgreSQL", PG_ADMIN.rsplit("/", 1)[0] + f"/{name}", args.rows, args.written
            )
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            admin.dispose()
    print(
        table(
            ["store", "rows", "query", "usage_report ms", "raw GROUP BY ms (anchor)", "ratio"],
            results,
        )
    )


if __name__ == "__main__":
    main()
