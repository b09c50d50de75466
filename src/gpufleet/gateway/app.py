"""The gateway's ASGI application: the OpenAI API, health, metrics and the admin API.

Starlette without FastAPI's dependency injection on the hot path, and pure ASGI middleware
(``BaseHTTPMiddleware`` buffers and costs a task per request). Bodies are read with a size limit
before any parsing; validation names the offending field; the model is looked up in the
controller's in-memory directory; the proxy streams the engine's answer back unbuffered.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpufleet.controller import ControlPlane, Directory, ModelEntry
from gpufleet.gateway import admin, batch_api
from gpufleet.gateway.asgi import Gateway, read_body
from gpufleet.gateway.auth import ANONYMOUS, Keyring, Principal
from gpufleet.gateway.batch_runner import BatchRunner
from gpufleet.gateway.demand import DemandMeter
from gpufleet.gateway.errors import (
    ApiError,
    bad_request,
    error_response,
    model_not_found,
    no_replica,
)
from gpufleet.gateway.fairqueue import AdmissionQueues, QueueRejected
from gpufleet.gateway.ledger import Ledger
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.openapi import openapi_document
from gpufleet.gateway.prefix_hints import RedisPrefixHints
from gpufleet.gateway.pricing import Pricing
from gpufleet.gateway.proxy import Outcome, Upstream
from gpufleet.gateway.quotas import (
    Demand,
    LocalQuotas,
    QuotaExceeded,
    Quotas,
    QuotaStoreUnavailable,
    Ticket,
)
from gpufleet.gateway.validate import check_chat, check_completion, check_embeddings, parse_body
from gpufleet.routing import CostOption, choose_split, features_of, rank_by_cost
from gpufleet.runtime import Phase
from gpufleet.store import UsageRow

__all__ = ["GatewaySettings", "build_app"]

log = logging.getLogger("gpufleet.gateway")


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
    #: Requests one replica gets from this gateway at once; more wait in the model's fair
    #: queue (priority first, then weighted fair share between tenants).
    slots_per_replica: int = 64
    queue_max_length: int = 1000
    queue_max_wait_s: float = 30.0
    #: Output tokens reserved for a request without max_tokens (capped by the context left).
    default_max_tokens: int = 4096
    #: Batch lines this gateway keeps in flight at once (they queue behind interactive ones).
    batch_concurrency: int = 16
    #: The only gateway (``gpufleet up``): resume batches a previous process had claimed
    #: without waiting for its claims to expire.
    batch_take_over: bool = False


class _Series:
    """One (model, tenant, route)'s metric children, looked up once."""

    def __init__(self, metrics: GatewayMetrics, model: str, tenant: str, route: str) -> None:
        self._metrics, self._key = metrics, (model, tenant, route)
        self._requests: dict[int, Any] = {}
        self.duration = metrics.duration.labels(model, tenant, route)
        self.ttft = metrics.ttft.labels(model, tenant)
        self.prompt = metrics.tokens.labels(model, tenant, "prompt")
        self.completion = metrics.tokens.labels(model, tenant, "completion")
        self.cached = metrics.tokens.labels(model, tenant, "cached")
        self.cost = metrics.cost.labels(model, tenant)

    def requests(self, status: int) -> Any:
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = self._metrics.requests.labels(*self._key, str(status))
        return child


#: The inference routes: how each body is checked, and whether it asks for embeddings.
_ROUTES: dict[str, tuple[Callable[[dict[str, Any]], str], bool]] = {
    "/v1/chat/completions": (check_chat, False),
    "/v1/completions": (check_completion, False),
    "/v1/embeddings": (check_embeddings, True),
}


def _nothing() -> None:
    pass


def _renamed(data: dict[str, Any], model: str) -> bytes:
    """The request body addressed to another deployment (engines check the model name)."""
    return json.dumps({**data, "model": model}).encode()


