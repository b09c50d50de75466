"""The planner's inputs and outputs: plain frozen values, so the simulator can call it unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_PRIORITIES",
    "Deployment",
    "Eviction",
    "MigRelayout",
    "Migration",
    "Placement",
    "Plan",
    "PlanSettings",
    "ReplicaKey",
    "Stage",
    "Unplaced",
]

Sharing = Literal["memory", "mig", "exclusive"]
Spread = Literal["preferred", "required", "none"]

DEFAULT_PRIORITIES: Mapping[str, int] = {"interactive": 100, "batch": 50, "best-effort": 10}


@dataclass(frozen=True, slots=True)
class Deployment:
    """A model to place: how many replicas, and what one needs per GPU at each TP degree.

    ``memory_per_gpu`` maps a degree — the GPUs one replica holds — to the bytes each of them
    must give (from ``gpufleet.sizing``); a degree of 0 means a CPU replica needing that much
    node memory. A degree no node can hold runs tensor parallel within nodes and pipeline
    parallel across them (TP × PP = the degree).
    """

    name: str
    replicas: int
    memory_per_gpu: Mapping[int, int]
    priority: int = 100
    priority_class: str = "interactive"
    #: Allowed GPU types, most preferred first; empty allows any.
    gpu_types: tuple[str, ...] = ()
    #: memory: share whole GPUs by memory; mig: a MIG instance of its own; exclusive: whole GPUs alone.
    sharing: Sharing = "memory"
    #: Replicas of one deployment on different nodes: preferred (soft), required (hard) or none.
    spread: Spread = "preferred"


@dataclass(frozen=True, slots=True, order=True)
class ReplicaKey:
    deployment: str
    index: int

    def __str__(self) -> str:
        return f"{self.deployment}#{self.index}"


Stage = tuple[str, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one replica runs: GPUs on one node, or — for a model bigger than a node — tensor
    parallel within each of ``pp`` nodes and pipeline parallel across them.

    The first pipeline stage (the leader's) is ``node``/``gpus``; ``workers`` holds the others,
    in stage order, each on a node of its own with as many GPUs of the same type. A replica on
    one node has no workers, so placements written before multi-node ones read back unchanged.
    """

    replica: ReplicaKey
    node: str
    gpus: tuple[int, ...]  # GPU indices on the node; () for a CPU replica
    gpu_type: str | None
    memory_per_gpu: int
    #: The engine's share of each GPU's memory (vLLM's --gpu-memory-utilization).
    memory_fraction: float
    mig_profile: str | None = None
    mig_instance: int | None = None
    time_slice: int | None = None
    #: Pipeline stages after the leader's: (node, GPU indices on it) each; () on one node.
    workers: tuple[Stage, ...] = ()

    def __post_init__(self) -> None:
        # Read back from JSON (``dataclasses.asdict`` writes lists): tuples again, so
        # placements compare equal and hash as they did before they were written.
        object.__setattr__(self, "gpus", tuple(self.gpus))
        object.__setattr__(
            self, "workers", tuple((str(node), tuple(gpus)) for node, gpus in self.workers)
        )

    @property
    def tp(self) -> int:
        """Tensor-parallel degree: GPUs per pipeline stage."""
        return len(self.gpus)

    @property
    def pp(self) -> int:
        """Pipeline-parallel degree: nodes the replica spans (1 on one node)."""
        return 1 + len(self.workers)

    @property
    def gpu_count(self) -> int:
        """GPUs the replica holds in all (TP × PP)."""
        return len(self.gpus) * self.pp

    @property
    def nodes(self) -> tuple[str, ...]:
        """The leader's node, then the workers', in stage order."""
        return (self.node, *(node for node, _ in self.workers))

    @property
    def stages(self) -> tuple[Stage, ...]:
        """(node, GPU indices) of every pipeline stage, the leader's first."""
        return ((self.node, self.gpus), *self.workers)

    @property
    def slots(self) -> frozenset[tuple[str, int]]:
        """(node, GPU index) of every GPU it holds, on every stage: what two placements share."""
        return frozenset((node, gpu) for node, gpus in self.stages for gpu in gpus)

    def where(self) -> str:
        if not self.gpus:
            base = f"{self.node}/cpu"
        else:
            base = " + ".join(
                f"{node}/gpu-{','.join(str(g) for g in gpus)}" for node, gpus in self.stages
            )
        if self.mig_profile is not None:
            base += f"/mig-{self.mig_instance}:{self.mig_profile}"
        if self.time_slice is not None:
            base += f"/slice-{self.time_slice}"
        return base


@dataclass(frozen=True, slots=True)
class Eviction:
    placement: Placement
    reason: str


@dataclass(frozen=True, slots=True)
class Migration:
    before: Placement
    after: Placement
    reason: str


@dataclass(frozen=True, slots=True)
class MigRelayout:
    node: str
    gpu: int
    layout: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class Unplaced:
    replica: ReplicaKey
    reason: str


@dataclass(frozen=True, slots=True)
class PlanSettings:
    #: Share of each GPU's memory the planner hands out (the rest is headroom for compute spikes).
    memory_headroom: float = 0.9
    #: Engines sharing one whole GPU at most (compute headroom so busy models don't starve).
    max_replicas_per_gpu: int = 4
    defragment: bool = True
    #: GPUs a set of migrations must free before it is worth moving running replicas.
    min_gpus_freed: int = 1
    #: The optimising pass runs on instances up to this many replicas (TP 1, no MIG) ...
    optimise_max_replicas: int = 60
    #: ... for at most this long.
    optimise_time_limit_s: float = 2.0


@dataclass(frozen=True, slots=True)
class Plan:
    placements: tuple[Placement, ...]
    evictions: tuple[Eviction, ...] = ()
    migrations: tuple[Migration, ...] = ()
    relayouts: tuple[MigRelayout, ...] = ()
    unplaced: tuple[Unplaced, ...] = ()
    gpus_used: int = 0
    gpus_total: int = 0
    #: Memory handed out / memory of the GPUs in use.
    memory_utilisation: float = 0.0
    solver: str = "heuristic"
    notes: tuple[str, ...] = field(default_factory=tuple)
