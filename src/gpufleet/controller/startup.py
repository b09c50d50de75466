"""Replicas' start-ups counted: ``gpufleet_replica_startup_seconds{model,phase}``, and the
sentence a ``ReplicaReady`` event says ("ready in 12.3 s (fetch 0.0 s, load 11.9 s, first
probe 0.4 s)").

A start is counted once, when it completes — the replica turns Ready from starting or after a
crash, not back from a moment of Unready — with one observation per phase its runtime measured
(``runtime.startup`` says what each phase is and where one is None). A restart is a start of
its own: it is told apart by the replica's restart count.

Who counts: under ``gpufleet up`` the controller, whose process serves the gateway's /metrics
(where ``collectors()`` is registered, as ``supervise``'s are). On Kubernetes the operator
serves no /metrics, so each gateway counts from the pods it follows: every gateway counts every
start, which leaves the quantiles the fleet's and the counts per gateway (take ``max`` across
gateways, not ``sum``). A recorder counts only starts that completed after it was made, so a
process that restarts does not count again the replicas it adopts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Histogram
from prometheus_client.registry import Collector

from gpufleet.runtime import Phase, Replica
from gpufleet.runtime.startup import phases, summary

__all__ = ["STARTUP", "StartupRecorder", "collectors"]

#: From a local look-up (milliseconds) to a large model's first download (an hour or two).
_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

#: Not registered anywhere by default: ``collectors()`` are for the registry a process serves.
STARTUP = Histogram(
    "gpufleet_replica_startup_seconds",
    "Replica start-up by phase: fetch (weights onto the machine), load (engine started to "
    "answering its health path), ready (answering to the first ready probe passing)",
    ["model", "phase"],
    buckets=_BUCKETS,
    registry=None,
)


def collectors() -> tuple[Collector, ...]:
    """The start-up histogram, to register where a process serves its metrics."""
    return (STARTUP,)


class StartupRecorder:
    """Counts each start of each replica once, as its changes go by."""

    def __init__(
        self, histogram: Histogram = STARTUP, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._histogram = histogram
        #: Starts that completed before this (unix seconds) are not counted.
        self._since = clock()
        #: Replica id → the restart count of its start last counted.
        self._counted: dict[str, int] = {}

    def observe(self, replica: Replica) -> str | None:
        """Count ``replica``'s start if this change completes one; the start's summary
        (``runtime.startup.summary``) if it does and has figures, else None."""
        if replica.phase is Phase.STOPPED:
            self._counted.pop(replica.id, None)
            return None
        if replica.phase is not Phase.READY or self._counted.get(replica.id) == replica.restarts:
            return None
        self._counted[replica.id] = replica.restarts
        # A replica ready before this recorder began (adopted) was counted by the one before.
        if replica.ready_at is None or replica.ready_at >= self._since:
            for phase, seconds in phases(replica):
                self._histogram.labels(replica.model, phase).observe(seconds)
        return summary(replica)
