"""The ledger spool's cost on the hot path: ``Ledger.record`` with and without the spool.

``record`` is what an answer pays for its usage row before its last byte leaves (the store
write is behind it, in another task). Both ledgers record the same rows in one run, alternating
call by call so that drift on a shared machine hits both alike; the writer runs as in the
gateway (flush every 0.5 s, fsync every 0.1 s) on a SQLite store in a temporary directory.
Prints p50/p99/p99.9 per call in µs, and the difference.

    python bench/ledger_spool.py --rows 20000
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

from gpufleet.gateway.ledger import Ledger
from gpufleet.gateway.spool import Spool
from gpufleet.store import Store, UsageRow, sqlite_url


def _row(i: int, side: str) -> UsageRow:
    return UsageRow(
        request_id=f"{side}-{i:08d}-8c1f0e9a-4b7d-4e3a-9f21-000000000000",
        client_request_id=f"client-{i}",
        at=dt.datetime.now(dt.UTC),
        tenant="bench",
        key_prefix="gpf_bench001",
        model="smollm2",
        replica="smollm2-0",
        route="chat/completions",
        status=200,
        prompt_tokens=31,
        cached_tokens=0,
        completion_tokens=8,
        ttft_ms=12.5,
        duration_ms=40.25,
        gpu_seconds=0.0123,
        cost_usd=0.0000123,
    )


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "plain").mkdir()
        (root / "spooled").mkdir()
        plain_store = Store.open(sqlite_url(root / "plain"))
        spool_store = Store.open(sqlite_url(root / "spooled"))
        plain = Ledger(plain_store)
        spooled = Ledger(spool_store, spool=Spool(root / "spool"))
        plain.start()
        spooled.start()
        start = dt.datetime.now(dt.UTC)
        times: dict[str, list[float]] = {"memory only": [], "with spool": []}
        clock = time.perf_counter_ns
        for i in range(rows):
            for name, ledger in (("memory only", plain), ("with spool", spooled)):
                row = _row(i, name[0])
                t0 = clock()
                ledger.record(row)
                times[name].append((clock() - t0) / 1000)
            if i % 200 == 0:
                await asyncio.sleep(0)  # let the writers run, as between requests
        await plain.close()
        await spooled.close()
        assert plain.pending == 0 and spooled.pending == 0
        for store in (plain_store, spool_store):
            assert store.usage_report("tenant", since=start)[0]["requests"] == rows
            store.close()
    print(f"Ledger.record, {rows} rows each, alternating (µs per call)")
    print(f"{'':14}{'p50':>8}{'p99':>8}{'p99.9':>8}{'mean':>8}")
    for name, samples in times.items():
        print(
            f"{name:14}{_pct(samples, 0.5):8.1f}{_pct(samples, 0.99):8.1f}"
            f"{_pct(samples, 0.999):8.1f}{statistics.fmean(samples):8.1f}"
        )
    a, b = times["memory only"], times["with spool"]
    print(
        f"{'added':14}{_pct(b, 0.5) - _pct(a, 0.5):8.1f}{_pct(b, 0.99) - _pct(a, 0.99):8.1f}"
        f"{_pct(b, 0.999) - _pct(a, 0.999):8.1f}{statistics.fmean(b) - statistics.fmean(a):8.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    asyncio.run(run(parser.parse_args().rows))


if __name__ == "__main__":
    main()
