"""Engine metrics for routing, scraped every 250 ms from every ready replica that has them.

The gateway's own in-flight and backlog counts lead; these are the second signal (engine queue,
KV use), fresh enough to matter — production-stack's 30 s is too stale, the best routers scrape
every ~50 ms. A replica that leaves the directory is forgotten by every policy. Each scrape
carries the replica's secret, for engines whose ``/metrics`` is behind it (llama-server's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiohttp

from gpufleet.controller import Directory
from gpufleet.engines import ADAPTERS, EngineLoad
from gpufleet.gateway.proxy import Upstream
from gpufleet.runtime import Replica

__all__ = ["EngineScraper"]

log = logging.getLogger("gpufleet.gateway.scraper")


class EngineScraper:
    def __init__(
        self,
        directory: Directory,
        upstream: Upstream,
        *,
        interval_s: float = 0.25,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        #: Called after every pass (the gateway lets queued requests onto new replicas).
        self.on_tick = on_tick
        self.directory = directory
        self.upstream = upstream
        self.interval = interval_s
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
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.interval * 0.8)
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
            try:
                await self.scrape_once()
            except Exception:
                log.exception("scraping engine metrics failed")
            if self.on_tick is not None:
                self.on_tick()
            await asyncio.sleep(self.interval)
