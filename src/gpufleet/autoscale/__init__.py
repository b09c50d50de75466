"""The autoscaler's pure core: ``decide(samples, spec, state, ready, now) -> ScaleDecision``.

Pure like the planner and routing: no clock, no I/O. The controller feeds it samples from the
gateway and engines and persists what it decides; the simulator feeds it modelled samples, so
``gpufleet sim`` and the live system scale alike. Policies are named plug-ins (one file each);
``spec.autoscaling.policy`` names the one a model uses.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpufleet.autoscale.concurrency import ConcurrencyPolicy
from gpufleet.autoscale.model import Sample, ScaleDecision, ScaleState, ScalingPolicy
from gpufleet.autoscale.schedule import is_open, next_opening
from gpufleet.spec import ModelSpec

__all__ = [
    "POLICIES",
    "ConcurrencyPolicy",
    "Sample",
    "ScaleDecision",
    "ScaleState",
    "ScalingPolicy",
    "decide",
    "initial_state",
    "is_open",
    "next_opening",
]

POLICIES: dict[str, ScalingPolicy] = {p.name: p for p in (ConcurrencyPolicy(),)}


def initial_state(spec: ModelSpec, now: float, desired: int | None = None) -> ScaleState:
    """The state of a model seen for the first time (``desired`` from a persisted decision)."""
    start = spec.replicas.min if desired is None else desired
    start = min(max(start, spec.replicas.min), spec.replicas.max)
    return ScaleState(desired=start, last_active=now, observing_since=now)


def decide(
    samples: Sequence[Sample], spec: ModelSpec, state: ScaleState, ready: int, now: float
) -> ScaleDecision:
    return POLICIES[spec.autoscaling.policy].decide(samples, spec, state, ready, now)
