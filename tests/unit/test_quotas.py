"""In-process quotas: exact under asyncio concurrency, rolling windows on a fake clock, budgets."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, date, datetime, timedelta

import pytest

from gpufleet.gateway import quotas, quotas_redis
from gpufleet.gateway.quotas import (
    Demand,
    Limits,
    LocalQuotas,
    QuotaExceeded,
    Ticket,
    budget_period,
    make_quotas,
    window_retry_after,
)
from gpufleet.gateway.quotas_redis import RedisQuotas

FREE = Demand(tokens=0, cost_usd=0.0)


class Clock:
    """Wall time that moves only when a test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


async def outcomes(
    q: LocalQuotas, n: int, scopes: list[tuple[str, Limits]], demand: Demand
) -> tuple[list[Ticket], list[QuotaExceeded]]:
    async def one(i: int) -> Ticket | QuotaExceeded:
        try:
            return await q.admit(f"req-{i}", scopes, demand)
        except QuotaExceeded as exc:
            return exc

    results = await asyncio.gather(*(one(i) for i in range(n)))
    return (
        [r for r in results if isinstance(r, Ticket)],
        [r for r in results if isinstance(r, QuotaExceeded)],
    )


def test_public_surface() -> None:
    assert sorted(quotas.__all__) == [
        "Demand",
        "LimitName",
        "Limits",
        "LocalQuotas",
        "Period",
        "QuotaExceeded",
        "QuotaStoreUnavailable",
        "Quotas",
        "Ticket",
        "budget_period",
        "make_quotas",
        "window_retry_after",
    ]
    assert all(hasattr(quotas, name) for name in quotas.__all__)
    assert quotas_redis.__all__ == ["RedisQuotas"]


async def test_make_quotas_picks_the_backend() -> None:
    assert isinstance(make_quotas(None), LocalQuotas)
    shared = make_quotas("redis://127.0.0.1:6379/0")
    assert isinstance(shared, RedisQuotas)
    await shared.close()


def test_limits_and_demands_are_checked() -> None:
    assert Limits().empty()
    assert not Limits(budget_usd=0.0).empty()
    with pytest.raises(ValueError, match="rpm"):
        Limits(rpm=-1)
    with pytest.raises(ValueError, match="budget_usd"):
        Limits(budget_usd=math.inf)
    with pytest.raises(ValueError, match="budget_period"):
        Limits(budget_usd=1.0, budget_period="year")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="demand"):
        Demand(tokens=-1, cost_usd=0.0)


async def test_rpm_is_exact_under_concurrency() -> None:
    q = LocalQuotas()
    admitted, refused = await outcomes(q, 200, [("tenant:acme", Limits(rpm=50))], FREE)
    assert len(admitted) == 50
    assert len(refused) == 150
    assert {e.limit for e in refused} == {"rpm"}
    assert (await q.snapshot("tenant:acme", Limits(rpm=50)))["rpm"] == 50


async def test_budget_is_never_overshot_by_concurrent_admissions() -> None:
    q = LocalQuotas()
    limits = Limits(budget_usd=10.0)
    admitted, refused = await outcomes(q, 100, [("tenant:acme", limits)], Demand(10, 0.3))
    assert len(admitted) * 0.3 <= 10
    assert len(admitted) == math.floor(10 / 0.3) == 33
    assert {e.limit for e in refused} == {"budget"}
    use = await q.snapshot("tenant:acme", limits)
    assert use["reserved_usd"] == pytest.approx(9.9)
    assert use["spent_usd"] == 0
    # Settling below the estimate frees the difference: 33 x 0.1 spent leaves 6.7, room for 22.
    for ticket in admitted:
        await q.settle(ticket, tokens=10, cost_usd=0.1)
    use = await q.snapshot("tenant:acme", limits)
    assert use["spent_usd"] == pytest.approx(3.3)
    assert use["reserved_usd"] == 0
    more, _ = await outcomes(q, 40, [("tenant:acme", limits)], Demand(10, 0.3))
    assert len(more) == 22


