"""What this machine has: GPUs through NVML (nvidia-ml-py) when a driver is present, else CPU only.

Discovery returns the same ``Inventory`` a person would write, so the planner cannot tell a
discovered machine from a described one. NVML is passed in (``nvml=``) so tests can hand in a
fake with the handful of calls used; in production it is ``pynvml`` from nvidia-ml-py.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from gpufleet.hardware.catalog import normalise_gpu_name
from gpufleet.spec import API_VERSION, Inventory

__all__ = ["discover"]


def _dns(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-." else "-" for c in name.lower()).strip("-.")
    return cleaned[:63] or "local"


def _load_nvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def discover(*, nvml: Any | None = None, node_name: str | None = None) -> Inventory:
    """An inventory of this one machine."""
    nvml = nvml if nvml is not None else _load_nvml()
    groups: list[dict[str, Any]] = []
    if nvml is not None:
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            raw_name = _text(nvml.nvmlDeviceGetName(handle))
            gpu_type = normalise_gpu_name(raw_name) or raw_name
            memory = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            group: dict[str, Any] = {"type": gpu_type, "count": 1, "memory": memory}
            layout = _mig_layout(nvml, handle)
            if layout:
                group["migLayout"] = layout
            groups.append(group)
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    node = {
        "name": _dns(node_name or socket.gethostname()),
        "cpus": os.cpu_count() or 1,
        "memory": int(pages * page_size),
        "gpus": _merge(groups),
    }
    return Inventory.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "Inventory",
            "metadata": {"name": "discovered"},
            "spec": {"nodes": [node]},
        }
    )


def _mig_layout(nvml: Any, handle: Any) -> list[str]:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # noqa: BLE001 - GPUs without MIG raise NVMLError_NotSupported
        return []
    if not current:
        return []
    layout = []
    for j in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
        except Exception:  # noqa: BLE001 - unused MIG slots raise NVMLError_NotFound
            continue
        name = _text(nvml.nvmlDeviceGetName(mig))  # e.g. "NVIDIA H100 80GB HBM3 MIG 3g.40gb"
        layout.append(name.rsplit(" ", 1)[-1])
    return layout


def _merge(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive identical GPUs become one group with a count."""
    merged: list[dict[str, Any]] = []
    for g in groups:
        if merged and {k: v for k, v in merged[-1].items() if k != "count"} == {
            k: v for k, v in g.items() if k != "count"
        }:
            merged[-1]["count"] += 1
        else:
            merged.append(dict(g))
    return merged
