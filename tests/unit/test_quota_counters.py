"""The quota arithmetic as a pure core: plain functions, ``now`` passed in, no event loop."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime

import pytest

from gpufleet.policies import quota_counters, quota_rules
from gpufleet.policies.quota_counters import QuotaCounters
from gpufleet.policies.quota_rules import Demand, Limits, QuotaExceeded, Ticket

FREE = Demand(tokens=0, cost_usd=0.0)
ACME = "tenant:acme"


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def refusal(
    q: QuotaCounters, scopes: list[tuple[str, Limits]], demand: Demand, now: float
) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as refused:
        q.admit("refused", scopes, demand, now)
    return refused.value


def test_runs_without_an_event_loop() -> None:
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()
    q = QuotaCounters()
    q.admit("a", [(ACME, Limits(rpm=1))], FREE, 1_000.0)
    assert refusal(q, [(ACME, Limits(rpm=1))], FREE, 1_000.5).limit == "rpm"


def test_exports() -> None:
    assert quota_counters.__all__ == ["QuotaCounters"]
    assert sorted(quota_rules.__all__) == [
        "DEFAULT_LEASE_S",
        "Demand",
        "LimitName",
        "Limits",
        "NANO",
        "Period",
        "QuotaExceeded",
        "SETTLE_WINDOW_S",
        "SHARED_LEASE_S",
        "Ticket",
        "WINDOW_S",
        "budget_period",
        "counted_scopes",
        "limits_of",
        "needs_settle_marker",
        "quota_exceeded",
        "to_nano",
        "window_retry_after",
    ]
    assert all(hasattr(quota_rules, name) for name in quota_rules.__all__)


def test_the_window_rolls_over_exactly_at_the_second() -> None:
    q = QuotaCounters()
    scopes = [(ACME, Limits(rpm=2))]
    q.admit("a", scopes, FREE, 1_000.9)  # counts in the bucket of second 1000
    q.admit("b", scopes, FREE, 1_030.0)
    exceeded = refusal(q, scopes, FREE, 1_059.5)
    assert exceeded.retry_after_s == pytest.approx(0.5)  # bucket 1000 leaves at 1060
    assert str(exceeded) == "tenant 'acme' is over its limit of 2 requests per minute; retry in 1 s"
    q.admit("c", scopes, FREE, 1_060.0)
    assert q.snapshot(ACME, scopes[0][1], 1_060.0)["rpm"] == 2
    assert q.snapshot(ACME, scopes[0][1], 1_090.0)["rpm"] == 1


def test_ten_minutes_of_requests_per_minute_in_virtual_time() -> None:
    q = QuotaCounters()
    scopes = [(ACME, Limits(rpm=60))]
    admitted: list[float] = []
    for i in range(1_200):  # one request every half second for ten minutes
        now = i / 2
        try:
            q.admit(f"r{i}", scopes, FREE, now)
        except QuotaExceeded as exc:
            assert exc.retry_after_s > 0
            continue
        admitted.append(now)
    assert len(admitted) == 600
    for start in range(0, 540):  # no 60 s window holds more than its 60
        assert sum(start <= t < start + 60 for t in admitted) <= 60


def test_settle_replaces_the_token_reservation() -> None:
    q = QuotaCounters()
    scopes = [("key:k1", Limits(tpm=1_000))]
    first = q.admit("a", scopes, Demand(tokens=600, cost_usd=0.0), 1_000.0)
    exceeded = refusal(q, scopes, Demand(tokens=600, cost_usd=0.0), 1_000.0)
    assert (exceeded.limit, exceeded.retry_after_s) == ("tpm", 60.0)
    q.settle(first, tokens=100, cost_usd=0.0)
    assert q.snapshot("key:k1", scopes[0][1], 1_001.0)["tpm"] == 100
    q.admit("b", scopes, Demand(tokens=900, cost_usd=0.0), 1_001.0)
    assert refusal(q, scopes, Demand(tokens=1, cost_usd=0.0), 1_001.0).limit == "tpm"


def test_settle_after_the_bucket_left_the_window_corrects_nothing() -> None:
    q = QuotaCounters()
    scopes = [(ACME, Limits(tpm=100))]
    old = q.admit("a", scopes, Demand(tokens=100, cost_usd=0.0), 1_000.0)
    q.admit("b", scopes, Demand(tokens=100, cost_usd=0.0), 1_070.0)
    q.settle(old, tokens=0, cost_usd=0.0)
    assert q.snapshot(*scopes[0], 1_070.0)["tpm"] == 100


def test_concurrency_is_held_until_settle_or_lease_expiry() -> None:
    q = QuotaCounters(lease_s=10.0)
    scopes = [(ACME, Limits(concurrency=1))]
    settled = q.admit("a", scopes, FREE, 1_000.0)
    exceeded = refusal(q, scopes, FREE, 1_000.0)
    assert (exceeded.limit, exceeded.retry_after_s) == ("concurrency", 1.0)
    q.settle(settled, tokens=0, cost_usd=0.0)
    q.admit("lost", scopes, FREE, 1_001.0)  # never settled: its gateway died
    refusal(q, scopes, FREE, 1_010.9)
    q.admit("b", scopes, FREE, 1_011.0)
    assert q.snapshot(*scopes[0], 1_011.0)["concurrency"] == 1


def test_budget_admits_exactly_what_fits_and_settle_frees_the_difference() -> None:
    q = QuotaCounters()
    limits = Limits(budget_usd=10.0)
    now = at("2024-02-10T12:00:00")
    tickets: list[Ticket] = []
    for i in range(100):
        try:
            tickets.append(q.admit(f"r{i}", [(ACME, limits)], Demand(10, 0.3), now))
        except QuotaExceeded as exc:
            assert exc.limit == "budget"
    assert len(tickets) == math.floor(10 / 0.3) == 33
    assert q.snapshot(ACME, limits, now)["reserved_usd"] == pytest.approx(9.9)
    for ticket in tickets:
        q.settle(ticket, tokens=10, cost_usd=0.1)
    use = q.snapshot(ACME, limits, now)
    assert use["spent_usd"] == pytest.approx(3.3)
    assert use["reserved_usd"] == 0.0
    more = 0
    for i in range(40):
        try:
            q.admit(f"more{i}", [(ACME, limits)], Demand(10, 0.3), now)
            more += 1
        except QuotaExceeded:
            pass
    assert more == 22  # 6.7 left


def test_a_spent_budget_waits_for_the_next_period() -> None:
    q = QuotaCounters()
    limits = Limits(budget_usd=1.0, budget_period="day")
    q.admit("a", [(ACME, limits)], Demand(1, 1.0), at("2024-02-10T12:00:00"))
    exceeded = refusal(q, [(ACME, limits)], Demand(1, 0.01), at("2024-02-10T18:00:00"))
    assert (exceeded.limit, exceeded.retry_after_s) == ("budget", 6 * 3_600)
    q.admit("b", [(ACME, limits)], Demand(1, 1.0), at("2024-02-11T00:00:00"))


def test_a_refusal_in_one_scope_consumes_no_other() -> None:
    q = QuotaCounters()
    tenant = (ACME, Limits(rpm=10, tpm=10_000, concurrency=10, budget_usd=10.0))
    key = ("key:k1", Limits(rpm=1))
    demand = Demand(tokens=100, cost_usd=1.0)
    q.admit("a", [tenant, key], demand, 1_000.0)
    assert refusal(q, [tenant, key], demand, 1_000.0).scope == "key:k1"
    assert q.snapshot(*tenant, 1_000.0) == {
        "rpm": 1,
        "tpm": 100,
        "concurrency": 1,
        "spent_usd": 0.0,
        "reserved_usd": 1.0,
    }


def test_settle_is_idempotent() -> None:
    q = QuotaCounters()
    limits = Limits(tpm=1_000, concurrency=1, budget_usd=5.0)
    ticket = q.admit("a", [(ACME, limits)], Demand(tokens=500, cost_usd=1.0), 1_000.0)
    q.settle(ticket, tokens=200, cost_usd=0.5)
    once = q.snapshot(ACME, limits, 1_000.0)
    q.settle(ticket, tokens=200, cost_usd=0.5)
    assert q.snapshot(ACME, limits, 1_000.0) == once
    assert once["concurrency"] == 0
    q.admit("b", [(ACME, limits)], Demand(tokens=1, cost_usd=0.0), 1_000.0)
    assert refusal(q, [(ACME, limits)], FREE, 1_000.0).limit == "concurrency"


def test_scopes_without_limits_are_not_counted() -> None:
    q = QuotaCounters()
    ticket = q.admit("a", [(ACME, Limits()), ("key:k1", Limits())], FREE, 1_000.0)
    assert ticket.scopes == ()
    q.settle(ticket, tokens=10, cost_usd=1.0)
    assert q._scopes == {}
