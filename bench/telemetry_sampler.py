"""GPU telemetry's cost: the sampler's CPU for 8 GPUs at 2 s, and the history's bytes per GPU.

CPU: ``--ticks`` ticks of the loop's work on a machine with 8 GPUs — ``NvmlSampler.read_now``
against the FAKE NVML (``gpufleet.telemetry.fake_nvml``: four tensor-parallel replicas whose
engines' children hold two GPUs each, so every process is traced to its engine; ~90 NVML calls
a tick) and ``Telemetry.record`` into a SQLite store (a temporary directory): one row a GPU a
tick, the minute rolled and the old rows pruned once a minute of the simulated clock, which
moves 2 s a tick. Then the same through ``Telemetry.sample_once`` in an event loop (the worker
thread hops the loop makes). CPU is this process's (``time.process_time``; SQLite's work is in
it): per tick, and as % of one core at one tick every 2 s. The fake answers from Python objects,
so this is gpufleet's own cost around NVML, not the driver's (the device check measures that).

Storage: ``--gpus`` GPUs' history at its steady state, written through the store: a week of
1-minute rows and an hour of 2-second samples, each GPU busy with varying figures. SQLite: the
database file's growth (WAL checkpointed first); PostgreSQL (a scratch database made on the
server at ``--postgres``, dropped afterwards): ``pg_total_relation_size`` (table, indexes,
TOAST) of ``gpu_samples`` and ``gpu_devices``. Divided by the GPUs: bytes per GPU per week.
Run: python bench/telemetry_sampler.py [--ticks 3600] [--gpus 50] [--postgres URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import sqlalchemy as sa

from common import postgres_database, table
from gpufleet.runtime import Phase, Replica
from gpufleet.store import Store, sqlite_url
from gpufleet.store.telemetry import MINUTE_S, RAW_S
from gpufleet.telemetry import GpuReading, NvmlSampler, Telemetry
from gpufleet.telemetry.fake_nvml import FakeGpu, FakeNvml, FakeProcess

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
GIB = 1024**3
GPUS = 8
INTERVAL_S = 2.0
T0 = 1_800_000_000.0  # a whole minute


def eight_gpus() -> tuple[FakeNvml, dict[int, int], list[Replica]]:
    """Eight H100s, four replicas of tensor parallel 2: engine pid 100·k, its EngineCore
    100·k+1, one worker per GPU under that (100·k+10+g)."""
    parents: dict[int, int] = {}
    replicas, gpus = [], []
    for k in range(1, GPUS // 2 + 1):
        engine = 100 * k
        parents[engine], parents[engine + 1] = 1, engine
        replicas.append(Replica(f"llama-g1-{k:06x}", "llama", 1, Phase.READY, pid=engine))
        for g in range(2):
            worker = engine + 10 + g
            parents[worker] = engine + 1
            gpus.append(
                FakeGpu(
                    f"GPU-{k}-{g}",
                    memory_used=70 * GIB,
                    util=80,
                    processes=[FakeProcess(worker, 69 * GIB)],
                )
            )
    return FakeNvml(gpus), parents, replicas


def cpu_rows(ticks: int) -> list[list[str]]:
    nvml, parents, replicas = eight_gpus()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(sqlite_url(Path(tmp)))
        sampler = NvmlSampler(nvml, "bench", parent_of=parents.get)
        telemetry = Telemetry(sampler, replicas=lambda: replicas, store=store)
        readings = sampler.read_now(replicas, T0)
        assert len(readings) == GPUS and all(r.replica for r in readings)
        read_s = record_s = 0.0
        for i in range(ticks):
            now = T0 + INTERVAL_S * i
            start = time.process_time()
            readings = sampler.read_now(replicas, now)
            mid = time.process_time()
            telemetry.record(readings, now)
            end = time.process_time()
            read_s, record_s = read_s + mid - start, record_s + end - mid
        rows += [
            _cpu_row("NvmlSampler.read_now (fake NVML)", read_s, ticks),
            _cpu_row("Telemetry.record (SQLite)", record_s, ticks),
            _cpu_row("both", read_s + record_s, ticks),
        ]
        store.close()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(sqlite_url(Path(tmp)))
        sampler = NvmlSampler(nvml, "bench", parent_of=parents.get)
        telemetry = Telemetry(sampler, replicas=lambda: replicas, store=store)

        async def loop() -> float:
            start = time.process_time()
            for i in range(ticks):
                await telemetry.sample_once(T0 + INTERVAL_S * i)
            return time.process_time() - start

        rows.append(_cpu_row("Telemetry.sample_once (event loop)", asyncio.run(loop()), ticks))
        store.close()
    return rows


def _cpu_row(what: str, seconds: float, ticks: int) -> list[str]:
    per_tick = seconds / ticks
    return [what, f"{per_tick * 1e6:,.0f}", f"{per_tick / INTERVAL_S * 100:.3f} %"]


def history(gpus: int) -> Iterator[tuple[int, list[GpuReading]]]:
    """(resolution, readings) of a week of minutes, then of the week's last hour of samples
    (the same figures each run: a seeded generator)."""
    rng = random.Random(18)
    devices = [(f"GPU-{n:08x}-0000-4000-8000-{n:012x}", f"node-{n // 8:03d}") for n in range(gpus)]

    def tick(at: float) -> list[GpuReading]:
        return [
            GpuReading(
                node=node,
                device=device,
                index=str(n % 8),
                name="NVIDIA H100 80GB HBM3",
                parent=None,
                memory_used=rng.randrange(60, 80) * GIB + rng.randrange(GIB),
                memory_total=80 * GIB,
                util=rng.random(),
                sm_active=rng.random(),
                power_w=rng.uniform(100, 700),
                temp_c=rng.uniform(30, 80),
                replica=f"model-{n // 4:03d}-g1-{n:06x}",
                model=f"model-{n // 4:03d}",
                at=at,
            )
            for n, (device, node) in enumerate(devices)
        ]

    week = 7 * 86400
    for m in range(0, week, MINUTE_S):
        yield MINUTE_S, tick(T0 + m)
    for s in range(0, 3600, RAW_S):
        yield RAW_S, tick(T0 + week - 3600 + s)


def write(store: Store, ticks: Iterable[tuple[int, list[GpuReading]]]) -> int:
    rows = 0
    for resolution, readings in ticks:
        rows += store.put_gpu_samples(readings, readings[0].at, resolution)
    return rows


def storage_rows(gpus: int, postgres: str | None) -> list[list[str]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpufleet.db"
        store = Store.open(sqlite_url(Path(tmp)))
        empty = _sqlite_bytes(store, path)
        n = write(store, history(gpus))
        rows.append(_size_row("SQLite (file)", gpus, n, _sqlite_bytes(store, path) - empty))
        store.close()
    if postgres is not None:
        url, drop = postgres_database(postgres)
        try:
            store = Store.open(url)
            n = write(store, history(gpus))
            with store._engine.begin() as conn:
                size = conn.execute(
                    sa.text(
                        "SELECT pg_total_relation_size('gpu_samples')"
                        " + pg_total_relation_size('gpu_devices')"
                    )
                ).scalar_one()
            rows.append(_size_row("PostgreSQL (tables + indexes)", gpus, n, int(size)))
            store.close()
        finally:
            drop()
    return rows


def _sqlite_bytes(store: Store, path: Path) -> int:
    with store._engine.begin() as conn:
        conn.execute(sa.text("PRAGMA wal_checkpoint(TRUNCATE)"))
    return path.stat().st_size


def _size_row(what: str, gpus: int, rows: int, size: int) -> list[str]:
    per_gpu = size / gpus
    return [
        what,
        f"{rows:,}",
        f"{size / 1e6:,.1f} MB",
        f"{size / rows:.0f}",
        f"{per_gpu / 1e6:.2f} MB",
        f"{per_gpu * 1000 / 1e9:.2f} GB",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ticks", type=int, default=3600, help="ticks of the CPU measurement")
    parser.add_argument("--gpus", type=int, default=50, help="GPUs whose history is stored")
    parser.add_argument("--postgres", default=PG_ADMIN, help="server to make a scratch database on")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()

    print(
        f"Sampler CPU, {GPUS} GPUs every {INTERVAL_S:g} s — FAKE NVML (gpufleet's own cost, "
        f"not the driver's), {args.ticks} ticks (~{args.ticks * INTERVAL_S / 3600:.1f} h "
        "simulated):"
    )
    print(table(["work a tick", "CPU µs a tick", "% of one core"], cpu_rows(args.ticks)))
    print()
    print(
        f"History storage, {args.gpus} GPUs: a week of 1-minute rows + an hour of 2 s samples "
        "(the steady state):"
    )
    print(
        table(
            ["store", "rows", "bytes", "bytes a row", "per GPU a week", "1,000 GPUs a week"],
            storage_rows(args.gpus, None if args.no_postgres else args.postgres),
        )
    )


if __name__ == "__main__":
    main()
