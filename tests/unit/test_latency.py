"""Latency and throughput per model from the ledger: percentiles by hand, series buckets, and
the admin route on a real store."""

from __future__ import annotations

import datetime as dt

import pytest

from gpufleet.policies.latency import Timing, latency_series, percentile, summarise
from gpufleet.store import Store, UsageRow


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50 and percentile(values, 95) == 95
    assert percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None


def test_summary_inter_token_latency_and_tokens_per_second() -> None:
    rows = [
        # A stream: first token at 100 ms, 11 tokens in 1,100 ms: 10 gaps of 100 ms.
        Timing(at=10.0, ttft_ms=100.0, duration_ms=1100.0, completion_tokens=11),
        # A stream of 3 tokens in 500 ms after a 300 ms first token: gaps of 100 ms.
        Timing(at=20.0, ttft_ms=300.0, duration_ms=500.0, completion_tokens=3),
        # Not a stream: no TTFT, no inter-token latency; one token: no gap either.
        Timing(at=30.0, ttft_ms=None, duration_ms=900.0, completion_tokens=6),
    ]
    s = summarise(rows, start=0.0, seconds=60.0)
    assert s.requests == 3 and s.completion_tokens == 20
    assert s.tokens_per_s == pytest.approx(20 / 60)
    assert s.ttft_ms == (100.0, 300.0, 300.0)
    assert s.itl_ms == (100.0, 100.0, 100.0)
    assert s.e2e_ms == (900.0, 1100.0, 1100.0)


def test_series_buckets_by_end_time_and_the_last_may_be_short() -> None:
    rows = [Timing(at=t, ttft_ms=None, duration_ms=10.0, completion_tokens=1) for t in (1, 2, 11)]
    series = latency_series(rows, since=0.0, until=25.0, step=10.0)
    assert [(s.start, s.seconds, s.requests) for s in series] == [
        (0.0, 10.0, 2),
        (10.0, 10.0, 1),
        (20.0, 5.0, 0),
    ]
    assert series[2].e2e_ms == (None, None, None) and series[2].tokens_per_s == 0.0
    with pytest.raises(ValueError, match="step"):
        latency_series(rows, 0.0, 1.0, 0.0)


def test_the_store_reads_answered_requests_of_one_model(store: Store) -> None:
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    def row(i: int, model: str, status: int) -> UsageRow:
        return UsageRow(
            request_id=f"t-{i}",
            at=at + dt.timedelta(seconds=i),
            tenant="t",
            key_prefix="k",
            model=model,
            replica="r",
            route="chat",
            status=status,
            prompt_tokens=1,
            cached_tokens=0,
            completion_tokens=4,
            ttft_ms=50.0 if i % 2 else None,
            duration_ms=200.0,
            gpu_seconds=0.0,
            cost_usd=0.0,
        )

    store.record_usage([row(1, "a", 200), row(2, "a", 200), row(3, "a", 502), row(4, "b", 200)])
    timings = store.timings("a", at, at + dt.timedelta(minutes=1))
    assert sorted((t.ttft_ms is None, t.completion_tokens) for t in timings) == [
        (False, 4),
        (True, 4),
    ]
    assert timings[0].at == pytest.approx((at + dt.timedelta(seconds=1)).timestamp())
