"""The engine emulator over HTTP: OpenAI SDK, prefix caching, load, vLLM metrics, faults."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from gpufleet.emulator import EmulatedEngine, Faults, ReplicaServer
from gpufleet.emulator.engine import RequestStats
from gpufleet.engines import parse_vllm
from gpufleet.hardware import CATALOG
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel
from tests.conftest import eventually, free_port

LLAMA_8B = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
LONG_SYSTEM = "You are a careful assistant who answers in full sentences. " * 120  # ~1,800 tokens


def engine(**kw: object) -> EmulatedEngine:
    perf = PerfModel(load_architecture(LLAMA_8B), CATALOG["H100"])
    return EmulatedEngine(perf, **{"kv_capacity_tokens": 400_000, **kw})  # type: ignore[arg-type]


@asynccontextmanager
async def replicas(*engines: EmulatedEngine) -> AsyncIterator[list[str]]:
    servers = [ReplicaServer(e, "llama") for e in engines]
    urls = []
    for s in servers:
        port = free_port()
        await s.start("127.0.0.1", port)
        urls.append(f"http://127.0.0.1:{port}")
    try:
        yield urls
    finally:
        while _clients:
            await _clients.pop().close()
        for s in servers:
            await s.stop()


_clients: list[AsyncOpenAI] = []


def sdk(url: str) -> AsyncOpenAI:
    """An SDK client, closed when the ``replicas`` block it was made in ends."""
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)
    _clients.append(client)
    return client


async def ttft(client: AsyncOpenAI, system: str, user: str, max_tokens: int = 4) -> float:
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model="llama",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        max_tokens=max_tokens,
        stream=True,
    )
    first = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    assert first is not None
    return first


async def test_openai_sdk_works_and_the_emulator_says_what_it_is() -> None:
    async with replicas(engine(time_scale=0.1)) as (url,):
        client = sdk(url)
        reply = await client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "Hello"}], max_tokens=7
        )
        assert reply.system_fingerprint == "gpufleet-emulator"
        assert reply.usage is not None and reply.usage.completion_tokens == 7
        assert "emulated" in (reply.choices[0].message.content or "")
        text = await client.completions.create(model="llama", prompt="Once", max_tokens=3)
        assert text.usage is not None and text.usage.completion_tokens == 3
        assert [m.id for m in (await client.models.list()).data] == ["llama"]
        stream = await client.chat.completions.create(
            model="llama",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 5
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


async def test_repeated_prompt_gets_cached_tokens_and_a_lower_ttft() -> None:
    async with replicas(engine(time_scale=20)) as (url,):
        client = sdk(url)
        cold = await ttft(client, LONG_SYSTEM, "first question")
        warm = await ttft(client, LONG_SYSTEM, "second question")
        reply = await client.chat.completions.create(
            model="llama",
            messages=[
                {"role": "system", "content": LONG_SYSTEM},
                {"role": "user", "content": "third"},
            ],
            max_tokens=1,
        )
        usage = reply.usage
        assert usage is not None and usage.prompt_tokens_details is not None
        cached = usage.prompt_tokens_details.cached_tokens or 0
        assert cached >= 0.9 * usage.prompt_tokens and cached % 16 == 0
        assert warm < 0.6 * cold, (cold, warm)
        async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
            load = parse_vllm(await resp.text())
        assert load.prefix_hits >= cached and load.prefix_hit_rate > 0.5


async def test_under_load_requests_wait_and_ttft_grows() -> None:
    e = engine(time_scale=5, max_num_seqs=2)
    async with replicas(e) as (url,):
        client = sdk(url)
        peak_waiting = 0.0

        async def watch() -> None:
            nonlocal peak_waiting
            async with aiohttp.ClientSession() as http:
                while True:
                    async with http.get(f"{url}/metrics") as resp:
                        peak_waiting = max(peak_waiting, parse_vllm(await resp.text()).waiting)
                    await asyncio.sleep(0.02)

        alone = await ttft(client, "short", "q", max_tokens=20)
        watcher = asyncio.create_task(watch())
        try:
            loaded = await asyncio.gather(
                *(ttft(client, "short", f"q{i}", max_tokens=20) for i in range(6))
            )
        finally:
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher
        assert peak_waiting >= 2
        assert max(loaded) > 3 * alone, (alone, loaded)


async def test_inter_token_latency_grows_with_batch() -> None:
    e = engine(time_scale=1)
    assert e.perf.decode_step_s(64, 2000) > e.perf.decode_step_s(1, 2000)


async def test_injected_failures() -> None:
    async with replicas(engine(time_scale=0.1, faults=Faults(fail_rate=1.0))) as (url,):
        with pytest.raises(openai.InternalServerError):
            await sdk(url).completions.create(model="llama", prompt="x", max_tokens=1)


async def test_injected_stall() -> None:
    async with replicas(engine(time_scale=0.01, faults=Faults(stall_rate=1.0, stall_s=0.4))) as (
        url,
    ):
        start = time.perf_counter()
        await sdk(url).completions.create(model="llama", prompt="x", max_tokens=1)
        assert time.perf_counter() - start >= 0.4


async def test_slow_start_is_unready_then_ready() -> None:
    faults = Faults(slow_start_s=0.5)
    async with (
        replicas(engine(time_scale=0.01, faults=faults)) as (url,),
        aiohttp.ClientSession() as http,
    ):
        async with http.get(f"{url}/v1/models") as resp:
            assert resp.status == 503

        async def ready() -> bool:
            async with http.get(f"{url}/v1/models") as resp:
                return resp.status == 200

        await eventually(ready, "the replica is ready after its slow start")


async def test_crash_stops_the_replica_answering() -> None:
    async with replicas(engine(time_scale=0.01, faults=Faults(crash_after=1))) as (url,):
        client = sdk(url)
        await client.completions.create(model="llama", prompt="x", max_tokens=1)
        with pytest.raises(openai.APIConnectionError):
            await client.completions.create(model="llama", prompt="x", max_tokens=1)
        with pytest.raises(openai.APIConnectionError):
            await client.completions.create(model="llama", prompt="x", max_tokens=1)


async def test_faults_can_be_changed_at_run_time() -> None:
    async with replicas(engine(time_scale=0.01)) as (url,), aiohttp.ClientSession() as http:
        async with http.put(f"{url}/emulator/v1/faults", json={"fail_rate": 1.0}) as resp:
            assert resp.status == 200
        with pytest.raises(openai.InternalServerError):
            await sdk(url).completions.create(model="llama", prompt="x", max_tokens=1)
        async with http.put(f"{url}/emulator/v1/faults", json={"bogus": 1}) as resp:
            assert resp.status == 400


async def test_prompt_larger_than_the_kv_cache_is_refused() -> None:
    async with replicas(engine(time_scale=0.01, kv_capacity_tokens=64)) as (url,):
        with pytest.raises(openai.InternalServerError, match="exceed the KV cache"):
            await sdk(url).completions.create(model="llama", prompt="word " * 400, max_tokens=1)


async def test_thirty_two_replicas_in_one_process() -> None:
    async with replicas(*(engine(time_scale=0.01, seed=i) for i in range(32))) as urls:
        replies = await asyncio.gather(
            *(sdk(u).completions.create(model="llama", prompt="hi", max_tokens=2) for u in urls)
        )
        assert len({u for u in urls}) == 32 and all(r.usage for r in replies)


def test_single_replica_process_exits_when_it_crashes(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpufleet.emulator", "--arch", str(LLAMA_8B), "--name", "llama",
         "--port", str(port), "--crash-after", "0", "--time-scale", "0.01"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert "gpufleet emulator: 1 replica(s) of llama on 1× H100" in proc.stdout.readline()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            client.completions.create(model="llama", prompt="x", max_tokens=1)
        assert proc.wait(timeout=10) == 70
    finally:
        proc.kill()
        proc.wait()


def test_emulator_refuses_a_model_that_does_not_fit() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpufleet.emulator", "--arch", str(LLAMA_8B.parent / "llama-3-70b.json"),
         "--gpu", "L4", "--port", str(free_port())],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "does not fit 1× L4" in result.stderr


async def test_a_client_leaving_mid_stream_frees_its_slot_and_blocks() -> None:
    e = engine(time_scale=0.01)
    stats = RequestStats(prompt_tokens=100)
    tokens = e.generate(list(range(100)), 500, stats)
    async with contextlib.aclosing(tokens):
        first = await anext(tokens)
        assert first.index == 0 and e.running == 1 and e.cache.usage > 0
    assert (e.running, e.waiting, e.cache.usage) == (0, 0, 0)
    assert stats.completion_tokens == 1


async def test_time_scale_can_change_while_a_request_runs() -> None:
    e = engine(time_scale=1.0)  # 1,000 tokens: about 10 s
    stats = RequestStats(prompt_tokens=100)

    async def whole() -> int:
        return len([t async for t in e.generate(list(range(100)), 1000, stats, stream=False)])

    task = asyncio.create_task(whole())
    while e.running == 0:
        await asyncio.sleep(0.001)
    e.time_scale = 0.001  # now about 10 ms
    async with asyncio.timeout(5):
        assert await task == 1000
    assert stats.completion_tokens == 1000 and e.generation_tokens_total == 1000
