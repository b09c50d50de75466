"""Quotas shared through the real Redis on 127.0.0.1:6379: exact across tasks and processes."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from gpufleet.gateway import quotas, quotas_redis
from gpufleet.gateway.quotas import (
    Demand,
    Limits,
    Period,
    QuotaExceeded,
    QuotaStoreUnavailable,
    Ticket,
    budget_period,
)
from gpufleet.gateway.quotas_redis import _LUA_PERIOD, RedisQuotas
from tests.integration.conftest import REDIS

FREE = Demand(tokens=0, cost_usd=0.0)

# One gateway process: connect, say ready, wait for "go", fire 100 admissions at once. It loads
# the modules by path, registered under their names: importing the gateway package (the whole
# app) would triple the test's time.
CHILD = """
import asyncio, importlib.util, sys

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

quotas = load("gpufleet.gateway.quotas", sys.argv[2])
backend = load("gpufleet.gateway.quotas_redis", sys.argv[3])
Demand, Limits, QuotaExceeded, RedisQuotas = (
    quotas.Demand, quotas.Limits, quotas.QuotaExceeded, backend.RedisQuotas
)

async def main(namespace: str) -> None:
    q = RedisQuotas("redis://127.0.0.1:6379/0", namespace=namespace, timeout_s=5.0)
    scopes = [("tenant:shared", Limits(rpm=100))]
    await q.snapshot(*scopes[0])
    print("ready", flush=True)
    sys.stdin.readline()

    async def one(i: int) -> int:
        try:
            await q.admit(f"r{i}", scopes, Demand(tokens=1, cost_usd=0.0))
        except QuotaExceeded:
            return 0
        return 1

    print(sum(await asyncio.gather(*(one(i) for i in range(100)))), flush=True)
    await q.close()

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture
async def q(namespace: str) -> AsyncIterator[RedisQuotas]:
    quotas = RedisQuotas(REDIS, namespace=namespace, timeout_s=5.0)  # a loaded CI box is slow
    yield quotas
    await quotas.close()


