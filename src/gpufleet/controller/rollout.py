"""Canary rollouts: judge a new generation on the traffic it served, then promote or roll back.

The controller runs the canary beside the last promoted generation (which keeps its full
count, so capacity never drops during a rollout); the gateway sends it ``canaryPercent`` of
the model's requests and counts, per generation, answers, engine errors (HTTP 5xx) and TTFTs.
``judge`` is pure: a canary that fails too often or misses the TTFT objective is rolled back as
soon as it has answered ``minRequests`` (no need to wait out the analysis to see it is broken);
one that never becomes ready is rolled back at the progress deadline; one that survives the
analysis is promoted. Revisions and their verdicts live in the store, so a restart resumes a
canary, and a rolled-back generation stays rolled back until a new spec is applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from gpufleet.spec import ModelSpec

__all__ = ["GenerationStats", "RolloutStats", "Verdict", "judge"]

Verdict = tuple[Literal["wait", "promote", "rollback"], str]


@dataclass(frozen=True, slots=True)
class GenerationStats:
    requests: int = 0
    errors: int = 0
    ttft_p90: float | None = None


class RolloutStats(Protocol):
    def generation_stats(self, model: str, generation: int) -> GenerationStats:
        """What the replicas of one generation of a model have answered so far."""


def judge(
    spec: ModelSpec, stats: GenerationStats, ready_for: float | None, running_for: float
) -> Verdict:
    """``ready_for``: seconds since the canary first served (None: not yet ready);
    ``running_for``: seconds since the rollout began."""
    r = spec.rollout
    if ready_for is None:
        if running_for >= r.progress_deadline:
            return (
                "rollback",
                f"not ready within the progress deadline of {r.progress_deadline:g} s",
            )
        return "wait", ""
    done = ready_for >= r.analysis
    if stats.requests and (stats.requests >= r.min_requests or done):
        rate = stats.errors / stats.requests
        if rate > r.max_error_rate:
            return "rollback", (
                f"error rate {rate:.0%} ({stats.errors} of {stats.requests} requests) is over "
                f"maxErrorRate {r.max_error_rate:.0%}"
            )
        objective = spec.autoscaling.ttft_objective
        if objective is not None and stats.ttft_p90 is not None and stats.ttft_p90 > objective:
            return "rollback", (
                f"TTFT p90 {stats.ttft_p90:.2f} s is over the objective of {objective:g} s"
            )
    if done:
        return "promote", (
            f"{stats.requests} requests, {stats.errors} errors in {r.analysis:g} s of analysis"
        )
    return "wait", ""