async def test_exact_decimal_budgets_fit() -> None:
    """In floats 0.1 + 0.2 > 0.3; in nano-dollars three requests of 0.1 fit a budget of 0.3."""
    q = LocalQuotas()
    scopes = [("tenant:acme", Limits(budget_usd=0.3))]
    for i in range(3):
        await q.admit(f"r{i}", scopes, Demand(1, 0.1))
    with pytest.raises(QuotaExceeded):
        await q.admit("r3", scopes, Demand(1, 0.1))


async def test_tokens_are_reserved_then_corrected_at_settle() -> None:
    q = LocalQuotas(clock=Clock(1_000.0))
    scopes = [("key:k1", Limits(tpm=1_000))]
    first = await q.admit("a", scopes, Demand(tokens=600, cost_usd=0.0))
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("b", scopes, Demand(tokens=600, cost_usd=0.0))
    assert refused.value.limit == "tpm"
    assert str(refused.value) == (
        "key 'k1' is over its limit of 1000 tokens per minute "
        "(600 used, this request reserves 600); retry in 60 s"
    )
    await q.settle(first, tokens=100, cost_usd=0.0)  # a smaller actual frees 500 tokens
    assert (await q.snapshot("key:k1", Limits(tpm=1_000)))["tpm"] == 100
    await q.admit("b", scopes, Demand(tokens=600, cost_usd=0.0))
    with pytest.raises(QuotaExceeded):
        await q.admit("c", scopes, Demand(tokens=301, cost_usd=0.0))
    await q.admit("c", scopes, Demand(tokens=300, cost_usd=0.0))


async def test_a_request_larger_than_the_token_limit_is_told_so() -> None:
    q = LocalQuotas()
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("a", [("key:k1", Limits(tpm=1_000))], Demand(tokens=4_096, cost_usd=0.0))
    assert str(refused.value) == (
        "key 'k1' allows 1000 tokens per minute and this request reserves 4096 "
        "(prompt plus max_tokens); lower max_tokens or shorten the prompt"
    )


async def test_settle_releases_the_concurrency_slot() -> None:
    q = LocalQuotas()
    scopes = [("tenant:acme", Limits(concurrency=2))]
    a = await q.admit("a", scopes, FREE)
    await q.admit("b", scopes, FREE)
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("c", scopes, FREE)
    assert refused.value.limit == "concurrency"
    assert refused.value.retry_after_s == 1.0
    assert refused.value.retry_after == 1.0  # the TemporaryError contract
    assert str(refused.value) == (
        "tenant 'acme' already has 2 requests in flight, its limit of 2; retry in 1 s"
    )
    await q.settle(a, tokens=0, cost_usd=0.0)
    await q.admit("c", scopes, FREE)
    assert (await q.snapshot("tenant:acme", Limits(concurrency=2)))["concurrency"] == 2


async def test_settle_is_idempotent() -> None:
    q = LocalQuotas()
    limits = Limits(tpm=1_000, concurrency=1, budget_usd=5.0)
    scopes = [("tenant:acme", limits)]
    ticket = await q.admit("a", scopes, Demand(tokens=500, cost_usd=1.0))
    await q.settle(ticket, tokens=200, cost_usd=0.5)
    once = await q.snapshot("tenant:acme", limits)
    assert once == {
        "rpm": 0,
        "tpm": 200,
        "concurrency": 0,
        "spent_usd": 0.5,
        "reserved_usd": 0.0,
    }
    await q.settle(ticket, tokens=200, cost_usd=0.5)
    assert await q.snapshot("tenant:acme", limits) == once
    # The second settle did not free a second slot.
    await q.admit("b", scopes, Demand(tokens=1, cost_usd=0.0))
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("c", scopes, Demand(tokens=1, cost_usd=0.0))
    assert refused.value.limit == "concurrency"


