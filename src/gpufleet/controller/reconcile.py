"""The reconcile loop: make what runs equal what the store says should run.

In the controller-runtime style: a pass for one model gets only the model's name, re-reads the
desired state (the store) and the observed state (the runtime), and takes idempotent steps.
Triggers for a model that is already queued merge into one pass; each model has one worker, and
models reconcile in parallel. Errors decide retries: a ``TemporaryError`` requeues after its delay,
a ``PermanentError`` (missing weights, missing engine) is reported once per generation and waits
for the spec to change. A pass that fails because the store or the API server does not answer is
part of that dependency's outage, reported once (``controller.failures``); other failures are
logged per model, rate-limited.

How many replicas a model runs is the autoscaler's answer (``controller.autoscaler``): its
persisted count, changed by decisions every second from the gateway's demand, bounded by what
the planner can place. A request for a model at zero replicas ``wake``s it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gpufleet.controller.autoscaler import Autoscaler, DemandSource, ScaleChange
from gpufleet.controller.directory import Directory
from gpufleet.controller.failures import PassFailures
from gpufleet.controller.rollout import GenerationStats, Verdict, judge
from gpufleet.controller.startup import StartupRecorder
from gpufleet.errors import PermanentError, TemporaryError
from gpufleet.policies.costs import replica_price_per_hour
from gpufleet.runtime import Phase, Replica, ReplicaRequest, Role, Runtime
from gpufleet.spec import Inventory, Model, ModelSpec
from gpufleet.store import ApplyResult, Revision, Store
from gpufleet.supervise import Supervisor

if TYPE_CHECKING:
    from gpufleet.controller.jobs import JobScheduler

__all__ = ["Controller"]

log = logging.getLogger("gpufleet.controller")

_GONE = (Phase.STOPPING, Phase.STOPPED)
_EVENTS = {
    Phase.READY: ("Normal", "ReplicaReady"),
    Phase.BACKOFF: ("Warning", "ReplicaCrashed"),
    Phase.UNREADY: ("Warning", "ReplicaUnready"),
    Phase.FAILED: ("Warning", "ReplicaFailed"),
    Phase.STOPPED: ("Normal", "ReplicaStopped"),
}


class Controller:
    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        *,
        autoscaler: Autoscaler | None = None,
        resync_s: float = 15.0,
        retry_s: float = 5.0,
        failures: PassFailures | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.autoscaler = autoscaler or Autoscaler(store)
        #: GPU jobs' scheduler (``controller.jobs``) where this controller runs them (``gpufleet
        #: up``); the admin API's ``/admin/v1/jobs`` reach it here.
        self.jobs: JobScheduler | None = None
        self.directory = Directory()
        self._resync_s = resync_s
        self._retry_s = retry_s
        self._dirty: dict[str, asyncio.Event] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: Supervised loops (restarted after an error; ``unhealthy`` while one is down).
        self._loops = Supervisor()
        #: Failed passes: outages of the store or the API server reported once, other errors
        #: rate-limited (``failures.outages`` is the reporter; ``gpufleet up`` shares the
        #: gateway's).
        self.failures = failures or PassFailures()
        self._reported: dict[str, tuple[int, str]] = {}
        self._phases: dict[str, Phase] = {}
        #: Canary rollouts under way: when each began, and when its first replica served.
        self._canary_since: dict[tuple[str, int], float] = {}
        self._canary_ready: dict[tuple[str, int], float] = {}
        #: Replicas out of routing, finishing their requests before they stop.
        self._draining: dict[str, asyncio.Task[None]] = {}
        self._drain_model: dict[str, str] = {}
        #: Worker passes begun and finished per model, and a condition notified as each one
        #: finishes: what ``reconciled`` waits on.
        self._begun: dict[str, int] = {}
        self._finished: dict[str, int] = {}
        self._passed = asyncio.Condition()
        self._stopped = False
        #: Replicas' start-ups, counted as they complete (``controller.startup``).
        self.startups = StartupRecorder()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.autoscaler.load()
        for stored in await asyncio.to_thread(self.store.list_models, "default"):
            self.directory.put_spec(
                stored.model.name,
                stored.generation,
                stored.model.spec,
                int(stored.created_at.timestamp()),
            )
            self.trigger(stored.model.name)
        # Replicas the runtime already runs (pods adopted by a restarted operator).
        for replica in self.runtime.replicas():
            self.directory.observe(replica)
            self._phases[replica.id] = replica.phase
        await self._account_spans()
        self._loops.spawn("controller:watch", self._watch)
        self._tasks.append(asyncio.create_task(self._resync(), name="controller:resync"))
        self._tasks.append(asyncio.create_task(self._autoscale(), name="controller:autoscale"))

    async def stop(self) -> None:
        """Stop reconciling. Replicas keep running; closing the runtime stops them."""
        self._stopped = True
        await self._loops.close()
        tasks = [*self._tasks, *self._workers.values(), *self._draining.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._workers.clear()

    def inventory(self) -> Inventory | None:
        """The inventory the planner bounds replicas by (None: not bounded by one)."""
        inventory = getattr(self.autoscaler.capacity, "inventory", None)
        return inventory if isinstance(inventory, Inventory) else None

    def unhealthy(self) -> list[str]:
        """The controller's critical background loops that are down (readiness fails)."""
        return self._loops.unhealthy()

    def trigger(self, name: str) -> None:
        if self._stopped:
            return
        self._dirty.setdefault(name, asyncio.Event()).set()
        if name not in self._workers:
            self._workers[name] = asyncio.create_task(self._worker(name), name=f"reconcile:{name}")

    async def reconciled(self, name: str) -> None:
        """Return once a pass for ``name`` that began after this call has finished.

        A test that asserts nothing changed (no replica started or stopped) waits on this
        instead of sleeping: the pass saw the state as of the call, and took every step it was
        going to take. Waits for ever on a stopped controller; callers bound it.
        """
        target = self._begun.get(name, 0) + 1
        self.trigger(name)
        async with self._passed:
            await self._passed.wait_for(lambda: self._finished.get(name, 0) >= target)

    # -- desired state ----------------------------------------------------------------------

    async def apply(self, models: list[Model]) -> list[tuple[str, ApplyResult, int]]:
        results: list[tuple[str, ApplyResult, int]] = []
        for model in models:
            result, generation = await asyncio.to_thread(self.store.apply_model, model)
            stored = await asyncio.to_thread(self.store.get_model, model.name)
            created = int(stored.created_at.timestamp()) if stored else int(time.time())
            self.directory.put_spec(model.name, generation, model.spec, created)
            if result != "unchanged":
                await self._event(
                    model.name, "Normal", "Applied", f"generation {generation} {result}"
                )
            results.append((model.name, result, generation))
            self.trigger(model.name)
        return results

    async def delete(self, name: str) -> bool:
        deleted = await asyncio.to_thread(self.store.delete_model, name)
        if deleted:
            self.autoscaler.forget(name)
            await self._event(name, "Normal", "Deleted", "model deleted; stopping its replicas")
            self.trigger(name)
        return deleted

    def attach_demand(self, source: DemandSource) -> None:
        if self.autoscaler.source is None:
            self.autoscaler.source = source

    async def wake(self, name: str) -> None:
        """A request is waiting for ``name``, which has no ready replica: make sure one comes."""
        entry = self.directory.get(name)
        if entry is not None:
            change = await self.autoscaler.wake(name, entry.spec)
            if change is not None:
                await self._scaled(change)
                # Bound it now: on a full fleet a lower priority model must make room first.
                await self.autoscale_once()
        self.trigger(name)

    async def autoscale_once(self) -> list[ScaleChange]:
        """One autoscaler pass over every model (the loop runs it every ``interval_s``)."""
        models, prefill_ready = {}, {}
        for entry in self.directory.entries():
            if entry.spec.engine == "external":
                continue  # one replica per endpoint: never scaled, never placed
            ready = sum(
                1
                for r in entry.replicas
                if r.generation == entry.generation and r.routable and r.role != "prefill"
            )
            models[entry.name] = (entry.spec, ready)
            if entry.spec.disaggregation is not None:
                prefill_ready[entry.name] = len(entry.prefill_endpoints)
        changes = await self.autoscaler.tick(models, prefill_ready)
        for change in changes:
            await self._scaled(change)
        return changes

    async def _scaled(self, change: ScaleChange) -> None:
        if change.unschedulable:
            kind, reason = "Warning", "Unschedulable"
        elif change.after == 0:
            kind, reason = "Normal", "ScaledToZero"
        elif change.before == 0:
            kind, reason = "Normal", "Woken"
        else:
            kind, reason = "Normal", "ScaledUp" if change.after > change.before else "ScaledDown"
        text = f"{change.before} → {change.after} replicas: {change.reason}"
        if change.pool:
            text = f"{change.pool} pool: {text}"
        if change.pool == "prefill":
            reason = "Prefill" + reason  # PrefillScaledUp, … (the model's own stay as they are)
        await self._event(change.model, kind, reason, text)
        self.trigger(change.model)

    # -- reconcile --------------------------------------------------------------------------

    async def reconcile(self, name: str) -> float | None:
        """One pass for one model. Returns seconds until the next pass is needed, if any."""
        stored = await asyncio.to_thread(self.store.get_model, name)
        running = [
            r
            for r in self.runtime.replicas(name)
            if r.phase not in _GONE and r.id not in self._draining
        ]
        if stored is None:
            self.directory.remove(name)
            await asyncio.gather(*(self._stop(r) for r in running))
            return None
        # A disaggregated model's prefill pool follows the generation its replicas (the decode
        # pool, which rollouts and canaries move) run; everything below is about the latter.
        prefill = [r for r in running if r.role == "prefill"]
        replicas = [r for r in running if r.role != "prefill"]

        spec, generation = stored.model.spec, stored.generation
        self.directory.put_spec(name, generation, spec, int(stored.created_at.timestamp()))
        want = self.autoscaler.desired(name, spec)
        self.directory.set_desired(name, want)

        # Which generation runs: the newest, unless it is a canary under analysis or was
        # rolled back (then the last promoted one, whose spec the store keeps). Replicas of
        # any generation with the same engine template count as current: changing replicas,
        # routing or quotas restarts no engine.
        revisions = {r.generation: r for r in await asyncio.to_thread(self.store.revisions, name)}
        templates = {g: _template(r.model.spec) for g, r in revisions.items()}
        templates[generation] = _template(spec)

        def like(g: int) -> set[int]:
            return {other for other, t in templates.items() if t == templates[g]}

        target = revisions.get(generation)
        stable = max(
            (r for r in revisions.values() if r.status == "active" and r.generation < generation),
            key=lambda r: r.generation,
            default=None,
        )
        if target is not None and target.status == "new":
            if (
                spec.rollout.strategy == "canary"
                and stable is not None
                and generation not in like(stable.generation)
            ):
                same = like(stable.generation)
                await self._converge_prefill(
                    name, stable.generation, stable.model.spec, prefill, want, same
                )
                return await self._canary(name, generation, spec, stable, replicas, want, same)
            await asyncio.to_thread(self.store.set_revision_status, name, generation, "active")
        elif target is not None and target.status == "rolled-back":
            if stable is None:
                self.directory.set_problem(name, f"generation {generation} was rolled back")
                await asyncio.gather(*(self._stop(r) for r in running))
                return None
            self.directory.set_rollout(
                name, None, f"generation {generation} rolled back: {target.reason}"
            )
            generation, spec = stable.generation, stable.model.spec
        else:
            self.directory.set_rollout(name, None, "")
        await self._converge_prefill(name, generation, spec, prefill, want, like(generation))
        return await self._converge(name, generation, spec, replicas, want, like(generation))

    async def _converge_prefill(
        self,
        name: str,
        generation: int,
        spec: ModelSpec,
        replicas: list[Replica],
        want: int,
        same: set[int],
    ) -> None:
        """Run a disaggregated model's prefill pool: ``disaggregation.prefill.replicas`` like
        ``generation`` while the model has replicas at all (none when it is scaled to zero or
        not disaggregated), as many as the fleet can place beside everything else (the planner's
        reason is an event); old ones stop once the new are ready. A prefill replica that cannot
        start or be placed is an event, not the model's problem: its requests prefill where
        they decode."""
        target, unplaced = self.autoscaler.prefill_replicas(name, spec, want)
        if unplaced:
            await self._event_once(
                name, generation, "PrefillUnschedulable", f"prefill pool: {unplaced}"
            )
        current = [r for r in replicas if r.generation in same]
        old = [r for r in replicas if r.generation not in same]
        failed = [r for r in current if r.phase is Phase.FAILED]
        if failed:
            await self._event_once(
                name, generation, "PrefillFailedToStart", f"{failed[0].id}: {failed[0].message}"
            )
            current = [r for r in current if r.phase is not Phase.FAILED]
        elif len(current) < target:
            await self._start(name, generation, spec, target - len(current), "prefill")
        if len(current) > target:
            extra = sorted(current, key=lambda r: r.phase is Phase.READY)[: len(current) - target]
            await asyncio.gather(*(self._stop(r) for r in extra))
        if old and sum(1 for r in current if r.phase is Phase.READY) >= target:
            await asyncio.gather(*(self._stop(r) for r in old))

    async def _converge(
        self,
        name: str,
        generation: int,
        spec: ModelSpec,
        replicas: list[Replica],
        want: int,
        same: set[int],
    ) -> float | None:
        """Run ``want`` replicas like ``generation`` (any of ``same``); stop the others once
        those are ready."""
        current = [r for r in replicas if r.generation in same]
        old = [r for r in replicas if r.generation not in same]

        failed = [r for r in current if r.phase is Phase.FAILED]
        if failed:
            self.directory.set_problem(name, failed[0].message)
            await self._event_once(name, generation, "FailedToStart", failed[0].message)
            return None

        if len(current) < want:
            missing = want - len(current)
            if old:
                # A rollout: surge beside the old replicas where the fleet has room, else
                # replace in place — drain an old replica first, start its successor after.
                held = len(current) + len(old) + self._draining_of(name)
                room = self.autoscaler.placeable(name, spec, held + missing) - held
                if room <= 0:
                    victim = sorted(old, key=lambda r: r.phase is Phase.READY)[0]
                    await self._event(
                        name,
                        "Normal",
                        "ReplacingInPlace",
                        f"no room beside the old replicas: stopping {victim.id} first",
                    )
                    await self._stop(victim)
                    return 1.0
                missing = min(missing, room)
            if not await self._start(name, generation, spec, missing):
                return None
        elif len(current) > want:
            extra = sorted(current, key=lambda r: r.phase is Phase.READY)[: len(current) - want]
            await asyncio.gather(*(self._stop(r) for r in extra))

        ready_now = sum(1 for r in current if r.phase is Phase.READY)
        if old and ready_now >= want:
            await asyncio.gather(*(self._stop(r) for r in old))
        closed = self.autoscaler.closed(spec) if want == 0 else ""
        unschedulable = self.autoscaler.unschedulable.get(name, "") if want == 0 else ""
        if closed:
            self.directory.set_problem(name, closed, "OffSchedule")
        else:
            self.directory.set_problem(name, unschedulable, "Unschedulable")
        return 60.0 if spec.schedule is not None else None  # windows open and close by the clock

    def _draining_of(self, name: str) -> int:
        return sum(1 for model in self._drain_model.values() if model == name)

    async def _start(
        self, name: str, generation: int, spec: ModelSpec, count: int, role: Role = ""
    ) -> bool:
        if spec.disaggregation is not None and not role:
            role = "decode"
        pool = spec.pool(role) if role else spec
        for _ in range(count):
            request = ReplicaRequest(name, generation, pool, role)
            try:
                replica = await self.runtime.start(request)
            except PermanentError as exc:
                self.directory.set_problem(name, str(exc))
                await self._event_once(name, generation, "FailedToStart", str(exc))
                return False
            self.directory.observe(replica)
            await self._open_span(name, replica.id, generation, pool)
            what = f"{role} replica" if role == "prefill" else "replica"
            await self._event(name, "Normal", "ReplicaStarting", f"{what} {replica.id} starting")
        return True

    async def _open_span(
        self,
        model: str,
        replica: str,
        generation: int,
        spec: ModelSpec,
        at: dt.datetime | None = None,
    ) -> None:
        """The replica holds its capacity from ``at`` (the cost report's placed time)."""
        types = spec.resources.gpu_types
        await asyncio.to_thread(
            self.store.open_span,
            model,
            replica,
            generation=generation,
            gpus=float(spec.resources.gpus),
            gpu_type=types[0] if types and spec.resources.gpus else None,
            price_per_hour=replica_price_per_hour(spec),
            at=at or dt.datetime.now(dt.UTC),
        )

    async def _account_spans(self) -> None:
        """Spans follow what runs: open for every replica the runtime has (one adopted from a
        previous operator included), ``seen_at`` moved on, and a span whose replica is gone
        without a word (a process that died with its replicas) ended where it was last seen."""
        at = dt.datetime.now(dt.UTC)
        live = [r for r in self.runtime.replicas() if r.phase is not Phase.STOPPED]
        opened = set(await asyncio.to_thread(self.store.open_spans))
        for replica in live:
            entry = self.directory.get(replica.model)
            if replica.id not in opened and entry is not None:
                started = replica.started_at
                since = dt.datetime.fromtimestamp(started, dt.UTC) if started else at
                spec = entry.spec.pool(replica.role) if replica.role else entry.spec
                await self._open_span(replica.model, replica.id, replica.generation, spec, since)
        # GPU jobs' attempts hold capacity too (their spans are the job scheduler's).
        held = [r.id for r in live] + (self.jobs.span_ids() if self.jobs is not None else [])
        await asyncio.to_thread(self.store.touch_spans, held, at)

    async def _canary(
        self,
        name: str,
        generation: int,
        spec: ModelSpec,
        stable: Revision,
        replicas: list[Replica],
        want: int,
        stable_like: set[int],
    ) -> float | None:
        """A canary pass: the stable generation at full count, the canary beside it, judged."""
        now = self.autoscaler.clock()
        key = (name, generation)
        pct = spec.rollout.canary_percent
        canary = [r for r in replicas if r.generation == generation]
        base = [r for r in replicas if r.generation in stable_like]
        others = [r for r in replicas if r.generation != generation and r not in base]
        await asyncio.gather(*(self._stop(r) for r in others))
        if key not in self._canary_since:
            self._canary_since[key] = now
            await self._event(
                name,
                "Normal",
                "CanaryStarted",
                f"generation {generation} takes {pct} % of requests beside generation "
                f"{stable.generation} for {spec.rollout.analysis:g} s",
            )
        size = max(1, math.ceil(max(want, 1) * pct / 100))
        verdict: Verdict = ("wait", "")
        if len(canary) < size and not await self._start(name, generation, spec, size - len(canary)):
            entry = self.directory.get(name)
            verdict = (
                "rollback",
                f"a canary replica cannot start: {entry.problem if entry else ''}",
            )
        if len(base) < want:
            await self._start(name, stable.generation, stable.model.spec, want - len(base))
        canary = [
            r
            for r in self.runtime.replicas(name)
            if r.generation == generation and r.phase not in _GONE
        ]
        if any(r.routable for r in canary):
            self._canary_ready.setdefault(key, now)
        failed = [r for r in canary if r.phase is Phase.FAILED]
        if failed:
            verdict = ("rollback", f"a canary replica cannot start: {failed[0].message}")
        if verdict[0] == "wait":
            ready_at = self._canary_ready.get(key)
            stats = self._rollout_stats(name, generation)
            verdict = judge(
                spec,
                stats,
                None if ready_at is None else now - ready_at,
                now - self._canary_since[key],
            )
            self.directory.set_rollout(
                name,
                (generation, pct) if ready_at is not None else None,
                f"canary generation {generation} at {pct} %: {stats.requests} requests, "
                f"{stats.errors} errors",
            )
        if verdict[0] == "wait":
            return 1.0
        self._canary_since.pop(key, None)
        self._canary_ready.pop(key, None)
        if verdict[0] == "promote":
            await asyncio.to_thread(self.store.set_revision_status, name, generation, "active")
            await self._event(name, "Normal", "Promoted", f"generation {generation}: {verdict[1]}")
        else:
            await asyncio.to_thread(
                self.store.set_revision_status, name, generation, "rolled-back", verdict[1]
            )
            await asyncio.gather(*(self._stop(r) for r in canary))
            await self._event(
                name, "Warning", "RolledBack", f"generation {generation}: {verdict[1]}"
            )
        self.directory.set_rollout(name, None, "")
        self.directory.set_problem(name, "")
        return 0.0

    def _rollout_stats(self, name: str, generation: int) -> GenerationStats:
        source = self.autoscaler.source
        if source is None or not hasattr(source, "generation_stats"):
            return GenerationStats()
        stats: GenerationStats = source.generation_stats(name, generation)
        return stats

    async def _stop(self, replica: Replica) -> None:
        """Stop a replica gracefully: out of routing at once, stopped once the requests it
        is serving are done or the model's ``drain`` period is over (what is still running
        then fails over: a request with no byte sent is retried elsewhere, a batch line goes
        back to pending)."""
        if replica.id in self._draining:
            return
        entry = self.directory.get(replica.model)
        grace = entry.spec.drain if entry is not None else 0.0
        source = self.autoscaler.source
        in_flight = getattr(source, "in_flight_on", None)
        if not replica.routable or grace <= 0 or in_flight is None or not in_flight(replica.id):
            await self.runtime.stop(replica.id)
            return
        self.directory.observe(dataclasses.replace(replica, phase=Phase.STOPPING))
        self._drain_model[replica.id] = replica.model
        self._draining[replica.id] = asyncio.create_task(
            self._drain(replica, grace, in_flight), name=f"drain:{replica.id}"
        )

    async def _drain(self, replica: Replica, grace: float, in_flight: Callable[[str], int]) -> None:
        deadline = time.monotonic() + grace
        try:
            while in_flight(replica.id) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            left = in_flight(replica.id)
            if left:
                await self._event(
                    replica.model,
                    "Warning",
                    "DrainTimeout",
                    f"replica {replica.id}: {left} request(s) still running after {grace:g} s",
                )
            await self.runtime.stop(replica.id)
        finally:
            self._draining.pop(replica.id, None)
            self._drain_model.pop(replica.id, None)
            self.trigger(replica.model)

    async def _event_once(self, name: str, generation: int, reason: str, message: str) -> None:
        key = (generation, reason)
        if self._reported.get(name) == key:
            return
        self._reported[name] = key
        await self._event(name, "Warning", reason, message)

    async def _event(self, name: str, type: str, reason: str, message: str) -> None:
        log.info("%s %s: %s", name, reason, message)
        await asyncio.to_thread(self.store.add_event, name, reason, message, type=type)

    # -- loops ------------------------------------------------------------------------------

    async def _worker(self, name: str) -> None:
        event = self._dirty[name]
        loop = asyncio.get_running_loop()
        while True:
            await event.wait()
            event.clear()
            self._begun[name] = self._begun.get(name, 0) + 1
            delay: float | None
            try:
                delay = await self.reconcile(name)
            except Exception as exc:  # noqa: BLE001 - failures says it (a bug, traced)
                delay = exc.retry_after if isinstance(exc, TemporaryError) else self._retry_s
                self.failures.failed(
                    f"reconcile {name}", exc, affected="reconciling models", retry_s=delay
                )
            else:
                self.failures.passed(f"reconcile {name}")
            if delay is not None:
                loop.call_later(delay, self.trigger, name)
            self._finished[name] = self._begun[name]
            async with self._passed:
                self._passed.notify_all()

    async def _watch(self) -> None:
        stream = self.runtime.watch()
        # A restart after an error: what runs now, then every change (the feed subscribes on
        # the first iteration, with no await in between).
        for replica in self.runtime.replicas():
            self.directory.observe(replica)
        async for replica in stream:
            self.directory.observe(replica)
            previous = self._phases.get(replica.id)
            if replica.phase is previous:
                continue
            self._phases[replica.id] = replica.phase
            if replica.phase is Phase.STOPPED:
                self._phases.pop(replica.id, None)
            started = self.startups.observe(replica)
            kind = _EVENTS.get(replica.phase)
            if kind is not None:
                text = f"replica {replica.id}: {started or replica.message or replica.phase.value}"
                await self._event(replica.model, kind[0], kind[1], text)
            if replica.phase is Phase.STOPPED:
                now = dt.datetime.now(dt.UTC)
                await asyncio.to_thread(self.store.close_span, replica.id, now)
            if replica.phase in (Phase.READY, Phase.FAILED, Phase.STOPPING, Phase.STOPPED):
                self.trigger(replica.model)

    async def _autoscale(self) -> None:
        while True:
            await asyncio.sleep(self.autoscaler.interval_s)
            try:
                await self.autoscale_once()
            except Exception as exc:  # noqa: BLE001 - failures says it (a bug, traced)
                self.failures.failed(
                    "autoscaler pass", exc, affected="autoscaling", retry_s=self._retry_s
                )
                await asyncio.sleep(self._retry_s)
            else:
                self.failures.passed("autoscaler pass")

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self._resync_s)
            names = {e.name for e in self.directory.entries()}
            names |= {r.model for r in self.runtime.replicas()}
            for name in names:
                self.trigger(name)
            try:
                await self._account_spans()
            except Exception as exc:  # noqa: BLE001 - failures says it (a store outage)
                self.failures.failed(
                    "replica spans",
                    exc,
                    affected="the cost report's placed time",
                    retry_s=self._resync_s,
                )
            else:
                self.failures.passed("replica spans")


#: The spec fields that shape an engine process: a change to any of them needs new replicas.
_TEMPLATE = frozenset(
    {"source", "engine", "context_length", "resources", "placement", "embeddings", "engine_args"}
)


def _template(spec: ModelSpec) -> str:
    shape = spec.model_dump(include=set(_TEMPLATE), mode="json")
    if spec.disaggregation is not None:
        # The pools' engines; not their count, nor when the gateway prefills remotely.
        shape["disaggregation"] = spec.disaggregation.model_dump(
            mode="json", exclude={"min_remote_prefill_tokens": True, "prefill": {"replicas"}}
        )
    return json.dumps(shape, sort_keys=True)
