"""Plain Kubernetes objects for models and tenants: deterministic, reviewable, secure by default.

For each model: one Deployment per placement group (replicas the planner put on the same node
and GPU shape; without an inventory, one Deployment asking for the model's GPUs on its GPU
types), a Service selecting all of them, and a PodDisruptionBudget when it runs more than one
replica. A disaggregated model is two pools, each rendered so from its pool's spec: the decode
pool (the model's replicas, ``engine-<model>``) and the prefill pool
(``disaggregation.prefill.replicas`` of them, ``engine-<model>-prefill``; none when that is 0),
their pods labelled ``gpufleet.io/role: decode|prefill``. The Service selects the decode pool
(prefill replicas are called by the gateway, pod by pod); KEDA scales the decode pool; one
budget covers both (docs/kubernetes.md).

The engine container runs the official image of its engine with the arguments the
engine adapter derives from the plan (vLLM's ``--tensor-parallel-size``, SGLang's
``--tp-size``; llama.cpp's own server for GGUF models), weights read-only from the shared
model-cache claim (emitted too, unless it exists already), so scaling up never downloads again.
The engine's pod itself is built in ``pods.py``, shared with the operator.

On Kubernetes the NVIDIA device plugin hands a whole GPU to one pod unless the node
time-slices it (or splits it into MIG instances), so the plan is made with one replica per
whole GPU, and an engine is told its share of GPU memory (vLLM's ``--gpu-memory-utilization``,
SGLang's ``--mem-fraction-static``) only on a time-sliced GPU, where other pods share it: on a
GPU of its own the engine's default (vLLM: 0.9) applies, instead of the planner's estimate of
what the model needs (a 0.40 that leaves half the card idle and starves the KV cache).

For each tenant: a Namespace, a ResourceQuota on GPUs, a default-deny NetworkPolicy that lets
only the gateway reach engines (on ``RenderSettings.engine_port``), and a Role/RoleBinding for
its people.

Every pod: non-root, no privilege escalation, all capabilities dropped, seccomp RuntimeDefault,
read-only root filesystem (writable ``/tmp`` and cache as emptyDir), no service-account token.
Output order is fixed (kind, namespace, name) and every mapping is built in a fixed order, so
rendering the same input twice gives the same bytes — what GitOps diffs need.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from gpufleet.planner import (
    DEFAULT_PRIORITIES,
    PREFILL_POOL_SUFFIX,
    Deployment,
    Placement,
    PlanSettings,
    plan,
)
from gpufleet.runtime.base import Role
from gpufleet.runtime.kubernetes.checks import check, check_settings
from gpufleet.runtime.kubernetes.common import (
    DEFAULT_IMAGES,
    LABEL_COMPONENT,
    LABEL_GROUP,
    LABEL_MODEL,
    LABEL_ROLE,
    LABEL_TENANT,
    MANAGED,
    PORT,
    ModelCache,
    RenderError,
    RenderSettings,
    meta,
    namespace_object,
)
from gpufleet.runtime.kubernetes.keda import scaled_object
from gpufleet.runtime.kubernetes.loader import cache_claim, claim_of, loader_job, loader_name
from gpufleet.runtime.kubernetes.pods import (
    LWS_GROUP_KEY,
    LWS_INDEX,
    EngineGroup,
    engine_pod,
    engine_share,
    leader_worker_set,
    placed_group,
    pool_rdma,
    role_labels,
)
from gpufleet.runtime.kubernetes.tenants import tenant_objects
from gpufleet.spec import Inventory, Model, Tenant

__all__ = [
    "CLUSTER_PLANNING",
    "DEFAULT_IMAGES",
    "LABEL_COMPONENT",
    "LABEL_GROUP",
    "LABEL_MODEL",
    "LABEL_ROLE",
    "LABEL_TENANT",
    "LWS_GROUP_KEY",
    "LWS_INDEX",
    "MANAGED",
    "PORT",
    "EngineGroup",
    "ModelCache",
    "RenderError",
    "RenderSettings",
    "check",
    "engine_pod",
    "engine_share",
    "leader_worker_set",
    "loader_job",
    "loader_name",
    "model_disruption_budget",
    "model_service",
    "placed_group",
    "pool_rdma",
    "pools",
    "render",
    "role_labels",
    "tenant_objects",
    "to_yaml",
]

#: The planner's rules for a cluster: a whole GPU belongs to one pod unless its node
#: time-slices it (then up to its time-slicing count) or splits it into MIG instances. Running
#: pods are never moved (no defragmentation: a plan must not count on GPUs a migration would
#: free), and the heuristic alone places, so ``render``, the operator's bound and its placer
#: give the same answer for the same fleet.
CLUSTER_PLANNING = PlanSettings(max_replicas_per_gpu=1, defragment=False, optimise_max_replicas=0)

_ORDER = (
    "Namespace",
    "PriorityClass",
    "ResourceQuota",
    "NetworkPolicy",
    "Role",
    "RoleBinding",
    "PersistentVolumeClaim",
    "Service",
    "Job",
    "Deployment",
    "PodDisruptionBudget",
    "ScaledObject",
    "LeaderWorkerSet",
)


def render(
    models: Sequence[Model],
    tenants: Sequence[Tenant] = (),
    settings: RenderSettings | None = None,
    *,
    inventory: Inventory | None = None,
    deployments: Mapping[str, Deployment] | None = None,
) -> list[dict[str, Any]]:
    """Every object, in apply order. With an ``inventory`` (and the models' sized
    ``deployments``, by the planner's names: a disaggregated model's prefill pool is
    ``<model>:prefill``) replicas are pinned to the nodes and GPU shapes the planner chose."""
    settings = settings or RenderSettings()
    problems = check_settings(settings) + [p for m in models for p in check(m, settings)]
    if problems:
        raise RenderError(problems)
    # An external model runs nothing: gateways probe its endpoints (and read their keys'
    # Secrets) from its Model resource, which is applied as it is.
    models = [m for m in models if m.spec.engine != "external"]
    objects: list[dict[str, Any]] = [namespace_object(settings.namespace, {})]
    objects += [_priority_class(name, value) for name, value in DEFAULT_PRIORITIES.items()]
    cached = [m for m in models if claim_of(m, settings) == settings.model_cache_claim]
    if cached and settings.model_cache is not None:
        objects.append(cache_claim(settings, settings.model_cache))
    groups = _groups(models, inventory, deployments)
    loaders: dict[str, dict[str, Any]] = {}
    for model in sorted(models, key=lambda m: m.name):
        objects += _model_objects(model, groups, settings)
        if model.spec.parsed_source.scheme != "pvc":
            loaders.setdefault(loader_name(model), loader_job(model, settings))
    objects += loaders.values()
    for tenant in sorted(tenants, key=lambda t: t.name):
        objects += tenant_objects(tenant, settings)
    return sorted(objects, key=_sort_key)


def to_yaml(objects: Iterable[Mapping[str, Any]]) -> str:
    return "".join(
        "---\n" + yaml.safe_dump(dict(o), sort_keys=False, default_flow_style=False)
        for o in objects
    )


def _sort_key(o: Mapping[str, Any]) -> tuple[int, str, str]:
    meta = o["metadata"]
    return (_ORDER.index(o["kind"]), meta.get("namespace", ""), meta["name"])


# -- models -----------------------------------------------------------------------------------


def pools(model: Model) -> list[tuple[Role, Model]]:
    """A model's pools, each as the model with the pool's spec: the model itself, or — when it
    is disaggregated — its decode pool and, when it runs any, its prefill pool."""
    spec = model.spec
    if spec.disaggregation is None:
        return [("", model)]
    found: list[tuple[Role, Model]] = [
        ("decode", model.model_copy(update={"spec": spec.pool("decode")}))
    ]
    if spec.disaggregation.prefill.replicas:
        found.append(("prefill", model.model_copy(update={"spec": spec.pool("prefill")})))
    return found


def _pool_name(model: str, role: Role) -> str:
    """A pool's name for the planner (``planner.pool_deployments``)."""
    return model + PREFILL_POOL_SUFFIX if role == "prefill" else model


