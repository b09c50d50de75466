"""The Kubernetes operator: Model custom resources in, the controller in the middle, status out.

One operator at a time acts (leader election on a ``coordination.k8s.io`` Lease: the holder
renews it every few seconds; another replica takes over once it has not been renewed for
``lease_s``). The leader mirrors the Model resources of its namespace into the controller —
``kubectl apply`` of a Model is ``gpufleet apply`` — and writes back each Model's status:
replica counts, endpoints and the conditions a person reads first (Ready, Progressing,
Degraded, Unschedulable with the planner's reason). Status is patched only when it changed,
so a steady fleet makes no writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpufleet.controller import Autoscaler, Controller, Directory, ModelEntry, PlannerCapacity
from gpufleet.controller.capacity import size_model
from gpufleet.errors import GpufleetError, SpecError
from gpufleet.gateway.shared_demand import RedisDemand
from gpufleet.planner import Deployment, Placement, PlanSettings, ReplicaKey, plan
from gpufleet.runtime import ReplicaRequest
from gpufleet.runtime.base import Phase
from gpufleet.runtime.kubernetes import (
    EngineGroup,
    KubernetesRuntime,
    RenderSettings,
    inventory_from_nodes,
)
from gpufleet.runtime.kubernetes.api import Conflict, KubeApi
from gpufleet.runtime.kubernetes.manifests import (
    LABEL_MODEL,
    model_disruption_budget,
    model_service,
    tenant_objects,
)
from gpufleet.runtime.kubernetes.resources import model_from_resource, tenant_from_resource
from gpufleet.spec import Inventory, Model, ModelSpec
from gpufleet.store import Store

__all__ = [
    "CLUSTER_PLANNING",
    "WAKE_ANNOTATION",
    "ClusterPlacer",
    "LeaderElection",
    "Operator",
    "OperatorConfig",
    "model_status",
    "run_operator",
]

#: Set by a gateway (gpufleet.cluster) on a Model it holds a request for.
WAKE_ANNOTATION = "gpufleet.io/wake-at"

log = logging.getLogger("gpufleet.operator")


def _stamp(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def model_status(
    entry: ModelEntry,
    *,
    observed_generation: int,
    unschedulable: str,
    previous: Mapping[str, Any] | None,
    now: float,
) -> dict[str, Any]:
    """A Model's ``status``: counts, endpoints, conditions (transition times kept while the
    condition's status stays the same)."""
    ready = len(entry.endpoints)
    starting = [r for r in entry.replicas if r.phase in (Phase.STARTING, Phase.UNREADY)]
    crashing = [r for r in entry.replicas if r.phase in (Phase.BACKOFF, Phase.FAILED)]
    wanted: list[tuple[str, bool, str, str]] = [
        (
            "Ready",
            ready > 0 or entry.desired == 0,
            entry.status,
            f"{ready} of {entry.desired} replicas ready"
            + (" (scaled to zero; a request wakes it)" if entry.desired == 0 else ""),
        ),
        (
            "Progressing",
            bool(starting) or ready < entry.desired or entry.canary is not None,
            "Rollout" if entry.canary is not None else "Scaling",
            entry.rollout or f"{len(starting)} starting",
        ),
        (
            "Degraded",
            bool(crashing) or bool(entry.problem and not unschedulable),
            "ReplicaCrashing" if crashing else ("Failed" if entry.problem else "AsExpected"),
            crashing[0].message if crashing else entry.problem,
        ),
        (
            "Unschedulable",
            bool(unschedulable),
            "InsufficientCapacity" if unschedulable else "Placed",
            unschedulable,
        ),
    ]
    before = {c["type"]: c for c in (previous or {}).get("conditions", [])}
    conditions = []
    for kind, ok, reason, message in wanted:
        status = "True" if ok else "False"
        old = before.get(kind)
        since = old["lastTransitionTime"] if old and old.get("status") == status else _stamp(now)
        conditions.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since,
                "observedGeneration": observed_generation,
            }
        )
    result: dict[str, Any] = {
        "observedGeneration": observed_generation,
        "replicas": len(entry.replicas),
        "readyReplicas": ready,
        "desiredReplicas": entry.desired,
        "selector": f"{LABEL_MODEL}={entry.name}",
        "endpoints": sorted(r.url for r in entry.endpoints if r.url),
        "conditions": conditions,
    }
    if entry.canary is not None:
        result["canary"] = {"generation": entry.canary[0], "percent": entry.canary[1]}
    return result


