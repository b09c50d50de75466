"""GpuJob resources mirrored into the job scheduler, and its records back into their status.

A GpuJob in the operator's namespace is submitted to the scheduler (``controller.jobs``) once:
the store's row is then the job's truth — placed by the same planner as the models, an attempt
a ``batch/v1`` Job (``runtime.kubernetes.jobs``) — and each pass writes the row into the
resource's ``status`` (phase, reason, attempts, preemptions, GPU-seconds, cost). Deleting the
resource cancels the job (a running attempt gets its grace period). A resource created again
under a finished job's name (after the old one's deletion) is a new submission. A spec that
gpufleet refuses is said in the status (``Invalid``), and nothing runs for it.

The tenant is the resource's ``spec.tenant``, else ``default``; the scheduler refuses a tenant
that does not exist (the status says how to make it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from gpufleet.controller.jobs import JobError, JobScheduler
from gpufleet.errors import SpecError
from gpufleet.runtime.kubernetes.api import KubeApi
from gpufleet.runtime.kubernetes.resources import job_from_resource
from gpufleet.store import JobRecord

__all__ = ["DEFAULT_TENANT", "JobMirror", "job_status"]

log = logging.getLogger("gpufleet.operator")

DEFAULT_TENANT = "default"


def job_status(rec: JobRecord) -> dict[str, Any]:
    """What a GpuJob's ``status`` says of its row."""
    spec = rec.document.get("spec", {})
    gpus = int(spec.get("resources", {}).get("gpus", 1) or 1)
    placement = rec.placement or {}
    nodes = [placement["node"]] if placement.get("node") else []
    nodes += [str(n) for n, _ in placement.get("workers", [])]
    status: dict[str, Any] = {
        "phase": rec.phase,
        "reason": rec.reason.splitlines()[0][:1024] if rec.reason else "",
        "message": rec.reason[:4096],
        "attempts": rec.attempt,
        "failures": rec.failures,
        "preemptions": rec.preemptions,
        "gpuSeconds": round(rec.gpu_seconds, 3),
        "costUsd": round(rec.cost_usd, 6),
        "runSeconds": round(rec.gpu_seconds / gpus, 3),
        "nodes": nodes,
    }
    if rec.started_at is not None:
        status["startTime"] = _stamp(rec.started_at)
    if rec.finished_at is not None:
        status["completionTime"] = _stamp(rec.finished_at)
    return status


class JobMirror:
    def __init__(
        self,
        api: KubeApi,
        scheduler: JobScheduler,
        namespace: str,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.api = api
        self.scheduler = scheduler
        self.namespace = namespace
        self.clock = clock
        self.writes = 0
        #: Why a resource was not submitted, by name: (its resourceVersion, phase, message),
        #: said in its status; submitted again once the resource changes.
        self._refused: dict[str, tuple[str, str, str]] = {}

    async def sync(self) -> None:
        self.writes = 0
        store = self.scheduler.store
        resources = await self.api.list("GpuJob", self.namespace)
        present: set[str] = set()
        for obj in resources:
            meta = obj["metadata"]
            name = str(meta["name"])
            present.add(name)
            if meta.get("deletionTimestamp"):
                continue
            rec = await asyncio.to_thread(store.job, name)
            created = _parse(meta.get("creationTimestamp"))
            fresh = rec is None or (
                not rec.active and created is not None and created > rec.submitted_at
            )
            refused = self._refused.get(name)
            if fresh and (refused is None or refused[0] != str(meta.get("resourceVersion"))):
                await self._submit(obj)
            await self._write_status(obj, await asyncio.to_thread(store.job, name))
        for rec in await asyncio.to_thread(store.jobs, phases=("Queued", "Running", "Preempting")):
            if rec.name not in present:  # (a Cancelling one is already on its way)
                log.info("GpuJob %s was deleted: cancelling it", rec.name)
                try:
                    await self.scheduler.cancel(rec.name)
                except JobError as exc:
                    log.info("GpuJob %s: %s", rec.name, exc)

    async def _submit(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        name, version = str(meta["name"]), str(meta.get("resourceVersion"))
        try:
            job = job_from_resource(obj)
            await self.scheduler.submit(job, job.spec.tenant or DEFAULT_TENANT)
        except SpecError as exc:
            self._refused[name] = (version, "Invalid", "; ".join(exc.problems))
        except JobError as exc:
            self._refused[name] = (version, "Refused", str(exc))
        else:
            self._refused.pop(name, None)

    async def _write_status(self, obj: dict[str, Any], rec: JobRecord | None) -> None:
        name = str(obj["metadata"]["name"])
        refused = self._refused.get(name)
        if refused is not None and (rec is None or not rec.active):
            _, phase, message = refused
            status: dict[str, Any] = {"phase": phase, "reason": phase, "message": message}
        elif rec is not None:
            status = job_status(rec)
        else:
            return
        previous = obj.get("status") or {}
        if all(previous.get(k) == v for k, v in status.items()):
            return
        self.writes += 1
        await self.api.patch_status("GpuJob", self.namespace, name, status)


def _parse(value: Any) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _stamp(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
