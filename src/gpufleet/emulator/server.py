"""The emulator's OpenAI-compatible HTTP face, with vLLM's metric names, for many replicas at once.

aiohttp serves every replica from one event loop on consecutive ports: a replica costs a socket,
a KV cache and a few counters, so a 32-replica fleet runs on a 2-core machine. Responses say
what they are: ``system_fingerprint: gpufleet-emulator`` and an ``x-gpufleet-emulator`` header.
With an ``api_key`` a replica answers its ``/v1`` routes (and its fault controls) only to a
bearer of that key, 401 otherwise, as vLLM does; ``/health`` and ``/metrics`` stay open.

Disaggregated serving follows vLLM's KV-transfer contract (``kvtransfer`` tells it whole): a
body's ``kv_transfer_params`` make it a prefill call, answered with a top-level
``kv_transfer_params`` offering the prompt's KV (``remote_engine_id``: a uuid made when the
replica is built; ``remote_host``/``remote_port``: where it listens; ``tp_size``: its TP), or a
decode call, which pulls that KV over the replica's link and decodes without prefilling, its
answer and stream exactly a plain request's (``cached_tokens``: blocks found in this replica's
own cache). Malformed params, a decode call naming another prompt's blocks, and a call the
replica's ``kv_role`` refuses get a 400 naming the field, in OpenAI's error shape.

KV events (``kv_publisher``): with a ``kv_events`` config that publishes, the replica's cache
reports to a ``BlockEventLog`` (each prompt described before it is submitted, so stored blocks
carry their token ids) and a ``KvEventPublisher`` sends them as vLLM does; ``GET
/kv_event_sources`` answers as vLLM 0.32 (``{"0": config}``, ``{}`` without events). ``POST
/tokenize`` is vLLM's: ``{"model", "prompt"}`` or ``{"model", "messages",
"add_generation_prompt"?}`` → ``{"count", "max_model_len", "tokens", "token_strs": null}``,
the very token ids a chat or completion request with that body puts in the cache — the gateway
keys its view of the replica's blocks (``routing.kv_events``) from them. ``POST
/reset_prefix_cache`` (vLLM's dev-mode route) drops the cached blocks (``{"success": false}``
while sequences run) and publishes ``AllBlocksCleared``. Like vLLM, none of these three sits
under ``/v1``, so an ``api_key`` does not guard them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest

from gpufleet.emulator.engine import (
    EmulatedEngine,
    EmulatedFailure,
    EmulatorCrash,
    Faults,
    RequestStats,
    Token,
)
from gpufleet.emulator.kv_publisher import KvEventPublisher, KvEventsConfig
from gpufleet.emulator.kvcache import BlockEventLog, block_hashes, tokenize
from gpufleet.emulator.kvtransfer import (
    KV_ROLES,
    BadTransferParams,
    KVRole,
    TransferParams,
    block_ids,
    offer,
    refusal,
)
from gpufleet.emulator.metrics import replica_metrics

__all__ = ["ReplicaServer", "render_chat"]

_HEADERS = {"x-gpufleet-emulator": "1"}
#: The paths a key guards (vLLM guards ``/v1``; the fault controls could crash a replica).
_GUARDED = ("/v1/", "/emulator/")


def render_chat(messages: Iterable[dict[str, Any]], *, generation_prompt: bool = True) -> str:
    """A stable rendering of chat messages (a stand-in chat template); ``generation_prompt``
    opens the assistant's turn, as a chat request always does."""
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|{m.get('role', 'user')}|>\n{content or ''}\n")
    return "".join(parts) + ("<|assistant|>\n" if generation_prompt else "")


def _completion_text(prompt: Any) -> str | None:
    """A completion body's ``prompt`` as the text it stands for; None if it is not one."""
    if isinstance(prompt, list):
        prompt = "".join(str(p) for p in prompt)
    return prompt if isinstance(prompt, str) else None


