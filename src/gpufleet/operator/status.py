"""What the operator writes back: a Model's and a Tenant's ``status``.

Conditions a person reads first — Ready, Progressing, Degraded, Unschedulable — each with a
reason and a message; a condition's ``lastTransitionTime`` moves only when its status does, so
an unchanged fleet produces an unchanged status and the operator writes nothing. A model whose
latest spec gpufleet refuses keeps running its last good generation and says ``InvalidSpec``
on Ready; a model the planner cannot place is not Ready, whatever its replica count.

A disaggregated model's counts and selector (the scale subresource's: ``kubectl scale``, an
HPA) are its decode pool's, the replicas that answer requests; its prefill replicas count in
its conditions (one starting is progress, one crashing a degradation).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from gpufleet.controller import ModelEntry
from gpufleet.runtime.base import Phase
from gpufleet.runtime.kubernetes.common import LABEL_MODEL, LABEL_ROLE

__all__ = ["conditions", "model_status", "stamp", "tenant_status"]

_Wanted = tuple[str, bool, str, str]


def stamp(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions(
    wanted: Sequence[_Wanted],
    previous: Mapping[str, Any] | None,
    *,
    observed_generation: int,
    now: float,
) -> list[dict[str, Any]]:
    """Conditions from (type, status, reason, message); transition times kept while a
    condition's status stays the same."""
    before = {c.get("type"): c for c in (previous or {}).get("conditions", []) or []}
    result = []
    for kind, ok, reason, message in wanted:
        status = "True" if ok else "False"
        old = before.get(kind)
        since = old["lastTransitionTime"] if old and old.get("status") == status else stamp(now)
        result.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since,
                "observedGeneration": observed_generation,
            }
        )
    return result


def model_status(
    entry: ModelEntry | None,
    *,
    name: str = "",
    observed_generation: int,
    unschedulable: str,
    previous: Mapping[str, Any] | None,
    now: float,
    invalid: str = "",
    missing: str = "",
) -> dict[str, Any]:
    """A Model's ``status``. ``entry``: what the controller runs for it (None when it runs
    nothing: a spec refused from the start); ``invalid``: why the latest spec is refused;
    ``missing``: a cluster capability the model needs and lacks (LeaderWorkerSet)."""
    replicas = entry.replicas if entry else ()
    serving = [r for r in replicas if r.role != "prefill"]
    ready = len(entry.endpoints) if entry else 0
    desired = entry.desired if entry else 0
    problem = entry.problem if entry else ""
    starting = [r for r in replicas if r.phase in (Phase.STARTING, Phase.UNREADY)]
    crashing = [r for r in replicas if r.phase in (Phase.BACKOFF, Phase.FAILED)]
    unschedulable = unschedulable or (
        problem if entry is not None and entry.problem_kind == "Unschedulable" else ""
    )
    failed = missing or (problem if entry is not None and entry.problem_kind == "Failed" else "")
    counts = f"{ready} of {desired} replicas ready"
    if invalid:
        ready_c: _Wanted = ("Ready", False, "InvalidSpec", invalid)
    elif ready > 0:
        ready_c = ("Ready", True, entry.status if entry else "Ready", counts)
    elif unschedulable:
        ready_c = ("Ready", False, "Unschedulable", f"{counts}: {unschedulable}")
    elif failed:
        ready_c = ("Ready", False, "Failed", failed)
    elif desired == 0 and entry is not None and entry.problem_kind == "OffSchedule" and problem:
        ready_c = ("Ready", True, "OffSchedule", problem)
    elif desired == 0:
        ready_c = ("Ready", True, "ScaledToZero", "scaled to zero; a request wakes it")
    else:
        ready_c = ("Ready", False, entry.status if entry else "Starting", counts)
    canary = entry.canary if entry else None
    wanted: list[_Wanted] = [
        ready_c,
        (
            "Progressing",
            bool(starting) or ready < desired or canary is not None,
            "Rollout" if canary is not None else "Scaling",
            (entry.rollout if entry else "") or _starting(starting),
        ),
        (
            "Degraded",
            bool(crashing) or bool(failed),
            "ReplicaCrashing" if crashing else ("Failed" if failed else "AsExpected"),
            crashing[0].message if crashing else failed,
        ),
        (
            "Unschedulable",
            bool(unschedulable),
            "InsufficientCapacity" if unschedulable else "Placed",
            unschedulable,
        ),
    ]
    selector = f"{LABEL_MODEL}={entry.name if entry else name}"
    if entry is not None and entry.spec.disaggregation is not None:
        selector += f",{LABEL_ROLE}=decode"
    result: dict[str, Any] = {
        "observedGeneration": observed_generation,
        "replicas": len(serving),
        "readyReplicas": ready,
        "desiredReplicas": desired,
        "selector": selector,
        "endpoints": sorted(r.url for r in (entry.endpoints if entry else ()) if r.url),
        "conditions": conditions(
            wanted, previous, observed_generation=observed_generation, now=now
        ),
    }
    if canary is not None:
        result["canary"] = {"generation": canary[0], "percent": canary[1]}
    if entry is not None and entry.spec.disaggregation is not None:
        # The prefill pool beside the decode pool (the counts above): what runs, what serves.
        pool = [r for r in replicas if r.role == "prefill"]
        result["prefill"] = {
            "replicas": len(pool),
            "readyReplicas": len(entry.prefill_endpoints),
        }
    return result


def _starting(starting: Sequence[Any]) -> str:
    """How many replicas are starting, and what holds the first one back (the scheduler's
    reason for a pod it cannot place)."""
    waiting = next((r.message for r in starting if r.message), "")
    return f"{len(starting)} starting" + (f"; {waiting}" if waiting else "")


def tenant_status(
    namespace: str,
    *,
    observed_generation: int,
    previous: Mapping[str, Any] | None,
    now: float,
    invalid: str = "",
) -> dict[str, Any]:
    """A Tenant's ``status``: its namespace, and Ready (False with the reason when refused)."""
    wanted: list[_Wanted] = [
        ("Ready", False, "InvalidSpec", invalid)
        if invalid
        else ("Ready", True, "Mirrored", f"keys, quotas and namespace {namespace} in place")
    ]
    return {
        "namespace": namespace,
        "conditions": conditions(
            wanted, previous, observed_generation=observed_generation, now=now
        ),
    }
