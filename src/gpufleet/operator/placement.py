"""Where a new replica goes on a cluster: the planner's answer on the nodes' inventory.

The pod runtime asks for a replica; this plans the replicas already running (their placements
are kept on their pods, and on the LeaderWorkerSets of multi-node ones, as JSON) plus the new
one with the same ``plan()`` as ``gpufleet up``, ``render`` and the simulator, under the
cluster's rule that a whole GPU belongs to one pod unless the node time-slices it or splits it
into MIG instances (``CLUSTER_PLANNING``).

A disaggregated model's prefill replica is planned as the planner names its pool,
``<model>:prefill`` (``planner.pool_deployments``), sized from the pool's spec: its placement,
kept on its pod, counts against the pool's replicas and the next plans see it as the
controller's capacity bound does.

A replica bigger than any node comes back as the planner put it — tensor parallel within each
node, pipeline parallel across them (``EngineGroup.pp`` nodes, ``gpus`` each, the leader's node
and the workers') — and the runtime pins a LeaderWorkerSet there. When the planner finds no
room for such a replica this raises ``TemporaryError`` instead: a group left to the scheduler
unpinned would hold GPUs the planner does not know of, or wait for nodes shaped as the
``gpus_per_node`` guess says. The capacity bound normally keeps such a replica from being asked
for at all (the model is reported Unschedulable); this covers the moments the two disagree
(a node just gone), and the controller asks again later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter
from collections.abc import Callable

from gpufleet.controller import Directory, ModelEntry
from gpufleet.controller.capacity import size_model
from gpufleet.errors import GpufleetError, TemporaryError
from gpufleet.planner import PREFILL_POOL_SUFFIX, Deployment, Placement, ReplicaKey, plan
from gpufleet.runtime import ReplicaRequest
from gpufleet.runtime.kubernetes import EngineGroup, KubernetesRuntime
from gpufleet.runtime.kubernetes.manifests import CLUSTER_PLANNING, placed_group
from gpufleet.spec import Inventory, ModelSpec

__all__ = ["CLUSTER_PLANNING", "ClusterPlacer", "placement_from_json", "running_placements"]

#: How long the controller waits before asking again for a replica with no room across nodes.
RETRY_S = 15.0


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
        pool = request.model + (PREFILL_POOL_SUFFIX if request.role == "prefill" else "")
        try:
            mine = self._size(pool, request.spec)
        except (GpufleetError, OSError, ValueError):
            mine = None
        if mine is None:
            return fallback  # not sized: the runtime's own rule (gpus_per_node) decides
        current = running_placements(self._runtime)
        counts = Counter(p.replica.deployment for p in current)
        used = {p.replica.index for p in current if p.replica.deployment == pool}
        index = next(i for i in range(len(used) + 1) if i not in used)
        top = max(max(used, default=-1), index)
        deployments = {pool: dataclasses.replace(mine, replicas=top + 1)}
        for entry in self._directory.entries():
            for name, spec in _pools(entry):
                if name == pool or not counts.get(name):
                    continue
                try:
                    dep = self._size(name, spec)
                except (GpufleetError, OSError, ValueError):
                    dep = None
                if dep is not None:
                    top = max(p.replica.index for p in current if p.replica.deployment == name)
                    deployments[name] = dataclasses.replace(dep, replicas=top + 1)
        known = [p for p in current if p.replica.deployment in deployments]
        inventory = self._inventory()
        result = plan(inventory, deployments.values(), current=known, settings=CLUSTER_PLANNING)
        key = ReplicaKey(pool, index)
        chosen = next((p for p in result.placements if p.replica == key), None)
        if chosen is not None:
            return placed_group(chosen, key=chosen.node)
        gpus = request.spec.resources.gpus
        largest = max((node.gpu_count for node in inventory.nodes), default=0)
        if gpus > 1 and (gpus > largest or gpus > self._runtime.settings.gpus_per_node):
            reason = next((u.reason for u in result.unplaced if u.replica == key), "no room")
            raise TemporaryError(f"cannot place {key} across nodes: {reason}", RETRY_S)
        return fallback  # one node's worth: an unpinned pod, the scheduler's reason reported


def _pools(entry: ModelEntry) -> list[tuple[str, ModelSpec]]:
    """A model's pools by the planner's names, each with the spec its replicas run."""
    if entry.spec.disaggregation is None:
        return [(entry.name, entry.spec)]
    return [
        (entry.name, entry.spec.pool("decode")),
        (entry.name + PREFILL_POOL_SUFFIX, entry.spec.pool("prefill")),
    ]


def running_placements(runtime: KubernetesRuntime) -> list[Placement]:
    """Where the runtime's replicas are, as the planner put them (kept on their pods)."""
    current: list[Placement] = []
    for text in runtime.placements().values():
        with contextlib.suppress(KeyError, TypeError, ValueError):
            current.append(placement_from_json(text))
    return current


def placement_from_json(text: str) -> Placement:
    """A placement as ``placed_group`` wrote it (older ones, without ``workers``, too)."""
    data = json.loads(text)
    data["replica"] = ReplicaKey(**data["replica"])
    return Placement(**data)
