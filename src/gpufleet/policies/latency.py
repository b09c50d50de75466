"""Latency and throughput of a model over a window, from the gateway's own measurements.

Every request an engine answered has its ledger row: when it ended, its time to first token (a
stream's), its end-to-end duration and its completion tokens. Here they become percentiles
(P50/P95/P99 of TTFT, inter-token latency and end-to-end) for the window and per step of a
series, and tokens per second — per model and, given the GPUs it held, per GPU. A stream's
inter-token latency is its mean gap after the first token: (duration − TTFT) ÷ (tokens − 1).

Pure: rows and the window come in as plain values. Percentiles are nearest-rank on the sorted
values (exact, as the rows are all there; a Prometheus histogram would give bucket bounds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LatencySummary", "Timing", "latency_series", "percentile", "summarise"]


@dataclass(frozen=True, slots=True)
class Timing:
    """One answered request: when it ended (epoch s), TTFT and duration (ms), tokens."""

    at: float
    ttft_ms: float | None
    duration_ms: float
    completion_tokens: int

    @property
    def itl_ms(self) -> float | None:
        if self.ttft_ms is None or self.completion_tokens < 2:
            return None
        return max(0.0, self.duration_ms - self.ttft_ms) / (self.completion_tokens - 1)


@dataclass(frozen=True, slots=True)
class LatencySummary:
    start: float
    seconds: float
    requests: int
    completion_tokens: int
    ttft_ms: tuple[float | None, float | None, float | None]
    itl_ms: tuple[float | None, float | None, float | None]
    e2e_ms: tuple[float | None, float | None, float | None]

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0–100) of values sorted ascending; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def _p(values: list[float]) -> tuple[float | None, float | None, float | None]:
    values.sort()
    return percentile(values, 50), percentile(values, 95), percentile(values, 99)


def summarise(rows: Sequence[Timing], start: float, seconds: float) -> LatencySummary:
    ttft = [r.ttft_ms for r in rows if r.ttft_ms is not None]
    itl = [v for r in rows if (v := r.itl_ms) is not None]
    e2e = [r.duration_ms for r in rows]
    return LatencySummary(
        start=start,
        seconds=seconds,
        requests=len(rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
        ttft_ms=_p(ttft),
        itl_ms=_p(itl),
        e2e_ms=_p(e2e),
    )


def latency_series(
    rows: Sequence[Timing], since: float, until: float, step: float
) -> list[LatencySummary]:
    """One summary per ``step`` seconds from ``since`` (the last may be shorter), each over
    the requests that ended in it."""
    if step <= 0:
        raise ValueError(f"step must be positive (got {step})")
    if until <= since:
        return []
    count = math.ceil((until - since) / step)
    buckets: list[list[Timing]] = [[] for _ in range(count)]
    for row in rows:
        if since <= row.at < until:
            buckets[min(count - 1, int((row.at - since) // step))].append(row)
    return [
        summarise(bucket, since + i * step, min(step, until - (since + i * step)))
        for i, bucket in enumerate(buckets)
    ]