async def test_a_failure_in_one_scope_consumes_no_other() -> None:
    q = LocalQuotas()
    tenant = ("tenant:acme", Limits(rpm=10, tpm=10_000, concurrency=10, budget_usd=10.0))
    k1 = ("key:k1", Limits(rpm=1))
    demand = Demand(tokens=100, cost_usd=1.0)
    await q.admit("a", [tenant, k1], demand)
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("b", [tenant, k1], demand)
    assert refused.value.scope == "key:k1"
    assert str(refused.value).startswith("key 'k1' is over its limit of 1 requests per minute")
    use = await q.snapshot(*tenant)
    assert use == {"rpm": 1, "tpm": 100, "concurrency": 1, "spent_usd": 0.0, "reserved_usd": 1.0}
    await q.admit("c", [tenant, ("key:k2", Limits(rpm=1))], demand)
    assert (await q.snapshot(*tenant))["rpm"] == 2


async def test_scopes_without_limits_cost_nothing() -> None:
    q = LocalQuotas()
    ticket = await q.admit("a", [("tenant:acme", Limits()), ("key:k1", Limits())], FREE)
    assert ticket.scopes == ()
    await q.settle(ticket, tokens=10, cost_usd=1.0)
    assert q._counters._scopes == {}


async def test_rpm_retry_after_waits_for_enough_of_the_window() -> None:
    clock = Clock(1_000.2)
    q = LocalQuotas(clock=clock)
    scopes = [("tenant:acme", Limits(rpm=2))]
    await q.admit("a", scopes, FREE)
    clock.now = 1_010.7
    await q.admit("b", scopes, FREE)
    clock.now = 1_030.5
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("c", scopes, FREE)
    assert refused.value.retry_after_s == pytest.approx(29.5)  # the 1000 s bucket leaves at 1060
    assert str(refused.value) == (
        "tenant 'acme' is over its limit of 2 requests per minute; retry in 30 s"
    )


async def test_window_rolls_over_exactly_at_the_second() -> None:
    clock = Clock(1_000.5)
    q = LocalQuotas(clock=clock)
    scopes = [("tenant:acme", Limits(rpm=2, tpm=100))]
    await q.admit("a", scopes, Demand(tokens=60, cost_usd=0.0))
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("b", scopes, Demand(tokens=60, cost_usd=0.0))
    assert refused.value.limit == "tpm"
    await q.admit("b", scopes, Demand(tokens=40, cost_usd=0.0))
    clock.now = 1_059.99
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("c", scopes, Demand(tokens=1, cost_usd=0.0))
    assert refused.value.limit == "rpm"
    assert refused.value.retry_after_s == pytest.approx(0.01)
    clock.now = 1_060.0
    await q.admit("c", scopes, Demand(tokens=100, cost_usd=0.0))
    assert (await q.snapshot(*scopes[0]))["rpm"] == 1


async def test_settle_after_the_bucket_left_the_window_corrects_nothing() -> None:
    clock = Clock(1_000.0)
    q = LocalQuotas(clock=clock)
    scopes = [("tenant:acme", Limits(tpm=100))]
    old = await q.admit("a", scopes, Demand(tokens=100, cost_usd=0.0))
    clock.now = 1_070.0
    await q.admit("b", scopes, Demand(tokens=100, cost_usd=0.0))
    await q.settle(old, tokens=0, cost_usd=0.0)
    assert (await q.snapshot(*scopes[0]))["tpm"] == 100


@pytest.mark.parametrize(
    ("period", "retry_s"),
    [
        ("day", 12 * 3_600),
        ("week", 36 * 3_600),  # Saturday noon to Monday
        ("month", 19.5 * 86_400),  # 10 Feb 2024 (a leap year) noon to 1 March
    ],
)
async def test_budget_retry_after_is_the_end_of_the_period(period: str, retry_s: float) -> None:
    q = LocalQuotas(clock=Clock(at("2024-02-10T12:00:00")))
    limits = Limits(budget_usd=1.0, budget_period=period)  # type: ignore[arg-type]
    await q.admit("a", [("tenant:acme", limits)], Demand(tokens=1, cost_usd=1.0))
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("b", [("tenant:acme", limits)], Demand(tokens=1, cost_usd=0.01))
    assert refused.value.limit == "budget"
    assert refused.value.retry_after_s == pytest.approx(retry_s)
    assert str(refused.value).startswith(f"tenant 'acme' has used its budget of $1.00 per {period}")


