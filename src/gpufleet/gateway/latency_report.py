"""A model's latency and throughput over a window (``GET /admin/v1/models/{name}/latency``):
P50/P95/P99 of TTFT, inter-token latency and end-to-end, and tokens/s — per model, and per GPU
from the GPUs its replicas held (their spans) — for the window and as a series the console
charts. The arithmetic is ``policies.latency``; the rows are the ledger's."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from typing import Any

from gpufleet.policies.costs import Span, placed_seconds
from gpufleet.policies.latency import LatencySummary, latency_series, summarise
from gpufleet.store import Store

__all__ = ["MAX_POINTS", "build_latency", "default_step"]

#: A series longer than this is refused (ask for a coarser step).
MAX_POINTS = 2000


def default_step(seconds: float) -> float:
    """About 120 points, never finer than the telemetry's 2 s."""
    return max(2.0, math.ceil(seconds / 120.0))


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _view(s: LatencySummary, spans: list[Span]) -> dict[str, Any]:
    """``spans``: the model's; tokens/s per GPU is tokens ÷ the GPU-seconds they held in
    the same stretch of time (None for a model on CPUs)."""
    held = sum(x.gpus * placed_seconds(x, s.start, s.start + s.seconds) for x in spans)
    view: dict[str, Any] = {
        "start": dt.datetime.fromtimestamp(s.start, dt.UTC).isoformat(),
        "requests": s.requests,
        "completion_tokens": s.completion_tokens,
        "tokens_per_s": round(s.tokens_per_s, 3),
        "gpu_seconds": round(held, 3),
        "tokens_per_s_per_gpu": round(s.completion_tokens / held, 3) if held > 0 else None,
    }
    for name, values in (("ttft_ms", s.ttft_ms), ("itl_ms", s.itl_ms), ("e2e_ms", s.e2e_ms)):
        for q, value in zip(("p50", "p95", "p99"), values, strict=True):
            view[f"{name}_{q}"] = _ms(value)
    return view


async def build_latency(
    store: Store, model: str, since: dt.datetime, until: dt.datetime, step: float
) -> dict[str, Any]:
    rows = await asyncio.to_thread(store.timings, model, since, until)
    spans = [
        s for s in await asyncio.to_thread(store.spans_between, since, until) if s.model == model
    ]
    start, end = since.timestamp(), until.timestamp()
    return {
        "model": model,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "step": step,
        "summary": _view(summarise(rows, start, end - start), spans),
        "series": [_view(s, spans) for s in latency_series(rows, start, end, step)],
    }
