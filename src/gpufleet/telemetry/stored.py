"""The GPUs as the operator's leader last wrote them, for a gateway on Kubernetes.

Gateways do not sample (one reader of the DCGM exporters per cluster, not one per gateway):
the leader writes each tick's readings to the shared store, and a gateway shows the newest
sample of each device from there (``Store.latest_gpu_samples``). ``latest()`` never queries:
it answers from what a background loop read, and that loop reads every ``refresh_s`` only
while someone asks — the console, the admin API, a Prometheus scrape of the gateway's
``/metrics`` — so an idle gateway costs the database nothing. The first ask after a quiet
spell gets the readings of before it (their ``at`` says how old) and wakes the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from gpufleet.errors import GpufleetError
from gpufleet.store.telemetry import GpuHistoryStore
from gpufleet.supervise import Supervisor, wait_set
from gpufleet.telemetry.gpus import GpuReading, place
from gpufleet.telemetry.metrics import GpuCollector
from gpufleet.telemetry.sampler import SaidOnce

__all__ = ["StoredReadings"]


class StoredReadings:
    kind = "store"

    def __init__(
        self,
        store: GpuHistoryStore,
        *,
        registry: CollectorRegistry | None = None,
        refresh_s: float = 2.0,
        within_s: float = 30.0,
        idle_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``within_s``: a device without a sample that recent is gone (or the leader is);
        ``idle_s``: how long after the last ask the loop keeps reading."""
        self.store = store
        self.refresh_s = refresh_s
        self.within_s = within_s
        self.idle_s = idle_s
        self._clock = clock
        self._latest: list[GpuReading] = []
        self._read_at: float | None = None
        self._asked_at: float | None = None
        #: A read is under way: an ask then waits for it rather than asking for another.
        self._reading = False
        self._wake = asyncio.Event()
        self._said = SaidOnce(f"when next asked, at most every {refresh_s:g} s")
        self._supervisor = Supervisor()
        self._registry = registry
        self._collector = GpuCollector(self.latest)
        if registry is not None:
            registry.register(self._collector)

    def latest(self) -> list[GpuReading]:
        now = self._clock()
        self._asked_at = now
        stale = self._read_at is None or now - self._read_at >= self.refresh_s
        if stale and not self._reading:
            self._wake.set()
        return list(self._latest)

    async def refresh(self) -> list[GpuReading]:
        """Read the store now (in a thread) and keep what it says."""
        now = self._clock()
        self._reading = True
        try:
            points = await asyncio.to_thread(self.store.latest_gpu_samples, self.within_s, now)
        finally:
            self._reading = False
        self._latest = sorted(points, key=place)
        self._read_at = now
        return list(self._latest)

    async def start(self) -> None:
        self._supervisor.spawn("telemetry:stored", self._run, critical=False)

    async def close(self) -> None:
        await self._supervisor.close()
        if self._registry is not None:
            self._registry.unregister(self._collector)
            self._registry = None

    def _wanted(self) -> bool:
        return self._asked_at is not None and self._clock() - self._asked_at < self.idle_s

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.refresh()
            except GpufleetError as exc:
                self._said.failed("reading GPUs from the store", exc)
            else:
                self._said.passed("reading GPUs from the store")
            await wait_set(self._wake, self.refresh_s)
            while not self._wanted():  # nobody is looking: read again when someone does
                self._wake.clear()
                await self._wake.wait()
