"""The autoscaler's effects: sample demand, call the pure ``decide``, bound it, persist it.

Every ``interval_s`` each model gets one ``Sample`` from the demand source (the gateway: its
requests in flight, queued and held, arrivals, TTFTs; engine KV use and queues), and
``gpufleet.autoscale.decide`` says how many replicas it should have. The answer is bounded by
what the planner can place (``Capacity``): a need the fleet cannot meet is reported once as an
``Unschedulable`` event and the model's problem, not retried blindly.

What must survive a restart is persisted whenever it changes: the replica count last asked for
and the time of the last request (the scale-to-zero timer, on the wall clock). A restarted
controller starts every model at its persisted count and, having no samples yet, does not
scale down before a whole window has been observed — so restarting gpufleet neither drops a
model to zero nor doubles it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gpufleet.autoscale import (
    Sample,
    ScaleDecision,
    ScaleState,
    decide,
    initial_state,
    is_open,
    next_opening,
)
from gpufleet.planner import PREFILL_POOL_SUFFIX
from gpufleet.spec import ModelSpec, Replicas
from gpufleet.store import Store

__all__ = [
    "Autoscaler",
    "Capacity",
    "DemandSource",
    "ScaleChange",
    "prefill_pool",
    "prefill_scaling",
]

log = logging.getLogger("gpufleet.controller.autoscaler")


def prefill_pool(name: str) -> str:
    """The name of ``name``'s prefill pool: the planner's deployment, the demand source's and
    the store's key for its scale state (``planner.PREFILL_POOL_SUFFIX``)."""
    return name + PREFILL_POOL_SUFFIX


def prefill_scaling(spec: ModelSpec) -> ModelSpec | None:
    """What the policy reads for a disaggregated model's prefill pool: the pool's replica
    bounds and autoscaling (the model's when the pool gives none). None: no pool to run."""
    if spec.disaggregation is None:
        return None
    pool = spec.disaggregation.prefill
    lo, hi = pool.bounds
    if hi <= 0:
        return None
    return spec.pool("prefill").model_copy(
        update={
            "replicas": Replicas(min=lo, max=hi),
            "autoscaling": pool.autoscaling or spec.autoscaling,
        }
    )


#: last_active is written at most this often while a model stays busy (it only matters at the
#: scale-to-zero timescale of minutes).
_ACTIVE_WRITE_S = 15.0


class DemandSource(Protocol):
    def sample(self, model: str, now: float) -> Sample:
        """The model's demand now; counters (arrivals, TTFTs) since the previous call."""


class Capacity(Protocol):
    def bound(self, wants: Mapping[str, tuple[ModelSpec, int]]) -> Mapping[str, tuple[int, str]]:
        """For models whose wanted replicas cannot all be placed: (placeable, why)."""


@dataclass(frozen=True, slots=True)
class ScaleChange:
    model: str
    before: int
    after: int
    reason: str
    #: The fleet could not place what the policy asked for.
    unschedulable: bool = False
    #: The pool of a disaggregated model that moved ("prefill"; "" the model's replicas,
    #: which are its decode pool).
    pool: str = ""