async def outcomes(
    q: RedisQuotas, n: int, scopes: list[tuple[str, Limits]], demand: Demand
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


async def test_rpm_is_exact_under_concurrency(q: RedisQuotas) -> None:
    admitted, refused = await outcomes(q, 200, [("tenant:acme", Limits(rpm=50))], FREE)
    assert len(admitted) == 50
    assert {e.limit for e in refused} == {"rpm"}
    assert (await q.snapshot("tenant:acme", Limits(rpm=50)))["rpm"] == 50
    retry = refused[0].retry_after_s
    assert 58 < retry <= 60  # the admissions' bucket leaves the window a minute after it
    assert str(refused[0]).startswith("tenant 'acme' is over its limit of 50 requests per minute")


async def test_budget_is_never_overshot_by_concurrent_admissions(q: RedisQuotas) -> None:
    limits = Limits(budget_usd=10.0)
    admitted, refused = await outcomes(q, 100, [("tenant:acme", limits)], Demand(10, 0.3))
    assert len(admitted) * 0.3 <= 10
    assert len(admitted) == math.floor(10 / 0.3) == 33
    assert {e.limit for e in refused} == {"budget"}
    assert (await q.snapshot("tenant:acme", limits))["reserved_usd"] == pytest.approx(9.9)
    await asyncio.gather(*(q.settle(t, tokens=10, cost_usd=0.1) for t in admitted))
    use = await q.snapshot("tenant:acme", limits)
    assert (use["spent_usd"], use["reserved_usd"]) == (pytest.approx(3.3), 0)
    more, _ = await outcomes(q, 40, [("tenant:acme", limits)], Demand(10, 0.3))
    assert len(more) == 22


async def test_budget_retry_after_is_the_end_of_the_month(q: RedisQuotas) -> None:
    scopes = [("tenant:acme", Limits(budget_usd=1.0))]
    await q.admit("a", scopes, Demand(tokens=1, cost_usd=1.0))
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("b", scopes, Demand(tokens=1, cost_usd=0.01))
    server, _ = await q._redis.time()
    end = budget_period(server, "month")[2]
    assert refused.value.limit == "budget"
    assert end - server - 2 < refused.value.retry_after_s <= end - server


async def test_tokens_are_reserved_then_corrected_at_settle(q: RedisQuotas) -> None:
    scopes = [("key:k1", Limits(tpm=1_000))]
    first = await q.admit("a", scopes, Demand(tokens=600, cost_usd=0.0))
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("b", scopes, Demand(tokens=600, cost_usd=0.0))
    assert refused.value.limit == "tpm"
    await q.settle(first, tokens=100, cost_usd=0.0)
    assert (await q.snapshot(*scopes[0]))["tpm"] == 100
    await q.admit("b", scopes, Demand(tokens=600, cost_usd=0.0))
    with pytest.raises(QuotaExceeded):
        await q.admit("c", scopes, Demand(tokens=301, cost_usd=0.0))
    await q.admit("c", scopes, Demand(tokens=300, cost_usd=0.0))


async def test_settle_releases_concurrency_and_is_idempotent(q: RedisQuotas) -> None:
    limits = Limits(tpm=1_000, concurrency=1, budget_usd=5.0)
    scopes = [("tenant:acme", limits)]
    ticket = await q.admit("a", scopes, Demand(tokens=500, cost_usd=1.0))
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("b", scopes, Demand(tokens=1, cost_usd=0.0))
    assert (refused.value.limit, refused.value.retry_after_s) == ("concurrency", 1.0)
    await q.settle(ticket, tokens=200, cost_usd=0.5)
    once = await q.snapshot("tenant:acme", limits)
    assert once == {"rpm": 0, "tpm": 200, "concurrency": 0, "spent_usd": 0.5, "reserved_usd": 0}
    await q.settle(ticket, tokens=200, cost_usd=0.5)
    assert await q.snapshot("tenant:acme", limits) == once
    await q.admit("b", scopes, Demand(tokens=1, cost_usd=0.0))
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("c", scopes, Demand(tokens=1, cost_usd=0.0))
    assert refused.value.limit == "concurrency"


async def test_a_failure_in_one_scope_consumes_no_other(q: RedisQuotas) -> None:
    tenant = ("tenant:acme", Limits(rpm=10, tpm=10_000, concurrency=10, budget_usd=10.0))
    demand = Demand(tokens=100, cost_usd=1.0)
    await q.admit("a", [tenant, ("key:k1", Limits(rpm=1))], demand)
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("b", [tenant, ("key:k1", Limits(rpm=1))], demand)
    assert refused.value.scope == "key:k1"
    use = await q.snapshot(*tenant)
    assert use == {"rpm": 1, "tpm": 100, "concurrency": 1, "spent_usd": 0.0, "reserved_usd": 1.0}
    await q.admit("c", [tenant, ("key:k2", Limits(rpm=1))], demand)
    assert (await q.snapshot(*tenant))["rpm"] == 2


async def test_the_window_is_the_last_60_seconds_of_server_time(q: RedisQuotas) -> None:
    requests = q._keys("tenant:acme")[0]
    second, _ = await q._redis.time()
    # A bucket 60 s old has left the window; one 58 s old is in it even if a second ticks.
    await q._redis.hset(requests, mapping={second - 60: 5, second - 58: 3})
    limits = Limits(rpm=4)
    assert (await q.snapshot("tenant:acme", limits))["rpm"] == 3
    await q.admit("a", [("tenant:acme", limits)], FREE)
    with pytest.raises(QuotaExceeded) as refused:
        await q.admit("b", [("tenant:acme", limits)], FREE)
    assert 0 < refused.value.retry_after_s <= 2
    assert str(second - 60).encode() not in await q._redis.hkeys(requests)  # pruned


async def test_an_unsettled_concurrency_slot_expires_with_its_lease(namespace: str) -> None:
    q = RedisQuotas(REDIS, namespace=namespace, lease_s=0.3, timeout_s=5.0)
    try:
        scopes = [("tenant:acme", Limits(concurrency=1))]
        await q.admit("lost", scopes, FREE)  # its gateway "dies": never settled
        with pytest.raises(QuotaExceeded):
            await q.admit("b", scopes, FREE)
        await asyncio.sleep(0.35)
        await q.admit("b", scopes, FREE)
    finally:
        await q.close()


async def test_keys_expire_so_idle_scopes_vanish(q: RedisQuotas, namespace: str) -> None:
    limits = Limits(rpm=5, tpm=100, concurrency=2, budget_usd=1.0, budget_period="day")
    await q.admit("a", [("tenant:acme", limits)], Demand(tokens=10, cost_usd=0.1))
    client = aioredis.Redis.from_url(REDIS)
    try:
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*")]
        assert len(keys) == 5  # four per scope and the open ticket's marker
        ttls = [await client.ttl(k) for k in keys]
        assert all(0 < ttl <= 2 * 86_400 + 1 for ttl in ttls), ttls
        # The first admission of a period drops older periods' spend, but keeps the previous
        # period's, which late settles may still correct.
        budget = q._keys("tenant:acme")[3]
        second, _ = await client.time()
        current, start, _ = budget_period(second, "day")
        previous = budget_period(start - 1, "day")[0]
        await client.delete(budget)
        await client.hset(budget, mapping={"d1:s": 7, f"{previous}:s": 3})
        await q.admit("b", [("tenant:acme", limits)], Demand(tokens=10, cost_usd=0.1))
        fields = sorted(f.decode() for f in await client.hkeys(budget))
        assert fields == sorted([f"{previous}:s", f"{current}:s", f"{current}:r"])
    finally:
        await client.aclose()


async def test_scopes_without_limits_do_not_touch_redis() -> None:
    q = RedisQuotas("redis://127.0.0.1:1/0")
    try:
        ticket = await q.admit("a", [("tenant:acme", Limits()), ("key:k1", Limits())], FREE)
        await q.settle(ticket, tokens=1, cost_usd=0.0)
    finally:
        await q.close()


async def test_unreachable_redis_fails_closed() -> None:
    q = RedisQuotas("redis://:secret@127.0.0.1:1/0")
    scopes = [("tenant:acme", Limits(rpm=10))]
    try:
        with pytest.raises(QuotaStoreUnavailable) as down:
            await q.admit("a", scopes, FREE)
        assert str(down.value).startswith(
            "the quota store redis://***@127.0.0.1:1/0 is unavailable (ConnectionError: "
        )
        assert "secret" not in str(down.value)
        with pytest.raises(QuotaStoreUnavailable):
            await q.snapshot(*scopes[0])
        ticket = Ticket("a", "a#1", (("tenant:acme", Limits(concurrency=1)),), 0, 0, 0)
        # A settlement is not refused but kept, to land when Redis is back (test_redis_faults).
        await q.settle(ticket, tokens=0, cost_usd=0.0)
        assert len(q.pending) == 1
    finally:
        await q.close()


async def test_lua_periods_match_python() -> None:
    seconds: list[int] = []
    day = date(1999, 12, 1)
    while day < date(2041, 3, 1):  # every month's first days, and days spread in between
        midnight = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
        seconds += [midnight - 1, midnight, midnight + 49_999]
        day += timedelta(days=6) if day.day > 2 else timedelta(days=1)
    script = (
        _LUA_PERIOD
        + """
local out = {}
for _, kind in ipairs({'day', 'week', 'month'}) do
  for i = 1, #ARGV do
    local key, start, stop = period(tonumber(ARGV[i]), kind)
    out[#out + 1] = {key, start, stop}
  end
end
return out
"""
    )
    client = aioredis.Redis.from_url(REDIS)  # no 1 s timeout: a loaded machine may be slow
    try:
        reply = await client.eval(script, 0, *seconds)
    finally:
        await client.aclose()
    lua = [(k.decode(), int(a), int(b)) for k, a, b in reply]
    kinds: tuple[Period, ...] = ("day", "week", "month")
    assert lua == [budget_period(s, kind) for kind in kinds for s in seconds]


def test_admission_is_exact_across_processes(namespace: str) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, namespace, quotas.__file__, quotas_redis.__file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        counts = [int(child.communicate(timeout=20)[0]) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert 100 <= sum(counts) <= 101
