"""``concurrency``: replicas follow the requests in flight, KPA-style, with LLM pressure signals.

Knative's KPA (see ../shared/REFERENCE.md) in brief: desired = ceil(average concurrency over a
stable window / target per replica); a short panic window catches bursts — when it asks for at
least ``panicThreshold`` × the ready replicas the autoscaler scales up at once and refuses to
scale down until a whole stable window passes without panic; steps are bounded (×2 up, ÷2 down
by default). Scale-downs take the highest recommendation within a delay, so a lull between two
bursts does not stop replicas that take a minute to load again.

Concurrency alone misses what an LLM engine knows: a replica whose KV cache is full, or whose
TTFT or inter-token latency misses its objective, is overloaded at any request count (long
prompts, long outputs). Each of those adds one replica per step, and only once every replica
asked for is ready — so a replica still loading is not asked for twice.

Scale to zero (``replicas.min: 0``) needs a whole ``scaleToZeroAfter`` without a request; any
request (arriving, running, waiting or held by the gateway) wakes the model to one replica.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import itemgetter
from typing import ClassVar

from gpufleet.autoscale.model import Sample, ScaleDecision, ScaleState
from gpufleet.spec import ModelSpec

__all__ = ["ConcurrencyPolicy"]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class ConcurrencyPolicy:
    name: ClassVar[str] = "concurrency"

    def decide(
        self, samples: Sequence[Sample], spec: ModelSpec, state: ScaleState, ready: int, now: float
    ) -> ScaleDecision:
        a, lo, hi = spec.autoscaling, spec.replicas.min, spec.replicas.max
        current = state.desired
        latest = samples[-1] if samples else None
        busy = latest is not None and (latest.in_flight > 0 or latest.arrivals > 0)
        last_active = state.last_active
        if busy and latest is not None:
            last_active = max(last_active, latest.t)
        if lo == hi:
            kept = ScaleState(lo, last_active, state.observing_since)
            return ScaleDecision(lo, f"fixed at {lo} (replicas.min = replicas.max)", kept)

        stable_from, panic_from = now - a.stable_window, now - a.panic_window
        stable = [s.in_flight for s in samples if s.t > stable_from]
        burst = [s.in_flight for s in samples if s.t > panic_from]
        stable_avg, panic_avg = _mean(stable), _mean(burst)
        want_stable = math.ceil(stable_avg / a.target_in_flight - 1e-9)
        want_panic = math.ceil(panic_avg / a.target_in_flight - 1e-9)
        observed = now - state.observing_since
        full = observed >= a.stable_window

        # Panic: the short window needs threshold × what is ready (at least one replica).
        panic_until = state.panic_until if state.panic_until and state.panic_until > now else None
        if want_panic >= a.panic_threshold * max(ready, 1) and want_panic > current:
            panic_until = now + a.stable_window
        panicking = panic_until is not None

        recommendation = want_stable if full else max(want_stable, current)
        why = (
            f"average {stable_avg:.1f} requests in flight over {min(observed, a.stable_window):.0f} s"
            f" at a target of {a.target_in_flight:g} a replica"
        )
        if panicking:
            if want_panic > recommendation:
                why = (
                    f"burst: average {panic_avg:.1f} requests in flight over the last "
                    f"{a.panic_window:g} s, {ready} replica(s) ready"
                )
            recommendation = max(recommendation, want_panic, current)

        # LLM pressure: full KV caches or a missed TTFT objective add one replica at a time,
        # and only once every replica asked for is ready.
        pressure = self._pressure(samples, spec, now)
        if pressure and ready >= current and busy and current + 1 > recommendation:
            recommendation, why = current + 1, pressure

        # The scale-down delay: never below the highest recommendation within it, and not at
        # all before the delay has been observed (after a restart the history is empty).
        # Runs every tick over a delay's worth of entries: list comprehensions and a C-level
        # max, not generators (the simulator calls this 86,400 times a simulated day a model).
        delay_from = now - a.scale_down_delay
        history = (*[h for h in state.history if h[0] > delay_from], (now, recommendation))
        if recommendation < current:
            if observed < a.scale_down_delay or not full:
                recommendation = current
            else:
                held = max(map(itemgetter(1), history))
                if held > recommendation:
                    recommendation = held

        # Bounded steps.
        up_limit = max(math.ceil(max(current, 1) * a.max_scale_up_rate), current + 1)
        down_limit = math.floor(current / a.max_scale_down_rate)
        desired = max(min(recommendation, up_limit), down_limit)

        # Floors: one replica while there is traffic (or min), zero only when idle long enough.
        idle_s = now - last_active
        floor = lo
        if lo == 0 and idle_s < a.scale_to_zero_after:
            floor = 1 if current > 0 or busy else 0
        if lo == 0 and current > 0 and idle_s >= a.scale_to_zero_after:
            desired, why = (
                0,
                f"no request for {idle_s:.0f} s (scaleToZeroAfter {a.scale_to_zero_after:g} s)",
            )
        else:
            desired = max(desired, floor)
            if current == 0 and desired > 0:
                why = "a request arrived while scaled to zero"
        desired = min(desired, hi)
        kept = ScaleState(desired, last_active, state.observing_since, panic_until, history)
        return ScaleDecision(desired, why, kept, panic=panicking)

    @staticmethod
    def _pressure(samples: Sequence[Sample], spec: ModelSpec, now: float) -> str:
        a = spec.autoscaling
        panic_from = now - a.panic_window
        recent = [s for s in samples if s.t > panic_from]
        if not recent:
            return ""
        kv = [s.kv_usage for s in recent if s.kv_usage is not None]
        waiting = _mean([s.engine_waiting for s in recent])
        if kv and min(kv) >= a.kv_cache_target and waiting > 0:
            return (
                f"KV caches full: {min(kv):.0%} or more used over {a.panic_window:g} s "
                f"with {waiting:.1f} requests waiting in the engines"
            )
        if a.ttft_objective is not None:
            ttfts = [s.ttft_p90 for s in recent if s.ttft_p90 is not None]
            if ttfts and min(ttfts) > a.ttft_objective:
                return (
                    f"TTFT p90 {min(ttfts):.2f} s over the objective of "
                    f"{a.ttft_objective:g} s for {a.panic_window:g} s"
                )
        if a.itl_objective is not None:
            itls = [s.itl_p90 for s in recent if s.itl_p90 is not None]
            if itls and min(itls) > a.itl_objective:
                return (
                    f"inter-token latency p90 {min(itls) * 1000:.0f} ms over the objective of "
                    f"{a.itl_objective * 1000:g} ms for {a.panic_window:g} s"
                )
        return ""
