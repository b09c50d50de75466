"""Plain Kubernetes objects for models and tenants: deterministic, reviewable, secure by default.

For each model: one Deployment per placement group (replicas the planner put on the same node
and GPU shape; without an inventory, one Deployment asking for the model's GPUs on its GPU
types), a Service selecting all of them, and a PodDisruptionBudget when it runs more than one
replica. The engine container runs the official image of its engine with the arguments the
engine adapter derives from the plan (vLLM's ``--tensor-parallel-size``, SGLang's
``--tp-size``; llama.cpp's own server for GGUF models), weights read-only from the shared
model-cache claim (emitted too, unless it exists already), so scaling up never downloads again.

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

import dataclasses
import json
import math
import shlex
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from gpufleet.engines import ADAPTERS
from gpufleet.engines.base import LIVENESS_PATH
from gpufleet.engines.base import Placement as EnginePlacement
from gpufleet.hardware import CATALOG
from gpufleet.planner import DEFAULT_PRIORITIES, Deployment, Placement, PlanSettings, plan
from gpufleet.runtime.kubernetes.checks import check, check_settings
from gpufleet.runtime.kubernetes.common import (
    DEFAULT_IMAGES,
    LABEL_COMPONENT,
    LABEL_GROUP,
    LABEL_MODEL,
    LABEL_TENANT,
    MANAGED,
    PORT,
    RAY_PORT,
    ModelCache,
    RenderError,
    RenderSettings,
    meta,
    namespace_object,
)
from gpufleet.runtime.kubernetes.keda import scaled_object
from gpufleet.runtime.kubernetes.loader import (
    cache_claim,
    claim_of,
    loader_job,
    loader_name,
    wait_for_weights,
    weights_path,
)
from gpufleet.runtime.kubernetes.tenants import tenant_objects
from gpufleet.spec import Inventory, Model, Tenant

__all__ = [
    "CLUSTER_PLANNING",
    "DEFAULT_IMAGES",
    "LABEL_COMPONENT",
    "LABEL_GROUP",
    "LABEL_MODEL",
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
    "render",
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
    ``deployments``) replicas are pinned to the nodes and GPU shapes the planner chose."""
    settings = settings or RenderSettings()
    problems = check_settings(settings) + [p for m in models for p in check(m, settings)]
    if problems:
        raise RenderError(problems)
    objects: list[dict[str, Any]] = [namespace_object(settings.namespace, {})]
    objects += [_priority_class(name, value) for name, value in DEFAULT_PRIORITIES.items()]
    cached = [m for m in models if claim_of(m, settings) == settings.model_cache_claim]
    if cached and settings.model_cache is not None:
        objects.append(cache_claim(settings, settings.model_cache))
    groups = _groups(models, inventory, deployments)
    loaders: dict[str, dict[str, Any]] = {}
    for model in sorted(models, key=lambda m: m.name):
        objects += _model_objects(model, groups[model.name], settings)
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


@dataclass(frozen=True)
class EngineGroup:
    """Replicas of one model that share a node and a GPU shape (one Deployment) — or, for a
    model bigger than a node, that share their nodes (one LeaderWorkerSet): ``pp`` pods of
    ``gpus`` GPUs each, the leader's on ``node``, the workers' on ``workers``."""

    key: str
    replicas: int
    node: str | None = None
    gpu_type: str | None = None
    #: GPUs per pod: the tensor-parallel degree.
    gpus: int = 0
    memory_fraction: float | None = None
    mig_profile: str | None = None
    #: The planner's placement of the replica, as JSON, kept on its pod (the operator plans the
    #: next replicas around the ones running).
    placement: str = ""
    #: Pipeline stages, one pod (and node) each: 1 on one node.
    pp: int = 1
    #: The nodes of the stages after the leader's, in stage order (a LeaderWorkerSet's workers).
    workers: tuple[str, ...] = ()


def placed_group(placement: Placement, key: str = "main") -> EngineGroup:
    """The engine group of one replica where the planner put it (its placement JSON kept)."""
    return EngineGroup(
        key,
        1,
        node=placement.node,
        gpu_type=placement.gpu_type,
        gpus=placement.tp,
        # A whole GPU (or MIG instance) is the pod's alone: the engine's own default share of
        # its memory. Only a time-sliced GPU is shared, and gets the planner's share.
        memory_fraction=engine_share(placement),
        mig_profile=placement.mig_profile,
        placement=json.dumps(dataclasses.asdict(placement), sort_keys=True),
        pp=placement.pp,
        workers=tuple(node for node, _ in placement.workers),
    )


