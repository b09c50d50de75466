"""The usage ledger on SQLite and the real PostgreSQL: at most once, nothing lost on shutdown,
reports exact across the daily rollups; and the busy-time split behind each request's cost."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from gpufleet.gateway.ledger import Ledger
from gpufleet.policies.busy_meter import BusyMeter
from gpufleet.store import Store, UsageRow
from tests.conftest import eventually

DAY = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)


def row(
    rid: str, at: dt.datetime, *, tenant: str = "acme", model: str = "m", **kw: object
) -> UsageRow:
    values: dict[str, object] = {
        "request_id": rid,
        "at": at,
        "tenant": tenant,
        "key_prefix": f"gpf_{tenant[:8]:>8}",
        "model": model,
        "replica": "m-1",
        "route": "chat/completions",
        "status": 200,
        "prompt_tokens": 10,
        "cached_tokens": 4,
        "completion_tokens": 5,
        "ttft_ms": 12.5,
        "duration_ms": 80.0,
        "gpu_seconds": 0.5,
        "cost_usd": 0.001,
    }
    values.update(kw)
    return UsageRow(**values)  # type: ignore[arg-type]


def test_a_request_is_counted_at_most_once(store: Store) -> None:
    rows = [row(f"r{i}", DAY + dt.timedelta(hours=1, minutes=i)) for i in range(5)]
    assert store.record_usage(rows) == 5
    # A batch retried after a timeout (and one with a duplicate inside) changes nothing.
    assert store.record_usage([*rows[:3], rows[3], rows[3]]) == 0
    assert store.record_usage([row("r9", DAY + dt.timedelta(hours=2)), rows[0]]) == 1
    report = store.usage_report("tenant", since=DAY)
    assert report == [
        {
            "tenant": "acme",
            "requests": 6,
            "errors": 0,
            "prompt_tokens": 60,
            "cached_tokens": 24,
            "completion_tokens": 30,
            "gpu_seconds": 3.0,
            "cost_usd": 0.006,
            "external_requests": 0,
            "external_prompt_tokens": 0,
            "external_completion_tokens": 0,
            "external_cost_usd": 0.0,
            "estimated_requests": 0,
        }
    ]
    assert [r.request_id for r in store.usage_rows(since=DAY)] == [
        *(f"r{i}" for i in range(5)),
        "r9",
    ]


def test_reports_are_exact_from_a_time_inside_a_day(store: Store) -> None:
    """Whole days come from the rollups, the first partial day from the ledger rows."""
    store.record_usage(
        [
            row("early", DAY + dt.timedelta(hours=6), completion_tokens=1000),
            row("late", DAY + dt.timedelta(hours=20)),
            row("next", DAY + dt.timedelta(days=1, hours=3), model="other"),
            row("failed", DAY + dt.timedelta(days=1, hours=4), status=502, tenant="globex"),
            row("later", DAY + dt.timedelta(days=3), tenant="globex"),
        ]
    )
    by_model = store.usage_report("model", since=DAY + dt.timedelta(hours=12))
    assert [(r["model"], r["requests"], r["completion_tokens"]) for r in by_model] == [
        ("m", 3, 15),  # "early" is before the start: not counted
        ("other", 1, 5),
    ]
    by_tenant = {r["tenant"]: r for r in store.usage_report("tenant", since=DAY)}
    assert by_tenant["globex"]["requests"] == 2 and by_tenant["globex"]["errors"] == 1
    assert by_tenant["acme"]["completion_tokens"] == 1010
    only = store.usage_report("key", since=DAY, tenant="globex")
    assert [r["requests"] for r in only] == [2]


async def test_a_graceful_shutdown_loses_no_row(store: Store) -> None:
    ledger = Ledger(store, flush_s=3600)  # never flushes on its own during the test
    ledger.start()
    now = dt.datetime.now(dt.UTC)
    for i in range(1234):
        ledger.record(row(f"s{i}", now))
    await ledger.close()
    assert ledger.pending == 0
    reopened = Store(store.url)
    try:
        totals = reopened.usage_report("tenant", since=now - dt.timedelta(minutes=1))
        assert totals[0]["requests"] == 1234
    finally:
        reopened.close()


async def test_a_failed_write_is_kept_and_retried() -> None:
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0
            self.rows: list[UsageRow] = []

        def record_usage(self, rows: list[UsageRow]) -> int:
            self.calls += 1
            if self.calls == 1:
                raise OSError("database restarting")
            self.rows += rows
            return len(rows)

    flaky = Flaky()
    ledger = Ledger(flaky, flush_s=3600)  # type: ignore[arg-type]
    ledger.record(row("a", DAY))
    await ledger.flush()
    assert ledger.pending == 1 and not flaky.rows
    ledger.record(row("b", DAY))
    await ledger.close()
    assert [r.request_id for r in flaky.rows] == ["a", "b"]  # order kept


def test_busy_time_is_split_by_token_weight() -> None:
    meter = BusyMeter()
    a = meter.start("r1", 1.0, now=0.0)
    b = meter.start("r1", 3.0, now=5.0)
    c = meter.start("r2", 1.0, now=5.0)  # another replica: its own clock
    share_a = meter.stop(a, now=10.0)
    share_b = meter.stop(b, now=14.0)
    assert share_a == pytest.approx(5 + 5 * 1 / 4)  # alone 5 s, then 1/4 of 5 s
    assert share_b == pytest.approx(5 * 3 / 4 + 4)  # 3/4 of 5 s, then alone 4 s
    assert share_a + share_b == pytest.approx(14.0)  # the replica's busy time, all of it
    assert meter.stop(c, now=6.0) == pytest.approx(1.0)
    # Idle time between requests is nobody's.
    d = meter.start("r1", 2.0, now=100.0)
    assert meter.stop(d, now=101.0) == pytest.approx(1.0)


async def test_a_flush_waits_for_the_one_in_progress() -> None:
    """The usage report flushes first; rows the timer's flush is still writing must be in."""
    import asyncio

    class Slow:
        def __init__(self) -> None:
            self.rows: list[UsageRow] = []
            self.writing = threading.Event()

        def record_usage(self, rows: list[UsageRow]) -> int:
            self.writing.set()
            time.sleep(0.2)
            self.rows += rows
            return len(rows)

    slow = Slow()
    ledger = Ledger(slow, flush_s=3600)  # type: ignore[arg-type]
    ledger.record(row("a", DAY))
    timer = asyncio.create_task(ledger.flush())
    await eventually(slow.writing.is_set, '"a" is on its way to the store')
    await ledger.flush()
    assert [r.request_id for r in slow.rows] == ["a"]
    await timer
