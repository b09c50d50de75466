"""Demand shared through Redis: every gateway publishes its samples, the operator sums them
(and a canary's answers by generation, for its verdict).

On Kubernetes several gateway replicas see parts of the traffic and the operator, which
scales, sees none. Each gateway writes its latest sample per model into one Redis hash per
model (a field per gateway, the hash expiring unless refreshed), once a second; the operator's
``RedisDemand`` reads them all once a second and answers the autoscaler from that: requests in
flight and arrivals summed, engine queues summed, KV use averaged, TTFT and inter-token latency
p90 the worst. A disaggregated model's prefill pool is published as one more name
(``demand_names``). A gateway that dies stops counting within ``ttl_s``.

Every Redis call is bounded by ``timeout_s`` (a hung Redis must not freeze the loop), and an
outage is reported once when it begins and once when Redis answers again, not every second:
through ``outages``, the process's ``OutageReporter`` (the gateway's, the controller's), so a
Redis that admission, settlements and demand all fail on is one outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterable

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gpufleet.autoscale import Sample
from gpufleet.controller import GenerationStats, ModelEntry, prefill_pool
from gpufleet.outages import OutageReporter

__all__ = ["DemandPublisher", "RedisDemand", "demand_names"]

_PREFIX = "gpufleet:demand:"
#: Per model: "<gateway>:<generation>" → the canary's answers counted by that gateway.
_GENERATIONS = "gpufleet:generations:"
#: What an outage of Redis stops, on each side.
PUBLISHING = "shared demand for autoscaling (not published)"
READING = "shared demand for autoscaling (replica counts held)"


def demand_names(entries: Iterable[ModelEntry]) -> list[str]:
    """What demand is published and read for: every model, and a disaggregated model's
    prefill pool (``prefill_pool``), which scales on its own."""
    names: list[str] = []
    for entry in entries:
        names.append(entry.name)
        if entry.spec.disaggregation is not None:
            names.append(prefill_pool(entry.name))
    return names


class DemandPublisher:
    """A gateway's side: ``sample(model, now)`` of its meter, written for every model.
    ``outages`` may be replaced after construction (``ClusterPlane.share_outages``)."""

    def __init__(
        self,
        url: str,
        gateway_id: str,
        sample: Callable[[str, float], Sample],
        models: Callable[[], Iterable[str]],
        *,
        interval_s: float = 1.0,
        ttl_s: float = 5.0,
        canaries: Callable[[], Iterable[tuple[str, int]]] = tuple,
        generation_stats: Callable[[str, int], GenerationStats] | None = None,
        timeout_s: float = 1.0,
        outages: OutageReporter | None = None,
    ) -> None:
        self._redis = _client(url, timeout_s)
        self.outages = outages or OutageReporter()
        self.gateway_id = gateway_id
        self._canaries = canaries
        self._generation_stats = generation_stats
        self._sample = sample
        self._models = models
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="gateway:publish-demand")

    async def publish_once(self) -> None:
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            for model in self._models():
                s = self._sample(model, now)
                value = json.dumps(
                    [
                        now,
                        s.in_flight,
                        s.arrivals,
                        s.kv_usage,
                        s.engine_waiting,
                        s.ttft_p90,
                        s.itl_p90,
                    ]
                )
                pipe.hset(_PREFIX + model, self.gateway_id, value)
                pipe.expire(_PREFIX + model, int(self.ttl_s) + 1)
            if self._generation_stats is not None:
                for model, generation in self._canaries():
                    g = self._generation_stats(model, generation)
                    field = f"{self.gateway_id}:{generation}"
                    pipe.hset(
                        _GENERATIONS + model, field, json.dumps([g.requests, g.errors, g.ttft_p90])
                    )
                    pipe.expire(_GENERATIONS + model, 3600)
            await pipe.execute()

    async def _run(self) -> None:
        while True:
            try:
                await self.publish_once()
            except Exception as exc:  # noqa: BLE001 - Redis away: the operator sees stale data
                self.outages.failed("redis", exc, affected=PUBLISHING)
            else:
                self.outages.recovered("redis")
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._redis.aclose()


class RedisDemand:
    """The operator's side: a ``DemandSource`` over what every gateway published."""

    def __init__(
        self,
        url: str,
        models: Callable[[], Iterable[str]],
        *,
        interval_s: float = 1.0,
        ttl_s: float = 5.0,
        timeout_s: float = 1.0,
        outages: OutageReporter | None = None,
    ) -> None:
        self._redis = _client(url, timeout_s)
        self.outages = outages or OutageReporter()
        self._models = models
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._latest: dict[str, list[list[float | None]]] = {}
        self._generations: dict[tuple[str, int], list[GenerationStats]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="operator:read-demand")

    async def refresh(self) -> None:
        models = sorted(self._models())
        async with self._redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.hgetall(_PREFIX + model)
            for model in models:
                pipe.hgetall(_GENERATIONS + model)
            everything = await pipe.execute()
        answers, generations = everything[: len(models)], everything[len(models) :]
        counts: dict[tuple[str, int], list[GenerationStats]] = {}
        for model, fields in zip(models, generations, strict=True):
            for key, value in fields.items():
                generation = int(key.decode().rsplit(":", 1)[1])
                requests, errors, ttft = json.loads(value)
                counts.setdefault((model, generation), []).append(
                    GenerationStats(int(requests), int(errors), ttft)
                )
        self._generations = counts
        now = time.time()
        latest: dict[str, list[list[float | None]]] = {}
        for model, fields in zip(models, answers, strict=True):
            rows = [json.loads(v) for v in fields.values()]
            latest[model] = [r for r in rows if now - float(r[0]) <= self.ttl_s]
        self._latest = latest

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the last view; scaling holds
                self.outages.failed("redis", exc, affected=READING)
            else:
                self.outages.recovered("redis")
            await asyncio.sleep(self.interval_s)

    def sample(self, model: str, now: float) -> Sample:
        rows = self._latest.get(model, [])
        kv = [float(r[3]) for r in rows if r[3] is not None]
        ttfts = [float(r[5]) for r in rows if r[5] is not None]
        # A gateway of an older release publishes no inter-token latency.
        itls = [float(r[6]) for r in rows if len(r) > 6 and r[6] is not None]
        return Sample(
            t=now,
            in_flight=sum(float(r[1] or 0) for r in rows),
            arrivals=int(sum(float(r[2] or 0) for r in rows)),
            kv_usage=sum(kv) / len(kv) if kv else None,
            engine_waiting=sum(float(r[4] or 0) for r in rows),
            ttft_p90=max(ttfts) if ttfts else None,
            itl_p90=max(itls) if itls else None,
        )

    def generation_stats(self, model: str, generation: int) -> GenerationStats:
        """A canary's answers over every gateway (the worst TTFT p90 of them)."""
        parts = self._generations.get((model, generation), [])
        ttfts = [p.ttft_p90 for p in parts if p.ttft_p90 is not None]
        return GenerationStats(
            sum(p.requests for p in parts),
            sum(p.errors for p in parts),
            max(ttfts) if ttfts else None,
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._redis.aclose()


def _client(url: str, timeout_s: float) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
