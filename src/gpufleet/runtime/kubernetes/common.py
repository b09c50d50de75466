"""What every Kubernetes object gpufleet writes shares: labels, ports, settings, security."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpufleet.engines.triton import backend_of as triton_backend
from gpufleet.engines.trtllm import backend_of as trtllm_backend
from gpufleet.errors import SpecError
from gpufleet.spec import ModelSpec

__all__ = [
    "CONTAINER_SECURITY",
    "DEFAULT_IMAGES",
    "KV_EVENTS_PORT",
    "KV_EVENTS_PORT_NAME",
    "KV_REPLAY_PORT",
    "KV_REPLAY_PORT_NAME",
    "LABEL_COMPONENT",
    "LABEL_GROUP",
    "LABEL_MODEL",
    "LABEL_ROLE",
    "LABEL_TENANT",
    "MANAGED",
    "POD_SECURITY",
    "PORT",
    "RAY_PORT",
    "ModelCache",
    "RenderError",
    "RenderSettings",
    "image_key",
    "meta",
    "namespace_object",
]

#: Official engine images (pinned; override with ``RenderSettings.images``), by ``image_key``.
#: NVIDIA's, from their own docs: TensorRT-LLM's container page (1.3.0rc24) for trtllm-serve —
#: its load gauges need 1.3 (tensorrt_llm/metrics/collector.py) — and, for prebuilt TensorRT
#: engines, a 1.2 release: the 1.3 line drops the TensorRT backend (NVIDIA/TensorRT-LLM#15918);
#: Triton's (server README and python/openai README, r26.07) with the backend in the tag.
DEFAULT_IMAGES: Mapping[str, str] = {
    "vllm": "vllm/vllm-openai:v0.11.0",
    "sglang": "lmsysorg/sglang:v0.5.3-cu126",
    "llamacpp": "ghcr.io/ggml-org/llama.cpp:server-b6800",
    "trtllm": "nvcr.io/nvidia/tensorrt-llm/release:1.3.0rc24",
    "trtllm-tensorrt": "nvcr.io/nvidia/tensorrt-llm/release:1.2.0",
    "triton-vllm": "nvcr.io/nvidia/tritonserver:26.07-vllm-python-py3",
    "triton-tensorrtllm": "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3",
}
#: Where engines listen in their pods unless ``RenderSettings.engine_port`` says otherwise.
PORT = 8000
#: Ray's head port on the leader of a multi-node engine (LeaderWorkerSet).
RAY_PORT = 6379
#: Where the engine of a ``routing.prefixIndex: precise`` model publishes its KV-cache events
#: (ZeroMQ PUB; vLLM's default endpoint, ``tcp://*:5557``) and answers replays of them (ROUTER;
#: the port vLLM's examples give it). Not a setting: each pod has an IP of its own, and names
#: the two in its engine container's ports, which is where the runtime reads them back. vLLM
#: offsets both by the data-parallel rank, so a pod runs one publisher (data parallelism 1).
KV_EVENTS_PORT = 5557
KV_REPLAY_PORT = 5558
#: The engine container's names for them: the runtime reads a pod's endpoints from these.
KV_EVENTS_PORT_NAME = "kv-events"
KV_REPLAY_PORT_NAME = "kv-replay"
LABEL_MODEL = "gpufleet.io/model"
LABEL_GROUP = "gpufleet.io/placement"
LABEL_TENANT = "gpufleet.io/tenant"
#: On the engine pods of a disaggregated model: the pool they serve in, ``prefill`` or
#: ``decode`` (a model that is not disaggregated has no such label). Selecting on it gives a
#: pool's pods — a Service, a disruption budget, ``kubectl get pods -l gpufleet.io/role=prefill``.
LABEL_ROLE = "gpufleet.io/role"
LABEL_COMPONENT = "app.kubernetes.io/component"
MANAGED = {"app.kubernetes.io/managed-by": "gpufleet", "app.kubernetes.io/part-of": "gpufleet"}


def image_key(spec: ModelSpec) -> str:
    """The key of ``RenderSettings.images`` a model's engine runs from: the engine's name, and
    for the engines whose backends ship in different images, the backend with it."""
    if spec.engine == "trtllm" and trtllm_backend(spec) == "tensorrt":
        return "trtllm-tensorrt"
    if spec.engine == "triton":
        return f"triton-{triton_backend(spec)}"
    return spec.engine


class RenderError(SpecError):
    """A model that cannot run on Kubernetes as written; the message says what to change."""


@dataclass(frozen=True)
class ModelCache:
    """The model-cache PersistentVolumeClaim ``render`` emits (the Helm chart's defaults: one
    claim every engine pod mounts, so it must be shared — ``ReadWriteMany`` — unless all
    engines run on one node)."""

    size: str = "500Gi"
    #: None: the cluster's default StorageClass.
    storage_class: str | None = None
    access_mode: str = "ReadWriteMany"


@dataclass(frozen=True)
class RenderSettings:
    namespace: str = "gpufleet"
    images: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_IMAGES))
    #: The PersistentVolumeClaim holding model weights, mounted read-only at ``/models``.
    model_cache_claim: str = "gpufleet-model-cache"
    #: How ``render`` creates that claim; None: it exists already (the Helm chart's, or one
    #: made by hand), and ``render`` leaves it out.
    model_cache: ModelCache | None = field(default_factory=ModelCache)
    #: The port engines listen on in their pods: their arguments, container port (and so the
    #: probes, which name it), the models' Services and the tenants' NetworkPolicies.
    engine_port: int = PORT
    #: Pods the gateway runs as (the only ones allowed to reach engines).
    gateway_labels: Mapping[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "gpufleet-gateway"}
    )
    #: Group bound to each tenant's Role (``{tenant}`` is replaced by the tenant's name).
    tenant_group: str = "gpufleet:tenant:{tenant}"
    #: GPUs one node has: a model asking for more runs as a LeaderWorkerSet across nodes.
    gpus_per_node: int = 8
    #: Scale engines with KEDA (a ScaledObject per model on gpufleet's own metrics) instead of
    #: gpufleet's autoscaler; the Deployments then leave ``replicas`` to KEDA.
    keda_prometheus: str | None = None


CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def namespace_object(name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {
                **MANAGED,
                **labels,
                # Pod Security Admission: the restricted profile, which every pod here meets.
                "pod-security.kubernetes.io/enforce": "restricted",
            },
        },
    }


def meta(name: str, namespace: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": {**MANAGED, **labels}}
