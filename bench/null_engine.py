"""An engine that answers instantly with a fixed body: isolates the gateway's own overhead.

A request with ``"stream": true`` gets ``max_tokens`` content chunks (one SSE event, one write
each, back to back), a finish chunk, a usage chunk when ``stream_options.include_usage`` asks
for it, and ``[DONE]``. Non-streaming requests are not parsed, so that path costs what it
always did. ``/health`` answers 200 for routers that probe their workers (vllm-router), and
``/metrics`` a few of vLLM's gauges, so a gateway that scrapes its engines (gpufleet, four times
a second) does that work as it would in front of vLLM. With ``GAP_MS`` the chunks of a stream
are that far apart, as an engine's decode steps are; with ``TOKENS`` a non-streaming answer is
that many tokens ("ok" each) instead of one. For many streams at once
(``bench/gateway_soak.py``: 10,000, opened hundreds at a time), ``--backlog`` lengthens the
listen queue past aiohttp's 128, whose overflow would turn connections into SYN retries a
second apart, and ``--uvloop`` runs it on uvloop, so that the core it shares with the clients
goes on writing the chunks on time.
Run: python bench/null_engine.py PORT [GAP_MS [TOKENS]] [--backlog N] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web


def answer(tokens: int) -> bytes:
    """A non-streaming chat completion of ``tokens`` tokens."""
    content = " ".join(["ok"] * tokens)
    return (
        b'{"id":"x","object":"chat.completion","created":0,"model":"null","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"%s"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}}'
    ) % (content.encode(), tokens, 5 + tokens)


BODY = answer(1)
METRICS = (
    b"# TYPE vllm:num_requests_running gauge\n"
    b'vllm:num_requests_running{model_name="null"} 0.0\n'
    b"# TYPE vllm:num_requests_waiting gauge\n"
    b'vllm:num_requests_waiting{model_name="null"} 0.0\n'
    b"# TYPE vllm:kv_cache_usage_perc gauge\n"
    b'vllm:kv_cache_usage_perc{model_name="null"} 0.0\n'
)


def _event(choice: str) -> bytes:
    chunk = '{"id":"x","object":"chat.completion.chunk","created":0,"model":"null","choices":[%s]}'
    return b"data: " + (chunk % choice).encode() + b"\n\n"


FIRST = _event('{"index":0,"delta":{"role":"assistant","content":"ok"},"finish_reason":null}')
TOKEN = _event('{"index":0,"delta":{"content":"ok"},"finish_reason":null}')
FINISH = _event('{"index":0,"delta":{},"finish_reason":"stop"}')
DONE = b"data: [DONE]\n\n"
GAP_S = 0.0


def _usage(tokens: int) -> bytes:
    usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
    chunk = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "null",
        "choices": [],
        "usage": usage,
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    raw = await request.read()
    if b'"stream"' not in raw:
        return web.Response(body=BODY, content_type="application/json")
    data = json.loads(raw)
    if data.get("stream") is not True:
        return web.Response(body=BODY, content_type="application/json")
    tokens = max(1, int(data.get("max_tokens") or 16))
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(FIRST)
    for _ in range(tokens - 1):
        if GAP_S:
            await asyncio.sleep(GAP_S)
        await resp.write(TOKEN)
    await resp.write(FINISH)
    if (data.get("stream_options") or {}).get("include_usage"):
        await resp.write(_usage(tokens))
    await resp.write(DONE)
    await resp.write_eof()
    return resp


async def models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "null", "object": "model"}]})


async def health(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def metrics(_: web.Request) -> web.Response:
    return web.Response(body=METRICS, content_type="text/plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("gap_ms", nargs="?", type=float, default=0.0, help="between chunks")
    parser.add_argument("tokens", nargs="?", type=int, default=1, help="of a non-streaming answer")
    parser.add_argument("--backlog", type=int, default=128, help="the listen queue's length")
    parser.add_argument("--uvloop", action="store_true", help="serve on uvloop")
    args = parser.parse_args()
    global BODY, GAP_S
    BODY, GAP_S = answer(args.tokens), args.gap_ms / 1000
    loop = None
    if args.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        backlog=args.backlog,
        loop=loop,
    )


if __name__ == "__main__":
    main()