class LeaderElection:
    """A Lease held by one identity at a time, renewed while it lives."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        identity: str,
        *,
        name: str = "gpufleet-operator",
        lease_s: float = 15.0,
        clock: Callable[[], float],
    ) -> None:
        self.api, self.namespace, self.identity, self.name = api, namespace, identity, name
        self.lease_s = lease_s
        self.clock = clock

    async def try_acquire(self) -> bool:
        """Take or renew the lease; True while this identity holds it."""
        now = self.clock()
        lease = await self.api.get("Lease", self.namespace, self.name)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_s),
            "renewTime": _micro(now),
        }
        if lease is None:
            try:
                await self.api.create(
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": {**spec, "acquireTime": _micro(now)},
                    }
                )
            except FileExistsError:
                return False
            return True
        held = lease.get("spec", {})
        renewed = _parse_micro(held.get("renewTime"))
        expired = renewed is None or now - renewed > float(
            held.get("leaseDurationSeconds", self.lease_s)
        )
        if held.get("holderIdentity") != self.identity and not expired:
            return False
        if held.get("holderIdentity") != self.identity:
            spec["acquireTime"] = _micro(now)
            log.info("taking over the operator lease from %s", held.get("holderIdentity"))
        lease["spec"] = {**held, **spec}
        try:
            await self.api.replace(lease)
        except Conflict:
            return False  # someone else renewed or took it in between
        return True


def _micro(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_micro(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return (
            dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()
        )
    except ValueError:
        return None


class Operator:
    def __init__(
        self,
        api: KubeApi,
        controller: Controller,
        namespace: str,
        election: LeaderElection,
        *,
        interval_s: float = 2.0,
        settings: RenderSettings | None = None,
    ) -> None:
        self.api = api
        self.controller = controller
        self.namespace = namespace
        self.election = election
        self.interval_s = interval_s
        self.settings = settings or RenderSettings(namespace=namespace)
        self.leading = False
        self._generations: dict[str, int] = {}
        self._woken: dict[str, str] = {}

    async def step(self) -> None:
        """One pass: hold the lease, mirror the Models, write their status."""
        self.leading = await self.election.try_acquire()
        if not self.leading:
            return
        await self.sync_tenants()
        resources = await self.api.list("Model", self.namespace)
        await self.sync_models(resources)
        await self.publish_status(resources)

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:
                log.exception("operator pass failed; trying again")
            await asyncio.sleep(self.interval_s)

    async def sync_models(self, resources: list[dict[str, Any]]) -> None:
        wanted: list[Model] = []
        for obj in resources:
            name = obj["metadata"]["name"]
            try:
                wanted.append(model_from_resource(obj))
            except SpecError as exc:
                # The CRD schema admits it but the spec does not (a rule across fields).
                await self.api.patch_status(
                    "Model",
                    self.namespace,
                    name,
                    {"conditions": [_invalid(exc, obj)]},
                )
                continue
            self._generations[name] = int(obj["metadata"].get("generation", 1))
        if wanted:
            await self.controller.apply(wanted)
        # A Service in front of each model's engines, and a disruption budget when it may run
        # more than one replica.
        fronts: dict[tuple[str, str, str], dict[str, Any]] = {}
        for model in wanted:
            children = [model_service(model, self.settings)]
            if model.spec.replicas.max > 1:
                children.append(model_disruption_budget(model, self.settings))
            for child in children:
                fronts[(child["kind"], self.namespace, child["metadata"]["name"])] = child
        await self._ensure(fronts, ("Service", "PodDisruptionBudget"), self.namespace, LABEL_MODEL)
        for obj in resources:
            # A gateway holding a request for a model with no ready replica stamps it.
            stamp = (obj["metadata"].get("annotations") or {}).get(WAKE_ANNOTATION)
            name = obj["metadata"]["name"]
            if stamp and stamp != self._woken.get(name):
                self._woken[name] = stamp
                await self.controller.wake(name)
        present = {m.name for m in wanted} | {o["metadata"]["name"] for o in resources}
        for entry in self.controller.directory.entries():
            if entry.name not in present:
                await self.controller.delete(entry.name)
                self._generations.pop(entry.name, None)

    async def sync_tenants(self) -> None:
        """Tenant resources into the store (keys, quotas) and into the cluster: each tenant's
        namespace, GPU quota, network policies and RBAC, created or corrected; those of a
        tenant that is gone are deleted."""
        wanted: dict[tuple[str, str, str], dict[str, Any]] = {}
        for obj in await self.api.list("Tenant", None):
            try:
                tenant = tenant_from_resource(obj)
            except SpecError as exc:
                log.warning("tenant %s is invalid: %s", obj["metadata"]["name"], exc)
                continue
            await asyncio.to_thread(self.controller.store.apply_tenant, tenant)
            for child in tenant_objects(tenant, self.settings):
                meta = child["metadata"]
                wanted[(child["kind"], meta.get("namespace", ""), meta["name"])] = child
        await self._ensure(wanted, _TENANT_KINDS, None, "gpufleet.io/tenant")

    async def _ensure(
        self,
        wanted: Mapping[tuple[str, str, str], dict[str, Any]],
        kinds: tuple[str, ...],
        namespace: str | None,
        owner_label: str,
    ) -> None:
        """Make the objects in ``wanted`` exist as written; delete the managed ones of
        ``kinds`` carrying ``owner_label`` that are not wanted any more. One list per kind
        reads what is there (no read per object: this runs every pass)."""
        managed = {"app.kubernetes.io/managed-by": "gpufleet"}
        existing: dict[tuple[str, str, str], dict[str, Any]] = {}
        for kind in kinds:
            for obj in await self.api.list(kind, namespace, managed):
                meta = obj["metadata"]
                existing[(kind, meta.get("namespace", ""), meta["name"])] = obj
        for key, child in sorted(wanted.items()):
            have = existing.get(key)
            if have is None:
                try:
                    await self.api.create(child)
                    continue
                except FileExistsError:  # there, but not labelled as ours: take it over
                    have = await self.api.get(*key)
                    if have is None:
                        continue
            if _differs(child, have):
                fresh = {**have, **{k: v for k, v in child.items() if k != "metadata"}}
                fresh["metadata"] = {**have["metadata"], "labels": child["metadata"]["labels"]}
                with contextlib.suppress(Conflict):  # changed meanwhile: corrected next pass
                    await self.api.replace(fresh)
        for key, obj in existing.items():
            if owner_label in obj["metadata"].get("labels", {}) and key not in wanted:
                await self.api.delete(*key)

    async def publish_status(self, resources: list[dict[str, Any]]) -> None:
        """Each Model's status, written where it changed (``resources``: as listed this pass)."""
        now = self.election.clock()
        listed = {obj["metadata"]["name"]: obj for obj in resources}
        for entry in self.controller.directory.entries():
            obj = listed.get(entry.name)
            if obj is None:
                continue
            previous = obj.get("status") or {}
            status = model_status(
                entry,
                observed_generation=self._generations.get(entry.name, 1),
                unschedulable=self.controller.autoscaler.unschedulable.get(entry.name, ""),
                previous=previous,
                now=now,
            )
            if status != previous:
                await self.api.patch_status("Model", self.namespace, entry.name, status)