def _groups(
    models: Sequence[Model],
    inventory: Inventory | None,
    deployments: Mapping[str, Deployment] | None,
) -> dict[str, list[EngineGroup]]:
    plain = {
        m.name: [EngineGroup("main", max(m.spec.replicas.min, 1), gpus=m.spec.resources.gpus)]
        for m in models
    }
    if inventory is None or not deployments:
        return plain
    result = plan(
        inventory,
        [deployments[m.name] for m in models if m.name in deployments],
        settings=CLUSTER_PLANNING,
    )
    unplaced = sorted({str(u.replica) + ": " + u.reason for u in result.unplaced})
    if unplaced:
        raise RenderError([f"cannot place {line}" for line in unplaced])
    by_model: dict[str, dict[tuple[Any, ...], list[Placement]]] = defaultdict(dict)
    for p in result.placements:
        share = engine_share(p)
        workers = tuple(node for node, _ in p.workers)
        shape = (p.node, p.gpu_type, p.tp, share, p.mig_profile, workers)
        by_model[p.replica.deployment].setdefault(shape, []).append(p)
    for name, shapes in by_model.items():
        groups = []
        for shape, placed in sorted(shapes.items(), key=lambda kv: str(kv[0])):
            node, gpu_type, tp, share, mig, workers = shape
            key = node if tp <= 1 and mig is None else f"{node}-tp{tp}{mig or ''}"
            if workers:
                key = f"{key}-pp{1 + len(workers)}"  # a group across nodes, led from ``node``
            if share is not None:
                key = f"{key}-shared"  # beside the same model on whole GPUs of that node
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


def engine_share(placement: Placement) -> float | None:
    """The share of GPU memory to tell the engine: the plan's, on a time-sliced GPU that other
    pods share; None (the engine's own default) on whole GPUs or a MIG instance of its own."""
    if not placement.gpus or placement.mig_profile is not None or placement.time_slice is None:
        return None
    return round(placement.memory_fraction, 3)


def model_service(model: Model, settings: RenderSettings) -> dict[str, Any]:
    """The Service in front of a model's engines (all generations, ready ones only)."""
    selector = {LABEL_MODEL: model.name}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(
            f"engine-{model.name}", settings.namespace, {**selector, LABEL_COMPONENT: "engine"}
        ),
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": settings.engine_port, "targetPort": "http"}],
        },
    }


def model_disruption_budget(model: Model, settings: RenderSettings) -> dict[str, Any]:
    """Voluntary disruptions (node drains) take one engine of the model at a time."""
    selector = {LABEL_MODEL: model.name}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(f"engine-{model.name}", settings.namespace, selector),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


def _model_objects(
    model: Model, groups: list[EngineGroup], settings: RenderSettings
) -> list[dict[str, Any]]:
    selector = {LABEL_MODEL: model.name}
    objects: list[dict[str, Any]] = [model_service(model, settings)]
    across = [g for g in groups if g.pp > 1]
    if across or (
        all(g.node is None for g in groups) and model.spec.resources.gpus > settings.gpus_per_node
    ):
        # One replica needs more GPUs than a node has: a group of pods across nodes (where the
        # planner put each, with an inventory; else of ``gpus_per_node`` GPUs a pod).
        objects[0]["spec"]["selector"] = {**selector, LWS_INDEX: "0"}  # leaders serve
        if not across:
            return [*objects, leader_worker_set(model, settings)]
        if len(across) != len(groups):
            raise RenderError(
                [
                    f"{model.name}: the planner put some replicas on one node and others "
                    "across nodes; render it with an inventory whose nodes are alike"
                ]
            )
        for group in across:
            lws = leader_worker_set(model, settings, group)
            if len(across) > 1:
                lws["metadata"]["name"] = f"engine-{model.name}-{group.key}"
            objects.append(lws)
        return objects
    for group in groups:
        objects.append(_deployment(model, group, settings, single=len(groups) == 1))
    if settings.keda_prometheus is not None:
        if len(groups) != 1:
            raise RenderError(
                [f"{model.name}: KEDA scales one Deployment; render it without --inventory"]
            )
        objects.append(scaled_object(model, settings))
    total = sum(g.replicas for g in groups)
    if total > 1:
        objects.append(model_disruption_budget(model, settings))
    return objects