def _groups(
    models: Sequence[Model],
    inventory: Inventory | None,
    deployments: Mapping[str, Deployment] | None,
) -> dict[str, list[EngineGroup]]:
    """The engine groups of every pool, by the pool's planner name."""
    plain: dict[str, list[EngineGroup]] = {}
    for m in models:
        for role, pool in pools(m):
            if role == "prefill":
                assert m.spec.disaggregation is not None
                group = EngineGroup(
                    "prefill", m.spec.disaggregation.prefill.replicas, gpus=pool.spec.resources.gpus
                )
            else:
                group = EngineGroup(
                    "main", max(m.spec.replicas.min, 1), gpus=pool.spec.resources.gpus
                )
            plain[_pool_name(m.name, role)] = [group]
    if inventory is None or not deployments:
        return plain
    result = plan(
        inventory,
        [deployments[name] for name in plain if name in deployments],
        settings=CLUSTER_PLANNING,
    )
    unplaced = sorted({str(u.replica) + ": " + u.reason for u in result.unplaced})
    if unplaced:
        raise RenderError([f"cannot place {line}" for line in unplaced])
    by_pool: dict[str, dict[tuple[Any, ...], list[Placement]]] = defaultdict(dict)
    for p in result.placements:
        share = engine_share(p)
        workers = tuple(node for node, _ in p.workers)
        shape = (p.node, p.gpu_type, p.tp, share, p.mig_profile, workers)
        by_pool[p.replica.deployment].setdefault(shape, []).append(p)
    for name, shapes in by_pool.items():
        groups = []
        for shape, placed in sorted(shapes.items(), key=lambda kv: str(kv[0])):
            node, gpu_type, tp, share, mig, workers = shape
            key = node if tp <= 1 and mig is None else f"{node}-tp{tp}{mig or ''}"
            if workers:
                key = f"{key}-pp{1 + len(workers)}"  # a group across nodes, led from ``node``
            if share is not None:
                key = f"{key}-shared"  # beside the same model on whole GPUs of that node
            if name.endswith(PREFILL_POOL_SUFFIX):
                key = f"prefill-{key}"  # apart from the decode pool's groups on that node
            groups.append(
                EngineGroup(
                    _dns(str(key).lower()),
                    len(placed),
                    node,
                    gpu_type,
                    tp,
                    share,
                    mig,
                    pp=1 + len(workers),
                    workers=workers,
                )
            )
        plain[name] = groups
    return plain