async def test_budget_messages() -> None:
    q = LocalQuotas(clock=Clock(at("2024-02-10T12:00:00")))
    scopes = [("tenant:acme", Limits(budget_usd=1.0))]
    await q.admit("a", scopes, Demand(tokens=1, cost_usd=0.75))
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("b", scopes, Demand(tokens=1, cost_usd=0.5))
    assert str(refused.value) == (
        "tenant 'acme' has $0.25 left of its budget of $1.00 per month (counting requests in "
        "flight) and this request may cost up to $0.5000; retry in 20 days"
    )
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("c", scopes, Demand(tokens=1, cost_usd=2.0))
    assert str(refused.value) == (
        "this request may cost up to $2.0000, more than the whole budget of tenant 'acme' "
        "($1.00 per month); lower max_tokens"
    )


async def test_a_new_period_starts_with_a_fresh_budget() -> None:
    clock = Clock(at("2024-01-31T23:59:59"))
    q = LocalQuotas(clock=clock)
    scopes = [("tenant:acme", Limits(budget_usd=1.0))]
    late = await q.admit("a", scopes, Demand(tokens=1, cost_usd=1.0))
    clock.now = at("2024-02-01T00:00:00")
    await q.admit("b", scopes, Demand(tokens=1, cost_usd=1.0))
    await q.settle(late, tokens=1, cost_usd=0.25)  # corrects January, not February
    assert (await q.snapshot(*scopes[0]))["reserved_usd"] == 1.0
    clock.now = at("2024-01-31T12:00:00")
    assert (await q.snapshot(*scopes[0]))["spent_usd"] == 0.25


async def test_an_unsettled_concurrency_slot_expires_with_its_lease() -> None:
    clock = Clock(1_000.0)
    q = LocalQuotas(clock=clock, lease_s=10.0)
    scopes = [("tenant:acme", Limits(concurrency=1))]
    await q.admit("lost", scopes, FREE)
    clock.now = 1_009.9
    with pytest.raises(QuotaExceeded):
        await q.admit("b", scopes, FREE)
    clock.now = 1_010.0
    await q.admit("b", scopes, FREE)


def test_budget_periods_follow_the_utc_calendar() -> None:
    day = date(1999, 12, 1)
    while day < date(2031, 3, 1):
        second = int(datetime(day.year, day.month, day.day, 13, tzinfo=UTC).timestamp())
        key, start, end = budget_period(second, "day")
        assert (start, end) == (second - 13 * 3_600, second + 11 * 3_600)
        key, start, end = budget_period(second, "week")
        monday = datetime.fromtimestamp(start, UTC)
        assert monday.isoweekday() == 1
        assert monday.date() <= day < monday.date() + timedelta(days=7)
        assert end - start == 7 * 86_400
        key, start, end = budget_period(second, "month")
        assert datetime.fromtimestamp(start, UTC).date() == day.replace(day=1)
        following = datetime.fromtimestamp(end, UTC).date()
        assert following.day == 1
        assert following == (day.replace(day=28) + timedelta(days=4)).replace(day=1)
        assert budget_period(end - 1, "month")[0] == key != budget_period(end, "month")[0]
        day += timedelta(days=3)


def test_window_retry_after() -> None:
    buckets = [(1_010, 5), (1_000, 3), (1_020, 2)]
    assert window_retry_after(buckets, 10, 1, 10, 1_030.0) == 30.0  # the oldest 3 suffice
    assert window_retry_after(buckets, 10, 4, 10, 1_030.0) == 40.0  # needs the 1010 bucket too
    assert window_retry_after(buckets, 10, 11, 10, 1_030.0) == 60.0  # never fits