def build_app(
    controller: ControlPlane,
    *,
    settings: GatewaySettings | None = None,
    metrics: GatewayMetrics | None = None,
    keyring: Keyring | None = None,
    quotas: Quotas | None = None,
    ledger: Ledger | None = None,
) -> Gateway:
    """The gateway. Without a ``keyring`` every caller is an admin of the default tenant (the
    explicit ``--no-auth`` mode); without ``ledger`` no usage rows are written."""
    settings = settings or GatewaySettings()
    metrics = metrics or GatewayMetrics()
    quotas = quotas or LocalQuotas()
    local = quotas if isinstance(quotas, LocalQuotas) else None
    directory: Directory = controller.directory
    hints = RedisPrefixHints(settings.redis_url) if settings.redis_url else None
    upstream = Upstream(metrics, hints=hints)
    pricing = Pricing()
    split_random = random.Random(settings.seed)
    limit = settings.max_body_bytes
    background: set[asyncio.Task[Any]] = set()
    #: Metric children by (model, tenant, route): ``labels()`` costs microseconds each time.
    series: dict[tuple[str, str, str], _Series] = {}

    def capacity(name: str) -> int:
        entry = directory.get(name)
        if entry is None:
            return 0
        per_replica = entry.spec.routing.max_in_flight_per_replica or settings.slots_per_replica
        return len(entry.endpoints) * per_replica

    queues = AdmissionQueues(
        capacity, max_length=settings.queue_max_length, max_wait_s=settings.queue_max_wait_s
    )
    demand = DemandMeter(directory, queues, upstream)

    def engine_error(model: str, replica_id: str, status: int) -> None:
        entry = directory.get(model)
        if entry is not None and entry.canary is not None:
            demand.outcome(model, replica_id, status, None)

    upstream.on_engine_error = engine_error
    controller.attach_demand(demand)

    async def authenticate(request: Request) -> Principal:
        if keyring is None:
            return ANONYMOUS
        try:
            return await keyring.authenticate(request.headers.get("authorization"))
        except ApiError:
            metrics.rejections.labels("", "unauthorized").inc()
            raise

    def inference(route: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            principal = await authenticate(request)
            raw = await read_body(request, limit)
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

    async def execute(
        route: str,
        principal: Principal,
        raw: bytes,
        header: Callable[[str], str | None],
        request_id: str,
        gateway_id: str,
    ) -> Response:
        """One inference request of ``principal`` on ``route``, from validation to the answer:
        the HTTP routes and the batch runner (``x-gpufleet-priority: batch``) both go here."""
        check, embeddings = _ROUTES[route]
        data = parse_body(raw)
        name = check(data)
        entry = directory.get(name)
        if entry is None or not principal.may_use(entry.spec):
            raise model_not_found(name)  # a private model is not even said to exist
        demand.arrived(name)
        if embeddings and not entry.spec.embeddings:
            raise bad_request(
                f"The model '{name}' does not serve embeddings (its spec has "
                "'embeddings: false'); use a model with 'spec.embeddings: true'",
                param="model",
                code="model_not_supported",
            )
        session = header(entry.spec.routing.session_header)
        chain = _chain(entry, _split_key(entry, principal, session))
        features = features_of(data, session)
        stream = data.get("stream") is True
        strip_usage = False
        if stream and not embeddings:
            # Ask the engine for usage so the ledger counts real tokens; the extra event is
            # taken out again unless the client asked for it.
            options = data.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                extra = options if isinstance(options, dict) else {}
                data = {**data, "stream_options": {**extra, "include_usage": True}}
                raw = json.dumps(data).encode()
                strip_usage = True
        output = data.get("max_tokens") or data.get("max_completion_tokens")
        if not isinstance(output, int) or embeddings:
            room = entry.spec.context_length - features.prompt_tokens
            output = 0 if embeddings else max(1, min(settings.default_max_tokens, room))
        tokens = features.prompt_tokens + output
        priority = principal.priority
        if header("x-gpufleet-priority") == "batch":
            priority = max(priority, 1)  # a caller may lower its priority, never raise it
        ticket = await admit(principal, gateway_id, entry, tokens)
        answered = False
        try:
            for i, target in enumerate(chain):
                last = i == len(chain) - 1
                if not target.endpoints and not target.problem:
                    if not last:
                        continue  # a fallback is ready now: no need to wait for this one
                    target = await hold(target.name)
                    queues.get(target.name).poke()
                body = raw if target.name == name else _renamed(data, target.name)
                release = await take_slot(target, principal, priority, tokens)
                done = _finisher(
                    principal,
                    ticket,
                    target,
                    route,
                    (gateway_id, request_id if request_id != gateway_id else None),
                    features.prompt_tokens,
                    release,
                )
                try:
                    response = await upstream.forward(
                        target,
                        route,
                        body,
                        stream=stream,
                        request_id=request_id,
                        features=features,
                        tenant=principal.tenant,
                        weight=float(tokens),
                        strip_usage=strip_usage,
                        done=done,
                    )
                except ApiError as exc:
                    release()
                    if last or exc.status not in (502, 503):
                        raise
                    metrics.fallbacks.labels(name, chain[i + 1].name).inc()
                    continue
                except BaseException:
                    release()  # cancelled (a batch runner stopping): give the slot back
                    raise
                answered = True
                response.headers["x-gpufleet-model"] = target.name
                return response
            raise AssertionError("unreachable: the last model of a chain answers or raises")
        except ApiError as exc:
            metrics.requests.labels(name, principal.tenant, route, str(exc.status)).inc()
            raise
        finally:
            if not answered:
                settle(ticket, 0, 0.0)

    async def take_slot(
        target: ModelEntry, principal: Principal, priority: int, tokens: int
    ) -> Callable[[], None]:
        """A place among the requests in flight to ``target`` (waiting in its fair queue when
        all are taken); returns how to give it back. A model without ready replicas skips the
        queue: the proxy answers it at once with the reason."""
        if not target.endpoints:
            return _nothing
        queue = queues.get(target.name)
        try:
            slot = await queue.acquire(
                principal.tenant, priority=priority, weight=principal.weight, cost=float(tokens)
            )
        except QueueRejected as exc:
            reason = f"queue_{exc.reason}"
            metrics.rejections.labels(principal.tenant, reason).inc()
            full = exc.reason == "full"
            raise ApiError(
                429 if full else 503,
                str(exc),
                type="rate_limit_error" if full else "service_unavailable",
                code=reason,
                headers={"retry-after": str(max(1, round(exc.retry_after_s)))},
            ) from exc
        metrics.queue_wait.labels(target.name, principal.tenant).observe(slot.waited_s)
        return functools.partial(queue.release, slot)

    async def admit(
        principal: Principal, request_id: str, entry: ModelEntry, tokens: int
    ) -> Ticket:
        demand = Demand(tokens=tokens, cost_usd=pricing.estimate(entry, tokens))
        try:
            return await quotas.admit(request_id, principal.scopes(), demand)
        except QuotaExceeded as exc:
            metrics.rejections.labels(principal.tenant, exc.limit).inc()
            raise ApiError(
                429,
                str(exc),
                type="rate_limit_error" if exc.limit != "budget" else "insufficient_quota",
                code=f"{exc.limit}_limit_exceeded" if exc.limit != "budget" else "budget_exceeded",
                headers={"retry-after": str(max(1, int(exc.retry_after_s + 0.999)))},
            ) from exc
        except QuotaStoreUnavailable as exc:
            log.error("quota store unavailable: %s", exc)
            raise ApiError(
                503,
                "Quotas cannot be checked right now (the shared quota store is unreachable); "
                "retry shortly",
                type="service_unavailable",
                code="quota_store_unavailable",
                headers={"retry-after": "2"},
            ) from exc

    def settle(ticket: Ticket, tokens: int, cost: float) -> None:
        """Replace the reservation by what the request used: inline in process, else in a
        task of its own (the answer is not held for Redis)."""
        if local is not None:
            local.settle_now(ticket, tokens=tokens, cost_usd=cost)
        else:
            _spawn(settle_shared(ticket, tokens, cost))

    async def settle_shared(ticket: Ticket, tokens: int, cost: float) -> None:
        try:
            await quotas.settle(ticket, tokens=tokens, cost_usd=cost)
        except QuotaStoreUnavailable as exc:
            log.warning("cannot settle quota of request %s: %s", ticket.request_id, exc)

    def _spawn(coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    def _finisher(
        principal: Principal,
        ticket: Ticket,
        entry: ModelEntry,
        route: str,
        ids: tuple[str, str | None],
        prompt_estimate: int,
        release: Callable[[], None],
    ) -> Callable[[Outcome], None]:
        def done(outcome: Outcome) -> None:
            release()
            model, tenant = entry.name, principal.tenant
            prompt = outcome.prompt_tokens if outcome.counted else prompt_estimate
            completion = outcome.completion_tokens
            cost = outcome.replica_seconds * pricing.per_second(entry)
            pricing.observe(entry, outcome.replica_seconds, prompt + completion)
            settle(ticket, prompt + completion, cost)
            m = series.get((model, tenant, route))
            if m is None:
                m = series[(model, tenant, route)] = _Series(metrics, model, tenant, route)
            m.requests(outcome.status).inc()
            m.duration.observe(outcome.duration_s)
            if outcome.ttft_s is not None:
                m.ttft.observe(outcome.ttft_s)
                demand.first_token(model, outcome.ttft_s)
            if entry.canary is not None:
                demand.outcome(model, outcome.replica, outcome.status, outcome.ttft_s)
            m.prompt.inc(prompt)
            m.completion.inc(completion)
            if outcome.cached_tokens:
                m.cached.inc(outcome.cached_tokens)
            if cost:
                m.cost.inc(cost)
            if ledger is not None:
                ledger.record(
                    UsageRow(
                        request_id=ids[0],
                        client_request_id=ids[1],
                        at=dt.datetime.now(dt.UTC),
                        tenant=tenant,
                        key_prefix=principal.key_prefix,
                        model=model,
                        replica=outcome.replica,
                        route=route.removeprefix("/v1/"),
                        status=outcome.status,
                        prompt_tokens=prompt,
                        cached_tokens=outcome.cached_tokens,
                        completion_tokens=completion,
                        ttft_ms=outcome.ttft_s * 1000 if outcome.ttft_s is not None else None,
                        duration_ms=outcome.duration_s * 1000,
                        gpu_seconds=outcome.replica_seconds * entry.spec.resources.gpus,
                        cost_usd=cost,
                    )
                )

        return done

    def _split_key(entry: ModelEntry, principal: Principal, session: str | None) -> str | None:
        """What keeps this caller on one side of the model's split (None: draw at random)."""
        by = entry.spec.routing.split_by
        if by == "tenant":
            return f"tenant:{principal.tenant}"
        if by == "key":
            return f"key:{principal.key_prefix}"
        return session if by == "session" else None

    def has_room(entry: ModelEntry) -> bool:
        """Ready replicas and a free slot now: a request there would not wait in the queue."""
        if not entry.endpoints:
            return False
        stats = queues.get(entry.name).stats()
        return stats.waiting == 0 and stats.in_flight < capacity(entry.name)

    def _chain(entry: ModelEntry, sticky: str | None) -> list[ModelEntry]:
        """The deployment the split picks, then the fallbacks that exist, in order."""
        routing = entry.spec.routing
        first = entry
        if routing.split:
            splits = [(t.model, t.weight) for t in routing.split]
            chosen = choose_split(entry.name, splits, sticky, split_random)
            first = directory.get(chosen) or entry
            metrics.split.labels(entry.name, first.name).inc()
        chain = [first]
        cost = first.spec.routing.cost
        if cost is not None:
            options = {first.name: first}
            for name in cost.alternatives:
                alternative = directory.get(name)
                if alternative is not None:
                    options[alternative.name] = alternative
            order = rank_by_cost(
                [
                    CostOption(
                        e.name,
                        pricing.per_token(e),
                        demand.recent_ttft_p90(e.name),
                        has_room(e),
                    )
                    for e in options.values()
                ],
                cost.ttft_objective,
            )
            chain = [options[n] for n in order]
        for name in routing.fallbacks:
            fallback = directory.get(name)
            if fallback is not None and fallback.name not in {c.name for c in chain}:
                chain.append(fallback)
        return chain

    async def hold(name: str) -> ModelEntry:
        """Wait, within the bound, for a ready replica; ask the controller for one meanwhile."""
        deadline = time.monotonic() + settings.hold_s
        metrics.held.labels(name).inc()
        demand.hold(name, 1)
        try:
            await controller.wake(name)
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
        finally:
            demand.hold(name, -1)

    async def list_models(request: Request) -> Response:
        principal = await authenticate(request)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": e.name, "object": "model", "created": e.created, "owned_by": "gpufleet"}
                    for e in directory.entries()
                    if principal.may_use(e.spec)
                ],
            }
        )

    async def get_model(request: Request) -> Response:
        principal = await authenticate(request)
        name = request.path_params["name"]
        entry = directory.get(name)
        if entry is None or not principal.may_use(entry.spec):
            raise model_not_found(name)
        return JSONResponse(
            {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "gpufleet"}
        )

    async def healthz(_: Request) -> Response:
        # Serving health (the chart's readiness probe): a loop that follows the fleet is down
        # and restarting, so this gateway's view may be stale — it leaves the Service until
        # the loop is back, without a restart.
        down = controller.unhealthy()
        if down:
            return JSONResponse({"status": "degraded", "loops_down": down}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def livez(_: Request) -> Response:
        # The process answers (the liveness probe): never fails for a loop that is restarting.
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        # A model scaled to zero is ready: its first request wakes it.
        waiting = [e.name for e in directory.entries() if not e.endpoints and e.desired > 0]
        down = controller.unhealthy()
        ok = not waiting and not down
        body: dict[str, object] = {"status": "ready" if ok else "not ready", "waiting_for": waiting}
        if down:
            body["loops_down"] = down
        return JSONResponse(body, status_code=200 if ok else 503)

    async def prometheus(_: Request) -> Response:
        metrics.queue_depth.clear()
        for model, stats in queues.stats().items():
            metrics.queue_depth.labels(model).set(stats.waiting)
        metrics.replicas.clear()
        metrics.desired.clear()
        for entry in directory.entries():
            metrics.desired.labels(entry.name).set(entry.desired)
            for phase in Phase:
                count = sum(1 for r in entry.replicas if r.phase is phase)
                if count:
                    metrics.replicas.labels(entry.name, phase.value).set(count)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(_: Request) -> Response:
        return JSONResponse(openapi_document([e.name for e in directory.entries()]))

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

    def principal_for(prefix: str) -> Principal | None:
        return keyring.principal_for(prefix) if keyring is not None else ANONYMOUS

    batches = BatchRunner(
        controller.store,
        execute,
        principal_for,
        gateway_id=f"gw-{secrets.token_hex(6)}",
        concurrency=settings.batch_concurrency,
        take_over=settings.batch_take_over,
    )

    hot = {route: inference(route) for route in _ROUTES}
    routes = [
        *(Route(path, handler, methods=["POST"]) for path, handler in hot.items()),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{name:path}", get_model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/livez", livez, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        *admin.routes(controller, authenticate, keyring=keyring, quotas=quotas, ledger=ledger),
        *batch_api.routes(controller.store, authenticate, _ROUTES, wake=batches.wake),
        Route("/openapi.json", openapi, methods=["GET"]),
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
    app.state.queues = queues
    app.state.demand = demand
    app.state.quotas = quotas
    app.state.execute = execute
    app.state.batches = batches

    async def close() -> None:
        await batches.close()
        if background:
            await asyncio.gather(*background, return_exceptions=True)

    app.state.close = close
    return Gateway(app, hot)
