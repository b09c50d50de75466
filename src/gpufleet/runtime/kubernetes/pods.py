"""The pod of one engine replica: its container, arguments, probes, placement and security.

``engine_pod`` is what ``render``'s Deployments and the operator's pods both run, so a rendered
fleet and an operated one start the same engine the same way. A model bigger than a node runs
as a ``leader_worker_set``: vLLM tensor parallel within a node, pipeline parallel across the
group's nodes, over Ray.

A disaggregated model's pools are sets of pods of their own, each built from the pool's spec
(``ModelSpec.pool``: its resources, the model's engine arguments and the pool's); the engine
adapter gives both vLLM's ``--kv-transfer-config``. Their NIXL side channel listens on, and is
announced at, the pod's IP (``VLLM_NIXL_SIDE_CHANNEL_HOST`` from the downward API; vLLM's
default, ``localhost``, reaches no other pod). A pool whose spec names an ``rdma`` resource gets
one in each pod's requests and limits: the device plugin (the NVIDIA Network Operator's) then
puts the RDMA device in the container, and NIXL moves the KV cache over it instead of the pod
network. Nothing else changes for it: the pods keep the ``restricted`` profile (no
``IPC_LOCK``), so the memory the transport pins counts against the container's memlock limit,
which the node's container runtime sets (docs/kubernetes.md).

A model with ``routing.prefixIndex: precise`` (each pool of a disaggregated one) has its
engine publish its KV-cache events: the adapter's ``--kv-events-config`` on the fixed ports
``KV_EVENTS_PORT`` (ZeroMQ PUB) and ``KV_REPLAY_PORT`` (replay ROUTER), named ``kv-events`` and
``kv-replay`` among the container's ports. The names are the pod's mark: the runtime reads a
replica's event endpoints from them (``tcp://<pod IP>:<port>``), so an operator or gateway that
restarts, or a pod that ``render`` made, needs nothing else. A multi-node replica publishes from
its leader, whose pod keeps the ports.

Engines answer only bearers of the fleet's engine key: the Secret ``gpufleet-engine-key`` (key
``key``), which the operator creates in its namespace and the gateways read. Each engine gets it
from the Secret in the environment variable it reads (vLLM's ``VLLM_API_KEY``, llama-server's
``LLAMA_API_KEY``), never in the pod spec; SGLang and Triton's front end read none, so their
arguments (``--api-key``; ``--openai-restricted-api``) name ``$(GPUFLEET_ENGINE_KEY)``, which the
kubelet expands. trtllm-serve checks no key: its pods have the network policies alone. The probes
ask the adapter's health path (``/health``; Triton's front end ``/health/ready``), which stays
open. The image is ``RenderSettings.images[image_key(spec)]``: TensorRT-LLM's and Triton's
depend on the backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gpufleet.engines import ADAPTERS, KvEvents
from gpufleet.engines.base import ENGINE_KEY_ENV, LIVENESS_PATH
from gpufleet.engines.base import Placement as EnginePlacement
from gpufleet.engines.triton import backend_env as triton_backend_env
from gpufleet.hardware import CATALOG
from gpufleet.planner import Placement
from gpufleet.runtime.base import Role
from gpufleet.runtime.kubernetes.common import (
    KV_EVENTS_PORT,
    KV_EVENTS_PORT_NAME,
    KV_REPLAY_PORT,
    KV_REPLAY_PORT_NAME,
    LABEL_COMPONENT,
    LABEL_MODEL,
    LABEL_ROLE,
    RAY_PORT,
    RenderError,
    RenderSettings,
    image_key,
    meta,
)
from gpufleet.runtime.kubernetes.loader import claim_of, wait_for_weights, weights_path
from gpufleet.spec import Model

__all__ = [
    "ENGINE_KEY_SECRET",
    "ENGINE_KEY_SECRET_KEY",
    "LWS_GROUP_KEY",
    "LWS_INDEX",
    "EngineGroup",
    "engine_pod",
    "engine_share",
    "kv_events",
    "leader_worker_set",
    "placed_group",
    "pool_rdma",
    "role_labels",
]


#: The Secret holding the key engines answer to (the operator makes it; gateways mount it).
ENGINE_KEY_SECRET = "gpufleet-engine-key"
ENGINE_KEY_SECRET_KEY = "key"
#: The llama.cpp server image's variable for ``--api-key``.
_LLAMA_SERVER_KEY_ENV = "LLAMA_API_KEY"


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


def engine_share(placement: Placement) -> float | None:
    """The share of GPU memory to tell the engine: the plan's, on a time-sliced GPU that other
    pods share; None (the engine's own default) on whole GPUs or a MIG instance of its own."""
    if not placement.gpus or placement.mig_profile is not None or placement.time_slice is None:
        return None
    return round(placement.memory_fraction, 3)


def pool_rdma(model: Model, role: Role) -> str | None:
    """The RDMA resource each pod of a disaggregated model's ``role`` pool asks for, if any."""
    disaggregation = model.spec.disaggregation
    if disaggregation is None or not role:
        return None
    pool = disaggregation.prefill if role == "prefill" else disaggregation.decode
    return pool.rdma


def kv_events(model: Model) -> KvEvents | None:
    """Where the engine of ``model`` (a pool's spec, for a disaggregated one) publishes its
    KV-cache events in its pod: the fixed ports, with ``routing.prefixIndex: precise``."""
    if model.spec.routing.prefix_index != "precise":
        return None
    return KvEvents(KV_EVENTS_PORT, KV_REPLAY_PORT)


def role_labels(model: Model, role: Role) -> dict[str, str]:
    """The role label of a pool's pods: ``prefill`` or ``decode`` on a disaggregated model's
    (its replicas are its decode pool), none on a model that is not disaggregated."""
    if model.spec.disaggregation is None:
        return {}
    return {LABEL_ROLE: role or "decode"}


def engine_pod(
    model: Model, group: EngineGroup, settings: RenderSettings, role: Role = ""
) -> dict[str, Any]:
    """The pod spec of one engine replica of ``model`` placed as ``group`` says; ``role``: the
    pool of a disaggregated model it serves in (``model.spec`` is then the pool's spec)."""
    spec = model.spec
    weights = weights_path(model)
    events = kv_events(model)
    command, args, health = _engine_command(model, group, weights, settings.engine_port, events)
    # The probes name the http port: they follow it. The KV-event ports' names mark the pod as
    # publishing (the runtime reads its endpoints from them).
    ports: list[dict[str, Any]] = [{"name": "http", "containerPort": settings.engine_port}]
    if events is not None:
        ports += [
            {"name": KV_EVENTS_PORT_NAME, "containerPort": events.port},
            {"name": KV_REPLAY_PORT_NAME, "containerPort": events.replay_port},
        ]
    resources: dict[str, Any] = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {}}
    if group.mig_profile:
        resources["limits"][f"nvidia.com/mig-{group.mig_profile}"] = 1
    elif group.gpus:
        resources["limits"]["nvidia.com/gpu"] = group.gpus
    rdma = pool_rdma(model, role)
    if rdma is not None:
        resources["requests"][rdma] = 1
        resources["limits"][rdma] = 1
    if not resources["limits"]:
        del resources["limits"]
    engine: dict[str, Any] = {"name": "engine", "image": settings.images[image_key(spec)]}
    if command is not None:
        engine["command"] = command
    engine |= {
        "args": args,
        "ports": ports,
        "env": [
            # Weights come from the cache volume; nothing phones home.
            {"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            {"name": "DO_NOT_TRACK", "value": "1"},
            # The root filesystem is read-only: caches go to the writable volume.
            {"name": "HOME", "value": "/home/engine"},
            {"name": "XDG_CACHE_HOME", "value": "/home/engine/.cache"},
            # The key it answers to, from the Secret: only the gateways hold it too.
            _key_env(spec.engine),
            *_transfer_env(model),
            *({"name": k, "value": v} for k, v in _backend_env(model).items()),
        ],
        "resources": resources,
        "readinessProbe": {
            "httpGet": {"path": health, "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": health, "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 90,  # 15 minutes to load weights and warm up
        },
        "livenessProbe": {
            "httpGet": {"path": health, "port": "http"},
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
            [wait_for_weights(settings.images[image_key(spec)], weights)]
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


#: How many leading entries of an engine adapter's argv are its program (the container's
#: ``command``; the rest are its ``args``), and whether that program is Python's, which the
#: image runs as ``python3`` (the adapter names this machine's interpreter): vLLM's and SGLang's
#: ``python -m MODULE``, trtllm-serve's ``sh -c LINE trtllm-serve``, Triton's front end script.
_PROGRAM: dict[str, tuple[int, bool]] = {
    "vllm": (3, True),
    "sglang": (3, True),
    "trtllm": (4, False),
    "triton": (2, True),
}
#: Where vLLM's NixlConnector listens for, and tells peers to send, its handshake (the side
#: channel): its default, ``localhost``, reaches no other pod.
NIXL_HOST_ENV = "VLLM_NIXL_SIDE_CHANNEL_HOST"


def _transfer_env(model: Model) -> list[dict[str, Any]]:
    """What a disaggregated vLLM engine needs to hand its KV cache to another pod: NIXL's side
    channel on the pod's own IP (the downward API's ``status.podIP``). A prefill engine binds
    it there and names it in the ``kv_transfer_params`` it answers; the decode engine the
    gateway passes them to connects there, then reads the blocks (vLLM's NixlConnector)."""
    disaggregation = model.spec.disaggregation
    if disaggregation is None or disaggregation.connector != "nixl" or model.spec.engine != "vllm":
        return []
    pod_ip = {"fieldRef": {"fieldPath": "status.podIP"}}
    return [{"name": NIXL_HOST_ENV, "valueFrom": pod_ip}]


def _backend_env(model: Model) -> dict[str, str]:
    """What an engine's backend needs in its environment (Triton's TensorRT-LLM backend its
    orchestrator mode)."""
    return triton_backend_env(model.spec) if model.spec.engine == "triton" else {}


def _key_env(engine: str) -> dict[str, Any]:
    """The engine key from its Secret, in the variable the engine reads (an engine that reads
    none gets ``GPUFLEET_ENGINE_KEY``, which its arguments name)."""
    if engine == "llamacpp":
        name = _LLAMA_SERVER_KEY_ENV
    else:
        name = ADAPTERS[engine].api_key_env or ENGINE_KEY_ENV
    ref = {"name": ENGINE_KEY_SECRET, "key": ENGINE_KEY_SECRET_KEY}
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _engine_command(
    model: Model,
    group: EngineGroup,
    weights: PurePosixPath,
    port: int,
    events: KvEvents | None = None,
) -> tuple[list[str] | None, list[str], str]:
    """The engine container's command (None: the image's own), arguments and health path (its
    probes' path: the adapter's liveness path)."""
    spec = model.spec
    if spec.engine == "llamacpp":
        args = [
            "--model", str(weights), "--alias", model.name,
            "--host", "0.0.0.0", "--port", str(port),
            "--ctx-size", str(spec.context_length), "--metrics",
        ]  # fmt: skip
        if group.gpus:
            args += ["--n-gpu-layers", "999"]
        return None, args + list(spec.engine_args), LIVENESS_PATH
    placement = EnginePlacement(
        node=group.node or "any",
        gpu_type=group.gpu_type,
        gpu_indices=tuple(range(group.gpus)),
        memory_fraction=group.memory_fraction,
        mig_profile=group.mig_profile,
    )
    adapter = ADAPTERS[spec.engine]
    launch = adapter.launch(
        spec,
        weights=Path(str(weights)),
        served_name=model.name,
        host="0.0.0.0",
        port=port,
        placement=placement,
        # Only an engine with no variable for it takes the key as an argument: a reference.
        api_key=f"$({ENGINE_KEY_ENV})" if adapter.api_key_env is None else None,
        kv_events=events,
    )
    size, python = _PROGRAM[spec.engine]
    command = list(launch.argv[:size])
    if python:
        command[0] = "python3"
    return command, list(launch.argv[size:]), launch.liveness_path


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
    model: Model, settings: RenderSettings, group: EngineGroup | None = None, role: Role = ""
) -> dict[str, Any]:
    """vLLM across nodes: tensor parallel within a node, pipeline parallel across the group's
    nodes, over Ray — the leader starts the Ray head and serves, the workers join it
    (LeaderWorkerSet, sigs.k8s.io/lws: the group is scheduled, restarted and scaled as one).

    ``group``: where the planner put the replica — TP = its GPUs per pod, PP = its nodes; the
    leader is pinned to its node and the workers to theirs, one pod per node. Without it (or
    with a group on one node: only its replica count is kept), pods of
    ``settings.gpus_per_node`` GPUs, as many as the model's GPUs need, wherever they fit.
    ``role``: the pool of a disaggregated model the group serves in (``model.spec`` the pool's).
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
            group.replicas if group is not None else max(spec.replicas.min, 1),
            gpus=per_node,
            pp=math.ceil(spec.resources.gpus / per_node),
        )
    stage = dataclasses.replace(group, pp=1, workers=())
    leader = engine_pod(model, stage, settings, role)
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
    worker = engine_pod(model, dataclasses.replace(stage, node=None), settings, role)
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
    labels = {LABEL_MODEL: model.name, **role_labels(model, role), LABEL_COMPONENT: "engine"}
    name = f"engine-{model.name}" + ("-prefill" if role == "prefill" else "")
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": meta(name, settings.namespace, labels),
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