class Autoscaler:
    def __init__(
        self,
        store: Store,
        source: DemandSource | None = None,
        *,
        capacity: Capacity | None = None,
        clock: Callable[[], float] = time.time,
        interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self.source = source
        self.capacity = capacity
        self.clock = clock
        self.interval_s = interval_s
        self._states: dict[str, ScaleState] = {}
        self._persisted: dict[str, tuple[int, float]] = {}
        self._persist_lock = asyncio.Lock()
        self._samples: dict[str, deque[Sample]] = {}
        #: What each model was given at the last pass (for ``placeable``).
        self._wants: dict[str, tuple[ModelSpec, int]] = {}
        #: Whether each model's schedule was open at the last pass.
        self._open: dict[str, bool] = {}
        #: Why a model has fewer replicas than its policy asks for (the planner's reason).
        self.unschedulable: dict[str, str] = {}
        #: A disaggregated model's prefill pool as the last pass could place it: (replicas,
        #: the planner's reason when fewer than its spec asks for).
        self._prefill: dict[str, tuple[int, str]] = {}

    async def load(self) -> None:
        self._persisted = await asyncio.to_thread(self.store.scale_states)

    def state(self, name: str, spec: ModelSpec) -> ScaleState:
        state = self._states.get(name)
        if state is None:
            saved = self._persisted.get(name)
            now = self.clock()
            state = initial_state(spec, now, saved[0] if saved else None)
            if saved is not None:
                state = ScaleState(state.desired, saved[1], now)
            self._states[name] = state
        return state

    def desired(self, name: str, spec: ModelSpec) -> int:
        """Replicas the model should run now: within its spec's bounds, unless the fleet cannot
        place ``replicas.min`` (then what it can)."""
        if spec.engine == "external":
            return len(spec.endpoints)  # one replica per endpoint: never scaled, never placed
        if not is_open(spec.schedule, self.clock()):
            return 0
        held = self._held(name, spec)
        if name not in self._wants and self.capacity is not None:
            # Not bounded by a pass yet (just applied): start no more than the fleet can
            # place beside what the other models were given; the next pass reports the rest.
            return min(held, max(self.placeable(name, spec, held), 0))
        return held

    def _held(self, name: str, spec: ModelSpec) -> int:
        state = self.state(name, spec)
        floor = 0 if name in self.unschedulable else spec.replicas.min
        return min(max(state.desired, floor), spec.replicas.max)

    def placeable(self, name: str, spec: ModelSpec, count: int) -> int:
        """How many of ``count`` replicas of ``name`` the fleet could hold beside what the
        other models were last given (all of them without a capacity bound)."""
        if self.capacity is None or spec.engine == "external":
            return count
        wants = {n: w for n, w in self._wants.items() if n != name}
        wants[name] = (spec, count)
        bound = self.capacity.bound(wants).get(name)
        return count if bound is None else bound[0]

    def closed(self, spec: ModelSpec) -> str:
        """Why the model may not run now (outside its schedule), or ""."""
        now = self.clock()
        if spec.schedule is None or is_open(spec.schedule, now):
            return ""
        opening = next_opening(spec.schedule, now)
        when = f"; it opens at {opening:%Y-%m-%d %H:%M %Z}" if opening is not None else ""
        windows = ", ".join(spec.schedule.windows)
        return f"outside its schedule ({windows} {spec.schedule.timezone}){when}"

    def forget(self, name: str) -> None:
        self._states.pop(name, None)
        self._samples.pop(name, None)
        self._persisted.pop(name, None)
        self.unschedulable.pop(name, None)
        self._open.pop(name, None)
        self._wants.pop(name, None)
        pool = prefill_pool(name)
        self._states.pop(pool, None)
        self._samples.pop(pool, None)
        self._persisted.pop(pool, None)
        self._wants.pop(pool, None)
        self._prefill.pop(name, None)

    def prefill_replicas(self, name: str, spec: ModelSpec, want: int) -> tuple[int, str]:
        """The prefill replicas a disaggregated model runs beside ``want`` replicas: what its
        pool's policy asks for (its fixed count, or between ``replicas`` and ``maxReplicas`` on
        the pool's own demand) while the model has any (none at zero), no more than the last
        pass could place; and the planner's reason when that is fewer."""
        scaling = prefill_scaling(spec)
        if scaling is None or want <= 0:
            return 0, ""
        lo, hi = scaling.replicas.min, scaling.replicas.max
        asked = min(max(self.state(prefill_pool(name), scaling).desired, lo), hi)
        placed, reason = self._prefill.get(name, (asked, ""))
        return min(asked, placed), reason

    async def wake(self, name: str, spec: ModelSpec) -> ScaleChange | None:
        """A request waits for a model with no replica: ask for one now, not at the next tick."""
        state = self.state(name, spec)
        now = self.clock()
        if self.closed(spec):
            return None
        if state.desired >= 1:
            if now - state.last_active > 1.0:
                self._states[name] = dataclasses.replace(state, last_active=now)
            return None
        self._states[name] = dataclasses.replace(state, desired=1, last_active=now)
        await self._persist(name)
        return ScaleChange(name, 0, 1, "a request is waiting for a replica")

    async def tick(
        self,
        models: Mapping[str, tuple[ModelSpec, int]],
        prefill_ready: Mapping[str, int] | None = None,
    ) -> list[ScaleChange]:
        """One sampling and decision pass over ``models`` (name → (spec, ready replicas));
        ``prefill_ready``: a disaggregated model's ready prefill replicas.

        Without a demand source nothing is decided from load: every model keeps the count it
        holds (its spec's, or what a wake-up or ``kubectl scale`` asked for) — but that count
        still goes through the capacity bound, so a model the fleet cannot place is reported
        unschedulable instead of leaving pods no node can take.

        A disaggregated model's two pools scale apart: its replicas (the decode pool) on
        requests in flight, KV-cache use and inter-token latency — not on TTFT while prefill
        replicas are ready, since those set it; its prefill pool, named ``prefill_pool(name)``,
        on the prompts being prefilled and TTFT, through the same policy, with its own bounds
        and state. Both go through the capacity bound together."""
        prefill_ready = prefill_ready or {}
        if self.source is None and self.capacity is None:
            return []
        now = self.clock()
        wants: dict[str, tuple[ModelSpec, int]] = {}
        decided: dict[str, ScaleDecision] = {}
        before: dict[str, int] = {}
        for name, (spec, ready) in models.items():
            # What the model ran with since the last pass (zero while its schedule was shut).
            opened = is_open(spec.schedule, now)
            before[name] = self._held(name, spec) if self._open.get(name, True) else 0
            self._open[name] = opened
            if self.source is None:
                state = self.state(name, spec)
                held = min(max(state.desired, spec.replicas.min), spec.replicas.max)
                decided[name] = ScaleDecision(held, "as its spec says", state)
            else:
                sample = self.source.sample(name, now)
                if spec.disaggregation is not None and prefill_ready.get(name, 0) > 0:
                    sample = dataclasses.replace(sample, ttft_p90=None)  # the prefill pool's
                window = self._observe(name, spec, sample)
                decided[name] = decide(window, spec, self.state(name, spec), ready, now)
            closed = self.closed(spec)
            if closed and decided[name].desired:
                state = dataclasses.replace(decided[name].state, desired=0)
                decided[name] = ScaleDecision(0, closed, state)
            wants[name] = (spec, decided[name].desired)
        # A disaggregated model's prefill pool takes capacity too: one more deployment to place.
        pools: dict[str, tuple[ModelSpec, int]] = {}
        pool_decided: dict[str, ScaleDecision] = {}
        pool_before: dict[str, int] = {}
        for name, (spec, want) in wants.items():
            scaling = prefill_scaling(spec)
            if scaling is None:
                continue
            pool = prefill_pool(name)
            pool_before[pool] = self.state(pool, scaling).desired
            decision = self._decide_pool(pool, scaling, prefill_ready.get(name, 0), now)
            pool_decided[pool] = decision
            pools[pool] = (spec.pool("prefill"), decision.desired if want > 0 else 0)
        bounds = (
            self.capacity.bound({**wants, **pools}) if self.capacity is not None and wants else {}
        )
        changes: list[ScaleChange] = []
        for pool, (pool_spec, count) in pools.items():
            name = pool.removesuffix(PREFILL_POOL_SUFFIX)
            placed, reason = bounds.get(pool, (count, ""))
            placed = min(count, max(placed, 0))
            self._prefill[name] = (placed, reason if placed < count else "")
            self._wants[pool] = (pool_spec, placed)
            decision = pool_decided[pool]
            state = decision.state
            if placed < count:
                # Ask again from what could be placed, as for models; the controller reports
                # the planner's reason (PrefillUnschedulable).
                state = dataclasses.replace(state, desired=placed)
            self._states[pool] = state
            running = wants[name][1] > 0  # at zero the pool stops with its model, silently
            if running and placed == count and state.desired != pool_before[pool]:
                changes.append(
                    ScaleChange(
                        name, pool_before[pool], state.desired, decision.reason, pool="prefill"
                    )
                )
        # States change all at once, with no await in between: a reconcile running meanwhile
        # must never read a decision the capacity bound has not yet cut.
        for name, decision in decided.items():
            state, want = decision.state, decision.desired
            pool = "decode" if wants[name][0].disaggregation is not None else ""
            bound = bounds.get(name)
            after, reported = want, False
            if bound is not None and bound[0] < want:
                # The state keeps what could be placed, so the next pass asks again from there.
                after = max(bound[0], 0)
                state = dataclasses.replace(state, desired=after)
                if self.unschedulable.get(name) != bound[1]:
                    self.unschedulable[name] = bound[1]
                    reason = f"wants {want} replicas; {bound[1]}"
                    changes.append(ScaleChange(name, before[name], after, reason, True, pool))
                    reported = True
            else:
                self.unschedulable.pop(name, None)
            self._states[name] = state
            self._wants[name] = (wants[name][0], after)
            if after != before[name] and not reported:
                changes.append(ScaleChange(name, before[name], after, decision.reason, pool=pool))
        for name in (*decided, *pool_decided):
            if self._stale(name):
                await self._persist(name)
        return changes

    def _observe(self, name: str, spec: ModelSpec, sample: Sample) -> deque[Sample]:
        """``sample`` added to ``name``'s window, which keeps what the policy looks back on."""
        window = self._samples.setdefault(name, deque())
        window.append(sample)
        horizon = sample.t - max(spec.autoscaling.stable_window, spec.autoscaling.panic_window)
        while window and window[0].t <= horizon:
            window.popleft()
        return window

    def _decide_pool(self, pool: str, scaling: ModelSpec, ready: int, now: float) -> ScaleDecision:
        """The prefill pool's policy decision (its spec's count without a demand source)."""
        state = self.state(pool, scaling)
        if self.source is None:
            lo, hi = scaling.replicas.min, scaling.replicas.max
            held = min(max(state.desired, lo), hi)
            return ScaleDecision(held, "as its spec says", dataclasses.replace(state, desired=held))
        window = self._observe(pool, scaling, self.source.sample(pool, now))
        return decide(window, scaling, state, ready, now)

    def _stale(self, name: str) -> bool:
        """Whether the stored state lags: its count, or its idle timer — written at most every
        ``_ACTIVE_WRITE_S`` while the model stays busy, and once more when it falls idle (its
        last activity no longer moves), so a restart times scale-to-zero from the last request,
        not from up to ``_ACTIVE_WRITE_S`` before it."""
        saved = self._persisted.get(name)
        state = self._states[name]
        return (
            saved is None
            or saved[0] != state.desired
            or state.last_active - saved[1] >= _ACTIVE_WRITE_S
            or saved[1] < state.last_active < self.clock()
        )

    async def _persist(self, name: str) -> None:
        # One write at a time, each of the state as it is when its turn comes: two writes in
        # flight at once (a wake-up and a pass) could land the older one last, and a restart
        # would then read a stale count or idle timer.
        async with self._persist_lock:
            state = self._states.get(name)
            if state is None:
                return
            record = (state.desired, state.last_active)
            if self._persisted.get(name) == record:
                return
            await asyncio.to_thread(self.store.put_scale_state, name, *record)
            self._persisted[name] = record
