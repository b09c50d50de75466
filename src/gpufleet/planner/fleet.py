"""The planner's working state: every GPU (or MIG instance) with what is placed on it.

Whole GPUs are indexed per type in a list sorted by free memory, so best fit — the smallest
free space that still fits — is a bisection, and a plan over 10,000 GPUs stays well under a
second. MIG instances are slots of their own: one replica each, never shared.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from gpufleet.hardware import CATALOG, Accelerator, normalise_gpu_name
from gpufleet.planner.model import Deployment, Placement, PlanSettings, ReplicaKey
from gpufleet.spec import Inventory

__all__ = ["Fleet", "Gpu"]


@dataclass(eq=False)
class Gpu:
    node: str
    index: int
    type: str
    memory: int
    usable: int
    max_replicas: int
    time_slicing: int
    mig_capable: bool
    layout: list[str] | None = None  # MIG instances' profiles, or None for a whole GPU
    instance_memory: list[int] = field(default_factory=list)
    instance_owner: list[ReplicaKey | None] = field(default_factory=list)
    used: int = 0
    replicas: dict[ReplicaKey, int] = field(default_factory=dict)
    exclusive: bool = False

    @property
    def free(self) -> int:
        return self.usable - self.used

    @property
    def in_use(self) -> bool:
        return bool(self.replicas) or any(o is not None for o in self.instance_owner)

    @property
    def name(self) -> str:
        return f"{self.node}/gpu-{self.index}"

    def sort_key(self) -> tuple[int, str, int]:
        return (self.free, self.node, self.index)


class Fleet:
    def __init__(
        self,
        inventory: Inventory,
        settings: PlanSettings,
        catalog: Mapping[str, Accelerator] = CATALOG,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self._free: dict[str, list[tuple[int, str, int]]] = {}
        self._lookup: dict[tuple[str, int], Gpu] = {}
        self._shapes: dict[str, tuple[tuple[str, int, int, bool], ...]] = {}
        #: Nodes holding at least one replica, sorted; the empty ones grouped by shape.
        self.busy_nodes: list[str] = []
        self._empty_by_shape: dict[tuple[tuple[str, int, int, bool], ...], list[str]] = {}
        self.gpus: list[Gpu] = []
        self.by_node: dict[str, list[Gpu]] = {}
        self.cached: dict[str, frozenset[str]] = {}
        self.node_memory_free: dict[str, int | None] = {}
        self.node_replicas: dict[str, dict[str, int]] = {}  # node -> deployment -> count
        self.placements: dict[ReplicaKey, Placement] = {}
        for node in sorted(inventory.nodes, key=lambda n: n.name):
            gpus: list[Gpu] = []
            for group in node.gpus:
                name = normalise_gpu_name(group.type) or group.type
                acc = catalog.get(name)
                memory = group.memory or (acc.memory_bytes if acc else 0)
                for _ in range(group.count):
                    gpu = Gpu(
                        node=node.name,
                        index=len(gpus),
                        type=name,
                        memory=memory,
                        usable=int(memory * settings.memory_headroom),
                        max_replicas=group.time_slicing
                        if group.time_slicing > 1
                        else settings.max_replicas_per_gpu,
                        time_slicing=group.time_slicing,
                        mig_capable=bool(acc and acc.supports_mig),
                    )
                    if group.mig_layout and acc is not None:
                        self.set_layout(gpu, list(group.mig_layout), acc)
                    gpus.append(gpu)
                    self._lookup[(gpu.node, gpu.index)] = gpu
            self.by_node[node.name] = gpus
            self.gpus.extend(gpus)
            self.cached[node.name] = frozenset(node.cached_models)
            self.node_memory_free[node.name] = node.memory
            self.node_replicas[node.name] = {}
        for name in self.by_node:
            self._empty_by_shape.setdefault(self.node_shape(name), []).append(name)
        #: Models whose weights some node holds (a node lacking them only loses if another has them).
        self.cached_anywhere: frozenset[str] = (
            frozenset().union(*self.cached.values()) if self.cached else frozenset()
        )
        for gpu in self.gpus:
            if gpu.layout is None:
                self._free.setdefault(gpu.type, []).append(gpu.sort_key())
        for entries in self._free.values():
            entries.sort()

    # -- lookups ----------------------------------------------------------------------------

    def gpu(self, node: str, index: int) -> Gpu | None:
        return self._lookup.get((node, index))

    def types(self) -> list[str]:
        return sorted(self._free)

    def whole_gpus_by_free(self, gpu_type: str, need: int) -> Iterator[Gpu]:
        """Whole GPUs of ``gpu_type`` with at least ``need`` free, tightest first."""
        entries = self._free.get(gpu_type, [])
        for i in range(bisect.bisect_left(entries, (need, "", -1)), len(entries)):
            _, node, index = entries[i]
            yield self._lookup[(node, index)]

    def node_shape(self, node: str) -> tuple[tuple[str, int, int, bool], ...]:
        """What an empty node offers, for telling identical empty nodes apart cheaply."""
        shape = self._shapes.get(node)
        if shape is None:
            shape = tuple(
                (g.type, g.usable, g.max_replicas, g.layout is None) for g in self.by_node[node]
            )
            self._shapes[node] = shape
        return shape

    def node_sizes(self, gpu_type: str) -> dict[str, int]:
        """Whole GPUs of ``gpu_type`` on each node that has any: what one pipeline stage of a
        replica bigger than a node can hold there."""
        sizes: dict[str, int] = {}
        for node, gpus in self.by_node.items():
            count = sum(1 for g in gpus if g.type == gpu_type and g.layout is None)
            if count:
                sizes[node] = count
        return sizes

    def gpus_used(self) -> int:
        return sum(1 for g in self.gpus if g.in_use)

    def allowed(self, gpu: Gpu, deployment: Deployment) -> bool:
        return not deployment.gpu_types or gpu.type in deployment.gpu_types

    def type_rank(self, gpu: Gpu, deployment: Deployment) -> int:
        return deployment.gpu_types.index(gpu.type) if gpu.type in deployment.gpu_types else 0

    def on_node(self, node: str, deployment: str) -> int:
        return self.node_replicas[node].get(deployment, 0)

    # -- changes ----------------------------------------------------------------------------

    def set_layout(self, gpu: Gpu, layout: list[str], acc: Accelerator) -> None:
        """Carve ``gpu`` into MIG instances (it leaves the whole-GPU index)."""
        self._reindex(gpu, remove_only=True)  # while it is still a whole GPU
        gpu.layout = layout
        gpu.instance_memory = [p.memory_bytes for p in (acc.mig_profile(n) for n in layout) if p]
        gpu.instance_owner = [None] * len(layout)
        # The node's shape changed: an empty node moves to its new group.
        old_shape = self._shapes.pop(gpu.node, None)
        group = self._empty_by_shape.get(old_shape, []) if old_shape is not None else []
        if gpu.node in group:
            group.remove(gpu.node)
            bisect.insort(self._empty_by_shape.setdefault(self.node_shape(gpu.node), []), gpu.node)

    def add(self, placement: Placement, *, exclusive: bool = False) -> None:
        key = placement.replica
        if placement.gpus:
            for gpu in self._gpus_of(placement):
                if placement.mig_instance is not None:
                    gpu.instance_owner[placement.mig_instance] = key
                    continue
                self._reindex(gpu, remove_only=True)
                gpu.used += placement.memory_per_gpu
                gpu.replicas[key] = placement.memory_per_gpu
                gpu.exclusive = gpu.exclusive or exclusive
                self._reindex(gpu)
        else:
            free = self.node_memory_free[placement.node]
            if free is not None:
                self.node_memory_free[placement.node] = free - placement.memory_per_gpu
        for node in placement.nodes:
            counts = self.node_replicas[node]
            if not counts:
                self._set_busy(node, busy=True)
            counts[key.deployment] = counts.get(key.deployment, 0) + 1
        self.placements[key] = placement

    def remove(self, key: ReplicaKey) -> Placement:
        placement = self.placements.pop(key)
        if placement.gpus:
            for gpu in self._gpus_of(placement):
                if placement.mig_instance is not None:
                    gpu.instance_owner[placement.mig_instance] = None
                    continue
                self._reindex(gpu, remove_only=True)
                gpu.used -= gpu.replicas.pop(key)
                if not gpu.replicas:
                    gpu.exclusive = False
                self._reindex(gpu)
        else:
            free = self.node_memory_free[placement.node]
            if free is not None:
                self.node_memory_free[placement.node] = free + placement.memory_per_gpu
        for node in placement.nodes:
            counts = self.node_replicas[node]
            counts[key.deployment] -= 1
            if not counts[key.deployment]:
                del counts[key.deployment]
            if not counts:
                self._set_busy(node, busy=False)
        return placement

    def _gpus_of(self, placement: Placement) -> list[Gpu]:
        return [self._lookup[(node, i)] for node, gpus in placement.stages for i in gpus]

    def empty_nodes(self) -> dict[tuple[tuple[str, int, int, bool], ...], list[str]]:
        """Empty nodes grouped by what they offer, each group sorted by name."""
        return self._empty_by_shape

    def _set_busy(self, node: str, *, busy: bool) -> None:
        shape = self.node_shape(node)
        empties = self._empty_by_shape.setdefault(shape, [])
        if busy:
            i = bisect.bisect_left(empties, node)
            if i < len(empties) and empties[i] == node:
                del empties[i]
            bisect.insort(self.busy_nodes, node)
        else:
            i = bisect.bisect_left(self.busy_nodes, node)
            if i < len(self.busy_nodes) and self.busy_nodes[i] == node:
                del self.busy_nodes[i]
            bisect.insort(empties, node)

    def _reindex(self, gpu: Gpu, *, remove_only: bool = False) -> None:
        if gpu.layout is not None:
            return
        entries = self._free.setdefault(gpu.type, [])
        key = gpu.sort_key()
        if remove_only:
            i = bisect.bisect_left(entries, key)
            if i < len(entries) and entries[i] == key:
                del entries[i]
        else:
            bisect.insort(entries, key)

    def memory_in_use(self) -> tuple[int, int]:
        """(memory handed out, memory of the GPUs in use)."""
        given = 0
        total = 0
        for g in self.gpus:
            if not g.in_use:
                continue
            total += g.memory
            given += g.used + sum(
                m for m, o in zip(g.instance_memory, g.instance_owner, strict=True) if o is not None
            )
        return given, total
