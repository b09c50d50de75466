"""The fleet page's view: nodes → GPUs → MIG slices or time-slices, each with what holds it.

Three sources, joined here and nowhere else (a pure function of plain values):

- the inventory (what the planner plans on): nodes, GPU groups, MIG layouts, time-slicing;
- the planner's placements (what each device is *planned* to hold, its memory per GPU);
- the telemetry's latest readings (what each device *holds* now: memory used, utilisation,
  the replica whose engine owns it — ``telemetry.gpus``).

Either of the last two may be missing: the local runtime does not pin replicas to GPUs, so
under ``gpufleet up`` only telemetry says where a replica runs; a cluster gateway knows each
replica's placement from its pod. A device is *idle* when nothing is planned on it and no
replica holds it — what the cost report counts as fleet idle. A MIG instance in a reading is
matched to the inventory's slot of the same profile in order of its GPU-instance id (NVML's
ids are not the planner's slot numbers). A fleet with no GPU at all (the default CPU install)
is said in words, with its CPU replicas listed instead of empty panels.

One pass over each input; 1,000 GPUs and 500 models build in milliseconds (bench/console_fleet.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gpufleet.controller import ModelEntry
from gpufleet.hardware import CATALOG, normalise_gpu_name
from gpufleet.planner import Placement
from gpufleet.runtime import Replica
from gpufleet.spec import Inventory
from gpufleet.telemetry.gpus import GpuReading

__all__ = ["NO_GPUS", "UNKNOWN_GPUS", "Planned", "fleet_view", "planned_of", "replica_places"]

NO_GPUS = "no GPUs: this fleet runs on CPU"
UNKNOWN_GPUS = (
    "the fleet's GPUs are not known here yet (no inventory shared by the operator and no GPU "
    "telemetry)"
)
_MIG_INDEX = re.compile(r"^(\d+)/mig-([^/]+)/(\d+)$")


@dataclass(frozen=True, slots=True)
class Planned:
    """One device a placement plans a replica on (a multi-GPU replica has one per GPU)."""

    model: str
    replica: str | None  # the replica's id where the runtime knows it (a pod's placement)
    node: str
    gpu: int
    memory: int  # bytes planned on this GPU (or MIG instance)
    mig_instance: int | None = None
    time_slice: int | None = None


def planned_of(placements: Iterable[tuple[Placement, str | None]]) -> list[Planned]:
    """Every device of every placement, with the replica id where one is known."""
    out: list[Planned] = []
    for p, rid in placements:
        for node, gpus in p.stages:
            for gpu in gpus:
                out.append(
                    Planned(
                        p.replica.deployment,
                        rid,
                        node,
                        gpu,
                        p.memory_per_gpu,
                        p.mig_instance,
                        p.time_slice,
                    )
                )
    return out


def _device(index: str | None = None, profile: str | None = None) -> dict[str, Any]:
    return {
        "index": index,
        "name": None,
        "profile": profile,
        "memory_total": None,
        "memory_used": None,
        "memory_planned": 0,
        "util": None,
        "power_w": None,
        "temp_c": None,
        "holders": [],
        "idle": True,
    }


def _read(device: dict[str, Any], r: GpuReading) -> None:
    device["name"] = r.name
    device["memory_used"] = r.memory_used
    if r.memory_total is not None:
        device["memory_total"] = r.memory_total
    device["util"] = r.util if r.util is not None else r.sm_active
    device["power_w"], device["temp_c"] = r.power_w, r.temp_c
    if r.replica is not None or r.model is not None:
        holder = {"replica": r.replica, "model": r.model or "?", "planned": False}
        device["holders"].append(holder)


def _plan(device: dict[str, Any], p: Planned) -> None:
    """Count a placement's memory; show its model unless a reading already shows the replica
    (a reading's holder stands for one placement: the first of its model)."""
    device["memory_planned"] += p.memory
    for h in device["holders"]:
        if "slot" not in h and h["model"] == p.model and p.replica in (None, h["replica"]):
            h["slot"] = p.time_slice
            return
    device["holders"].append(
        {"replica": p.replica, "model": p.model, "planned": True, "slot": p.time_slice}
    )


def _gpus_of_inventory(inventory: Inventory) -> dict[str, dict[str, dict[str, Any]]]:
    """node → GPU index → device, as the planner numbers them (in group order per node)."""
    nodes: dict[str, dict[str, dict[str, Any]]] = {}
    for node in inventory.nodes:
        gpus: dict[str, dict[str, Any]] = {}
        for group in node.gpus:
            kind = normalise_gpu_name(group.type) or group.type
            card = CATALOG.get(kind)
            memory = group.memory or (card.memory_bytes if card else None)
            for _ in range(group.count):
                gpu = _device(str(len(gpus)))
                gpu.update(type=kind, memory_total=memory, slots=group.time_slicing, slices=[])
                gpu["mode"] = (
                    "mig"
                    if group.mig_layout
                    else "time-sliced"
                    if group.time_slicing > 1
                    else "whole"
                )
                for i, profile in enumerate(group.mig_layout):
                    mig = card.mig_profile(profile) if card else None
                    piece = _device(f"{gpu['index']}/mig-{profile}/slot-{i}", profile)
                    piece["memory_total"] = mig.memory_bytes if mig else None
                    gpu["slices"].append(piece)
                gpus[gpu["index"]] = gpu
        nodes[node.name] = gpus
    return nodes


def _gpu(nodes: dict[str, dict[str, dict[str, Any]]], node: str, index: str) -> dict[str, Any]:
    gpus = nodes.setdefault(node, {})
    gpu = gpus.get(index)
    if gpu is None:
        gpu = _device(index)
        gpu.update(type=None, slots=1, slices=[], mode="whole")
        gpus[index] = gpu
    return gpu


def _attach_readings(
    nodes: dict[str, dict[str, dict[str, Any]]], readings: Sequence[GpuReading]
) -> None:
    instances: dict[tuple[str, str], list[tuple[str, int, GpuReading]]] = {}
    for r in readings:
        mig = _MIG_INDEX.match(r.index)
        if mig is None:
            gpu = _gpu(nodes, r.node, r.index)
            _read(gpu, r)
            if gpu["type"] is None:
                gpu["type"] = normalise_gpu_name(r.name) or r.name
        else:
            instances.setdefault((r.node, mig.group(1)), []).append(
                (mig.group(2), int(mig.group(3)), r)
            )
    for (node, index), found in instances.items():
        gpu = _gpu(nodes, node, index)
        gpu["mode"] = "mig"
        slices: list[dict[str, Any]] = gpu["slices"]
        free = {id(s): s for s in slices}
        for profile, gi, r in sorted(found, key=lambda f: (f[0], f[1])):
            piece = next((s for s in slices if s["profile"] == profile and id(s) in free), None)
            if piece is None:
                piece = _device(r.index, profile)
                slices.append(piece)
            free.pop(id(piece), None)
            piece["index"], piece["gi"] = r.index, gi
            _read(piece, r)


def _attach_plans(nodes: dict[str, dict[str, dict[str, Any]]], planned: Sequence[Planned]) -> None:
    for p in planned:
        gpu = _gpu(nodes, p.node, str(p.gpu))
        if p.mig_instance is not None and p.mig_instance < len(gpu["slices"]):
            _plan(gpu["slices"][p.mig_instance], p)
        else:
            _plan(gpu, p)


def _settle(gpu: dict[str, Any]) -> None:
    """Idle flags, and a MIG GPU's figures summed from its instances."""
    slices = gpu["slices"]
    if not slices:
        gpu["idle"] = not gpu["holders"]
        return
    gpu["idle"] = False  # a GPU cut into instances is not a device work runs on: they are
    for piece in slices:
        piece["idle"] = not piece["holders"]
    if gpu["memory_used"] is None:
        used = [s["memory_used"] for s in slices if s["memory_used"] is not None]
        gpu["memory_used"] = sum(used) if used else None
    gpu["memory_planned"] += sum(s["memory_planned"] for s in slices)


def _replica_row(r: Replica) -> dict[str, Any]:
    return {
        "id": r.id,
        "model": r.model,
        "phase": r.phase.value,
        "pid": r.pid,
        "restarts": r.restarts,
        "message": r.message,
    }


def fleet_view(
    inventory: Inventory | None,
    readings: Sequence[GpuReading],
    planned: Sequence[Planned],
    entries: Sequence[ModelEntry],
    *,
    telemetry: bool,
) -> dict[str, Any]:
    """The fleet page's JSON: ``summary``, ``nodes`` (each with ``gpus``), the replicas on no
    GPU (``elsewhere``), and ``message`` when there are no GPUs to draw."""
    nodes = _gpus_of_inventory(inventory) if inventory is not None else {}
    _attach_readings(nodes, readings)
    _attach_plans(nodes, planned)
    held: set[str] = set()
    planned_models: set[str] = set()
    devices = idle = slices = 0
    used = total = 0
    utils: list[float] = []
    node_rows = []
    specs = {n.name: n for n in inventory.nodes} if inventory is not None else {}
    for name in sorted(nodes):
        gpus = [nodes[name][k] for k in sorted(nodes[name], key=_index_key)]
        for gpu in gpus:
            _settle(gpu)
            for device in gpu["slices"] or [gpu]:
                devices += 1
                idle += device["idle"]
                for h in device["holders"]:
                    if h["replica"]:
                        held.add(h["replica"])
                    elif h["planned"]:
                        planned_models.add(h["model"])
            slices += len(gpu["slices"])
            used += gpu["memory_used"] or 0
            total += gpu["memory_total"] or 0
            if gpu["util"] is not None:
                utils.append(gpu["util"])
        spec = specs.get(name)
        node_rows.append(
            {
                "name": name,
                "cpus": spec.cpus if spec else None,
                "memory": spec.memory if spec else None,
                "gpus": gpus,
                "idle": sum(d["idle"] for g in gpus for d in (g["slices"] or [g])),
            }
        )
    gpu_count = sum(len(n["gpus"]) for n in node_rows)
    replicas = [r for e in entries for r in e.replicas]
    elsewhere = [
        _replica_row(r) for r in replicas if r.id not in held and r.model not in planned_models
    ]
    view: dict[str, Any] = {
        "gpus": gpu_count > 0,
        "telemetry": telemetry,
        "summary": {
            "nodes": len(node_rows) if gpu_count else len(specs),
            "gpus": gpu_count,
            "devices": devices,
            "idle": idle,
            "mig_slices": slices,
            "memory_used": used,
            "memory_total": total,
            "util": sum(utils) / len(utils) if utils else None,
            "models": len(entries),
            "replicas": len(replicas),
            "ready": sum(len(e.endpoints) for e in entries),
        },
        "nodes": [n for n in node_rows if n["gpus"]],
        "cpu_nodes": [
            {"name": s.name, "cpus": s.cpus, "memory": s.memory}
            for s in (inventory.nodes if inventory is not None else [])
            if not s.gpus
        ],
        "elsewhere": elsewhere,
    }
    if not gpu_count:
        view["message"] = NO_GPUS if inventory is not None else UNKNOWN_GPUS
    return view


def _index_key(index: str) -> tuple[int, str]:
    return (int(index), "") if index.isdigit() else (1 << 30, index)


def replica_places(
    readings: Sequence[GpuReading], planned: Sequence[Planned]
) -> dict[str, list[str]]:
    """replica id → the devices it holds ("node/gpu 0", "node/gpu 0 · 1g.10gb"), from the
    telemetry, else from its placement where the runtime knows it."""
    places: dict[str, list[str]] = {}
    for r in readings:
        if r.replica is not None:
            mig = _MIG_INDEX.match(r.index)
            where = f"{r.node}/gpu {r.index}"
            if mig is not None:
                where = f"{r.node}/gpu {mig.group(1)} · {mig.group(2)}"
            places.setdefault(r.replica, []).append(where)
    seen = set(places)
    for p in planned:
        if p.replica is not None and p.replica not in seen:
            places.setdefault(p.replica, []).append(f"{p.node}/gpu {p.gpu}")
    return places
