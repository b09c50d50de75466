"""Where a new replica goes on a cluster: the planner's answer on the nodes' inventory.

The pod runtime asks for a replica; this plans the replicas already running (their placements
are kept on their pods as JSON) plus the new one with the same ``plan()`` as ``gpufleet up``
and the simulator, under the cluster's rule that a whole GPU belongs to one pod unless the node
time-slices it or splits it into MIG instances.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter
from collections.abc import Callable

from gpufleet.controller import Directory
from gpufleet.controller.capacity import size_model
from gpufleet.errors import GpufleetError
from gpufleet.planner import Deployment, Placement, PlanSettings, ReplicaKey, plan
from gpufleet.runtime import ReplicaRequest
from gpufleet.runtime.kubernetes import EngineGroup, KubernetesRuntime
from gpufleet.spec import Inventory, ModelSpec

__all__ = ["CLUSTER_PLANNING", "ClusterPlacer", "placement_from_json", "running_placements"]


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
        current = running_placements(self._runtime)
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
            # A whole GPU (or MIG instance) is the pod's alone: the engine's own default share
            # of its memory. Only a time-sliced GPU is shared, and gets the planner's share.
            memory_fraction=chosen.memory_fraction if chosen.time_slice is not None else None,
            mig_profile=chosen.mig_profile,
            placement=json.dumps(dataclasses.asdict(chosen), sort_keys=True),
        )


def running_placements(runtime: KubernetesRuntime) -> list[Placement]:
    """Where the runtime's replicas are, as the planner put them (kept on their pods)."""
    current: list[Placement] = []
    for text in runtime.placements().values():
        with contextlib.suppress(KeyError, TypeError, ValueError):
            current.append(placement_from_json(text))
    return current


def placement_from_json(text: str) -> Placement:
    data = json.loads(text)
    data["replica"] = ReplicaKey(**data["replica"])
    data["gpus"] = tuple(data["gpus"])
    return Placement(**data)
