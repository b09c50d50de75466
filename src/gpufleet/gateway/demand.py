"""The gateway's demand, as the autoscaler samples it (``controller.DemandSource``).

The gateway knows demand first and exactly: requests running on engines and waiting in its
fair queue, requests held while a model has no ready replica, and arrivals — a request that
starts and ends between two samples still counts as activity, so a model serving short requests
is never mistaken for idle. Engine metrics (KV use, engine queues) come from the scraper's
latest view; TTFTs are those the gateway measured since the previous sample.

Counting is O(1) on the hot path (a dict increment); the sample is taken once a second.
"""

from __future__ import annotations

from collections import defaultdict

from gpufleet.autoscale import Sample
from gpufleet.controller import Directory
from gpufleet.gateway.fairqueue import AdmissionQueues
from gpufleet.gateway.proxy import Upstream

__all__ = ["DemandMeter"]

#: TTFTs kept per model between two samples (a reservoir large enough for a p90).
_TTFT_KEEP = 512


class DemandMeter:
    def __init__(self, directory: Directory, queues: AdmissionQueues, upstream: Upstream) -> None:
        self.directory = directory
        self.queues = queues
        self.upstream = upstream
        self._arrivals: defaultdict[str, int] = defaultdict(int)
        self._held: defaultdict[str, int] = defaultdict(int)
        self._ttfts: defaultdict[str, list[float]] = defaultdict(list)

    def arrived(self, model: str) -> None:
        self._arrivals[model] += 1

    def hold(self, model: str, delta: int) -> None:
        self._held[model] += delta

    def first_token(self, model: str, seconds: float) -> None:
        ttfts = self._ttfts[model]
        if len(ttfts) < _TTFT_KEEP:
            ttfts.append(seconds)

    def sample(self, model: str, now: float) -> Sample:
        stats = self.queues.get(model).stats()
        arrivals = self._arrivals.pop(model, 0)
        ttfts = sorted(self._ttfts.pop(model, ()))
        p90 = ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))] if ttfts else None
        kv: list[float] = []
        waiting = 0.0
        entry = self.directory.get(model)
        if entry is not None:
            for replica in entry.endpoints:
                load = self.upstream.loads.get(replica.id)
                if load is not None:
                    kv.append(load.kv_usage)
                    waiting += load.waiting
        return Sample(
            t=now,
            in_flight=stats.in_flight + stats.waiting + self._held.get(model, 0),
            arrivals=arrivals,
            kv_usage=sum(kv) / len(kv) if kv else None,
            engine_waiting=waiting,
            ttft_p90=p90,
        )
