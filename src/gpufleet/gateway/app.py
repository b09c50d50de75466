"""The gateway's ASGI application: the OpenAI API, health, metrics and the admin API.

Starlette without FastAPI's dependency injection on the hot path, and pure ASGI middleware
(``BaseHTTPMiddleware`` buffers and costs a task per request). Bodies are read with a size limit
before any parsing; validation names the offending field; the model is looked up in the
controller's in-memory directory; the proxy streams the engine's answer back unbuffered.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpufleet.controller import Controller, Directory, ModelEntry
from gpufleet.gateway import admin
from gpufleet.gateway.errors import (
    ApiError,
    bad_request,
    error_response,
    model_not_found,
    no_replica,
)
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.prefix_hints import RedisPrefixHints
from gpufleet.gateway.proxy import Upstream
from gpufleet.gateway.validate import check_chat, check_completion, check_embeddings, parse_body
from gpufleet.routing import choose_split, features_of
from gpufleet.runtime import Phase

__all__ = ["GatewaySettings", "build_app"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    max_body_bytes: int = 8 * 1024 * 1024
    #: How long a request waits for a replica of a model that has none ready (starting, or
    #: scaled to zero) before it is answered 503 with Retry-After. Never unbounded.
    hold_s: float = 60.0
    #: Seeds the draws of canary splits without a stickiness key (tests fix it).
    seed: int | None = None
    #: Redis shared by gateway replicas for prefix hints (None: each gateway routes alone).
    redis_url: str | None = None


class RequestIdMiddleware:
    """Give every request an id (the client's ``x-request-id`` when it is sane) and echo it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID.match(candidate):
                    rid = candidate
                break
        if not rid:
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than this gateway accepts ({limit} bytes); "
        "send a smaller request or raise --max-body-bytes",
        code="request_too_large",
    )


def _renamed(data: dict[str, Any], model: str) -> bytes:
    """The request body addressed to another deployment (engines check the model name)."""
    return json.dumps({**data, "model": model}).encode()


def build_app(
    controller: Controller,
    *,
    settings: GatewaySettings | None = None,
    metrics: GatewayMetrics | None = None,
) -> Starlette:
    settings = settings or GatewaySettings()
    metrics = metrics or GatewayMetrics()
    directory: Directory = controller.directory
    hints = RedisPrefixHints(settings.redis_url) if settings.redis_url else None
    upstream = Upstream(metrics, hints=hints)
    split_random = random.Random(settings.seed)
    limit = settings.max_body_bytes

    def inference(
        route: str, check: Callable[[dict[str, Any]], str], *, embeddings: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            raw = await read_body(request, limit)
            data = parse_body(raw)
            name = check(data)
            entry = directory.get(name)
            if entry is None:
                raise model_not_found(name)
            if embeddings and not entry.spec.embeddings:
                raise bad_request(
                    f"The model '{name}' does not serve embeddings (its spec has "
                    "'embeddings: false'); use a model with 'spec.embeddings: true'",
                    param="model",
                    code="model_not_supported",
                )
            session = request.headers.get(entry.spec.routing.session_header)
            chain = _chain(entry, session)
            features = features_of(data, session)
            for i, target in enumerate(chain):
                last = i == len(chain) - 1
                if not target.endpoints and not target.problem:
                    if not last:
                        continue  # a fallback is ready now: no need to wait for this one
                    target = await hold(target.name)
                body = raw if target.name == name else _renamed(data, target.name)
                try:
                    response = await upstream.forward(
                        target,
                        route,
                        body,
                        stream=data.get("stream") is True,
                        request_id=request.scope["state"]["request_id"],
                        features=features,
                    )
                except ApiError as exc:
                    if last or exc.status not in (502, 503):
                        raise
                    metrics.fallbacks.labels(name, chain[i + 1].name).inc()
                    continue
                response.headers["x-gpufleet-model"] = target.name
                return response
            raise AssertionError("unreachable: the last model of a chain answers or raises")

        return handler

    def _chain(entry: ModelEntry, session: str | None) -> list[ModelEntry]:
        """The deployment the split picks, then the fallbacks that exist, in order."""
        routing = entry.spec.routing
        first = entry
        if routing.split:
            splits = [(t.model, t.weight) for t in routing.split]
            chosen = choose_split(entry.name, splits, session, split_random)
            first = directory.get(chosen) or entry
            metrics.split.labels(entry.name, first.name).inc()
        chain = [first]
        for name in routing.fallbacks:
            fallback = directory.get(name)
            if fallback is not None and fallback.name not in {c.name for c in chain}:
                chain.append(fallback)
        return chain

    async def hold(name: str) -> ModelEntry:
        """Wait, within the bound, for a ready replica; ask the controller for one meanwhile."""
        controller.trigger(name)
        deadline = time.monotonic() + settings.hold_s
        metrics.held.labels(name).inc()
        while True:
            entry = directory.get(name)
            if entry is None:
                raise model_not_found(name)
            if entry.endpoints or entry.problem:
                return entry
            if time.monotonic() >= deadline:
                raise no_replica(
                    name, f"none became ready within {settings.hold_s:g} s", retry_after=5
                )
            await asyncio.sleep(0.05)

    async def list_models(_: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": e.name, "object": "model", "created": e.created, "owned_by": "gpufleet"}
                    for e in directory.entries()
                ],
            }
        )

    async def get_model(request: Request) -> Response:
        name = request.path_params["name"]
        entry = directory.get(name)
        if entry is None:
            raise model_not_found(name)
        return JSONResponse(
            {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "gpufleet"}
        )

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        waiting = [e.name for e in directory.entries() if not e.endpoints]
        body = {"status": "ready" if not waiting else "not ready", "waiting_for": waiting}
        return JSONResponse(body, status_code=200 if not waiting else 503)

    async def prometheus(_: Request) -> Response:
        metrics.replicas.clear()
        for entry in directory.entries():
            for phase in Phase:
                count = sum(1 for r in entry.replicas if r.phase is phase)
                if count:
                    metrics.replicas.labels(entry.name, phase.value).set(count)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def on_api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(
            ApiError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {}))
        )

    async def on_crash(_: Request, exc: Exception) -> Response:
        return error_response(
            ApiError(
                500, "The gateway failed to handle this request; see its log", type="server_error"
            )
        )

    routes = [
        Route(
            "/v1/chat/completions", inference("/v1/chat/completions", check_chat), methods=["POST"]
        ),
        Route("/v1/completions", inference("/v1/completions", check_completion), methods=["POST"]),
        Route(
            "/v1/embeddings",
            inference("/v1/embeddings", check_embeddings, embeddings=True),
            methods=["POST"],
        ),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", get_model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        *admin.routes(controller),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: on_api_error,
            HTTPException: on_http_error,
            Exception: on_crash,
        },
    )
    app.state.started = time.time()
    app.state.upstream = upstream
    app.add_middleware(RequestIdMiddleware)
    return app
