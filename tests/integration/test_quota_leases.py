"""Concurrency leases in Redis are short and renewed while their requests run (issue 16).

A gateway SIGKILLed under load never settles the requests it had in flight: with 900 s leases
their slots locked the tenant out for 15 minutes. Now a lease lasts ``lease_s`` (30 s) past its
admission or its last renewal, and the gateway that took it renews it every third of that until
the request settles. These tests use leases of a few seconds against real Redis servers: the
machine's (a namespace of their own) and, for outages, a private one (tests/faults). They wait
on renewal passes and on Redis's answers, not on sleeps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import gpufleet
from gpufleet.gateway.quotas import Demand, Limits, QuotaExceeded, QuotaStoreUnavailable, Ticket
from gpufleet.gateway.quotas_redis import RedisQuotas
from gpufleet.outages import OutageReporter
from tests.conftest import eventually
from tests.faults.redis_server import RedisServer
from tests.integration.conftest import REDIS

FREE = Demand(tokens=0, cost_usd=0.0)
ONE = ("tenant:acme", Limits(concurrency=1))
TWO = ("tenant:acme", Limits(concurrency=2, tpm=100_000, budget_usd=100.0))
#: Short leases, renewed as production's are relative to theirs (30 s, every 10 s) but faster.
LEASE_S = 2.0
RENEW_S = 0.3


@pytest.fixture
async def other(namespace: str) -> AsyncIterator[RedisQuotas]:
    """Another gateway on the same counters, not renewing anything: what a tenant sees."""
    q = RedisQuotas(REDIS, namespace=namespace, timeout_s=5.0)
    yield q
    await q.close()


async def admitted(q: RedisQuotas, request_id: str, scope: tuple[str, Limits] = ONE) -> bool:
    try:
        await q.admit(request_id, [scope], FREE)
    except (QuotaExceeded, QuotaStoreUnavailable):  # refused, or Redis still loading
        return False
    return True


async def renewals(q: RedisQuotas, n: int) -> None:
    """``n`` more renewal passes that Redis answered, at least ``(n - 1) * renew_every_s``
    (or none left to renew: the leases were lost, which the caller's checks then show)."""
    target = q.leases.passes + n
    await eventually(lambda: q.leases.passes >= target or not q.leases.held, f"{n} renewal passes")


async def expiry(q: RedisQuotas, ticket: Ticket, scope: str = "tenant:acme") -> float | None:
    """The lease's expiry in the scope's in-flight set, in seconds on Redis's clock (None: gone)."""
    score: Any = await q._redis.zscore(q._keys(scope)[2], ticket.lease)
    return None if score is None else float(score)


async def redis_now(q: RedisQuotas) -> float:
    secs, micros = await q._redis.time()
    return float(secs) + micros / 1_000_000


async def test_a_renewed_lease_outlives_its_first_expiry_and_its_sets_ttl(
    namespace: str, other: RedisQuotas
) -> None:
    """A request running much longer than its lease keeps its slot: 15 passes are over 4 s,
    past the 2 s lease and the in-flight set's 3 s TTL set at admission."""
    q = RedisQuotas(REDIS, namespace=namespace, lease_s=LEASE_S, renew_every_s=RENEW_S)
    try:
        await q.start()
        ticket = await q.admit("long", [ONE], FREE)
        admitted_at = await redis_now(q)
        assert q.leases.held == 1
        await renewals(q, 15)
        assert await redis_now(q) > admitted_at + LEASE_S + 1  # past the first expiry and TTL
        assert not await admitted(other, "b")  # the slot is still taken
        assert (await other.snapshot(*ONE))["concurrency"] == 1
        left = await expiry(q, ticket)
        assert left is not None and left > await redis_now(q)
        assert await q._redis.ttl(q._keys("tenant:acme")[2]) > 0
        await q.settle(ticket, tokens=0, cost_usd=0.0)
        assert q.leases.held == 0
        assert await admitted(other, "b")
        assert q.leases.lost == 0 and q.leases.failures == 0
    finally:
        await q.close()


#: A gateway that admits two requests of a concurrency-2 tenant, renews their leases until they
#: have outlived their first expiry, says so, and waits to be SIGKILLed.
DYING_GATEWAY = """
import asyncio, sys
from gpufleet.gateway.quotas import Demand, Limits
from gpufleet.gateway.quotas_redis import RedisQuotas

async def main(namespace: str, lease_s: float, renew_s: float) -> None:
    q = RedisQuotas("redis://127.0.0.1:6379/0", namespace=namespace, lease_s=lease_s,
                    renew_every_s=renew_s, timeout_s=5.0)
    await q.start()
    tenant = ("tenant:acme", Limits(concurrency=2, tpm=100_000, budget_usd=100.0))
    for i in range(2):
        await q.admit(f"r{i}", [tenant], Demand(tokens=0, cost_usd=0.0))
    target = q.leases.passes + int(1.5 * lease_s / renew_s) + 1
    while q.leases.passes < target and q.leases.held:
        await asyncio.sleep(renew_s / 3)
    print("renewed", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
"""


async def test_the_slots_of_a_gateway_killed_mid_request_free_within_about_a_lease(
    namespace: str, other: RedisQuotas
) -> None:
    """No settlement ever comes from a SIGKILLed gateway; its renewals stop, and its slots free
    when their leases run out — well before 10 leases (a 900 s or a 30 s lease fails this)."""
    lease_s = 3.0
    src = str(Path(gpufleet.__file__).parents[1])
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DYING_GATEWAY, namespace, str(lease_s), str(RENEW_S),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": src},
    )  # fmt: skip
    assert child.stdout is not None
    try:
        async with asyncio.timeout(60):  # a hang, not a time budget
            assert (await child.stdout.readline()).strip() == b"renewed"
        # Renewed past their first expiry: both slots still taken.
        assert (await other.snapshot(*TWO))["concurrency"] == 2
    finally:
        child.send_signal(signal.SIGKILL)  # no settlement, no close: what a crash leaves
        await child.wait()
    assert not await admitted(other, "n0", TWO)  # renewed ≤ 0.3 s ago: ≥ 2.7 s left
    await eventually(lambda: admitted(other, "n0", TWO), "a slot freed", timeout=10 * lease_s)
    assert await admitted(other, "n1", TWO)  # both


