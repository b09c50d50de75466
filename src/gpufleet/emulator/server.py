"""The emulator's OpenAI-compatible HTTP face, with vLLM's metric names, for many replicas at once.

aiohttp serves every replica from one event loop on consecutive ports: a replica costs a socket,
a KV cache and a few counters, so a 32-replica fleet runs on a 2-core machine. Responses say
what they are: ``system_fingerprint: gpufleet-emulator`` and an ``x-gpufleet-emulator`` header.
With an ``api_key`` a replica answers its ``/v1`` routes (and its fault controls) only to a
bearer of that key, 401 otherwise, as vLLM does; ``/health`` and ``/metrics`` stay open.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpufleet.emulator.engine import (
    EmulatedEngine,
    EmulatedFailure,
    EmulatorCrash,
    Faults,
    RequestStats,
    Token,
)
from gpufleet.emulator.kvcache import BLOCK_TOKENS, tokenize

__all__ = ["ReplicaServer", "render_chat"]

_HEADERS = {"x-gpufleet-emulator": "1"}
#: The paths a key guards (vLLM guards ``/v1``; the fault controls could crash a replica).
_GUARDED = ("/v1/", "/emulator/")
_LATENCY = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    10,
    20,
    40,
    80,
)


def render_chat(messages: Iterable[dict[str, Any]]) -> str:
    """A stable rendering of chat messages (a stand-in chat template)."""
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|{m.get('role', 'user')}|>\n{content or ''}\n")
    return "".join(parts) + "<|assistant|>\n"


class _Gauges(Collector):
    def __init__(self, engine: EmulatedEngine, model: str) -> None:
        self.engine = engine
        self.model = model

    def collect(self) -> Iterable[Metric]:
        e, labels = self.engine, ["0", self.model]
        e.poll()
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests running on the engine", e.running),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled", e.waiting),
            ("vllm:kv_cache_usage_perc", "KV cache usage, 0..1", e.cache.usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=["engine", "model_name"])
            g.add_metric(labels, value)
            yield g
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "KV cache configuration",
            labels=["block_size", "num_gpu_blocks"],
        )
        info.add_metric([str(BLOCK_TOKENS), str(e.cache.capacity)], 1)
        yield info
        for name, doc, total in (
            ("vllm:prompt_tokens", "Prompt tokens processed", e.prompt_tokens_total),
            ("vllm:generation_tokens", "Tokens generated", e.generation_tokens_total),
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache",
                e.prefix_queries,
            ),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", e.prefix_hits),
        ):
            c = CounterMetricFamily(name, doc, labels=["engine", "model_name"])
            c.add_metric(labels, total)
            yield c


@dataclass
class _Metrics:
    registry: CollectorRegistry
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue: Histogram


def _metrics(engine: EmulatedEngine, model: str) -> _Metrics:
    r = CollectorRegistry()
    r.register(_Gauges(engine, model))
    lab = ["engine", "model_name"]
    return _Metrics(
        r,
        Histogram("vllm:time_to_first_token_seconds", "TTFT", lab, buckets=_LATENCY, registry=r),
        Histogram(
            "vllm:inter_token_latency_seconds",
            "Gap between tokens",
            lab,
            buckets=_LATENCY,
            registry=r,
        ),
        Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency", lab, buckets=_LATENCY, registry=r
        ),
        Histogram(
            "vllm:request_queue_time_seconds", "Time waiting", lab, buckets=_LATENCY, registry=r
        ),
    )


def _error(status: int, message: str, type_: str = "invalid_request_error") -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=_HEADERS)


class ReplicaServer:
    """One emulated replica behind its own port."""

    def __init__(
        self,
        engine: EmulatedEngine,
        model: str,
        *,
        default_max_tokens: int = 64,
        on_crash: Callable[[], None] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.engine = engine
        self._key = f"Bearer {api_key}".encode() if api_key else None
        self.on_crash = on_crash
        self.model = model
        self.default_max_tokens = default_max_tokens
        self.metrics = _metrics(engine, model)
        self.created = int(time.time())
        self.site: web.TCPSite | None = None
        self.app = web.Application(
            client_max_size=64 * 1024 * 1024,
            middlewares=[self._authenticate] if self._key is not None else [],
        )
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_post("/v1/completions", self._completion)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._prometheus)
        self.app.router.add_get("/emulator/v1/faults", self._get_faults)
        self.app.router.add_put("/emulator/v1/faults", self._put_faults)
        self.app.router.add_post("/emulator/v1/crash", self._crash_now)
        self._open: set[asyncio.BaseTransport] = set()

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        assert self._key is not None
        given = request.headers.get("authorization", "").encode()
        if request.path.startswith(_GUARDED) and not hmac.compare_digest(given, self._key):
            return _error(401, "Unauthorized", "authentication_error")
        response: web.StreamResponse = await handler(request)
        return response

    async def _health(self, _: web.Request) -> web.Response:
        if not self.engine.ready:
            return _error(503, "starting (emulated slow start)", "service_unavailable")
        return web.Response(text="ok", headers=_HEADERS)

    async def _models(self, _: web.Request) -> web.Response:
        if not self.engine.ready:
            return _error(503, "starting (emulated slow start)", "service_unavailable")
        data = [
            {
                "id": self.model,
                "object": "model",
                "created": self.created,
                "owned_by": "gpufleet-emulator",
            }
        ]
        return web.json_response({"object": "list", "data": data}, headers=_HEADERS)

    def exposition(self) -> str:
        """The replica's metrics in Prometheus text format, as ``/metrics`` serves them."""
        return generate_latest(self.metrics.registry).decode()

    async def _prometheus(self, _: web.Request) -> web.Response:
        return web.Response(text=self.exposition(), content_type="text/plain", headers=_HEADERS)

    async def _crash_now(self, request: web.Request) -> web.Response:
        """Die now, as a killed engine would: every connection drops, no answer is sent."""
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.crash()))
        return web.Response(status=202, text="crashing")

    async def _get_faults(self, _: web.Request) -> web.Response:
        return web.json_response(self.engine.faults.__dict__)

    async def _put_faults(self, request: web.Request) -> web.Response:
        data = await request.json()
        try:
            self.engine.faults = Faults(**data)
        except TypeError as exc:
            return _error(400, f"bad faults: {exc}")
        return web.json_response(self.engine.faults.__dict__)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' must be a non-empty array")
        return await self._serve(request, body, render_chat(messages), chat=True)

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = "".join(str(p) for p in prompt)
        if not isinstance(prompt, str):
            return _error(400, "'prompt' must be a string")
        return await self._serve(request, body, prompt, chat=False)

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        if not self.engine.ready:
            return _error(503, "starting (emulated slow start)", "service_unavailable")
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "body is not valid JSON")
        return body if isinstance(body, dict) else _error(400, "body must be a JSON object")

    async def _serve(
        self, request: web.Request, body: dict[str, Any], text: str, *, chat: bool
    ) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            self._open.add(transport)
        try:
            return await self._answer(request, body, text, chat=chat)
        except ConnectionResetError:
            # The client went away, or this replica "crashed" under it: nobody to answer.
            return web.Response(status=499)
        finally:
            if transport is not None:
                self._open.discard(transport)

    async def _answer(
        self, request: web.Request, body: dict[str, Any], text: str, *, chat: bool
    ) -> web.StreamResponse:
        max_tokens = (
            body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        )
        prompt = tokenize(text)
        stats = RequestStats(prompt_tokens=len(prompt))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        stream = body.get("stream") is True
        tokens = self.engine.generate(prompt, int(max_tokens), stats, stream=stream)
        m = self.metrics
        try:
            async with contextlib.aclosing(tokens):
                first = await anext(tokens, None)
                if stream:
                    resp = await self._stream(request, rid, chat, first, tokens, stats, body)
                else:
                    pieces = [first.text] if first else []
                    pieces += [t.text async for t in tokens]
                    resp = web.json_response(
                        self._completion_body(rid, chat, "".join(pieces), stats), headers=_HEADERS
                    )
        except EmulatedFailure as exc:
            return _error(500, str(exc), "server_error")
        except EmulatorCrash:
            await self.crash()
            if request.transport is not None:
                request.transport.close()  # as a dying process would: no answer at all
            return web.Response(status=500)
        m.ttft.labels("0", self.model).observe(stats.ttft_s)
        m.queue.labels("0", self.model).observe(stats.queued_s)
        m.e2e.labels("0", self.model).observe(stats.finished_s)
        if stats.completion_tokens > 1:
            gap = (stats.finished_s - stats.ttft_s) / (stats.completion_tokens - 1)
            m.itl.labels("0", self.model).observe(gap)
        return resp

    async def _stream(
        self,
        request: web.Request,
        rid: str,
        chat: bool,
        first: Token | None,
        tokens: AsyncGenerator[Token, None],
        stats: RequestStats,
        body: dict[str, Any],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache", **_HEADERS}
        )
        await resp.prepare(request)
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = delta
            else:
                choice["text"] = delta.get("content", "")
            obj = "chat.completion.chunk" if chat else "text_completion"
            payload = {"id": rid, "object": obj, "created": created, "model": self.model,
                       "system_fingerprint": "gpufleet-emulator", "choices": [choice]}  # fmt: skip
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        if chat:
            await resp.write(chunk({"role": "assistant", "content": ""}, None))
        if first is not None:
            await resp.write(chunk({"content": first.text}, None))
        async for t in tokens:
            await resp.write(chunk({"content": t.text}, None))
        await resp.write(chunk({}, "length"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": self.model, "choices": [], "usage": _usage(stats)}  # fmt: skip
            await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _completion_body(
        self, rid: str, chat: bool, text: str, stats: RequestStats
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": "gpufleet-emulator",
            "choices": [choice],
            "usage": _usage(stats),
        }

    async def start(self, host: str, port: int) -> None:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        self.site = web.TCPSite(runner, host, port, reuse_address=True)
        await self.site.start()
        self._runner = runner

    async def crash(self) -> None:
        """Stop answering: the listening socket closes, new connections are refused."""
        self.engine.crashed = True
        for transport in list(self._open):
            transport.abort()  # type: ignore[attr-defined]  # requests in flight die with the "process"
        if self.site is not None:
            site, self.site = self.site, None
            await site.stop()
        if self.on_crash is not None:
            self.on_crash()

    async def stop(self) -> None:
        await self._runner.cleanup()


def _usage(stats: RequestStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }
