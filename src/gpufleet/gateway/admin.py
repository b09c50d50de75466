"""The admin API (``/admin/v1``) the CLI and the web console talk to: models (apply, scale,
delete), replicas (list, restart), logs, events (role ``operator``); tenants and API keys
(role ``admin``); usage, the cost report and the GPUs (``operator``); GPU jobs
(``jobs_api``, ``operator``).

Applying is all-or-nothing: every document is validated before any is stored, so a bad file
changes nothing. Embedded mode serves the ``default`` namespace only. A ``user`` key gets 403
on every route here.

The store's routes answer OpenAI's shape of ``503 store_unavailable`` with Retry-After while the
store cannot be reached (a ``StoreError``), and the outage is reported once, not per request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gpufleet.controller import ControlPlane, ModelEntry
from gpufleet.errors import GpufleetError, SpecError, StoreError
from gpufleet.gateway.auth import ROLES, Keyring, Principal, forbidden
from gpufleet.gateway.cost_report import build_report, per_token_models, report_view
from gpufleet.gateway.errors import ApiError, bad_request, quota_store_unavailable
from gpufleet.gateway.gpus_report import build_history, gpus_view, resolution_of
from gpufleet.gateway.jobs_api import job_routes
from gpufleet.gateway.latency_report import MAX_POINTS, build_latency, default_step
from gpufleet.gateway.ledger import Ledger
from gpufleet.gateway.quotas import Quotas, QuotaStoreUnavailable
from gpufleet.gateway.validate import parse_body
from gpufleet.outages import OutageReporter
from gpufleet.policies.quota_rules import limits_of
from gpufleet.runtime import Replica
from gpufleet.spec import API_VERSION, LimitsSpec, Model, Tenant, parse_document, parse_tenant
from gpufleet.store import KeyRecord

Authenticate = Callable[[Request], Awaitable[Principal]]
Handler = Callable[[Request], Awaitable[Response]]
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")

__all__ = ["key_view", "replica_view", "routes"]


def replica_view(r: Replica) -> dict[str, Any]:
    return {
        "id": r.id,
        "model": r.model,
        "generation": r.generation,
        # A disaggregated model's pool: "prefill" or "decode"; "" otherwise.
        "role": r.role,
        "phase": r.phase.value,
        "url": r.url,
        "pid": r.pid,
        "restarts": r.restarts,
        "message": r.message,
        "started_at": r.started_at,
        "ready_at": r.ready_at,
        # Start-up by phase, seconds or null (gpufleet.runtime.startup), and the weights'
        # bytes fetched of how many where the source tells them.
        "fetch_s": r.fetch_s,
        "load_s": r.load_s,
        "ready_s": r.ready_s,
        "startup_s": r.startup_s,
        "fetched_bytes": r.fetched_bytes,
        "weights_bytes": r.weights_bytes,
    }


def model_view(e: ModelEntry) -> dict[str, Any]:
    return {
        "name": e.name,
        "generation": e.generation,
        "engine": e.spec.engine,
        # An external model has no weights: where it is served from instead.
        "source": e.spec.source or ", ".join(x.url for x in e.spec.endpoints),
        "status": e.status,
        "ready": len(e.endpoints),
        "desired": e.desired,
        "problem": e.problem,
        "rollout": e.rollout,
        "replicas": [replica_view(r) for r in e.replicas],
    }


def _not_found(name: str, kind: str = "model", *, param: str = "name") -> ApiError:
    code = {"model": "model_not_found", "tenant": "tenant_not_found", "API key": "key_not_found"}
    return ApiError(
        404, f"{kind} '{name}' not found", type="not_found", param=param, code=code[kind]
    )


def key_view(k: KeyRecord) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    state = "active"
    if k.revoked_at is not None:
        state = "revoked"
    elif k.expires_at is not None and k.expires_at <= now:
        state = "expired"
    return {
        "prefix": k.prefix,
        "name": k.name,
        "tenant": k.tenant,
        "role": k.role,
        "state": state,
        "limits": k.limits,
        "created_at": k.created_at.isoformat(),
        "expires_at": k.expires_at.isoformat() if k.expires_at else None,
        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
    }


def _since(value: str | None, now: dt.datetime | None = None) -> dt.datetime:
    """``--since``: an ISO date or time, or a span back from now such as ``24h``, ``7d``."""
    now = now or dt.datetime.now(dt.UTC)
    if not value:
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    match = re.fullmatch(r"(\d+)([mhd])", value)
    if match:
        n, unit = int(match.group(1)), match.group(2)
        unit_name = {"m": "minutes", "h": "hours", "d": "days"}[unit]
        return now - dt.timedelta(**{unit_name: n})
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise bad_request(
            f"'since' must be an ISO date/time (2026-11-01, 2026-11-01T08:00) or a span such as "
            f"30m, 24h, 7d (got {value!r})",
            param="since",
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


#: Seconds a client is asked to wait while the store is down.
STORE_RETRY_AFTER_S = 5


def store_unavailable() -> ApiError:
    return ApiError(
        503,
        "The store cannot be reached right now; retry shortly",
        type="service_unavailable",
        code="store_unavailable",
        headers={"retry-after": str(STORE_RETRY_AFTER_S)},
    )


def routes(
    controller: ControlPlane,
    authenticate: Authenticate,
    *,
    keyring: Keyring | None = None,
    quotas: Quotas | None = None,
    ledger: Ledger | None = None,
    outages: OutageReporter | None = None,
) -> list[Route]:
    directory = controller.directory
    runtime = controller.runtime
    store = controller.store
    reporter = outages or OutageReporter()

    def guarded(role: str, handler: Handler, *, uses_store: bool = True) -> Handler:
        async def run(request: Request) -> Response:
            try:
                principal = await authenticate(request)
                allowed = principal.is_admin if role == "admin" else principal.is_operator
                if not allowed:
                    raise forbidden(role)
                response = await handler(request)
            except StoreError as exc:
                reporter.failed("store", exc, affected="admin API (503)")
                raise store_unavailable() from exc
            if uses_store:
                reporter.recovered("store")
            return response

        run.__name__ = handler.__name__
        return run

    def need_keyring() -> Keyring:
        if keyring is None:
            raise ApiError(
                409,
                "Authentication is disabled on this server (--no-auth): there are no keys to "
                "manage; restart it without --no-auth",
                code="auth_disabled",
            )
        return keyring

    # -- tenants ----------------------------------------------------------------------------

    def tenant_view(t: Tenant) -> dict[str, Any]:
        return {"name": t.name, **t.document()["spec"]}

    async def list_tenants(_: Request) -> Response:
        rows = await asyncio.to_thread(store.list_tenants)
        return JSONResponse({"tenants": [tenant_view(r.tenant) for r in rows]})

    async def apply_tenant(request: Request) -> Response:
        data = parse_body(await request.body())
        doc = data.get("document", data)
        if isinstance(doc, dict):
            doc = {"apiVersion": API_VERSION, "kind": "Tenant", **doc}
        try:
            tenant = parse_tenant(doc)
        except SpecError as exc:
            raise ApiError(
                400, "; ".join(exc.problems), param="document", code="invalid_spec"
            ) from exc
        result = await asyncio.to_thread(store.apply_tenant, tenant)
        if keyring is not None:
            await asyncio.to_thread(keyring.load)
        return JSONResponse({"name": tenant.name, "result": result, "tenant": tenant_view(tenant)})

    async def delete_tenant(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "default":
            raise bad_request(
                "The tenant 'default' holds the admin key and cannot be deleted", param="name"
            )
        if not await asyncio.to_thread(store.delete_tenant, name):
            raise _not_found(name, "tenant")
        if keyring is not None:
            await asyncio.to_thread(keyring.load)
        return JSONResponse({"deleted": name})

    async def tenant_usage(request: Request) -> Response:
        """Current use of a tenant's quotas against its limits."""
        name = request.path_params["name"]
        stored = {r.tenant.name: r.tenant for r in await asyncio.to_thread(store.list_tenants)}
        tenant = stored.get(name)
        if tenant is None:
            raise _not_found(name, "tenant")
        limits = limits_of(tenant.spec.limits)
        try:
            used = await quotas.snapshot(f"tenant:{name}", limits) if quotas else {}
        except QuotaStoreUnavailable as exc:
            reporter.failed("redis", exc, affected="admission: requests refused with 503")
            raise quota_store_unavailable("The tenant's use cannot be read") from exc
        return JSONResponse(
            {"tenant": name, "limits": tenant.document()["spec"]["limits"], "used": used}
        )

    # -- keys -------------------------------------------------------------------------------

    async def list_keys(request: Request) -> Response:
        tenant = request.query_params.get("tenant")
        rows = await asyncio.to_thread(store.list_keys, tenant=tenant)
        return JSONResponse({"keys": [key_view(k) for k in rows]})

    async def create_key(request: Request) -> Response:
        ring = need_keyring()
        data = parse_body(await request.body())
        tenant = data.get("tenant", "default")
        if not isinstance(tenant, str) or ring.tenant(tenant) is None:
            await asyncio.to_thread(ring.load)
            if not isinstance(tenant, str) or ring.tenant(tenant) is None:
                raise bad_request(
                    f"tenant {tenant!r} does not exist; create it first with "
                    "'gpufleet tenants create NAME'",
                    param="tenant",
                    code="tenant_not_found",
                )
        role = data.get("role", "user")
        if role not in ROLES:
            raise bad_request(
                f"'role' must be one of {', '.join(ROLES)} (got {role!r})", param="role"
            )
        name = data.get("name", "key")
        if not isinstance(name, str) or not _NAME.match(name) or len(name) > 63:
            raise bad_request(
                "'name' must be lower-case letters, digits, '-' or '.', at most 63 characters",
                param="name",
            )
        limits = data.get("limits")
        if limits is not None:
            try:
                limits = LimitsSpec.model_validate(limits).model_dump(
                    by_alias=True, mode="json", exclude_none=True
                )
            except ValueError as exc:
                raise bad_request(
                    f"'limits' is not valid: {exc}".splitlines()[0], param="limits"
                ) from exc
        expires_at = None
        expires = data.get("expires_in_days")
        if expires is not None:
            if (
                isinstance(expires, bool)
                or not isinstance(expires, (int, float))
                or not 0 < expires <= 3650
            ):
                raise bad_request(
                    "'expires_in_days' must be a number of days between 0 and 3650",
                    param="expires_in_days",
                )
            expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(days=float(expires))
        secret, record = await asyncio.to_thread(
            ring.create_key, tenant, name=name, role=role, limits=limits, expires_at=expires_at
        )
        return JSONResponse({"key": secret, **key_view(record)}, status_code=201)

    async def revoke_key(request: Request) -> Response:
        prefix = request.path_params["prefix"]
        record = await asyncio.to_thread(store.revoke_key, prefix)
        if record is None:
            raise _not_found(prefix, "API key", param="prefix")
        if keyring is not None:
            await asyncio.to_thread(keyring.load)
        return JSONResponse(key_view(record))

    # -- usage ------------------------------------------------------------------------------

    async def usage_report(request: Request) -> Response:
        by_param = request.query_params.get("by", "tenant")
        if by_param not in ("tenant", "model", "key"):
            raise bad_request("'by' must be tenant, model or key", param="by")
        by: Literal["tenant", "model", "key"] = by_param  # type: ignore[assignment]
        since = _since(request.query_params.get("since"))
        if ledger is not None:
            await ledger.flush()  # what was just served is in the report
        tenant = request.query_params.get("tenant")
        rows = await asyncio.to_thread(store.usage_report, by, since=since, tenant=tenant)
        # Requests refused before an engine had them: counted per day (whole days from since's).
        refusals = await asyncio.to_thread(store.refusal_report, by, since=since, tenant=tenant)
        return JSONResponse(
            {"by": by, "since": since.isoformat(), "usage": rows, "refusals": refusals}
        )

    async def cost(request: Request) -> Response:
        """The cost report: placed, busy and idle cost per model, tenant or key, and the cost
        of one successful request (``policies.costs`` says how each is counted)."""
        by = request.query_params.get("by", "model")
        if by not in ("tenant", "model", "key"):
            raise bad_request("'by' must be model, tenant or key", param="by")
        now = dt.datetime.now(dt.UTC)
        since = _since(request.query_params.get("since") or "7d", now)
        until_text = request.query_params.get("until")
        until = _since(until_text, now) if until_text else now
        if until <= since:
            raise bad_request(
                f"'until' ({until.isoformat()}) must be after 'since' ({since.isoformat()})",
                param="until",
            )
        if ledger is not None:
            await ledger.flush()
        inventory_of = getattr(controller, "inventory", None)  # the cluster's reads the store
        inventory = await asyncio.to_thread(inventory_of) if callable(inventory_of) else None
        # The models served now: one deleted within the window is counted as GPU-priced.
        per_token = per_token_models((e.name, e.spec) for e in directory.entries())
        report = await build_report(
            store,
            by,  # type: ignore[arg-type]
            since,
            until,
            inventory,
            per_token,
        )
        return JSONResponse(report_view(report, inventory_known=inventory is not None))

    async def latency(request: Request) -> Response:
        """P50/P95/P99 of TTFT, inter-token latency and end-to-end, and tokens/s, of one
        model over a window, with a series for charts (``step`` seconds a point)."""
        name = request.path_params["name"]
        until = dt.datetime.now(dt.UTC)
        since = _since(request.query_params.get("since") or "1h", until)
        seconds = (until - since).total_seconds()
        if seconds <= 0:
            raise bad_request("'since' must be in the past", param="since")
        step_text = request.query_params.get("step")
        try:
            step = float(step_text) if step_text else default_step(seconds)
        except ValueError as exc:
            raise bad_request("'step' must be a number of seconds", param="step") from exc
        if not step > 0 or seconds / step > MAX_POINTS:
            raise bad_request(
                f"'step' must be positive and give at most {MAX_POINTS} points over the window "
                f"(at least {math.ceil(seconds / MAX_POINTS)} s here)",
                param="step",
            )
        if ledger is not None:
            await ledger.flush()
        return JSONResponse(await build_latency(store, name, since, until, step))

    async def gpus(request: Request) -> Response:
        """Every GPU and MIG instance now, who holds it, and which are idle."""
        return JSONResponse(gpus_view(request.app.state.telemetry))

    async def gpu_history(request: Request) -> Response:
        """A window of GPU history for charts, of one device, model or node if asked."""
        query = request.query_params
        until = dt.datetime.now(dt.UTC)
        since = _since(query.get("since") or "1h", until)
        if query.get("until"):
            until = _since(query["until"], until)
        if until <= since:
            raise bad_request("'since' must be before 'until' (and in the past)", param="since")
        resolution = resolution_of(query.get("resolution"), (until - since).total_seconds())
        if resolution is None:
            raise bad_request("'resolution' must be 2s or 1m", param="resolution")
        body = await build_history(
            store,
            since.timestamp(),
            until.timestamp(),
            resolution,
            device=query.get("device") or None,
            model=query.get("model") or None,
            node=query.get("node") or None,
        )
        return JSONResponse({"since": since.isoformat(), "until": until.isoformat(), **body})

    async def usage_requests(request: Request) -> Response:
        since = _since(request.query_params.get("since"))
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError as exc:
            raise bad_request("'limit' must be an integer", param="limit") from exc
        if ledger is not None:
            await ledger.flush()
        rows = await asyncio.to_thread(
            store.usage_rows,
            since=since,
            tenant=request.query_params.get("tenant"),
            limit=max(1, min(limit, 10_000)),
        )
        return JSONResponse({"requests": [{**r.values(), "at": r.at.isoformat()} for r in rows]})

    async def list_models(_: Request) -> Response:
        return JSONResponse({"models": [model_view(e) for e in directory.entries()]})

    async def apply_models(request: Request) -> Response:
        data = parse_body(await request.body())
        documents = data.get("documents")
        if not isinstance(documents, list) or not documents:
            raise bad_request(
                "'documents' must be a non-empty array of resources", param="documents"
            )
        problems: list[str] = []
        models: list[Model] = []
        for i, doc in enumerate(documents, start=1):
            try:
                model = parse_document(doc)
            except SpecError as exc:
                problems += [f"document {i}: {p}" for p in exc.problems]
                continue
            if model.metadata.namespace != "default":
                problems.append(
                    f"document {i}: metadata.namespace {model.metadata.namespace!r}: embedded mode "
                    "serves namespace 'default' only; remove the field"
                )
            models.append(model)
        if problems:
            raise ApiError(400, "; ".join(problems), param="documents", code="invalid_spec")
        results = await controller.apply(models)
        return JSONResponse(
            {"results": [{"name": n, "result": r, "generation": g} for n, r, g in results]}
        )

    async def get_model(request: Request) -> Response:
        entry = directory.get(request.path_params["name"])
        if entry is None:
            raise _not_found(request.path_params["name"])
        return JSONResponse(model_view(entry))

    async def delete_model(request: Request) -> Response:
        name = request.path_params["name"]
        if not await controller.delete(name):
            raise _not_found(name)
        return JSONResponse({"deleted": name})

    async def scale_model(request: Request) -> Response:
        """Set a model's replica bounds (``min``/``max``, or ``replicas`` for both) and apply
        the changed spec as ``gpufleet apply`` does: same validation, same controller path."""
        name = request.path_params["name"]
        entry = directory.get(name)
        if entry is None:
            raise _not_found(name)
        data = parse_body(await request.body())
        bounds = entry.spec.replicas.model_dump(by_alias=True)
        if "replicas" in data:
            bounds = {"min": data["replicas"], "max": data["replicas"]}
        bounds.update({k: data[k] for k in ("min", "max") if k in data})
        doc = Model(api_version=API_VERSION, metadata={"name": name}, spec=entry.spec).document()
        doc["spec"]["replicas"] = bounds
        try:
            model = parse_document(doc)
        except SpecError as exc:
            raise ApiError(
                400, "; ".join(exc.problems), param="replicas", code="invalid_spec"
            ) from exc
        ((_, result, generation),) = await controller.apply([model])
        return JSONResponse(
            {"name": name, "result": result, "generation": generation, "replicas": bounds}
        )

    async def restart_replica(request: Request) -> Response:
        """Stop one replica; the controller starts another in its place."""
        rid = request.path_params["id"]
        replica = next((r for r in runtime.replicas() if r.id == rid), None)
        if replica is None:
            raise ApiError(
                404,
                f"replica '{rid}' not found",
                type="not_found",
                param="id",
                code="replica_not_found",
            )
        try:
            await runtime.stop(rid)
        except GpufleetError as exc:
            raise ApiError(
                409, f"replica '{rid}' cannot be restarted here: {exc}", code="restart_failed"
            ) from exc
        await asyncio.to_thread(
            store.add_event,
            replica.model,
            "ReplicaRestarted",
            f"replica {rid} stopped on request; the controller starts another",
        )
        return JSONResponse({"restarted": rid, "model": replica.model})

    async def list_replicas(request: Request) -> Response:
        model = request.query_params.get("model")
        return JSONResponse({"replicas": [replica_view(r) for r in runtime.replicas(model)]})

    async def logs(request: Request) -> Response:
        name = request.path_params["name"]
        entry = directory.get(name)
        replicas = runtime.replicas(name)
        if entry is None and not replicas:
            raise _not_found(name)
        try:
            tail = int(request.query_params.get("tail", "200"))
        except ValueError as exc:
            raise bad_request("'tail' must be an integer", param="tail") from exc
        parts = []
        for replica in replicas:
            try:
                text = await runtime.logs(replica.id, tail=tail)
            except GpufleetError as exc:  # one replica's logs unavailable: say so, keep the rest
                text = f"(no logs: {exc})"
            parts.append(f"==> replica {replica.id} ({replica.phase.value}) <==\n{text}\n")
        return PlainTextResponse("".join(parts) or f"model '{name}' has no replicas\n")

    async def events(request: Request) -> Response:
        model = request.query_params.get("model")
        rows = await asyncio.to_thread(controller.store.events, model)
        return JSONResponse(
            {
                "events": [
                    {
                        "at": e.at.isoformat(),
                        "model": e.model,
                        "type": e.type,
                        "reason": e.reason,
                        "message": e.message,
                    }
                    for e in rows
                ]
            }
        )

    op, ad = "operator", "admin"
    return [
        Route("/admin/v1/models", guarded(op, list_models, uses_store=False), methods=["GET"]),
        Route("/admin/v1/models", guarded(op, apply_models), methods=["POST"]),
        Route("/admin/v1/models/{name}", guarded(op, get_model, uses_store=False), methods=["GET"]),
        Route("/admin/v1/models/{name}", guarded(op, delete_model), methods=["DELETE"]),
        Route("/admin/v1/models/{name}/logs", guarded(op, logs, uses_store=False), methods=["GET"]),
        Route("/admin/v1/models/{name}/latency", guarded(op, latency), methods=["GET"]),
        Route("/admin/v1/models/{name}/scale", guarded(op, scale_model), methods=["POST"]),
        Route("/admin/v1/replicas", guarded(op, list_replicas, uses_store=False), methods=["GET"]),
        Route("/admin/v1/replicas/{id}/restart", guarded(op, restart_replica), methods=["POST"]),
        Route("/admin/v1/events", guarded(op, events), methods=["GET"]),
        Route("/admin/v1/tenants", guarded(ad, list_tenants), methods=["GET"]),
        Route("/admin/v1/tenants", guarded(ad, apply_tenant), methods=["POST"]),
        Route("/admin/v1/tenants/{name}", guarded(ad, delete_tenant), methods=["DELETE"]),
        Route("/admin/v1/tenants/{name}/quota", guarded(ad, tenant_usage), methods=["GET"]),
        Route("/admin/v1/keys", guarded(ad, list_keys), methods=["GET"]),
        Route("/admin/v1/keys", guarded(ad, create_key), methods=["POST"]),
        Route("/admin/v1/keys/{prefix}", guarded(ad, revoke_key), methods=["DELETE"]),
        Route("/admin/v1/usage", guarded(op, usage_report), methods=["GET"]),
        Route("/admin/v1/usage/requests", guarded(op, usage_requests), methods=["GET"]),
        Route("/admin/v1/report", guarded(op, cost), methods=["GET"]),
        Route("/admin/v1/gpus", guarded(op, gpus, uses_store=False), methods=["GET"]),
        Route("/admin/v1/gpus/history", guarded(op, gpu_history), methods=["GET"]),
        *job_routes(controller, guarded, authenticate),
    ]
