"""Engine metrics for routing, scraped every 250 ms from every ready replica that has them.

The gateway's own in-flight and backlog counts lead; these are the second signal (engine queue,
KV use), fresh enough to matter — production-stack's 30 s is too stale, the best routers scrape
every ~50 ms. A replica that leaves the directory is forgotten by every policy. Each scrape
carries the replica's secret, for engines whose ``/metrics`` is behind it (llama-server's).

Scraping is paced by what it costs the event loop, which also serves every request: a pass's
CPU time (fetching and parsing every engine's page) may take at most ``budget`` of the loop's
time, so the pause after a pass is the longer of ``interval_s`` and what keeps that share.
A handful of replicas are scraped every 250 ms; a thousand are scraped as often as a tenth of a
core allows (their pages parsed in Python take milliseconds each), instead of a pass every
250 ms holding the loop for most of it. The pace is said once when it slows and once when it
is back (``gpufleet_engine_scrape_pause_seconds`` on /metrics follows it). Each pass also
keeps ``precise`` (when given) following the KV-cache events of the replicas now ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp

from gpufleet.controller import Directory
from gpufleet.engines import ADAPTERS, EngineLoad
from gpufleet.gateway.precise_prefix import PrecisePrefix
from gpufleet.gateway.proxy import Upstream
from gpufleet.runtime import Replica

__all__ = ["EngineScraper"]

log = logging.getLogger("gpufleet.gateway.scraper")

#: The longest one engine's metrics page is waited for (a pass waits for its slowest).
SCRAPE_TIMEOUT_S = 2.0


class EngineScraper:
    def __init__(
        self,
        directory: Directory,
        upstream: Upstream,
        *,
        interval_s: float = 0.25,
        budget: float = 0.1,
        on_tick: Callable[[], None] | None = None,
        precise: PrecisePrefix | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.thread_time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not 0 < budget <= 1:
            raise ValueError(f"the scraping budget is a share of the loop in (0, 1], not {budget}")
        #: Called after every pass (the gateway lets queued requests onto new replicas).
        self.on_tick = on_tick
        #: Kept following the KV-cache events of precise models' replicas, every pass.
        self.precise = precise
        self.directory = directory
        self.upstream = upstream
        self.interval = interval_s
        self.budget = budget
        #: The pause after the last pass: ``interval`` unless the passes cost more than
        #: ``budget`` of the loop.
        self.pause = interval_s
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._sleep = sleep
        self._slowed = False
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._known: set[str] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gateway:scrape-engines")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def scrape_once(self) -> None:
        if self._http is None:
            # A busy engine answers /metrics late (vLLM serves it on the loop that serves its
            # requests), and a busy engine's load is the one routing needs most: a page may
            # take up to 2 s, not the 200 ms of a pass, before routing keeps its last view.
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=max(self.interval * 0.8, SCRAPE_TIMEOUT_S))
            )
        jobs = []
        alive: set[str] = set()
        for entry in self.directory.entries():
            adapter = ADAPTERS.get(entry.spec.engine)
            for replica in entry.replicas:
                alive.add(replica.id)
            if adapter is None or adapter.metrics_path is None:
                continue
            for replica in entry.endpoints:
                url = f"{replica.url}{adapter.metrics_path}"
                jobs.append(self._one(replica, url, adapter.parse_metrics))
        await asyncio.gather(*jobs)
        if self.precise is not None:
            await self.precise.sync(self.directory.entries())
        for gone in self._known - alive:
            self.upstream.forget(gone)
        self._known = alive

    async def _one(
        self, replica: Replica, url: str, parse: Callable[[str], EngineLoad | None]
    ) -> None:
        assert self._http is not None
        try:
            async with self._http.get(url, headers=replica.auth_headers()) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return  # liveness is the runtime's business; routing keeps its last view
        load = parse(text)
        if load is not None:
            self.upstream.loads[replica.id] = load

    async def _run(self) -> None:
        while True:
            began, cpu = self._clock(), self._cpu_clock()
            try:
                await self.scrape_once()
            except Exception:
                log.exception("scraping engine metrics failed")
            self.pace(self._clock() - began, self._cpu_clock() - cpu)
            if self.on_tick is not None:
                self.on_tick()
            await self._sleep(self.pause)

    def pace(self, took_s: float, cpu_s: float) -> float:
        """The pause after a pass that took ``took_s`` of wall time and ``cpu_s`` of the loop
        thread's CPU: at least ``interval``, and long enough that passes keep to ``budget``
        of the loop (``cpu / (took + pause) <= budget``). The CPU is the thread's, so work the
        loop did for requests during the pass counts too: a busy gateway scrapes less often,
        which is the trade wanted — its own in-flight counts lead routing anyway."""
        self.pause = max(self.interval, cpu_s / self.budget - took_s)
        slowed = self.pause > 2 * self.interval
        if slowed != self._slowed:
            self._slowed = slowed
            if slowed:
                log.warning(
                    "scraping %d engines costs %.0f ms of CPU a pass: scraping every %.2f s "
                    "instead of %.2f s, to keep it under %.0f%% of the event loop",
                    len(self._known),
                    cpu_s * 1000,
                    self.pause + took_s,
                    self.interval,
                    self.budget * 100,
                )
            else:
                log.info("engine scraping is back to every %.2f s", self.interval)
        return self.pause