async def test_a_settlement_landing_during_a_renewal_pass_stays_settled(
    namespace: str, other: RedisQuotas
) -> None:
    """The pass read the lease as held, then the settlement removed it, then the pass's script
    ran: it must not bring the slot back (the ``ZADD XX`` of the script)."""
    q = RedisQuotas(REDIS, namespace=namespace, lease_s=LEASE_S, renew_every_s=RENEW_S)
    script = q.leases._script
    gate = asyncio.Event()
    built: list[dict[str, Any]] = []

    async def held_back(**call: Any) -> Any:
        built.append(call)
        await gate.wait()
        return await script(**call)

    q.leases._script = held_back  # type: ignore[assignment]
    try:
        ticket = await q.admit("r0", [TWO], FREE)
        still = await q.admit("r1", [TWO], FREE)
        renewal = asyncio.create_task(q.leases.renew())
        await eventually(lambda: built, "the renewal pass sent its call")
        assert ticket.lease in built[0]["args"]
        await q.settle(ticket, tokens=10, cost_usd=0.01)  # lands while the pass waits
        gate.set()
        assert await renewal
        assert await expiry(q, ticket) is None  # not brought back
        assert await expiry(q, still) is not None  # the other one renewed
        assert q.leases.lost == 0  # settled, not lost: no warning
        assert q.leases.held == 1
        assert (await other.snapshot(*TWO))["concurrency"] == 1
        # ...and in the other order: a pass after the settlement does not see it either.
        await q.settle(still, tokens=10, cost_usd=0.01)
        assert await q.leases.renew()
        assert await expiry(q, still) is None
        assert (await other.snapshot(*TWO))["concurrency"] == 0
    finally:
        gate.set()
        await q.close()