#: What a tenant owns in the cluster, deleted with it (its namespace last).
_TENANT_KINDS = ("RoleBinding", "Role", "NetworkPolicy", "ResourceQuota", "Namespace")


def _differs(want: Mapping[str, Any], have: Mapping[str, Any]) -> bool:
    """Whether what gpufleet manages in an object (labels, spec, rules, roleRef, subjects)
    differs from what is there; fields the cluster adds are ignored."""
    if want["metadata"].get("labels") != have.get("metadata", {}).get("labels"):
        return True
    return any(want.get(k) != have.get(k) for k in want if k not in ("metadata", "status"))


def _invalid(exc: SpecError, obj: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "Ready",
        "status": "False",
        "reason": "InvalidSpec",
        "message": "; ".join(exc.problems),
        "lastTransitionTime": _stamp(dt.datetime.now(dt.UTC).timestamp()),
        "observedGeneration": int(obj["metadata"].get("generation", 1)),
    }


#: On Kubernetes a whole GPU goes to one pod unless the node time-slices it (or it is split
#: into MIG instances): the planner must not share it by memory.
CLUSTER_PLANNING = PlanSettings(max_replicas_per_gpu=1, defragment=False, optimise_max_replicas=0)


class ClusterPlacer:
    """Where a new replica goes: the planner's answer on the cluster's inventory, planned
    around the replicas already running (their placements are kept on their pods)."""

    def __init__(
        self,
        inventory: Callable[[], Inventory],
        directory: Directory,
        runtime: KubernetesRuntime,
        *,
        size: Callable[[str, ModelSpec], Deployment | None] = size_model,
    ) -> None:
        self._inventory = inventory
        self._directory = directory
        self._runtime = runtime
        self._size = size

    def __call__(self, request: ReplicaRequest) -> EngineGroup:
        fallback = EngineGroup("main", 1, gpus=request.spec.resources.gpus)
        try:
            mine = self._size(request.model, request.spec)
        except (GpufleetError, OSError, ValueError):
            mine = None
        if mine is None:
            return fallback
        current: list[Placement] = []
        for text in self._runtime.placements().values():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                current.append(_placement_from_json(text))
        counts = Counter(p.replica.deployment for p in current)
        used = {p.replica.index for p in current if p.replica.deployment == request.model}
        index = next(i for i in range(len(used) + 1) if i not in used)
        top = max(max(used, default=-1), index)
        deployments = {request.model: dataclasses.replace(mine, replicas=top + 1)}
        for entry in self._directory.entries():
            if entry.name == request.model or not counts.get(entry.name):
                continue
            try:
                dep = self._size(entry.name, entry.spec)
            except (GpufleetError, OSError, ValueError):
                dep = None
            if dep is not None:
                top = max(p.replica.index for p in current if p.replica.deployment == entry.name)
                deployments[entry.name] = dataclasses.replace(dep, replicas=top + 1)
        known = [p for p in current if p.replica.deployment in deployments]
        result = plan(
            self._inventory(), deployments.values(), current=known, settings=CLUSTER_PLANNING
        )
        key = ReplicaKey(request.model, index)
        chosen = next((p for p in result.placements if p.replica == key), None)
        if chosen is None:
            return fallback
        return EngineGroup(
            f"{chosen.node}",
            1,
            node=chosen.node,
            gpu_type=chosen.gpu_type,
            gpus=len(chosen.gpus),
            memory_fraction=chosen.memory_fraction
            if chosen.gpus and not chosen.mig_profile
            else None,
            mig_profile=chosen.mig_profile,
            placement=json.dumps(dataclasses.asdict(chosen), sort_keys=True),
        )


