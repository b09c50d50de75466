"""The gateway's HTTP surface: its route table, the public handlers around the request path, and
where errors become answers.

Inference routes read the caller's key and the body (with its size limit) and hand them to
``Gateway.execute``; they are also served past Starlette by ``asgi.GatewayApp``'s fast path.
The model list answers only with the models the caller may use. ``/healthz`` is serving health
(503 while a loop following the fleet is down), ``/livez`` only says the process answers,
``/readyz`` waits for models that should have replicas. Every error leaves as an OpenAI-style
JSON body, produced by ``errors.error_response`` from the handlers below.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gpufleet.gateway import admin, batch_api, console
from gpufleet.gateway.asgi import read_body
from gpufleet.gateway.batch_runner import BatchRunner
from gpufleet.gateway.errors import ApiError, error_response
from gpufleet.gateway.openapi import openapi_document
from gpufleet.gateway.request import INFERENCE_ROUTES
from gpufleet.gateway.service import Gateway
from gpufleet.runtime import Phase

__all__ = ["EXCEPTION_HANDLERS", "Handler", "Surface", "route_table"]

Handler = Callable[[Request], Awaitable[Response]]


class Surface:
    """The gateway's own handlers (the admin and batch APIs have theirs in their modules)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._plane = gateway.plane
        self._directory = gateway.directory
        self._authenticate = gateway.admission.authenticate

    def inference(self, route: str) -> Handler:
        authenticate, execute = self._authenticate, self._gateway.execute
        refused = self._gateway.accounting.refused
        settings = self._gateway.settings
        limit, idle_s = settings.max_body_bytes, settings.body_idle_s
        stalled = self._gateway.metrics.slow_clients.labels("body").inc

        async def handler(request: Request) -> Response:
            principal = None
            try:
                principal = await authenticate(request)
                raw = await read_body(request, limit, idle_s, stalled)
            except ApiError as exc:  # no key, or no body: counted among the day's refusals
                refused(principal, "", exc.status, exc.code)
                raise
            state = request.scope["state"]
            return await execute(
                route,
                principal,
                raw,
                request.headers.get,
                state["request_id"],
                state["gateway_id"],
            )

        return handler

    async def list_models(self, request: Request) -> Response:
        principal = await self._authenticate(request)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": e.name, "object": "model", "created": e.created, "owned_by": "gpufleet"}
                    for e in self._directory.entries()
                    if principal.may_use(e.spec)
                ],
            }
        )

    async def get_model(self, request: Request) -> Response:
        principal = await self._authenticate(request)
        entry = self._gateway.resolver.entry(request.path_params["name"], principal)
        return JSONResponse(
            {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "gpufleet"}
        )

    async def healthz(self, _: Request) -> Response:
        # Serving health (the chart's readiness probe): a loop that follows the fleet is down
        # and restarting, so this gateway's view may be stale — it leaves the Service until
        # the loop is back, without a restart.
        down = self._plane.unhealthy()
        if down:
            return JSONResponse({"status": "degraded", "loops_down": down}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def livez(self, _: Request) -> Response:
        # The process answers (the liveness probe): never fails for a loop that is restarting.
        return JSONResponse({"status": "ok"})

    async def readyz(self, _: Request) -> Response:
        # A model scaled to zero is ready: its first request wakes it.
        waiting = [e.name for e in self._directory.entries() if not e.endpoints and e.desired > 0]
        down = self._plane.unhealthy()
        ok = not waiting and not down
        body: dict[str, object] = {"status": "ready" if ok else "not ready", "waiting_for": waiting}
        if down:
            body["loops_down"] = down
        return JSONResponse(body, status_code=200 if ok else 503)

    async def prometheus(self, _: Request) -> Response:
        metrics = self._gateway.metrics
        metrics.queue_depth.clear()
        for model, stats in self._gateway.queues.stats().items():
            metrics.queue_depth.labels(model).set(stats.waiting)
        metrics.replicas.clear()
        metrics.desired.clear()
        for entry in self._directory.entries():
            metrics.desired.labels(entry.name).set(entry.desired)
            for phase in Phase:
                count = sum(1 for r in entry.replicas if r.phase is phase)
                if count:
                    metrics.replicas.labels(entry.name, phase.value).set(count)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, _: Request) -> Response:
        return JSONResponse(openapi_document([e.name for e in self._directory.entries()]))


def route_table(
    gateway: Gateway, batches: BatchRunner
) -> tuple[dict[str, Handler], list[BaseRoute]]:
    """The inference handlers by path (the fast path), and every route in matching order."""
    surface = Surface(gateway)
    authenticate, plane = gateway.admission.authenticate, gateway.plane
    hot = {route: surface.inference(route) for route in INFERENCE_ROUTES}
    routes = [
        *(Route(path, handler, methods=["POST"]) for path, handler in hot.items()),
        Route("/v1/models", surface.list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", surface.get_model, methods=["GET"]),
        Route("/healthz", surface.healthz, methods=["GET"]),
        Route("/livez", surface.livez, methods=["GET"]),
        Route("/readyz", surface.readyz, methods=["GET"]),
        Route("/metrics", surface.prometheus, methods=["GET"]),
        *admin.routes(
            plane,
            authenticate,
            keyring=gateway.keyring,
            quotas=gateway.quotas,
            ledger=gateway.ledger,
            outages=gateway.outages,
        ),
        *batch_api.routes(plane.store, authenticate, INFERENCE_ROUTES, wake=batches.wake),
        Route("/openapi.json", surface.openapi, methods=["GET"]),
        *console.routes(gateway),  # last: the web console under /ui
    ]
    return hot, routes


async def _on_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _on_http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return error_response(
        ApiError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {}))
    )


async def _on_crash(_: Request, exc: Exception) -> Response:
    return error_response(
        ApiError(500, "The gateway failed to handle this request; see its log", type="server_error")
    )


#: Starlette's exception handlers: an ``ApiError`` as raised, a routing error (404, 405) in
#: the same shape, anything else a 500 that points at the log.
EXCEPTION_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
    ApiError: _on_api_error,
    HTTPException: _on_http_error,
    Exception: _on_crash,
}