def engine_pod(model: Model, group: EngineGroup, settings: RenderSettings) -> dict[str, Any]:
    """The pod spec of one engine replica of ``model`` placed as ``group`` says."""
    spec = model.spec
    weights = weights_path(model)
    args = _engine_args(model, group, weights, settings.engine_port)
    resources: dict[str, Any] = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {}}
    if group.mig_profile:
        resources["limits"][f"nvidia.com/mig-{group.mig_profile}"] = 1
    elif group.gpus:
        resources["limits"]["nvidia.com/gpu"] = group.gpus
    if not resources["limits"]:
        del resources["limits"]
    engine: dict[str, Any] = {"name": "engine", "image": settings.images[spec.engine]}
    if spec.engine in ("vllm", "sglang"):
        engine["command"] = ["python3", "-m", _MODULES[spec.engine]]
    engine |= {
        "args": args,
        # The probes name this port: they follow it.
        "ports": [{"name": "http", "containerPort": settings.engine_port}],
        "env": [
            # Weights come from the cache volume; nothing phones home.
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            {"name": "DO_NOT_TRACK", "value": "1"},
            # The root filesystem is read-only: caches go to the writable volume.
            {"name": "HOME", "value": "/home/engine"},
            {"name": "XDG_CACHE_HOME", "value": "/home/engine/.cache"},
        ],
        "resources": resources,
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 90,  # 15 minutes to load weights and warm up
        },
        "livenessProbe": {
            "httpGet": {"path": LIVENESS_PATH, "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "cache", "mountPath": "/home/engine/.cache"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "priorityClassName": f"gpufleet-{spec.priority_class}",
        "terminationGracePeriodSeconds": math.ceil(spec.drain) + 10,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # The loader Job fills the cache once; replicas wait for its completion mark.
        "initContainers": (
            [wait_for_weights(settings.images[spec.engine], weights)]
            if spec.parsed_source.scheme != "pvc"
            else []
        ),
        "containers": [engine],
        "volumes": [
            {
                "name": "models",
                "persistentVolumeClaim": {
                    "claimName": claim_of(model, settings),
                    "readOnly": True,
                },
            },
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        ],
    }
    affinity = _affinity(model, group)
    if affinity:
        pod["affinity"] = affinity
    if group.gpus or group.mig_profile:
        pod["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return pod


def _deployment(
    model: Model, group: EngineGroup, settings: RenderSettings, *, single: bool
) -> dict[str, Any]:
    name = f"engine-{model.name}" if single else f"engine-{model.name}-{group.key}"
    labels = {LABEL_MODEL: model.name, LABEL_GROUP: group.key, LABEL_COMPONENT: "engine"}
    pod = engine_pod(model, group, settings)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, settings.namespace, labels),
        "spec": {
            # With KEDA the replica count is KEDA's (never two autoscalers on one workload).
            **({} if settings.keda_prometheus is not None else {"replicas": group.replicas}),
            "selector": {"matchLabels": {LABEL_MODEL: model.name, LABEL_GROUP: group.key}},
            # A new engine loads weights for minutes: keep the old one serving meanwhile.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


_MODULES = {"vllm": "vllm.entrypoints.openai.api_server", "sglang": "sglang.launch_server"}


def _engine_args(model: Model, group: EngineGroup, weights: PurePosixPath, port: int) -> list[str]:
    spec = model.spec
    if spec.engine == "llamacpp":
        args = [
            "--model", str(weights), "--alias", model.name,
            "--host", "0.0.0.0", "--port", str(port),
            "--ctx-size", str(spec.context_length), "--metrics",
        ]  # fmt: skip
        if group.gpus:
            args += ["--n-gpu-layers", "999"]
        return args + list(spec.engine_args)
    placement = EnginePlacement(
        node=group.node or "any",
        gpu_type=group.gpu_type,
        gpu_indices=tuple(range(group.gpus)),
        memory_fraction=group.memory_fraction,
        mig_profile=group.mig_profile,
    )
    launch = ADAPTERS[spec.engine].launch(
        spec,
        weights=Path(str(weights)),
        served_name=model.name,
        host="0.0.0.0",
        port=port,
        placement=placement,
    )
    # argv is [python, -m, module, ...]: the image's python runs the module (``command``).
    return list(launch.argv[3:])


def _affinity(
    model: Model, group: EngineGroup, hosts: Sequence[str] | None = None
) -> dict[str, Any]:
    """Required node affinity: the planner's nodes (``hosts``; default the group's node), and
    the GPU product of the group's type (else of the model's allowed types)."""
    terms: list[dict[str, Any]] = []
    if hosts is None:
        hosts = [group.node] if group.node is not None else []
    if hosts:
        values = sorted(set(hosts))
        terms.append({"key": "kubernetes.io/hostname", "operator": "In", "values": values})
    types = [group.gpu_type] if group.gpu_type else list(model.spec.resources.gpu_types)
    products = sorted({p for t in types for p in _gfd_products(t)})
    if products and (group.gpus or group.mig_profile):
        terms.append({"key": "nvidia.com/gpu.product", "operator": "In", "values": products})
    if not terms:
        return {}
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": terms}]
            }
        }
    }


