"""The planner's inventory from a cluster's Node objects (and the pods already on them).

GPUs come from what the NVIDIA device plugin and GPU Feature Discovery publish: allocatable
``nvidia.com/gpu`` and ``nvidia.com/mig-<profile>``, and the labels ``nvidia.com/gpu.product``
(e.g. ``NVIDIA-H100-80GB-HBM3``), ``nvidia.com/gpu.memory`` (MiB), ``nvidia.com/gpu.count``,
``nvidia.com/mig.strategy`` and ``nvidia.com/gpu.replicas`` (time-slicing: the plugin then
advertises count × replicas GPUs). Nodes that are cordoned or not Ready are left out; GPUs
requested by pods gpufleet does not manage are taken off their node. Pure: plain dicts in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from gpufleet.hardware import normalise_gpu_name
from gpufleet.spec import API_VERSION, Inventory, parse_bytes

__all__ = ["inventory_from_nodes"]

_MIG = "nvidia.com/mig-"
_MANAGED_BY = "app.kubernetes.io/managed-by"


def _ready(node: Mapping[str, Any]) -> bool:
    if node.get("spec", {}).get("unschedulable"):
        return False
    conditions = node.get("status", {}).get("conditions", [])
    ready = [c for c in conditions if c.get("type") == "Ready"]
    return not ready or ready[0].get("status") == "True"


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


def _cpus(value: str) -> int:
    """Whole CPUs of a quantity such as "64" or "63500m"."""
    if value.endswith("m"):
        return _int(value[:-1]) // 1000
    try:
        return int(float(value))
    except ValueError:
        return 0


def _foreign_gpus(pods: Sequence[Mapping[str, Any]]) -> Counter[str]:
    """Whole GPUs requested on each node by running pods that gpufleet does not manage."""
    used: Counter[str] = Counter()
    for pod in pods:
        labels = pod.get("metadata", {}).get("labels", {}) or {}
        node = pod.get("spec", {}).get("nodeName")
        phase = pod.get("status", {}).get("phase")
        if not node or labels.get(_MANAGED_BY) == "gpufleet" or phase in ("Succeeded", "Failed"):
            continue
        for container in pod.get("spec", {}).get("containers", []):
            limits = container.get("resources", {}).get("limits", {}) or {}
            used[node] += _int(limits.get("nvidia.com/gpu"))
    return used


def inventory_from_nodes(
    nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]] = ()
) -> Inventory:
    taken = _foreign_gpus(pods)
    specs = []
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        if not _ready(node):
            continue
        name = node["metadata"]["name"]
        labels: Mapping[str, str] = node["metadata"].get("labels", {}) or {}
        allocatable: Mapping[str, str] = node.get("status", {}).get("allocatable", {}) or {}
        entry: dict[str, Any] = {
            "name": name,
            "labels": {k: v for k, v in labels.items() if k.startswith("nvidia.com/")},
            "cpus": _cpus(str(allocatable.get("cpu", "0"))),
            "gpus": [],
        }
        if "memory" in allocatable:
            entry["memory"] = parse_bytes(str(allocatable["memory"]))
        product = labels.get("nvidia.com/gpu.product", "")
        gpu_type = normalise_gpu_name(product.replace("-", " ")) or normalise_gpu_name(product)
        replicas = max(_int(labels.get("nvidia.com/gpu.replicas"), 1), 1)
        advertised = _int(allocatable.get("nvidia.com/gpu"))
        count = _int(labels.get("nvidia.com/gpu.count"), advertised // replicas)
        mig = {
            key[len(_MIG) :]: _int(value)
            for key, value in sorted(allocatable.items())
            if key.startswith(_MIG) and _int(value) > 0
        }
        if count and (advertised or mig):
            group: dict[str, Any] = {"type": gpu_type or product or "unknown", "count": count}
            if gpu_type is None and labels.get("nvidia.com/gpu.memory"):
                group["memory"] = _int(labels["nvidia.com/gpu.memory"]) * (1 << 20)
            if mig:
                layout = [p for p, n in mig.items() for _ in range(max(n // count, 1))]
                group["migLayout"] = layout
            elif replicas > 1:
                group["timeSlicing"] = replicas
            foreign = taken.get(name, 0)
            if foreign and not mig:
                group["count"] = max(count - -(-foreign // replicas), 0)
            if group["count"] > 0:
                entry["gpus"].append(group)
        specs.append(entry)
    return Inventory.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "Inventory",
            "metadata": {"name": "cluster"},
            "spec": {"nodes": specs or [{"name": "none", "cpus": 0}]},
        }
    )