def model_service(model: Model, settings: RenderSettings) -> dict[str, Any]:
    """The Service in front of a model's engines (all generations, ready ones only): a
    disaggregated model's decode pool, the replicas that answer requests."""
    selector = {LABEL_MODEL: model.name, **role_labels(model, "decode")}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(
            f"engine-{model.name}",
            settings.namespace,
            {LABEL_MODEL: model.name, LABEL_COMPONENT: "engine"},
        ),
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": settings.engine_port, "targetPort": "http"}],
        },
    }


def model_disruption_budget(model: Model, settings: RenderSettings) -> dict[str, Any]:
    """Voluntary disruptions (node drains) take one engine of the model at a time (of either
    pool of a disaggregated model)."""
    selector = {LABEL_MODEL: model.name}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(f"engine-{model.name}", settings.namespace, selector),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


def _model_objects(
    model: Model, groups: Mapping[str, list[EngineGroup]], settings: RenderSettings
) -> list[dict[str, Any]]:
    service = model_service(model, settings)
    objects: list[dict[str, Any]] = [service]
    across = False  # some pool runs in groups across nodes (LeaderWorkerSets)
    serving: list[dict[str, Any]] = []  # the Deployments of the pool that answers requests
    total = 0
    for role, pool in pools(model):
        pool_groups = groups[_pool_name(model.name, role)]
        made = _pool_objects(pool, pool_groups, settings, role)
        if any(o["kind"] == "LeaderWorkerSet" for o in made):
            across = True
            if role != "prefill":
                service["spec"]["selector"][LWS_INDEX] = "0"  # leaders serve
        elif role != "prefill":
            serving = made
        objects += made
        total += sum(g.replicas for g in pool_groups)
    if across:
        return objects
    if settings.keda_prometheus is not None:
        if len(serving) != 1:
            raise RenderError(
                [f"{model.name}: KEDA scales one Deployment; render it without --inventory"]
            )
        objects.append(scaled_object(model, settings))
    if total > 1:
        objects.append(model_disruption_budget(model, settings))
    return objects


def _pool_objects(
    model: Model, groups: list[EngineGroup], settings: RenderSettings, role: Role
) -> list[dict[str, Any]]:
    """The workloads of one pool (``model.spec`` the pool's): a Deployment per group, or —
    when a replica needs more GPUs than a node has — LeaderWorkerSets."""
    across = [g for g in groups if g.pp > 1]
    if across or (
        all(g.node is None for g in groups) and model.spec.resources.gpus > settings.gpus_per_node
    ):
        # One replica needs more GPUs than a node has: a group of pods across nodes (where the
        # planner put each, with an inventory; else of ``gpus_per_node`` GPUs a pod).
        if not across:
            return [leader_worker_set(model, settings, groups[0], role)]
        if len(across) != len(groups):
            raise RenderError(
                [
                    f"{model.name}: the planner put some replicas on one node and others "
                    "across nodes; render it with an inventory whose nodes are alike"
                ]
            )
        objects = []
        for group in across:
            lws = leader_worker_set(model, settings, group, role)
            if len(across) > 1:
                lws["metadata"]["name"] = f"engine-{model.name}-{group.key}"
            objects.append(lws)
        return objects
    return [
        _deployment(model, group, settings, single=len(groups) == 1, role=role) for group in groups
    ]


def _deployment(
    model: Model, group: EngineGroup, settings: RenderSettings, *, single: bool, role: Role = ""
) -> dict[str, Any]:
    pool = f"engine-{model.name}" + ("-prefill" if role == "prefill" else "")
    name = pool if single else f"engine-{model.name}-{group.key}"
    labels = {
        LABEL_MODEL: model.name,
        LABEL_GROUP: group.key,
        **role_labels(model, role),
        LABEL_COMPONENT: "engine",
    }
    pod = engine_pod(model, group, settings, role)
    # With KEDA the serving pool's replica count is KEDA's (never two autoscalers on one
    # workload); a prefill pool keeps its own.
    keda = settings.keda_prometheus is not None and role != "prefill"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, settings.namespace, labels),
        "spec": {
            **({} if keda else {"replicas": group.replicas}),
            "selector": {"matchLabels": {LABEL_MODEL: model.name, LABEL_GROUP: group.key}},
            # A new engine loads weights for minutes: keep the old one serving meanwhile.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


# -- helpers ----------------------------------------------------------------------------------


def _priority_class(name: str, value: int) -> dict[str, Any]:
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": f"gpufleet-{name}", "labels": dict(MANAGED)},
        "value": value * 1000,
        "preemptionPolicy": "PreemptLowerPriority" if name == "interactive" else "Never",
        "globalDefault": False,
        "description": f"gpufleet {name} models",
    }


def _dns(value: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "-" else "-" for c in value).strip("-")
    return cleaned[:40] or "x"