def _error(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": None}}
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
        kv_role: KVRole = "kv_both",
        kv_events: KvEventsConfig | None = None,
    ) -> None:
        if kv_role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {', '.join(KV_ROLES)} (got {kv_role!r})")
        self.engine = engine
        self.kv_role = kv_role
        #: Names this replica in the KV it offers (vLLM: a uuid per engine, made at start).
        self.engine_id = str(uuid.uuid4())
        self.host, self.port = "127.0.0.1", 0  # where it listens, once started
        self._key = f"Bearer {api_key}".encode() if api_key else None
        self.on_crash = on_crash
        self.model = model
        self.default_max_tokens = default_max_tokens
        self.metrics = replica_metrics(engine, model, kv_role)
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
        self.app.router.add_post("/tokenize", self._tokenize)
        self.app.router.add_get("/kv_event_sources", self._kv_event_sources)
        self.app.router.add_post("/reset_prefix_cache", self._reset_prefix_cache)
        self._open: set[asyncio.BaseTransport] = set()
        #: The cache's KV events and their publisher, when ``kv_events`` publishes.
        self.kv_log: BlockEventLog | None = None
        self.kv_publisher: KvEventPublisher | None = None
        if kv_events is not None and kv_events.publishes:
            self.kv_log = BlockEventLog(max_described=min(1 << 16, 2 * engine.cache.capacity))
            engine.cache.listener = self.kv_log
            self.kv_publisher = KvEventPublisher(kv_events, self.kv_log)

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
        prompt = _completion_text(body.get("prompt"))
        if prompt is None:
            return _error(400, "'prompt' must be a string")
        return await self._serve(request, body, prompt, chat=False)

    async def _tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``POST /tokenize``: the token ids a request with these messages or this
        prompt is cached as."""
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not messages:
                return _error(400, "'messages' must be a non-empty array", param="messages")
            generation = body.get("add_generation_prompt", True)
            if body.get("continue_final_message") and generation:
                return _error(400, "Cannot set both `continue_final_message` and "
                              "`add_generation_prompt` to True.")  # fmt: skip
            text = render_chat(messages, generation_prompt=bool(generation))
        else:
            prompt = _completion_text(body.get("prompt"))
            if prompt is None:
                return _error(400, "'prompt' or 'messages' is required", param="prompt")
            text = prompt
        tokens = tokenize(text)
        answer = {"count": len(tokens), "max_model_len": self.engine.perf.arch.max_context,
                  "tokens": tokens, "token_strs": None}  # fmt: skip
        return web.json_response(answer, headers=_HEADERS)

    async def _kv_event_sources(self, _: web.Request) -> web.Response:
        sources = self.kv_publisher.sources() if self.kv_publisher is not None else {}
        return web.json_response(sources, headers=_HEADERS)

    async def _reset_prefix_cache(self, _: web.Request) -> web.Response:
        self.engine.poll()  # finished sequences release their blocks first
        return web.json_response({"success": self.engine.cache.reset()}, headers=_HEADERS)

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
        try:
            params = self._transfer_params(body, prompt)
        except BadTransferParams as exc:
            return _error(400, str(exc), param=exc.field)
        stats = RequestStats(prompt_tokens=len(prompt))
        if self.kv_log is not None:
            self.kv_log.describe(prompt)  # the token ids its stored blocks will be published with
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        stream = body.get("stream") is True
        remote_tp = None
        if params is not None and params.pulls:
            remote_tp = params.tp_size or self.engine.perf.tp
        tokens = self.engine.generate(
            prompt, int(max_tokens), stats, stream=stream, remote_prefill_tp=remote_tp
        )
        m = self.metrics
        try:
            async with contextlib.aclosing(tokens):
                first = await anext(tokens, None)
                if stream:
                    resp = await self._stream(request, rid, chat, first, tokens, stats, body)
                else:
                    pieces = [first.text] if first else []
                    pieces += [t.text async for t in tokens]
                    answer = self._completion_body(rid, chat, "".join(pieces), stats)
                    if params is not None and params.prefill_call:
                        answer["kv_transfer_params"] = self._offer(prompt)
                    resp = web.json_response(answer, headers=_HEADERS)
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
        if stats.kv_transfer_s is not None:
            m.kv_transfer.labels(self.model).observe(stats.kv_transfer_s)
        return resp

    def _transfer_params(self, body: dict[str, Any], prompt: list[int]) -> TransferParams | None:
        """The body's ``kv_transfer_params``, checked against this replica's role and, for a
        decode call, against the prompt; raises ``BadTransferParams`` for a 400."""
        params = TransferParams.parse(body.get("kv_transfer_params"))
        if params is None:
            return None
        refused = refusal(self.kv_role, params)
        if refused is not None:
            raise refused
        if params.pulls and params.remote_block_ids is not None:
            ours = block_ids(block_hashes(prompt))
            if list(params.remote_block_ids) != ours:
                raise BadTransferParams(
                    "kv_transfer_params.remote_block_ids",
                    "kv_transfer_params.remote_block_ids are not this prompt's blocks "
                    f"({len(params.remote_block_ids)} ids for a prompt of {len(ours)} full "
                    "blocks, or other ids): the prefill call prefilled another prompt",
                )
        return params

    def _offer(self, prompt: list[int]) -> dict[str, object]:
        """A prefill answer's ``kv_transfer_params``: this replica's KV of ``prompt``."""
        self.metrics.offers.count += 1
        self.metrics.offers.bytes += len(prompt) * self.engine.perf.kv_bytes_per_token
        return offer(
            self.engine_id, block_hashes(prompt), self.host, self.port, self.engine.perf.tp
        )

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
        self.host, self.port = host, port
        self._runner = runner
        if self.kv_publisher is not None:
            await self.kv_publisher.start()

    async def crash(self) -> None:
        """Stop answering: the listening socket closes, new connections are refused."""
        self.engine.crashed = True
        for transport in list(self._open):
            transport.abort()  # type: ignore[attr-defined]  # requests in flight die with the "process"
        if self.site is not None:
            site, self.site = self.site, None
            await site.stop()
        if self.kv_publisher is not None:
            await self.kv_publisher.close()  # a dead engine's socket closes with it
        if self.on_crash is not None:
            self.on_crash()

    async def stop(self) -> None:
        if self.kv_publisher is not None:
            await self.kv_publisher.close()
        await self._runner.cleanup()


def _usage(stats: RequestStats) -> dict[str, Any]:
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens},
    }
