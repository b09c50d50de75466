"""Inventories checked against the catalog: known GPU types, MIG layouts that fit.

A MIG layout is accepted when every profile exists for the GPU type and the instances together
use at most the GPU's compute slices (7 on A100/H100/H200, 4 on A30) and its memory. NVIDIA's
exact rule also constrains *positions* of instances; this check is the necessary condition,
which the planner's layout search refines.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gpufleet.errors import SpecError
from gpufleet.hardware.catalog import CATALOG, Accelerator, normalise_gpu_name
from gpufleet.spec import Inventory, load_inventory_text

__all__ = ["check_inventory", "compute_slices", "load_inventory", "mig_layout_problem"]


def compute_slices(gpu: Accelerator) -> int:
    return max((p.compute_slices for p in gpu.mig_profiles), default=0)


def mig_layout_problem(gpu: Accelerator, layout: list[str]) -> str | None:
    """Why ``layout`` cannot be carved out of one ``gpu``, or None when it can."""
    if not layout:
        return None
    if not gpu.supports_mig:
        return f"{gpu.name} does not support MIG (use timeSlicing to share it)"
    profiles = []
    for name in layout:
        profile = gpu.mig_profile(name)
        if profile is None:
            valid = ", ".join(p.name for p in gpu.mig_profiles)
            return f"{name!r} is not a MIG profile of {gpu.name} (valid: {valid})"
        profiles.append(profile)
    slices = sum(p.compute_slices for p in profiles)
    if slices > compute_slices(gpu):
        return f"the layout needs {slices} compute slices; {gpu.name} has {compute_slices(gpu)}"
    for profile in profiles:
        if layout.count(profile.name) > profile.max_count:
            return f"at most {profile.max_count} × {profile.name} fit one {gpu.name}"
    memory = sum(p.memory_bytes for p in profiles)
    if memory > gpu.memory_bytes:
        return f"the layout needs {memory / 1e9:.0f} GB; {gpu.name} has {gpu.memory_bytes / 1e9:.0f} GB"
    return None


def check_inventory(
    inventory: Inventory, catalog: Mapping[str, Accelerator] = CATALOG
) -> list[str]:
    problems = []
    for n, node in enumerate(inventory.nodes):
        for g, group in enumerate(node.gpus):
            where = f"spec.nodes[{n}].gpus[{g}]"
            canonical = normalise_gpu_name(group.type)
            if canonical is None or canonical not in catalog or canonical == "cpu":
                known = ", ".join(k for k in catalog if k != "cpu")
                problems.append(f"{where}.type: unknown GPU type {group.type!r}; known: {known}")
                continue
            problem = mig_layout_problem(catalog[canonical], group.mig_layout)
            if problem:
                problems.append(f"{where}.migLayout: {problem}")
    return problems


def load_inventory(path: str | Path, catalog: Mapping[str, Accelerator] = CATALOG) -> Inventory:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([f"{p}: cannot be read ({exc.strerror or exc})"]) from exc
    inventory = load_inventory_text(text, filename=str(p))
    problems = check_inventory(inventory, catalog)
    if problems:
        raise SpecError([f"{p}: {problem}" for problem in problems])
    return inventory
