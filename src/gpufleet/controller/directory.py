"""The in-memory directory the gateway reads on every request.

The controller writes it (specs from the store, replicas from the runtime's watch); the gateway
only reads. Reads are plain dict lookups of frozen values: no lock, no I/O on the hot path. On
Kubernetes the same shape is filled from Model objects and EndpointSlices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gpufleet.runtime import Phase, Replica
from gpufleet.spec import ModelSpec

__all__ = ["Directory", "ModelEntry"]


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    generation: int
    spec: ModelSpec
    created: int  # unix seconds, for the OpenAI model list
    replicas: tuple[Replica, ...] = ()
    #: Why the model cannot serve, when a person must act (bad weights, missing engine).
    problem: str = ""
    #: What kind of problem: Failed (a person must act), Unschedulable (no room in the fleet),
    #: OffSchedule (outside the model's time windows).
    problem_kind: str = "Failed"
    #: Replicas the controller wants now (the autoscaler's bounded decision); 0: scaled to zero.
    desired: int = 1
    #: A canary under analysis: (its generation, percent of requests it gets).
    canary: tuple[int, int] | None = None
    #: What the rollout is doing, for people ("canary generation 3 at 10 %: ...").
    rollout: str = ""

    def pool(self, draw: float) -> tuple[Replica, ...]:
        """The endpoints a request may go to, given a uniform draw in [0, 1): during a canary,
        the canary generation's for ``percent`` of draws and the others' for the rest."""
        endpoints = self.endpoints
        if self.canary is None:
            return endpoints
        generation, percent = self.canary
        new = tuple(r for r in endpoints if r.generation == generation)
        old = tuple(r for r in endpoints if r.generation != generation)
        if not new or not old:
            return endpoints
        return new if draw * 100 < percent else old

    @property
    def endpoints(self) -> tuple[Replica, ...]:
        """The replicas that answer requests (a disaggregated model's decode pool)."""
        return tuple(r for r in self.replicas if r.routable and r.role != "prefill")

    @property
    def prefill_endpoints(self) -> tuple[Replica, ...]:
        """A disaggregated model's ready prefill replicas."""
        return tuple(r for r in self.replicas if r.routable and r.role == "prefill")

    @property
    def status(self) -> str:
        if self.endpoints:
            return "Ready"
        if self.problem:
            return self.problem_kind
        if self.desired == 0 and not self.replicas:
            return "ScaledToZero"
        if any(r.phase is Phase.BACKOFF for r in self.replicas):
            return "BackOff"
        return "Starting"


class Directory:
    def __init__(self) -> None:
        self._entries: dict[str, ModelEntry] = {}

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def entries(self) -> list[ModelEntry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def put_spec(self, name: str, generation: int, spec: ModelSpec, created: int) -> None:
        old = self._entries.get(name)
        if old is not None and old.generation == generation:
            return
        self._entries[name] = ModelEntry(
            name,
            generation,
            spec,
            created,
            old.replicas if old else (),
            problem="",
            desired=old.desired if old else spec.replicas.min,
        )

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)

    def set_desired(self, name: str, desired: int) -> None:
        entry = self._entries.get(name)
        if entry is not None and entry.desired != desired:
            self._entries[name] = dataclasses.replace(entry, desired=desired)

    def set_rollout(self, name: str, canary: tuple[int, int] | None, text: str) -> None:
        entry = self._entries.get(name)
        if entry is not None and (entry.canary, entry.rollout) != (canary, text):
            self._entries[name] = dataclasses.replace(entry, canary=canary, rollout=text)

    def set_problem(self, name: str, problem: str, kind: str = "Failed") -> None:
        entry = self._entries.get(name)
        if entry is not None:
            self._entries[name] = dataclasses.replace(entry, problem=problem, problem_kind=kind)

    def observe(self, replica: Replica) -> None:
        entry = self._entries.get(replica.model)
        if entry is None:
            return
        others = tuple(r for r in entry.replicas if r.id != replica.id)
        alive = replica.phase is not Phase.STOPPED
        replicas = (*others, replica) if alive else others
        self._entries[replica.model] = dataclasses.replace(
            entry, replicas=tuple(sorted(replicas, key=lambda r: r.id))
        )