@pytest.fixture
def persistent(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis-aof", appendonly=True) as server:
        yield server


async def test_renewal_fails_over_to_the_outage_report_and_an_expired_slot_is_given_up(
    persistent: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis away for longer than a lease: the renewals that fail are the ``redis`` outage (no
    error per request), and the slot of the request still running has expired when Redis is
    back — the tenant may run one more than its limit until it finishes (toward availability,
    as a dead gateway's slots must free), and the gateway says so once and stops renewing it."""
    q = RedisQuotas(persistent.url, lease_s=1.0, renew_every_s=RENEW_S, timeout_s=1.0)
    q.pending.outages = outages = OutageReporter()
    again = RedisQuotas(persistent.url, timeout_s=1.0)
    try:
        running = await q.admit("running", [ONE], FREE)
        assert await q.leases.renew()
        persistent.kill()
        assert not await q.leases.renew()
        assert outages.is_down("redis") and q.leases.failures == 1
        await asyncio.to_thread(persistent.restart)  # from its AOF: the lease is there, old
        # Once the lease has run out on Redis's clock another request of the tenant gets in.
        await eventually(lambda: admitted(again, "next"), "the expired slot taken")
        with caplog.at_level(logging.WARNING, logger="gpufleet.gateway.quotas"):
            assert await q.leases.renew()
        assert not outages.is_down("redis")  # nothing pending: the pass says it is back
        assert q.leases.lost == 1 and q.leases.held == 0
        assert "1 concurrency slots of requests still in flight had expired" in caplog.text
        assert (await again.snapshot(*ONE))["concurrency"] == 1  # "next" only: not brought back
        await q.settle(running, tokens=0, cost_usd=0.0)
        assert (await again.snapshot(*ONE))["concurrency"] == 1
    finally:
        await again.close()
        await q.close()


async def test_an_admission_voided_on_a_hung_redis_is_never_renewed(
    persistent: RedisServer,
) -> None:
    """Only admissions whose answer came are renewed: one that timed out is voided, and if
    the hung Redis ran it after all, its slot is not kept alive by this gateway."""
    q = RedisQuotas(persistent.url, lease_s=LEASE_S, renew_every_s=RENEW_S, timeout_s=0.5)
    try:
        first = await q.admit("r0", [TWO], FREE)
        persistent.pause()
        with pytest.raises(QuotaStoreUnavailable):
            await q.admit("late", [TWO], FREE)
        assert q.leases.held == 1  # the voided one is not tracked
        persistent.resume()  # the admission that timed out runs now, then its void
        await eventually(lambda: not q.pending, "the void landed")
        assert await q.leases.renew()
        assert (await q.snapshot(*TWO))["concurrency"] == 1  # r0's only
        await q.settle(first, tokens=0, cost_usd=0.0)
        assert await q.leases.renew()  # nothing held: no call
        assert (await q.snapshot(*TWO))["concurrency"] == 0
    finally:
        persistent.resume()
        await q.close()


async def test_a_lease_must_be_renewed_more_often_than_it_lasts() -> None:
    with pytest.raises(ValueError, match="more often than they last"):
        RedisQuotas(REDIS, lease_s=1.0, renew_every_s=1.0)


async def test_the_renewal_task_runs_from_start_to_close(namespace: str) -> None:
    q = RedisQuotas(REDIS, namespace=namespace)
    await q.start()
    await q.start()  # once
    names = [t.get_name() for t in asyncio.all_tasks()]
    assert names.count("gateway:quota-leases") == 1
    await q.close()
    assert "gateway:quota-leases" not in [t.get_name() for t in asyncio.all_tasks() if not t.done()]