def _placement_from_json(text: str) -> Placement:
    data = json.loads(text)
    data["replica"] = ReplicaKey(**data["replica"])
    data["gpus"] = tuple(data["gpus"])
    return Placement(**data)


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str
    store_url: str
    identity: str = ""
    interval_s: float = 2.0
    #: How often the node inventory (the planner's view of the cluster) is read again.
    inventory_s: float = 30.0
    #: Redis the gateways publish their demand to (None: replicas stay as the specs say).
    redis_url: str | None = None


async def run_operator(cfg: OperatorConfig, api: KubeApi) -> None:
    """The operator process: store, runtime on pods, controller, the Model loop; until SIGTERM."""
    identity = cfg.identity or f"{socket.gethostname()}-{int(time.time())}"
    store = await asyncio.to_thread(Store.open, cfg.store_url)
    capacity = PlannerCapacity(
        inventory_from_nodes(await api.list("Node", None), await api.list("Pod", None)),
        settings=CLUSTER_PLANNING,
    )
    runtime = KubernetesRuntime(api, RenderSettings(namespace=cfg.namespace))
    controller = Controller(store, runtime, autoscaler=Autoscaler(store, capacity=capacity))
    runtime.set_placer(ClusterPlacer(lambda: capacity.inventory, controller.directory, runtime))
    demand = None
    if cfg.redis_url is not None:
        demand = RedisDemand(
            cfg.redis_url, lambda: [e.name for e in controller.directory.entries()]
        )
        controller.attach_demand(demand)
        demand.start()
    election = LeaderElection(api, cfg.namespace, identity, clock=time.time)
    operator = Operator(api, controller, cfg.namespace, election, interval_s=cfg.interval_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def refresh_inventory() -> None:
        while True:
            await asyncio.sleep(cfg.inventory_s)
            try:
                capacity.set_inventory(
                    inventory_from_nodes(await api.list("Node", None), await api.list("Pod", None))
                )
            except Exception as exc:  # noqa: BLE001 - the API is away: keep the last view
                log.warning("cannot read the node inventory: %s", exc)

    await runtime.start_watching()
    await controller.start()
    tasks = [
        asyncio.create_task(operator.run(), name="operator:models"),
        asyncio.create_task(refresh_inventory(), name="operator:inventory"),
    ]
    log.info("gpufleet operator %s watching namespace %s", identity, cfg.namespace)
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await controller.stop()
        await runtime.close()  # the pods keep serving; the next leader adopts them
        if demand is not None:
            await demand.close()
        store.close()
