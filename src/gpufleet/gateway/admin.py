"""The admin API (``/admin/v1``) the CLI talks to: apply, list, delete models; replicas; logs.

Applying is all-or-nothing: every document is validated before any is stored, so a bad file
changes nothing. Embedded mode serves the ``default`` namespace only; tenancy and keys (which
will guard these routes) arrive with the gateway's auth.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gpufleet.controller import Controller, ModelEntry
from gpufleet.errors import SpecError
from gpufleet.gateway.errors import ApiError, bad_request
from gpufleet.gateway.validate import parse_body
from gpufleet.runtime import Replica
from gpufleet.spec import Model, parse_document

__all__ = ["replica_view", "routes"]


def replica_view(r: Replica) -> dict[str, Any]:
    return {
        "id": r.id,
        "model": r.model,
        "generation": r.generation,
        "phase": r.phase.value,
        "url": r.url,
        "pid": r.pid,
        "restarts": r.restarts,
        "message": r.message,
        "started_at": r.started_at,
        "ready_at": r.ready_at,
    }


def model_view(e: ModelEntry) -> dict[str, Any]:
    return {
        "name": e.name,
        "generation": e.generation,
        "engine": e.spec.engine,
        "source": e.spec.source,
        "status": e.status,
        "ready": len(e.endpoints),
        "desired": max(e.spec.replicas.min, 1),
        "problem": e.problem,
        "replicas": [replica_view(r) for r in e.replicas],
    }


def _not_found(name: str) -> ApiError:
    return ApiError(
        404, f"model '{name}' not found", type="not_found", param="name", code="model_not_found"
    )


def routes(controller: Controller) -> list[Route]:
    directory = controller.directory
    runtime = controller.runtime

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
            text = await runtime.logs(replica.id, tail=tail)
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

    return [
        Route("/admin/v1/models", list_models, methods=["GET"]),
        Route("/admin/v1/models", apply_models, methods=["POST"]),
        Route("/admin/v1/models/{name}", get_model, methods=["GET"]),
        Route("/admin/v1/models/{name}", delete_model, methods=["DELETE"]),
        Route("/admin/v1/models/{name}/logs", logs, methods=["GET"]),
        Route("/admin/v1/replicas", list_replicas, methods=["GET"]),
        Route("/admin/v1/events", events, methods=["GET"]),
    ]
