"""Disaggregated serving over HTTP: vLLM's prefill and decode calls against real emulator
servers, the roles' refusals, malformed ``kv_transfer_params``, and the KV metrics."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from gpufleet.emulator import EmulatedEngine, ReplicaServer
from gpufleet.emulator.engine import RequestStats
from gpufleet.emulator.kvtransfer import KV_LINKS, KVRole
from gpufleet.hardware import CATALOG
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel
from tests.conftest import eventually, free_port

LLAMA_8B = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
LONG_SYSTEM = "You are a careful assistant who answers in full sentences. " * 120  # ~1,800 tokens
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": LONG_SYSTEM},
    {"role": "user", "content": "Per diem?"},
]
ASK = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class Replica:
    def __init__(self, server: ReplicaServer, url: str) -> None:
        self.server, self.url = server, url

    def sample(self, name: str, **labels: str) -> float:
        value = self.server.metrics.registry.get_sample_value(
            name, {"model_name": "llama", **labels}
        )
        return value or 0.0

    def ttft_sum(self) -> float:
        return self.sample("vllm:time_to_first_token_seconds_sum", engine="0")


@asynccontextmanager
async def replicas(*roles: KVRole, time_scale: float = 0.01) -> AsyncIterator[list[Replica]]:
    perf = PerfModel(load_architecture(LLAMA_8B), CATALOG["H100"])
    servers = [
        ReplicaServer(EmulatedEngine(perf, 400_000, time_scale=time_scale), "llama", kv_role=r)
        for r in roles
    ]
    started = []
    try:
        for s in servers:
            port = free_port()
            await s.start("127.0.0.1", port)
            started.append(Replica(s, f"http://127.0.0.1:{port}"))
        yield started
    finally:
        for s in servers:
            await s.stop()


async def post(
    http: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.post(url + path, json=body) as resp:
        payload: dict[str, Any] = await resp.json()
        return resp.status, payload


def prefill_call(body: dict[str, Any]) -> dict[str, Any]:
    """The proxy's prefill call (vLLM's toy_proxy_server.py, llm-d, Dynamo): one unstreamed
    token, asking for a remote decode."""
    ask = {k: v for k, v in body.items() if k != "stream_options"}
    return {**ask, "max_tokens": 1, "stream": False, "kv_transfer_params": dict(ASK)}


async def test_a_prefill_call_gets_nixl_connectors_answer() -> None:
    async with replicas("kv_both") as (p,), aiohttp.ClientSession() as http:
        body = {"model": "llama", "messages": MESSAGES, "max_tokens": 50, "stream": True}
        status, answer = await post(http, p.url, "/v1/chat/completions", prefill_call(body))
        assert status == 200
        assert answer["usage"]["completion_tokens"] == 1
        offer = answer["kv_transfer_params"]
        assert list(offer) == [
            "do_remote_prefill",
            "do_remote_decode",
            "remote_block_ids",
            "remote_engine_id",
            "remote_host",
            "remote_port",
            "tp_size",
        ]
        assert offer["do_remote_prefill"] is True and offer["do_remote_decode"] is False
        ids = offer["remote_block_ids"]
        assert len(ids) == answer["usage"]["prompt_tokens"] // 16 > 100
        assert all(type(i) is int for i in ids)
        assert offer["remote_engine_id"] == p.server.engine_id
        assert isinstance(offer["remote_engine_id"], str) and offer["remote_engine_id"]
        assert (offer["remote_host"], offer["remote_port"]) == ("127.0.0.1", p.server.port)
        assert p.url.endswith(f":{offer['remote_port']}") and offer["tp_size"] == 1
        # The same replica, the same id, on /v1/completions too.
        status, text = await post(
            http, p.url, "/v1/completions",
            {"model": "llama", "prompt": LONG_SYSTEM, "max_tokens": 1, "stream": False,
             "kv_transfer_params": dict(ASK)},
        )  # fmt: skip
        assert status == 200
        assert text["kv_transfer_params"]["remote_engine_id"] == p.server.engine_id
        # A plain request gets no offer.
        status, plain = await post(
            http, p.url, "/v1/completions", {"model": "llama", "prompt": "hi", "max_tokens": 2}
        )
        assert status == 200 and "kv_transfer_params" not in plain
        assert p.sample("gpufleet_emulator_kv_transfers_total", direction="out") == 2


async def test_a_decode_call_pulls_and_answers_as_a_plain_request_would() -> None:
    async with (
        replicas("kv_producer", "kv_consumer", "kv_both") as (p, d, plain),
        aiohttp.ClientSession() as http,
    ):
        body = {"model": "llama", "messages": MESSAGES, "max_tokens": 9}
        _, answer = await post(http, p.url, "/v1/chat/completions", prefill_call(body))
        offer = answer["kv_transfer_params"]
        client = AsyncOpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0)
        reply = await client.chat.completions.create(
            model="llama",
            messages=MESSAGES,
            max_tokens=9,
            extra_body={"kv_transfer_params": offer},
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 9
        assert reply.usage.prompt_tokens == answer["usage"]["prompt_tokens"]
        details = reply.usage.prompt_tokens_details
        assert details is not None and details.cached_tokens == 0  # nothing of it cached here
        assert (reply.model_extra or {}).get("kv_transfer_params") is None
        pulled = reply.usage.prompt_tokens * d.server.engine.perf.kv_bytes_per_token
        assert d.sample("gpufleet_emulator_kv_transfers_total", direction="in") == 1
        assert d.sample("gpufleet_emulator_kv_transfer_bytes_total", direction="in") == pulled
        assert d.sample("gpufleet_emulator_kv_transfer_seconds_count") == 1
        assert d.server.engine.prefix_queries == reply.usage.prompt_tokens

        # The same request, prefilled where it decodes: the pull over InfiniBand and one decode
        # step beat the prefill of ~1,800 tokens (the engines' own model-time figures).
        local = AsyncOpenAI(base_url=f"{plain.url}/v1", api_key="x", max_retries=0)
        await local.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=9)
        assert 0 < d.ttft_sum() < 0.5 * plain.ttft_sum()

        # Streamed: the decode replica's own cache now holds the prompt's blocks.
        stream = await client.chat.completions.create(
            model="llama",
            messages=MESSAGES,
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"kv_transfer_params": offer},
        )
        chunks = [c async for c in stream]
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 9
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 9
        assert usage.prompt_tokens_details is not None
        cached = usage.prompt_tokens_details.cached_tokens or 0
        assert cached == usage.prompt_tokens // 16 * 16
        await client.close()
        await local.close()


async def sse(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[Any]:
    """A stream's events, with what differs between any two streams (ids, times) blanked."""
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        text = await resp.text()
    events: list[Any] = []
    for line in text.split("\n\n"):
        if not line:
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            events.append(data)
            continue
        event = json.loads(data)
        event["id"] = event["created"] = None
        events.append(event)
    return events


