"""The gateway's demand, as the autoscaler samples it (``controller.DemandSource``).

The gateway knows demand first and exactly: requests running on engines and waiting in its
fair queue, requests held while a model has no ready replica, and arrivals — a request that
starts and ends between two samples still counts as activity, so a model serving short requests
is never mistaken for idle. Engine metrics (KV use, engine queues) come from the scraper's
latest view; TTFTs are those the gateway measured since the previous sample.

Counting is O(1) on the hot path (a dict increment); the sample is taken once a second.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Iterable

from gpufleet.autoscale import Sample
from gpufleet.controller import Directory, GenerationStats
from gpufleet.gateway.fairqueue import AdmissionQueues
from gpufleet.gateway.proxy import Upstream
from gpufleet.planner import PREFILL_POOL_SUFFIX
from gpufleet.runtime import Replica

__all__ = ["DemandMeter"]

#: TTFTs kept per model between two samples (a reservoir large enough for a p90).
_TTFT_KEEP = 512
#: How far back cost-aware routing looks at a deployment's TTFTs.
_RECENT_S = 30.0


#: (model, generation) pairs counted at most; generations only grow, so old ones are dropped.
_GENERATIONS_KEEP = 4096


class _Counts:
    __slots__ = ("errors", "requests", "ttfts")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.ttfts: list[float] = []


def _p90(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


class DemandMeter:
    def __init__(self, directory: Directory, queues: AdmissionQueues, upstream: Upstream) -> None:
        self.directory = directory
        self.queues = queues
        self.upstream = upstream
        self._arrivals: defaultdict[str, int] = defaultdict(int)
        self._held: defaultdict[str, int] = defaultdict(int)
        self._ttfts: defaultdict[str, list[float]] = defaultdict(list)
        self._itls: defaultdict[str, list[float]] = defaultdict(list)
        self._generations: dict[tuple[str, int], _Counts] = {}
        self._recent: dict[str, deque[tuple[float, float]]] = {}

    def arrived(self, model: str) -> None:
        self._arrivals[model] += 1

    def hold(self, model: str, delta: int) -> None:
        self._held[model] += delta

    def inter_token(self, model: str, seconds: float) -> None:
        """A stream ended whose events came ``seconds`` apart on average."""
        itls = self._itls[model]
        if len(itls) < _TTFT_KEEP:
            itls.append(seconds)

    def first_token(self, model: str, seconds: float) -> None:
        ttfts = self._ttfts[model]
        if len(ttfts) < _TTFT_KEEP:
            ttfts.append(seconds)
        recent = self._recent.get(model)
        if recent is None:
            recent = self._recent[model] = deque(maxlen=_TTFT_KEEP)
        recent.append((time.monotonic(), seconds))

    def recent_ttft_p90(self, model: str, window_s: float = _RECENT_S) -> float | None:
        """TTFT p90 of the model's requests over the last ``window_s`` (None: none)."""
        recent = self._recent.get(model)
        if not recent:
            return None
        since = time.monotonic() - window_s
        return _p90([ttft for at, ttft in recent if at >= since])

    def outcome(self, model: str, replica_id: str, status: int, ttft_s: float | None) -> None:
        """An answered request, counted for its replica's generation (canary analysis)."""
        entry = self.directory.get(model)
        if entry is None:
            return
        generation = next((r.generation for r in entry.replicas if r.id == replica_id), None)
        if generation is None:
            return
        counts = self._generations.get((model, generation))
        if counts is None:
            if len(self._generations) > _GENERATIONS_KEEP:
                self._generations.clear()
            counts = self._generations[(model, generation)] = _Counts()
        counts.requests += 1
        counts.errors += status >= 500
        if ttft_s is not None and len(counts.ttfts) < _TTFT_KEEP:
            counts.ttfts.append(ttft_s)

    def generation_stats(self, model: str, generation: int) -> GenerationStats:
        counts = self._generations.get((model, generation))
        if counts is None:
            return GenerationStats()
        return GenerationStats(counts.requests, counts.errors, _p90(counts.ttfts))

    def in_flight_on(self, replica_id: str) -> int:
        """Requests this gateway has on one replica now (the controller drains by it)."""
        return self.upstream.in_flight(replica_id)

    def sample(self, model: str, now: float) -> Sample:
        """``model``'s demand; a name ending in ``PREFILL_POOL_SUFFIX``: its prefill pool's."""
        if model.endswith(PREFILL_POOL_SUFFIX):
            return self._prefill_sample(model.removesuffix(PREFILL_POOL_SUFFIX), now)
        stats = self.queues.get(model).stats()
        arrivals = self._arrivals.pop(model, 0)
        p90 = _p90(self._ttfts.pop(model, []))
        entry = self.directory.get(model)
        kv, waiting = self._engines(entry.endpoints if entry is not None else ())
        return Sample(
            t=now,
            in_flight=stats.in_flight + stats.waiting + self._held.get(model, 0),
            arrivals=arrivals,
            kv_usage=kv,
            engine_waiting=waiting,
            ttft_p90=p90,
            itl_p90=_p90(self._itls.pop(model, [])),
        )

    def _prefill_sample(self, model: str, now: float) -> Sample:
        """A disaggregated model's prefill pool: prompts being prefilled on it, prompts that
        qualified for it (also while it has no replica), its replicas' engine queues, and the
        p90 of its prefill calls' times (its share of TTFT)."""
        demand = self.upstream.prefill_demand
        wanted, seconds = demand.take(model)
        entry = self.directory.get(model)
        kv, waiting = self._engines(entry.prefill_endpoints if entry is not None else ())
        return Sample(
            t=now,
            in_flight=demand.in_flight(model),
            arrivals=wanted,
            kv_usage=kv,
            engine_waiting=waiting,
            ttft_p90=_p90(seconds),
        )

    def _engines(self, replicas: Iterable[Replica]) -> tuple[float | None, float]:
        """Mean KV-cache use (None: unknown) and requests waiting inside ``replicas``' engines."""
        kv: list[float] = []
        waiting = 0.0
        for replica in replicas:
            load = self.upstream.loads.get(replica.id)
            if load is not None:
                if load.kv_usage is not None:  # None: the engine publishes no KV-cache use
                    kv.append(load.kv_usage)
                waiting += load.waiting
        return (sum(kv) / len(kv) if kv else None), waiting
