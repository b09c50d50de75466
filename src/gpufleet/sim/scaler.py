"""A scaler the simulator can run instead of the production autoscaler, to compare the two.

By default the simulator runs ``gpufleet.autoscale.decide`` — the policy the controller runs —
with the model's ``spec.autoscaling``. A benchmark that compares it with another system's
algorithm (KubeAI's, Kubernetes HPA's as KEDA drives it) plugs that algorithm in per model
through ``SimSettings.scalers``: a factory that builds one :class:`Scaler` per model from its
spec. The scaler sees what the production autoscaler sees — one :class:`Sample` a tick (the
gateway's requests in flight and queued, arrivals, engine KV use and queues, TTFT p90) — plus
the replicas ready and asked for, and answers with the replicas it wants. It keeps its own
state and samples at its own interval (it may return ``current`` between its own syncs); the
simulator still bounds the answer by what the planner can place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gpufleet.autoscale import Sample
from gpufleet.spec import ModelSpec

__all__ = ["Scaler", "ScalerFactory"]


class Scaler(Protocol):
    #: Shown as the reason of the scaling events it causes.
    name: str

    def decide(self, sample: Sample, ready: int, current: int, now: float) -> int:
        """The replicas the model should have at ``now``: ``sample`` is this tick's look at its
        demand, ``ready`` the replicas serving, ``current`` those asked for (loading
        included)."""
        ...


ScalerFactory = Callable[[ModelSpec], Scaler]