async def test_a_streamed_decode_call_is_byte_for_byte_a_plain_stream() -> None:
    async with (
        replicas("kv_both", "kv_both", "kv_both") as (p, d, fresh),
        aiohttp.ClientSession() as http,
    ):
        body = {
            "model": "llama",
            "messages": MESSAGES,
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        _, answer = await post(http, p.url, "/v1/chat/completions", prefill_call(body))
        decoded = await sse(
            http, d.url, {**body, "kv_transfer_params": answer["kv_transfer_params"]}
        )
        plain = await sse(http, fresh.url, body)  # nothing cached there either
        assert decoded == plain
        assert decoded[-2]["usage"]["completion_tokens"] == 6 and decoded[-1] == "[DONE]"


async def test_a_decode_call_without_a_source_is_prefilled_locally() -> None:
    async with replicas("kv_both") as (d,), aiohttp.ClientSession() as http:
        params = {**ASK, "do_remote_decode": False, "do_remote_prefill": True}
        status, answer = await post(
            http, d.url, "/v1/chat/completions",
            {"model": "llama", "messages": MESSAGES, "max_tokens": 3, "kv_transfer_params": params},
        )  # fmt: skip
        assert status == 200 and answer["usage"]["completion_tokens"] == 3
        assert "kv_transfer_params" not in answer
        assert d.sample("gpufleet_emulator_kv_transfers_total", direction="in") == 0


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ("yes", "kv_transfer_params"),
        ({"remote_block_ids": "1,2,3"}, "kv_transfer_params.remote_block_ids"),
        ({"remote_block_ids": [1, 2.5]}, "kv_transfer_params.remote_block_ids"),
        ({"do_remote_prefill": True, "remote_port": "5600"}, "kv_transfer_params.remote_port"),
        ({"remote_engine_id": 12}, "kv_transfer_params.remote_engine_id"),
        ({"do_remote_decode": 1}, "kv_transfer_params.do_remote_decode"),
    ],
)
async def test_malformed_kv_transfer_params_are_a_400_naming_the_field(
    params: object, field: str
) -> None:
    async with replicas("kv_both") as (r,), aiohttp.ClientSession() as http:
        for path, body in (
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"prompt": "hi"}),
        ):
            status, answer = await post(
                http, r.url, path, {"model": "llama", **body, "kv_transfer_params": params}
            )
            assert status == 400
            error = answer["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == field
            assert field in error["message"] and "Traceback" not in error["message"]


async def test_a_decode_call_for_another_prompt_is_refused() -> None:
    async with replicas("kv_both", "kv_both") as (p, d), aiohttp.ClientSession() as http:
        body = {"model": "llama", "messages": MESSAGES, "max_tokens": 4}
        _, answer = await post(http, p.url, "/v1/chat/completions", prefill_call(body))
        other = [{"role": "user", "content": "Something else entirely. " * 40}]
        status, refused = await post(
            http, d.url, "/v1/chat/completions",
            {**body, "messages": other, "kv_transfer_params": answer["kv_transfer_params"]},
        )  # fmt: skip
        assert status == 400
        assert refused["error"]["param"] == "kv_transfer_params.remote_block_ids"
        assert "not this prompt's blocks" in refused["error"]["message"]


async def test_producers_refuse_decode_calls_and_consumers_prefill_calls() -> None:
    async with replicas("kv_producer", "kv_consumer") as (p, c), aiohttp.ClientSession() as http:
        body = {"model": "llama", "messages": MESSAGES, "max_tokens": 2}
        status, refused = await post(http, c.url, "/v1/chat/completions", prefill_call(body))
        assert status == 400 and refused["error"]["param"] == "kv_transfer_params.do_remote_decode"
        assert "kv_consumer" in refused["error"]["message"]

        status, answer = await post(http, p.url, "/v1/chat/completions", prefill_call(body))
        assert status == 200
        decode = {**body, "kv_transfer_params": answer["kv_transfer_params"]}
        status, refused = await post(http, p.url, "/v1/chat/completions", decode)
        assert status == 400 and refused["error"]["param"] == "kv_transfer_params.do_remote_prefill"
        assert "kv_producer" in refused["error"]["message"]
        status, _ = await post(http, c.url, "/v1/chat/completions", decode)
        assert status == 200
        for r in (p, c):  # both still serve plain requests
            status, plain = await post(http, r.url, "/v1/chat/completions", body)
            assert status == 200 and plain["usage"]["completion_tokens"] == 2

        async with http.get(p.url + "/metrics") as resp:
            text = await resp.text()
        assert 'gpufleet_emulator_kv_role{model_name="llama",role="kv_producer"} 1.0' in text
        assert (
            'gpufleet_emulator_kv_link_bytes_per_second{link="infiniband",model_name="llama"}'
            in text
        )
        assert "vllm:num_requests_running" in text and "vllm:prefix_cache_hits_total" in text


def test_a_replica_knows_only_vllms_roles() -> None:
    perf = PerfModel(load_architecture(LLAMA_8B), CATALOG["H100"])
    with pytest.raises(ValueError, match="kv_role"):
        ReplicaServer(EmulatedEngine(perf, 1000), "llama", kv_role="both")  # type: ignore[arg-type]


async def test_a_client_leaving_during_its_pull_frees_its_slot_and_blocks() -> None:
    perf = PerfModel(load_architecture(LLAMA_8B), CATALOG["H100"])
    engine = EmulatedEngine(perf, 400_000, kv_link=KV_LINKS["tcp"])  # 8,000 tokens: ~0.34 s
    stats = RequestStats(prompt_tokens=8000)

    async def consume() -> None:
        async for _ in engine.generate(list(range(8000)), 5, stats, remote_prefill_tp=1):
            pass

    task = asyncio.create_task(consume())
    await eventually(lambda: engine.model.transferring == 1, "the request pulls its KV")
    assert engine.running == 1 and engine.cache.usage > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (engine.running, engine.model.transferring, engine.cache.usage) == (0, 0, 0)
    assert (stats.completion_tokens, stats.kv_transfer_s, engine.kv_pulls) == (0, None, 0)
