"""The admin API's GPU jobs (``/admin/v1/jobs``, role ``operator``): submit, list, get, logs,
cancel — what ``gpufleet jobs`` calls.

Submitting is all-or-nothing as applying models is: every document is validated before any is
queued. A job runs for the tenant its ``spec.tenant`` names, else the caller's. Jobs are run by
``gpufleet up``'s scheduler (``controller.jobs``); a control plane without one (the gateway on
Kubernetes, in this version) answers 501 with what to do instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gpufleet.controller import ControlPlane
from gpufleet.controller.jobs import JobError, JobScheduler
from gpufleet.errors import SpecError
from gpufleet.gateway.auth import Principal
from gpufleet.gateway.errors import ApiError, bad_request
from gpufleet.gateway.validate import parse_body
from gpufleet.spec import GpuJob, parse_job
from gpufleet.store import JobRecord

__all__ = ["job_routes", "job_view"]

Handler = Callable[[Request], Awaitable[Response]]
Guard = Callable[[str, Handler], Handler]


def job_view(rec: JobRecord) -> dict[str, Any]:
    spec = rec.document.get("spec", {})
    return {
        "name": rec.name,
        "tenant": rec.tenant,
        "phase": rec.phase,
        "reason": rec.reason,
        "attempt": rec.attempt,
        "failures": rec.failures,
        "preemptions": rec.preemptions,
        "gpus": spec.get("resources", {}).get("gpus"),
        "priorityClass": spec.get("priorityClass"),
        "placement": rec.placement,
        "gpu_seconds": rec.gpu_seconds,
        "cost_usd": rec.cost_usd,
        "submitted_at": rec.submitted_at.isoformat(),
        "started_at": rec.started_at.isoformat() if rec.started_at else None,
        "finished_at": rec.finished_at.isoformat() if rec.finished_at else None,
        "spec": spec,
    }


def _not_found(name: str) -> ApiError:
    return ApiError(
        404, f"job '{name}' not found", type="not_found", param="name", code="job_not_found"
    )


def job_routes(
    controller: ControlPlane,
    guarded: Guard,
    principal_of: Callable[[Request], Awaitable[Principal]],
) -> list[Route]:
    store = controller.store

    def scheduler() -> JobScheduler:
        jobs = getattr(controller, "jobs", None)
        if not isinstance(jobs, JobScheduler):
            raise ApiError(
                501,
                "GPU jobs run under 'gpufleet up' in this version; this gateway has no job "
                "scheduler",
                type="not_implemented",
                code="jobs_unavailable",
            )
        return jobs

    async def submit(request: Request) -> Response:
        jobs = scheduler()
        data = parse_body(await request.body())
        documents = data.get("documents")
        if not isinstance(documents, list) or not documents:
            raise bad_request("'documents' must be a non-empty array of GpuJob resources",
                              param="documents")  # fmt: skip
        problems: list[str] = []
        parsed: list[GpuJob] = []
        for i, doc in enumerate(documents, start=1):
            try:
                parsed.append(parse_job(doc))
            except SpecError as exc:
                problems += [f"document {i}: {p}" for p in exc.problems]
        names = [j.name for j in parsed]
        problems += [f"job {n!r} is given twice" for n in sorted(set(names)) if names.count(n) > 1]
        if problems:
            raise ApiError(400, "; ".join(problems), param="documents", code="invalid_spec")
        principal = await principal_of(request)
        results = []
        for job in parsed:
            try:
                rec = await jobs.submit(job, principal.tenant)
            except JobError as exc:
                raise ApiError(409, str(exc), param="documents", code="job_refused") from None
            results.append(job_view(rec))
        return JSONResponse({"jobs": results})

    async def list_jobs(request: Request) -> Response:
        rows = await asyncio.to_thread(store.jobs, tenant=request.query_params.get("tenant"))
        return JSONResponse({"jobs": [job_view(r) for r in rows]})

    async def get_job(request: Request) -> Response:
        rec = await asyncio.to_thread(store.job, request.path_params["name"])
        if rec is None:
            raise _not_found(request.path_params["name"])
        return JSONResponse(job_view(rec))

    async def logs(request: Request) -> Response:
        name = request.path_params["name"]
        rec = await asyncio.to_thread(store.job, name)
        if rec is None:
            raise _not_found(name)
        try:
            tail = int(request.query_params.get("tail", "200"))
            attempt = int(request.query_params.get("attempt", str(rec.attempt)))
        except ValueError as exc:
            raise bad_request("'tail' and 'attempt' must be integers", param="tail") from exc
        if rec.attempt == 0:
            return PlainTextResponse(f"job '{name}' has not started yet ({rec.reason})\n")
        if not 1 <= attempt <= rec.attempt:
            raise bad_request(f"job '{name}' has attempts 1 to {rec.attempt}", param="attempt")
        lines = await scheduler().runner.logs(name, attempt, tail=max(1, min(tail, 10_000)))
        head = f"==> job {name} attempt {attempt} of {rec.attempt} ({rec.phase}) <==\n"
        return PlainTextResponse(head + "".join(line + "\n" for line in lines))

    async def cancel(request: Request) -> Response:
        try:
            rec = await scheduler().cancel(request.path_params["name"])
        except JobError as exc:
            if "no job" in str(exc):
                raise _not_found(request.path_params["name"]) from None
            raise ApiError(409, str(exc), param="name", code="job_finished") from None
        return JSONResponse(job_view(rec))

    op = "operator"
    return [
        Route("/admin/v1/jobs", guarded(op, list_jobs), methods=["GET"]),
        Route("/admin/v1/jobs", guarded(op, submit), methods=["POST"]),
        Route("/admin/v1/jobs/{name}", guarded(op, get_job), methods=["GET"]),
        Route("/admin/v1/jobs/{name}/logs", guarded(op, logs), methods=["GET"]),
        Route("/admin/v1/jobs/{name}/cancel", guarded(op, cancel), methods=["POST"]),
    ]