def _gfd_products(gpu_type: str) -> list[str]:
    """GPU Feature Discovery's ``nvidia.com/gpu.product`` values for a catalog GPU type."""
    accelerator = CATALOG.get(gpu_type)
    if accelerator is None:
        return [gpu_type.replace(" ", "-")]
    names = [a for a in accelerator.aliases if a.startswith(("NVIDIA ", "Tesla "))]
    return [n.replace(" ", "-") for n in names] or [accelerator.name]


#: Labels the LeaderWorkerSet controller puts on a group's pods: the index within the group
#: (0: the leader), and a key shared by all pods of one group.
LWS_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_GROUP_KEY = "leaderworkerset.sigs.k8s.io/group-key"


def leader_worker_set(
    model: Model, settings: RenderSettings, group: EngineGroup | None = None
) -> dict[str, Any]:
    """vLLM across nodes: tensor parallel within a node, pipeline parallel across the group's
    nodes, over Ray — the leader starts the Ray head and serves, the workers join it
    (LeaderWorkerSet, sigs.k8s.io/lws: the group is scheduled, restarted and scaled as one).

    ``group``: where the planner put the replica — TP = its GPUs per pod, PP = its nodes; the
    leader is pinned to its node and the workers to theirs, one pod per node. Without it, pods
    of ``settings.gpus_per_node`` GPUs, as many as the model's GPUs need, wherever they fit.
    """
    spec = model.spec
    if spec.engine != "vllm":
        raise RenderError(
            [
                f"{model.name}: spec.resources.gpus {spec.resources.gpus} is more than a node's "
                f"{settings.gpus_per_node}; only vLLM spans nodes here (engine: vllm)"
            ]
        )
    if group is None or group.pp < 2:
        per_node = settings.gpus_per_node
        group = EngineGroup(
            "main",
            max(spec.replicas.min, 1),
            gpus=per_node,
            pp=math.ceil(spec.resources.gpus / per_node),
        )
    stage = dataclasses.replace(group, pp=1, workers=())
    leader = engine_pod(model, stage, settings)
    engine = leader["containers"][0]
    args = engine.pop("args")
    serve = shlex.join(
        [
            "python3",
            "-m",
            "vllm.entrypoints.openai.api_server",
            *args,
            "--pipeline-parallel-size",
            str(group.pp),
            "--distributed-executor-backend",
            "ray",
        ]
    )
    engine.pop("command", None)
    engine["command"] = [
        "sh",
        "-c",
        f"ray start --head --port={RAY_PORT} && exec {serve}",
    ]
    worker = engine_pod(model, dataclasses.replace(stage, node=None), settings)
    worker_engine = worker["containers"][0]
    for key in ("args", "command", "readinessProbe", "startupProbe", "livenessProbe", "ports"):
        worker_engine.pop(key, None)
    worker_engine["command"] = [
        "sh",
        "-c",
        f"ray start --address=$(LWS_LEADER_ADDRESS):{RAY_PORT} --block",
    ]
    if group.node is not None:
        _pin(model, group, leader, (group.node,))
        _pin(model, group, worker, group.workers)
    labels = {LABEL_MODEL: model.name, LABEL_COMPONENT: "engine"}
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": meta(f"engine-{model.name}", settings.namespace, labels),
        "spec": {
            "replicas": group.replicas,
            "startupPolicy": "LeaderReady",
            "leaderWorkerTemplate": {
                "size": group.pp,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {"metadata": {"labels": labels}, "spec": leader},
                "workerTemplate": {"metadata": {"labels": labels}, "spec": worker},
            },
        },
    }


def _pin(model: Model, group: EngineGroup, pod: dict[str, Any], hosts: Sequence[str]) -> None:
    """Pods of a group on the planner's nodes: the leader on its node, the workers on theirs,
    never two pods of one group on one node (each holds its stage's GPUs of that node)."""
    pod["affinity"] = _affinity(model, group, hosts) | {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": {LABEL_MODEL: model.name}},
                    # The pods of the same group only (the scheduler adds the pod's own key).
                    "matchLabelKeys": [LWS_GROUP_KEY],
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
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
