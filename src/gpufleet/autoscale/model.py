"""The autoscaler's values: what it sees (samples), what it remembers (state), what it decides.

All times are seconds on one clock chosen by the caller (the controller uses wall-clock time so
that persisted state means the same after a restart; tests and the simulator use their own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from gpufleet.spec import ModelSpec

__all__ = ["Sample", "ScaleDecision", "ScaleState", "ScalingPolicy"]


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at a model's demand, taken every second or so."""

    t: float
    #: Requests the gateway has for the model right now: running on engines, waiting in its fair
    #: queue, and held while no replica is ready. The first signal: exact and without delay.
    in_flight: float
    #: Requests that arrived since the previous sample (a short request may start and end
    #: between two samples; it still counts as activity).
    arrivals: int = 0
    #: Mean KV-cache use (0-1) of the ready replicas, from engine metrics; None when unknown.
    kv_usage: float | None = None
    #: Requests waiting inside the engines (their own queues).
    engine_waiting: float = 0.0
    #: 90th-percentile time to first token of the requests whose first token came since the
    #: previous sample; None when there were none.
    ttft_p90: float | None = None
    #: 90th percentile of the mean inter-token latency of the streams that ended since the
    #: previous sample; None when there were none.
    itl_p90: float | None = None


@dataclass(frozen=True, slots=True)
class ScaleState:
    """What the autoscaler carries from one decision to the next (the controller persists
    ``desired`` and ``last_active``; the rest is rebuilt after a restart)."""

    desired: int
    #: Last time the model had a request arriving or in flight (for scale to zero).
    last_active: float
    #: Since when samples have been collected: no window is judged before it is full, so a
    #: restarted controller (with no samples yet) never scales down on an empty window.
    observing_since: float
    #: Panic mode holds until this time.
    panic_until: float | None = None
    #: Recent recommendations (time, replicas), for the scale-down delay.
    history: tuple[tuple[float, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    desired: int
    #: Why, in words a person reads in ``gpufleet events`` (e.g. "average 23.5 requests in
    #: flight over 60 s at a target of 8 a replica").
    reason: str
    state: ScaleState
    panic: bool = False


class ScalingPolicy(Protocol):
    name: ClassVar[str]

    def decide(
        self, samples: Sequence[Sample], spec: ModelSpec, state: ScaleState, ready: int, now: float
    ) -> ScaleDecision:
        """The replicas ``spec``'s model should have at ``now``, given recent ``samples``
        (oldest first), the carried ``state`` and the replicas ``ready`` now."""
