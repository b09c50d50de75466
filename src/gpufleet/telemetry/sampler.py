"""The GPU telemetry loop: read every ``interval_s``, keep the latest, write history, serve
metrics.

One supervised loop per process that samples (``gpufleet up``, or the operator's leader). Each
tick reads the source (NVML in a worker thread, or the DCGM exporter over HTTP), attributes the
devices to the runtime's replicas of that moment, keeps the readings for ``latest()`` (the web
console and ``/metrics`` read them; a failed tick keeps the last ones, whose ``at`` says how old
they are) and writes them to the store: one row per device per 2-second slot, the minutes that
ended rolled into 1-minute rows and old rows pruned once a minute.

A failing source or store is said once when it starts failing and once when it recovers, not
every 2 s. Time is injected: tests drive ``sample_once(now)`` with explicit times.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from gpufleet.errors import GpufleetError
from gpufleet.outages import summary
from gpufleet.runtime import Replica
from gpufleet.store.telemetry import (
    KEEP_MINUTE_S,
    KEEP_RAW_S,
    MINUTE_S,
    RAW_S,
    GpuHistoryStore,
)
from gpufleet.supervise import Supervisor
from gpufleet.telemetry.dcgm import DcgmReader
from gpufleet.telemetry.gpus import GpuReading, GpuSource
from gpufleet.telemetry.metrics import GpuCollector
from gpufleet.telemetry.nvml import NvmlSampler, load_nvml

__all__ = ["SaidOnce", "Telemetry", "dcgm_telemetry", "nvml_telemetry"]

log = logging.getLogger("gpufleet.telemetry")


class Telemetry:
    def __init__(
        self,
        source: GpuSource,
        *,
        replicas: Callable[[], Sequence[Replica]],
        store: GpuHistoryStore | None = None,
        registry: CollectorRegistry | None = None,
        interval_s: float = 2.0,
        keep_raw_s: float = KEEP_RAW_S,
        keep_minute_s: float = KEEP_MINUTE_S,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"the sampling interval must be positive, not {interval_s}")
        self.source = source
        self.store = store
        self.interval_s = interval_s
        self.keep_raw_s = keep_raw_s
        self.keep_minute_s = keep_minute_s
        self._replicas = replicas
        self._clock = clock
        self._sleep = sleep
        self._latest: list[GpuReading] = []
        self._written_slot: int | None = None
        self._rolled_minute: int | None = None
        self._said = SaidOnce(f"every {interval_s:.0f} s")
        self._supervisor = Supervisor()
        self._registry = registry
        self._collector = GpuCollector(self.latest)
        if registry is not None:
            registry.register(self._collector)

    @property
    def kind(self) -> str:
        """The source's: "nvml" or "dcgm"."""
        return self.source.kind

    def latest(self) -> list[GpuReading]:
        """The devices as last read (empty before the first reading)."""
        return list(self._latest)

    async def sample_once(self, now: float | None = None) -> list[GpuReading]:
        """One tick at ``now`` (unix seconds; the clock's when None): read, keep, record."""
        now = self._clock() if now is None else now
        readings = await self._read(now)
        if self.store is not None:
            await asyncio.to_thread(self.record, readings, now)
        return readings

    async def _read(self, now: float) -> list[GpuReading]:
        readings = await self.source.read(list(self._replicas()), now)
        self._latest = readings
        return readings

    def record(self, readings: Sequence[GpuReading], now: float) -> None:
        """Write ``readings`` to the history (once per 2-second slot); once a minute roll the
        minutes that ended and prune. Blocks: run it in a thread."""
        assert self.store is not None
        second = int(now)
        slot = second - second % RAW_S
        if slot != self._written_slot:
            self.store.put_gpu_samples(readings, slot)
            self._written_slot = slot
        minute = second // MINUTE_S
        if minute != self._rolled_minute:
            self.store.roll_gpu_samples(now)
            self.store.prune_gpu_samples(
                now, keep_raw_s=self.keep_raw_s, keep_minute_s=self.keep_minute_s
            )
            self._rolled_minute = minute

    async def start(self) -> None:
        self._supervisor.spawn("telemetry:gpus", self._run, critical=False)

    async def close(self) -> None:
        await self._supervisor.close()
        await self.source.close()
        if self._registry is not None:
            self._registry.unregister(self._collector)
            self._registry = None

    async def _run(self) -> None:
        while True:
            started = self._clock()
            await self._tick(started)
            await self._sleep(max(0.0, started + self.interval_s - self._clock()))

    async def _tick(self, now: float) -> None:
        """``sample_once``, with a failing source or store said once, not every tick."""
        try:
            readings = await self._read(now)
        except GpufleetError as exc:
            self._said.failed("reading GPUs", exc)
            return
        self._said.passed("reading GPUs")
        if self.store is None:
            return
        try:
            await asyncio.to_thread(self.record, readings, now)
        except GpufleetError as exc:
            self._said.failed("writing GPU history", exc)
        else:
            self._said.passed("writing GPU history")


class SaidOnce:
    """A failure said when it starts (or its error changes) and once when it passes, not
    every tick."""

    def __init__(self, retry: str) -> None:
        self._retry = retry
        self._failing: dict[str, str] = {}  # what is failing → its error

    def failed(self, what: str, exc: Exception) -> None:
        # One line: a store's error carries SQLAlchemy's parameters, which change every tick.
        message = summary(exc)
        if self._failing.get(what) != message:
            self._failing[what] = message
            log.warning(
                "GPU telemetry: %s failed (%s); trying again %s", what, message, self._retry
            )

    def passed(self, what: str) -> None:
        if self._failing.pop(what, None) is not None:
            log.info("GPU telemetry: %s works again", what)


def nvml_telemetry(
    node: str,
    *,
    replicas: Callable[[], Sequence[Replica]],
    store: GpuHistoryStore | None = None,
    registry: CollectorRegistry | None = None,
    interval_s: float = 2.0,
    load: Callable[[], Any | None] = load_nvml,
) -> Telemetry | None:
    """Telemetry of this machine's GPUs, or None (said once) where NVML does not load: no
    driver, or no GPU. Loads NVML (``load``; tests pass a fake), which blocks: call it in a
    thread."""
    nvml = load()
    if nvml is None:
        log.info("no NVIDIA GPU found (NVML did not load): GPU telemetry is off")
        return None
    source = NvmlSampler(nvml, node, shutdown=True)
    return Telemetry(
        source, replicas=replicas, store=store, registry=registry, interval_s=interval_s
    )


def dcgm_telemetry(
    url: str,
    *,
    namespace: str,
    replicas: Callable[[], Sequence[Replica]],
    store: GpuHistoryStore | None = None,
    registry: CollectorRegistry | None = None,
    interval_s: float = 2.0,
) -> Telemetry:
    """Telemetry of a cluster's GPUs from the DCGM exporters (or Prometheus) at ``url``."""
    source = DcgmReader(url, namespace=namespace)
    return Telemetry(
        source, replicas=replicas, store=store, registry=registry, interval_s=interval_s
    )
