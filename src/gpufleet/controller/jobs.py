"""GPU jobs (``kind: GpuJob``) on the GPUs the fleet's models leave free, preempted when
they need them back and resumed when they are free again.

A job is placed by the same planner as the models (``PlannerCapacity``): as one gang replica of
whole GPUs (all of them at once or none), ranked below every model — a job never takes a GPU a
model's replica holds or needs, a model's minimum included, and a model that needs a job's
GPUs displaces it in the next plan (the autoscaler's bound). The scheduler then preempts the
job gracefully: SIGTERM with ``GPUFLEET_CHECKPOINT_DIR`` set, SIGKILL after the grace period
(``runtime.jobs``); the job goes back to the queue and its next attempt starts with
``GPUFLEET_RESUMED=1`` and the same checkpoint directory when the plan has room again. A
schedule window that closes preempts it the same way, and it waits for the next one.

Queue order: priority (``batch`` before ``best-effort``), then the tenants' fair share — the
GPUs a tenant's jobs hold now over its weight, least first — then age. A job is admitted only
where it fits beside everything placed, without moving anything (a higher-priority job waits
for GPUs; it does not preempt a running job).

Attempts: a crash is retried up to ``retries`` times (each from the last checkpoint), then the
job fails with its last log lines in the event; ``maxRuntime`` bounds the job's run time across
its attempts; cancelling stops it for good. Every attempt's GPU-seconds and cost go to the
job's tenant in the usage ledger (one row per attempt, route ``jobs``); a job whose tenant has
a budget is started only if what the tenant spent this period plus the job's most
(GPUs × the rest of its ``maxRuntime`` × the dearest GPU it accepts) stays within it.

The store's row is the job's truth (``store.jobs``), so a restart of gpufleet loses no job and
runs none twice: an attempt that was running when gpufleet stopped went with it — preempted
with its grace on a clean stop, killed with gpufleet otherwise (the kernel's parent-death
signal) — and the job is queued again to resume from its last checkpoint. Every transition is
an event with its reason (``gpufleet get events``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from gpufleet.autoscale.schedule import is_open, next_opening
from gpufleet.controller.capacity import PlannerCapacity
from gpufleet.controller.failures import PassFailures
from gpufleet.hardware import CATALOG
from gpufleet.planner import DEFAULT_PRIORITIES, Deployment, Placement, ReplicaKey
from gpufleet.policies.quota_rules import budget_period
from gpufleet.runtime.jobs import AttemptResult, JobAttempt, Outcome
from gpufleet.spec import GpuJob, parse_job
from gpufleet.store import ACTIVE_PHASES, JobExists, JobRecord, Store, UsageRow

__all__ = [
    "JOB_PREFIX",
    "Attempt",
    "JobError",
    "JobRunner",
    "JobScheduler",
    "Reservation",
    "job_deployment",
    "queue_key",
    "reserve",
]

log = logging.getLogger("gpufleet.controller.jobs")

#: Jobs' names in the planner (model names are DNS labels: they hold no ':').
JOB_PREFIX = "job:"
#: Below every model's priority class: jobs only ever get what models leave free.
_BELOW_MODELS = 100


class JobError(Exception):
    """A submission or a cancel refused: what is wrong and how to fix it."""


def queue_key(
    priority_class: str, held_gpus: int, weight: float, submitted: float, name: str
) -> tuple[int, float, float, str]:
    """A queued job's place in the queue (smallest first): its priority class, then its
    tenant's fair share — the GPUs the tenant's jobs hold now over the tenant's weight, least
    first — then its age (``submitted``, unix seconds), then its name."""
    return (-DEFAULT_PRIORITIES.get(priority_class, 0), held_gpus / weight, submitted, name)


def job_deployment(job: GpuJob) -> Deployment:
    """The planner's view of a job: one gang replica of whole GPUs, below every model."""
    res = job.spec.resources
    memory = -(-res.memory // res.gpus) if res.memory else 1
    return Deployment(
        name=JOB_PREFIX + job.name,
        replicas=1,
        memory_per_gpu={res.gpus: memory},
        priority=DEFAULT_PRIORITIES[job.spec.priority_class] - _BELOW_MODELS,
        priority_class=job.spec.priority_class,
        gpu_types=tuple(res.gpu_types),
        sharing="exclusive",
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Reservation:
    """The GPUs kept for the first job in the queue that waits for GPUs, while the jobs that
    hold them end (Slurm's backfill, with ``maxRuntime`` as the time limit).

    Without it the gang at the head never starts while smaller jobs are queued behind it: GPUs
    come free one or two at a time and each goes to a job that fits at once. A later job may
    still start on other GPUs, or on these if its ``maxRuntime`` ends before every job now on
    them reaches its own (``until``), so it cannot delay the head."""

    job: str
    gpus: frozenset[tuple[str, int]]
    #: When every job on those GPUs reaches its maxRuntime; None when one has none.
    until: float | None

    def allows(self, where: Placement, now: float, runtime_s: float | None) -> bool:
        """Whether a later job may start at ``where`` now, for at most ``runtime_s``."""
        if not where.slots & self.gpus:
            return True
        return self.until is not None and runtime_s is not None and now + runtime_s <= self.until

    def why(self) -> str:
        gpus = ", ".join(f"{node}/{gpu}" for node, gpu in sorted(self.gpus))
        return (
            f"waits: GPUs {gpus} are kept for job {self.job}, first in the queue, as the jobs "
            "on them end (a job whose maxRuntime ends before theirs may use them meanwhile)"
        )


def reserve(
    capacity: PlannerCapacity,
    job: GpuJob,
    running: Iterable[tuple[Placement, float | None]],
) -> Reservation | None:
    """The reservation for ``job``, first in the queue and waiting for GPUs: where it would
    run were no job holding GPUs, if jobs now hold some of those (``running``: each attempt's
    placement and when it reaches its maxRuntime, None without one). None when the models
    leave it no room, or when no job is in its way (nothing to drain)."""
    where = capacity.reserve(job_deployment(job))
    if where is None:
        return None
    gpus = where.slots
    ends = [end for placement, end in running if placement.slots & gpus]
    if not ends:
        return None
    until = None if any(end is None for end in ends) else max(e for e in ends if e is not None)
    return Reservation(job.name, gpus, until)


@dataclasses.dataclass(eq=False)
class _Active:
    job: GpuJob
    tenant: str
    number: int
    attempt: Attempt
    placement: Placement
    price_per_gpu_hour: float
    #: When this attempt reaches the job's maxRuntime (unix seconds); None without one.
    ends: float | None = None
    stopping: str = ""
    task: asyncio.Task[None] | None = None


class Attempt(Protocol):
    """A running attempt, as a runner hands it back."""

    def preempt(self, reason: str) -> None: ...

    def cancel(self, reason: str = "cancelled") -> None: ...

    async def wait(self) -> AttemptResult: ...


class JobRunner(Protocol):
    """Runs attempts: ``runtime.jobs.LocalJobRunner`` (child processes) under gpufleet up,
    ``runtime.kubernetes.jobs.KubernetesJobRunner`` (a ``batch/v1`` Job each) on a cluster. A
    runner may also ``adopt(job, attempt)`` an attempt it still runs after a restart, and
    ``discard_checkpoint(job)`` once a job is done for good."""

    async def start(self, attempt: JobAttempt, job: GpuJob) -> Attempt: ...

    async def logs(self, job: str, attempt: int, tail: int = 200) -> list[str]: ...


class JobScheduler:
    def __init__(
        self,
        store: Store,
        runner: JobRunner,
        capacity: PlannerCapacity | None,
        *,
        data_dir: Path,
        clock: Callable[[], float] = time.time,
        interval_s: float = 1.0,
        failures: PassFailures | None = None,
    ) -> None:
        self.store = store
        #: Failed passes told once, not a traceback a second: a store that is down is one
        #: outage line (shared with the controller's, so with the gateway's under ``up``).
        self.failures = failures or PassFailures()
        self.runner = runner
        self.capacity = capacity
        self.data_dir = data_dir
        self.clock = clock
        self.interval_s = interval_s
        self._active: dict[str, _Active] = {}
        self._loop: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        #: Each queued job's last "why it waits", so the event is written once per change.
        self._waiting: dict[str, str] = {}

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Take up what an earlier scheduler left: an attempt the runner still has (a cluster's
        Job outlives its operator) is adopted as it is; one that went with the process that ran
        it is queued again, to resume from its last checkpoint. Then schedule."""
        adopt = getattr(self.runner, "adopt", None)
        stopping = ("Running", "Preempting", "Cancelling")
        for rec in await asyncio.to_thread(self.store.jobs, phases=stopping):
            handle = await adopt(rec.name, rec.attempt) if adopt is not None else None
            if handle is not None and rec.placement is not None:
                await self._adopt(rec, handle)
                continue
            if rec.phase == "Cancelling":
                await self._finish(rec.name, "Cancelled", "cancelled", "Cancelled")
                continue
            why = "gpufleet stopped while it ran; it resumes from its last checkpoint"
            moved = await asyncio.to_thread(
                self.store.move_job, rec.name, (rec.phase,), phase="Queued", reason=why,
                placement=None,
            )  # fmt: skip
            if moved is not None:
                await self._event(rec.name, "Requeued", why)
        self._loop = asyncio.create_task(self._run(), name="jobs")

    async def _adopt(self, rec: JobRecord, handle: Attempt) -> None:
        job = parse_job(rec.document)
        doc = rec.placement or {}
        where = Placement(
            replica=ReplicaKey(JOB_PREFIX + job.name, 0),
            node=str(doc.get("node", "")),
            gpus=tuple(int(g) for g in doc.get("gpus", [])),
            gpu_type=doc.get("gpuType"),
            memory_per_gpu=1,
            memory_fraction=1.0,
            workers=tuple((str(n), tuple(int(g) for g in gs)) for n, gs in doc.get("workers", [])),
        )
        if self.capacity is not None:
            self.capacity.hold(job_deployment(job), where)
        remaining = self._remaining_s(job, rec)
        began = rec.started_at.timestamp() if rec.started_at is not None else self.clock()
        active = self._active[job.name] = _Active(
            job, rec.tenant, rec.attempt, handle, where, _price(where.gpu_type),
            ends=None if remaining is None else began + remaining,
        )  # fmt: skip
        if rec.phase == "Preempting":
            active.stopping = rec.reason
            handle.preempt(rec.reason)
        elif rec.phase == "Cancelling":
            active.stopping = "cancelled"
            handle.cancel("cancelled")
        await self._event(job.name, "Adopted", f"attempt {rec.attempt} still runs: followed again")
        active.task = asyncio.create_task(self._watch(active), name=f"job:{job.name}")

    async def close(self, *, stop_attempts: bool = True) -> None:
        """Stop scheduling. ``stop_attempts``: preempt running attempts (each saves its
        checkpoint within its grace) and queue them again for the next start — what a process
        whose attempts die with it does; otherwise leave them running for the next scheduler
        to adopt (an operator handing over its lead)."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        tasks = [a.task for a in self._active.values() if a.task is not None]
        if not stop_attempts:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._active.clear()
            return
        for active in self._active.values():
            active.stopping = active.stopping or "gpufleet is stopping"
            active.attempt.preempt(active.stopping)
        await asyncio.gather(*tasks, return_exceptions=True)

    def span_ids(self) -> list[str]:
        """The running attempts, by the ids their capacity spans carry."""
        return [_attempt_id(name, a.number) for name, a in self._active.items()]

    def trigger(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - failures says it (a bug, traced)
                self.failures.failed(
                    "job scheduling pass",
                    exc,
                    affected="scheduling GPU jobs",
                    retry_s=self.interval_s,
                )
            else:
                self.failures.passed("job scheduling pass")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)

    # -- the API's -------------------------------------------------------------------------

    async def submit(self, job: GpuJob, tenant: str) -> JobRecord:
        """Queue ``job`` for ``tenant`` (its ``spec.tenant`` when it names one)."""
        owner = job.spec.tenant or tenant
        known = {t.tenant.name for t in await asyncio.to_thread(self.store.list_tenants)}
        if owner not in known:
            raise JobError(
                f"{job.name}: tenant {owner!r} does not exist (spec.tenant, or the caller's); "
                f"create it first: gpufleet tenants create {owner}"
            )
        budget = await asyncio.to_thread(self._budget, owner)
        if budget is not None and job.spec.max_runtime is None:
            raise JobError(
                f"{job.name}: spec.maxRuntime is required: tenant {owner!r} has a budget, and "
                "a job's cost is bounded up front by its GPUs × maxRuntime × price"
            )
        document = job.document()
        try:
            rec = await asyncio.to_thread(self.store.submit_job, job.name, owner, document)
        except JobExists as exc:
            raise JobError(str(exc)) from None
        res = job.spec.resources
        await self._event(
            job.name, "Submitted",
            f"queued for tenant {owner}: {res.gpus} GPU(s), {job.spec.priority_class}",
        )  # fmt: skip
        self.trigger()
        return rec

    async def cancel(self, name: str) -> JobRecord:
        """Stop a job for good: a queued one at once; a running attempt is asked to stop (its
        grace period, as a preemption's) and the job is Cancelling until it has."""
        active = self._active.get(name)
        if active is not None:
            active.stopping = "cancelled"
            active.attempt.cancel("cancelled")
            grace = active.job.spec.grace_seconds
            moved = await asyncio.to_thread(
                self.store.move_job, name, ("Running", "Preempting"), phase="Cancelling",
                reason=f"cancelling: SIGTERM, {grace} s to stop",
            )  # fmt: skip
            rec = moved or await asyncio.to_thread(self.store.job, name)
            assert rec is not None
            return rec
        moved = await asyncio.to_thread(
            self.store.move_job, name, ("Queued",), phase="Cancelled", reason="cancelled"
        )
        if moved is None:
            rec = await asyncio.to_thread(self.store.job, name)
            if rec is None:
                raise JobError(f"no job {name!r}")
            raise JobError(f"job {name!r} is {rec.phase.lower()}: nothing to cancel")
        await self._event(name, "Cancelled", "cancelled while queued")
        return moved

    # -- one pass ---------------------------------------------------------------------------

    async def tick(self) -> None:
        now = self.clock()
        for name, active in list(self._active.items()):
            if active.stopping:
                continue
            why = ""
            if self.capacity is not None:
                why = self.capacity.displaced.get(JOB_PREFIX + name, "")
                why = f"its GPUs are needed: {why}" if why else ""
            if not why and not is_open(active.job.spec.schedule, now):
                why = "its schedule window closed"
            if why:
                await self._preempt(name, active, why)
        records = await asyncio.to_thread(self.store.jobs, phases=("Queued",))
        queued = [r for r in records if r.name not in self._active]
        if not queued:
            return
        stored = await asyncio.to_thread(self.store.list_tenants)
        tenants = {t.tenant.name: t.tenant for t in stored}
        budgets: dict[str, tuple[float, str]] = {
            name: (t.spec.limits.budget.usd, str(t.spec.limits.budget.period))
            for name, t in tenants.items()
            if t.spec.limits.budget is not None
        }
        committed = await asyncio.to_thread(self._committed, budgets, now)
        held: dict[str, int] = {}
        for active in self._active.values():
            held[active.tenant] = held.get(active.tenant, 0) + active.job.spec.resources.gpus

        def order(rec: JobRecord) -> tuple[int, float, float, str]:
            tenant = tenants.get(rec.tenant)
            weight = tenant.spec.weight if tenant is not None else 1.0
            priority = str(rec.document.get("spec", {}).get("priorityClass", "batch"))
            return queue_key(
                priority, held.get(rec.tenant, 0), weight, rec.submitted_at.timestamp(), rec.name
            )

        # Every decision of the pass first, with nothing awaited in between: the GPUs a job is
        # given are held before the next one is considered, and none come free mid-pass (an
        # attempt ending meanwhile) to be handed out of order.
        # The first job that waits for GPUs has them kept for it as the jobs on them end.
        running = [(a.placement, a.ends) for a in self._active.values()]
        reservation: Reservation | None = None
        decisions = []
        for rec in sorted(queued, key=order):
            decision = self._decide(rec, now, budgets, committed, reservation)
            decisions.append(decision)
            _, job, outcome = decision
            waits_for_gpus = isinstance(outcome, str) and outcome.startswith("waits for GPUs")
            if reservation is None and waits_for_gpus and self.capacity is not None:
                reservation = reserve(self.capacity, job, running)
        for rec, job, outcome in decisions:
            if isinstance(outcome, _Go):
                await self._launch(rec, job, outcome)
            elif outcome.startswith("fail:"):
                await self._finish(rec.name, "Failed", outcome.removeprefix("fail:"), "Failed")
            else:
                await self._waits(rec, outcome)

    def _decide(
        self,
        rec: JobRecord,
        now: float,
        budgets: dict[str, tuple[float, str]],
        committed: dict[str, float],
        reservation: Reservation | None = None,
    ) -> tuple[JobRecord, GpuJob, _Go | str]:
        """Whether ``rec`` starts now (its placement, held at once) or why it waits."""
        job = parse_job(rec.document)
        spec = job.spec
        if not is_open(spec.schedule, now):
            assert spec.schedule is not None
            opening = next_opening(spec.schedule, now)
            when = f" (next at {opening.isoformat(timespec='minutes')})" if opening else ""
            return rec, job, f"waits for its schedule window{when}"
        remaining = self._remaining_s(job, rec)
        if remaining is not None and remaining <= 0:
            return rec, job, "fail:it used its maxRuntime"
        if self.capacity is None:
            return rec, job, "waits: this gpufleet plans no GPUs (no inventory)"
        dep = job_deployment(job)
        where = self.capacity.admit(dep)
        if isinstance(where, str):
            return rec, job, f"waits for GPUs: {where}"
        if reservation is not None and not reservation.allows(where, now, remaining):
            return rec, job, reservation.why()
        price = _price(where.gpu_type)
        most = _most(job, remaining, price)
        if rec.tenant in budgets:
            usd, period = budgets[rec.tenant]
            spent = committed.get(rec.tenant, 0.0)
            if spent + most > usd:
                return (
                    rec,
                    job,
                    (
                        f"not started: tenant {rec.tenant}'s budget is ${usd:.2f} a {period}, "
                        f"${spent:.2f} spent or held by its running jobs, and this job may cost up "
                        f"to ${most:.2f} ({spec.resources.gpus} GPU(s) × the rest of its maxRuntime)"
                    ),
                )
            committed[rec.tenant] = spent + most
        self.capacity.hold(dep, where)
        return rec, job, _Go(where, price, remaining)

    async def _launch(self, rec: JobRecord, job: GpuJob, go: _Go) -> None:
        where, price, remaining = go.where, go.price, go.remaining
        dep = job_deployment(job)
        assert self.capacity is not None
        attempt_no = rec.attempt + 1
        checkpoint = self._checkpoint_dir(job)
        # Any attempt before this one may have left a checkpoint: the job reads it if it did.
        resumed = rec.attempt > 0
        moved = await asyncio.to_thread(
            self.store.move_job, rec.name, ("Queued",), phase="Running", attempt=attempt_no,
            placement=_placement_doc(where), started_at=dt.datetime.now(dt.UTC),
            reason="running",
        )  # fmt: skip
        if moved is None:
            self.capacity.release(dep.name)  # cancelled meanwhile
            return
        spec = job.spec
        attempt = JobAttempt(
            job=job.name,
            attempt=attempt_no,
            command=list(spec.command),
            checkpoint_dir=checkpoint,
            env=dict(spec.env),
            cwd=Path(spec.working_dir) if spec.working_dir else None,
            resumed=resumed,
            gpus=list(where.gpus),
            grace_s=float(spec.grace_seconds),
            max_runtime_s=remaining,
            node=where.node,
            workers=tuple(node for node, _ in where.workers),
            image=spec.image,
        )
        running = await self.runner.start(attempt, job)
        # Its GPUs are placed capacity for the cost report, as a replica's are (a span per
        # attempt; the controller keeps it open while ``span_ids`` names it).
        gpus = spec.resources.gpus
        await asyncio.to_thread(
            self.store.open_span, job.name, _attempt_id(job.name, attempt_no),
            generation=attempt_no, gpus=float(gpus), gpu_type=where.gpu_type,
            price_per_hour=gpus * price, at=dt.datetime.now(dt.UTC),
        )  # fmt: skip
        active = self._active[job.name] = _Active(
            job, rec.tenant, attempt_no, running, where, price,
            ends=None if remaining is None else self.clock() + remaining,
        )  # fmt: skip
        self._waiting.pop(job.name, None)
        on = ",".join(str(g) for g in where.gpus)
        kind, verb = (
            ("Resumed", "resumed from its checkpoint") if resumed else ("Started", "started")
        )
        await self._event(
            job.name, kind,
            f"attempt {attempt_no} {verb} on {where.node} GPU {on} ({where.gpu_type})",
        )  # fmt: skip
        active.task = asyncio.create_task(self._watch(active), name=f"job:{job.name}")

    async def _preempt(self, name: str, active: _Active, why: str) -> None:
        active.stopping = why
        active.attempt.preempt(why)
        await asyncio.to_thread(
            self.store.move_job, name, ("Running",), phase="Preempting", reason=why
        )
        grace = active.job.spec.grace_seconds
        await self._event(name, "Preempting", f"{why}; SIGTERM, {grace} s to checkpoint")

    async def _watch(self, active: _Active) -> None:
        """The attempt's end: GPUs back, the ledger, and where the job goes next."""
        result = await active.attempt.wait()
        name = active.job.name
        await asyncio.to_thread(
            self.store.close_span, _attempt_id(name, result.attempt), dt.datetime.now(dt.UTC)
        )
        if self.capacity is not None:
            self.capacity.release(JOB_PREFIX + name)
        self._active.pop(name, None)
        gpu_seconds = result.duration_s * active.job.spec.resources.gpus
        cost = gpu_seconds * active.price_per_gpu_hour / 3600.0
        rec = await asyncio.to_thread(self.store.job, name)
        if rec is None:
            return
        await asyncio.to_thread(self._ledger, rec, result, gpu_seconds, cost)
        totals = {"gpu_seconds": rec.gpu_seconds + gpu_seconds, "cost_usd": rec.cost_usd + cost}
        spec = active.job.spec
        if result.outcome is Outcome.SUCCEEDED:
            await self._finish(name, "Succeeded", result.reason, "Succeeded", **totals)
        elif result.outcome is Outcome.CANCELLED:
            await self._finish(name, "Cancelled", result.reason, "Cancelled", **totals)
        elif result.outcome is Outcome.TIMED_OUT:
            await self._finish(name, "Failed", result.reason, "Failed", **totals)
        elif result.outcome is Outcome.PREEMPTED:
            killed = "; killed after its grace period" if result.killed else ""
            why = active.stopping or result.reason
            moved = await asyncio.to_thread(
                self.store.move_job, name, ("Running", "Preempting", "Cancelling"), phase="Queued",
                reason=f"preempted: {why}", placement=None, preemptions=rec.preemptions + 1,
                **totals,
            )  # fmt: skip
            if moved is not None:
                await self._event(
                    name, "Preempted",
                    f"attempt {result.attempt} stopped after {result.duration_s:.0f} s{killed}; "
                    "queued to resume from its checkpoint",
                )  # fmt: skip
        else:
            failures = rec.failures + 1
            tail = "\n".join(result.last_log_lines[-10:])
            if failures > spec.retries:
                await self._finish(
                    name, "Failed",
                    f"{result.reason}; {spec.retries} retries used. Last lines:\n{tail}",
                    "Failed", failures=failures, **totals,
                )  # fmt: skip
            else:
                await asyncio.to_thread(
                    self.store.move_job, name, ("Running", "Preempting", "Cancelling"), phase="Queued",
                    reason=f"retry {failures} of {spec.retries}: {result.reason}",
                    placement=None, failures=failures, **totals,
                )  # fmt: skip
                await self._event(
                    name, "Retrying",
                    f"attempt {result.attempt} failed ({result.reason}); retry {failures} of "
                    f"{spec.retries} from its last checkpoint. Last lines:\n{tail}",
                    type="Warning",
                )  # fmt: skip
        self.trigger()

    # -- helpers ----------------------------------------------------------------------------

    async def _finish(self, name: str, phase: str, why: str, reason: str, **changes: Any) -> None:
        moved = await asyncio.to_thread(
            self.store.move_job, name, ACTIVE_PHASES, phase=phase,
            reason=why, placement=None, **changes,
        )  # fmt: skip
        if moved is not None:
            kind = "Warning" if phase == "Failed" else "Normal"
            await self._event(name, reason, why, type=kind)
            discard = getattr(self.runner, "discard_checkpoint", None)
            if discard is not None and phase in ("Succeeded", "Cancelled"):
                # Done for good: its checkpoint's volume goes (a failed job's is kept, to look
                # at or to resume by hand).
                try:
                    await discard(name)
                except Exception as exc:  # noqa: BLE001 - said; the job's end stands
                    log.warning("job %s: its checkpoint could not be removed: %s", name, exc)

    async def _waits(self, rec: JobRecord, why: str) -> None:
        if self._waiting.get(rec.name) == why:
            return
        self._waiting[rec.name] = why
        await asyncio.to_thread(self.store.move_job, rec.name, ("Queued",), reason=why)
        await self._event(rec.name, "Waiting", why)

    async def _event(self, name: str, reason: str, message: str, *, type: str = "Normal") -> None:
        log.info("job %s: %s: %s", name, reason, message.splitlines()[0] if message else "")
        await asyncio.to_thread(self.store.add_event, name, reason, message, type=type)

    def _checkpoint_dir(self, job: GpuJob) -> Path:
        own = self.data_dir / "jobs" / job.name / "checkpoint"
        if job.spec.checkpoint is None:
            return own
        path = Path(job.spec.checkpoint.path)
        if not path.is_absolute():
            base = Path(job.spec.working_dir) if job.spec.working_dir else own.parent
            path = base / path
        return path

    @staticmethod
    def _remaining_s(job: GpuJob, rec: JobRecord) -> float | None:
        if job.spec.max_runtime is None:
            return None
        used = rec.gpu_seconds / job.spec.resources.gpus
        return float(job.spec.max_runtime) - used

    def _budget(self, tenant: str) -> tuple[float, str] | None:
        for stored in self.store.list_tenants():
            if stored.tenant.name == tenant:
                budget = stored.tenant.spec.limits.budget
                return (budget.usd, budget.period) if budget is not None else None
        return None

    def _committed(self, budgets: dict[str, tuple[float, str]], now: float) -> dict[str, float]:
        """What each tenant with a budget has spent this period (the ledger) plus the most its
        running jobs may still cost: what a new job's most is added to."""
        out: dict[str, float] = {}
        for tenant, (_, period) in budgets.items():
            _, first, end = budget_period(int(now), period)  # type: ignore[arg-type]
            since = dt.datetime.fromtimestamp(first, dt.UTC)
            until = dt.datetime.fromtimestamp(end, dt.UTC)
            totals = self.store.usage_totals(since, until, tenant=tenant)
            out[tenant] = sum(t.answered_cost for t in totals)
        for active in self._active.values():
            if active.tenant in out and active.job.spec.max_runtime is not None:
                out[active.tenant] += _most(active.job, active.job.spec.max_runtime,
                                    active.price_per_gpu_hour)  # fmt: skip
        return out

    def _ledger(
        self, rec: JobRecord, result: AttemptResult, gpu_seconds: float, cost: float
    ) -> None:
        # Statuses as the ledger reads them: below 500 the tenant pays (a 5xx is the fleet's
        # failure). A job's GPU time is its tenant's whatever the outcome: the GPUs were held
        # for it, and a crash (400) or a time-out is the job's own.
        status = {
            Outcome.SUCCEEDED: 200,
            Outcome.PREEMPTED: 200,
            Outcome.TIMED_OUT: 408,
            Outcome.CANCELLED: 499,
            Outcome.FAILED: 400,
        }[result.outcome]
        stamp = int(rec.submitted_at.timestamp() * 1000)
        row = UsageRow(
            request_id=f"job-{rec.name}-{stamp}-{result.attempt}",
            at=dt.datetime.now(dt.UTC),
            tenant=rec.tenant,
            key_prefix="",
            model=rec.name,
            replica=_attempt_id(rec.name, result.attempt),
            route="jobs",
            status=status,
            prompt_tokens=0,
            cached_tokens=0,
            completion_tokens=0,
            ttft_ms=None,
            duration_ms=result.duration_s * 1000,
            gpu_seconds=gpu_seconds,
            cost_usd=cost,
        )
        self.store.record_usage([row])


@dataclasses.dataclass(frozen=True, slots=True)
class _Go:
    """A queued job's go: where it runs, its GPUs' price an hour, the rest of its maxRuntime."""

    where: Placement
    price: float
    remaining: float | None


def _most(job: GpuJob, remaining: float | None, price: float) -> float:
    """The most a job may cost from now: its GPUs × the rest of its maxRuntime × the dearer
    of ``price`` and the GPU types it accepts."""
    dearest = max([_price(t) for t in job.spec.resources.gpu_types] + [price])
    return job.spec.resources.gpus * (remaining or 0.0) * dearest / 3600.0


def _attempt_id(job: str, attempt: int) -> str:
    return f"{job}-attempt-{attempt}"


def _price(gpu_type: str | None) -> float:
    accelerator = CATALOG.get(gpu_type or "")
    return accelerator.price_per_hour if accelerator is not None else 0.0


def _placement_doc(where: Placement) -> dict[str, Any]:
    return {
        "node": where.node,
        "gpus": list(where.gpus),
        "gpuType": where.gpu_type,
        "workers": [[node, list(gpus)] for node, gpus in where.workers],
    }
