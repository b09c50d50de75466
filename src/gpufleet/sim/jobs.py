"""GPU jobs in the simulator: night work on what the models leave free, in virtual time.

The live scheduler's policies run unchanged (``controller.jobs``): a job is the planner's
``job_deployment`` (one gang replica of whole GPUs, below every model); the queue is sorted by
``queue_key`` (priority, the tenant's GPUs held over its weight, age) once per pass; a queued
job starts where ``PlannerCapacity.admit`` places it, held (``hold``) until its attempt ends
(``release``); a running job is preempted when the autoscaler's plan names it in
``PlannerCapacity.displaced`` (its GPUs given to a model's replica) or its schedule window
closes (``autoscale.schedule.is_open``). The simulator calls this module on each control tick
(``tick``), right after each new plan (``planned``), and when it starts a replica (``handover``).

What is modelled of a job is its progress, not its program. An attempt spends ``startup_s``
starting (the process, its checkpoint read back) and then does one second of work per second,
until it has done ``work_s`` in all. It keeps a periodic checkpoint every
``checkpoint_every_s`` of its progress. Preempted, it gets SIGTERM and its grace
(``checkpoint.graceSeconds``):

- one that *saves on SIGTERM* writes its checkpoint in ``save_s`` and exits: it loses no work,
  only the save's time (a save longer than the grace is cut off by SIGKILL: it loses what its
  last periodic checkpoint does not hold);
- one that only checkpoints periodically exits at once, and loses its progress since its last
  periodic checkpoint — up to one interval.

Its GPUs are handed back when it exits; a model's replica the plan put on them starts its engine
then (``handover``), so an interactive scale-up waits for the job's save, as it would on a real
GPU whose memory the job still holds. Per preemption the result keeps the time from the plan's
need to the GPUs handed back, and to the replica on them ready.

Not modelled: crashes and ``retries``, tenants' budgets (the live scheduler reads the ledger),
the cost of periodic checkpoints (part of ``work_s``), and a gang's speed depending on where it
lands. ``maxRuntime`` is: an attempt stops when the job's running time over its attempts
reaches it, and the job fails, as live.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gpufleet.autoscale.schedule import is_open
from gpufleet.controller.capacity import PlannerCapacity
from gpufleet.controller.jobs import JOB_PREFIX, Reservation, job_deployment, queue_key, reserve
from gpufleet.planner import Deployment, Placement
from gpufleet.sim.result import SimResult
from gpufleet.sim.tenants import DEFAULT_TENANT
from gpufleet.spec import GpuJob

__all__ = [
    "AttemptSpan",
    "FleetHours",
    "JobResult",
    "JobsResult",
    "Preemption",
    "SimJob",
    "SimJobs",
    "fleet_hours",
]


@dataclass(frozen=True, slots=True)
class SimJob:
    """One job of a simulation: its spec, when it is submitted, and how it works."""

    job: GpuJob
    #: Virtual seconds from the simulation's start.
    submit_s: float
    #: Seconds of work on its gang it needs in all (progress, not counting starts and saves).
    work_s: float
    #: Progress between two periodic checkpoints.
    checkpoint_every_s: float
    #: It writes a checkpoint on SIGTERM (else it exits at once, with its periodic one).
    saves_on_sigterm: bool = True
    #: Seconds a checkpoint on SIGTERM takes to write.
    save_s: float = 10.0
    #: Seconds from an attempt's start to its first step (process, checkpoint read back).
    startup_s: float = 60.0

    def __post_init__(self) -> None:
        if self.submit_s < 0 or self.work_s <= 0 or self.checkpoint_every_s <= 0:
            raise ValueError(
                f"{self.job.name}: need submit_s >= 0, work_s > 0, checkpoint_every_s > 0"
            )
        if self.save_s < 0 or self.startup_s < 0:
            raise ValueError(f"{self.job.name}: need save_s >= 0 and startup_s >= 0")

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def grace_s(self) -> float:
        return float(self.job.spec.grace_seconds)


@dataclass(frozen=True, slots=True)
class AttemptSpan:
    """One attempt: where and when it held its GPUs, and how it ended."""

    job: str
    attempt: int
    node: str
    gpus: tuple[int, ...]
    start: float
    stop: float
    #: Work it did that its job keeps (saved, or finished).
    progress_s: float
    #: ``succeeded``, ``preempted``, ``timed out`` (its maxRuntime), or ``running`` at the end.
    outcome: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Preemption:
    job: str
    attempt: int
    #: SIGTERM: when the plan displaced it or its window closed.
    at: float
    reason: str
    #: When it exited and its GPUs were handed back.
    stopped: float
    grace_s: float
    checkpoint_every_s: float
    #: It wrote its checkpoint on SIGTERM within its grace (False too when it was still
    #: starting: it had nothing to save, and lost nothing).
    saved: bool
    #: Progress no checkpoint holds.
    lost_s: float
    #: When the model's replica the plan put on its GPUs was ready (None: no replica took them).
    taker_ready: float | None = None

    @property
    def handback_s(self) -> float:
        """From the need (SIGTERM) to the GPUs handed back."""
        return self.stopped - self.at

    @property
    def to_ready_s(self) -> float | None:
        """From the need to the replica that took the GPUs serving."""
        return None if self.taker_ready is None else self.taker_ready - self.at


@dataclass(frozen=True, slots=True)
class JobResult:
    name: str
    tenant: str
    priority_class: str
    gpus: int
    submitted: float
    work_s: float
    #: Work done and kept (checkpointed, or the running attempt's at the end).
    done_s: float
    #: Its first attempt's start; None if it never ran.
    started: float | None
    finished: float | None
    #: ``succeeded``, ``failed`` (its maxRuntime), ``running``, ``queued``.
    phase: str
    attempts: int
    preemptions: int
    lost_s: float
    gpu_hours_held: float
    #: Why it waited last (the scheduler's words), while it waits.
    waiting: str = ""


@dataclass(frozen=True, slots=True)
class JobsResult:
    jobs: list[JobResult]
    attempts: list[AttemptSpan]
    preemptions: list[Preemption]
    #: GPU-hours jobs held (each attempt from its start to its exit).
    gpu_hours_held: float
    #: Of those, GPU-hours a model's replica was also placed on (waiting for the job's exit).
    gpu_hours_shared: float
    #: GPU-hours neither a model's replica nor a job held while a submitted job waited in the
    #: queue (sampled at each tick from the plan's placements): idle with work waiting — the
    #: GPUs were too few or too scattered for the gangs that waited, or a window was shut.
    gpu_hours_idle_waiting: float = 0.0

    def job(self, name: str) -> JobResult:
        for j in self.jobs:
            if j.name == name:
                return j
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class FleetHours:
    """The inventory's GPU-hours: held by a model's replica (placed, loading included), by a
    job, or idle (neither)."""

    total: float
    models: float
    jobs: float
    shared: float

    @property
    def idle(self) -> float:
        return max(0.0, self.total - self.models - self.jobs + self.shared)

    @property
    def idle_share(self) -> float:
        return self.idle / self.total if self.total else 0.0


def fleet_hours(result: SimResult, jobs: JobsResult | None = None) -> FleetHours:
    """The simulator's own GPU accounting (``SimResult.gpus``: placed and free per type) with
    the jobs' held hours taken out of what was free."""
    total = sum(g.gpus for g in result.gpus) * result.duration_s / 3600
    models = sum(g.hours_placed for g in result.gpus)
    held = jobs.gpu_hours_held if jobs else 0.0
    shared = jobs.gpu_hours_shared if jobs else 0.0
    return FleetHours(total, models, held, shared)


@dataclass(eq=False, slots=True)
class _Job:
    sim: SimJob
    dep: Deployment
    tenant: str
    priority_class: str
    saved_s: float = 0.0
    used_s: float = 0.0  # running time over attempts (maxRuntime)
    attempt: int = 0
    placement: Placement | None = None
    started: float = 0.0
    sigterm: float | None = None
    stop_at: float | None = None
    stopping: str = ""
    kept: float = 0.0  # of a preempted attempt's progress, what its checkpoint holds
    first_start: float | None = None
    finished: float | None = None
    failed: bool = False
    preemptions: int = 0
    lost_s: float = 0.0
    held_s: float = 0.0
    waiting: str = ""
    spans: list[AttemptSpan] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.sim.name

    @property
    def running(self) -> bool:
        return self.placement is not None

    @property
    def over(self) -> bool:
        return self.finished is not None or self.failed

    def progress(self, t: float) -> float:
        """The running attempt's progress at ``t`` (none past SIGTERM)."""
        end = t if self.sigterm is None else min(t, self.sigterm)
        return max(0.0, end - self.started - self.sim.startup_s)

    def runtime_end(self) -> float | None:
        """When the running attempt reaches the job's maxRuntime (None without one)."""
        limit = self.sim.job.spec.max_runtime
        return None if limit is None else self.started + float(limit) - self.used_s

    def ends(self) -> tuple[float, str]:
        """When the running attempt ends if nothing stops it: done, or out of maxRuntime."""
        done = self.started + self.sim.startup_s + self.sim.work_s - self.saved_s
        limit = self.sim.job.spec.max_runtime
        if limit is not None and self.started + float(limit) - self.used_s < done:
            return self.started + float(limit) - self.used_s, "timed out"
        return done, "succeeded"


class SimJobs:
    """A simulation's GPU jobs: give it to ``simulate`` and read ``result()`` after the run.

    One run's: the simulator attaches its planner capacity at the start. ``epoch`` is the unix
    time virtual time 0 stands for (schedule windows and ages are read against it); ``until_s``
    keeps the simulation going past the trace's end while a job is unfinished (None: it ends
    with the trace)."""

    def __init__(
        self, jobs: Iterable[SimJob], *, epoch: float = 0.0, until_s: float | None = None
    ) -> None:
        self.epoch = epoch
        self.until_s = until_s
        self._jobs: list[_Job] = []
        names: set[str] = set()
        for sim in sorted(jobs, key=lambda j: (j.submit_s, j.name)):
            if sim.name in names:
                raise ValueError(f"two jobs are named {sim.name!r}; give each its own name")
            names.add(sim.name)
            spec = sim.job.spec
            self._jobs.append(
                _Job(sim, job_deployment(sim.job), spec.tenant or DEFAULT_TENANT,
                     spec.priority_class)
            )  # fmt: skip
        self._capacity: PlannerCapacity | None = None
        self._weights: Mapping[str, float] = {}
        self._preemptions: list[Preemption] = []
        self._shared_s = 0.0
        self._version = 0  # what admission depends on changed (a plan, a hold, a release)
        self._passed: tuple[object, ...] | None = None
        self._closed = False
        self._gpus = 0
        self._last_tick: float | None = None
        self._idle_waiting_s = 0.0

    # -- the simulator's hooks --------------------------------------------------------------

    def attach(self, capacity: PlannerCapacity, weights: Mapping[str, float]) -> None:
        """The simulation's planner capacity and its tenants' weights (their fair share)."""
        if self._capacity is not None:
            raise ValueError("these jobs were already simulated; make a SimJobs per run")
        self._capacity, self._weights = capacity, weights
        self._gpus = sum(node.gpu_count for node in capacity.inventory.nodes)

    def planned(self, t: float) -> None:
        """A new plan: preempt the jobs it displaced (their GPUs go to a model's replica)."""
        capacity = self._need()
        self._settle(t)
        self._version += 1
        for job in self._jobs:
            if job.running and not job.stopping:
                why = capacity.displaced.get(job.dep.name, "")
                if why:
                    self._preempt(job, t, f"its GPUs are needed: {why}")

    def handover(self, placement: Placement | None, t: float, startup_s: float) -> float:
        """When a replica asked for at ``t`` on ``placement`` can start its engine: once the
        jobs on those GPUs have exited (their saves written)."""
        if placement is None:
            return t
        wanted = placement.slots
        free = t
        for job in self._jobs:
            if job.placement is None or job.stop_at is None:
                continue
            overlap = wanted & job.placement.slots
            if overlap:
                free = max(free, job.stop_at)
                self._shared_s += max(0.0, job.stop_at - t) * len(overlap)
        for job in self._jobs:
            if (
                job.placement is not None
                and job.stop_at is not None
                and wanted & job.placement.slots
            ):
                self._ready(job, free + startup_s)
        return free

    def tick(self, t: float) -> None:
        """One pass of the scheduler: attempts that ended, windows that closed, the queue."""
        capacity = self._need()
        self._settle(t)
        for job in self._jobs:
            if job.running and not job.stopping:
                why = capacity.displaced.get(job.dep.name, "")
                if why:
                    self._preempt(job, t, f"its GPUs are needed: {why}")
                elif not is_open(job.sim.job.spec.schedule, self.epoch + t):
                    self._preempt(job, t, "its schedule window closed")
        queued = [j for j in self._jobs if j.sim.submit_s <= t and not j.running and not j.over]
        if queued and self._last_tick is not None:
            self._idle_waiting_s += self._idle_gpus(capacity) * (t - self._last_tick)
        self._last_tick = t
        key = self._key(queued, t)
        if queued and key != self._passed:
            self._admit(queued, t)
            self._passed = self._key(queued, t)

    def pending(self, t: float) -> bool:
        """Whether the simulation should go on past its trace for the jobs."""
        return self.until_s is not None and t < self.until_s and any(not j.over for j in self._jobs)

    def close(self, end: float) -> None:
        """The simulation ended at ``end``: close what still runs."""
        if self._closed:
            return
        self._closed = True
        self._settle(end)
        for job in self._jobs:
            if job.placement is None:
                continue
            if job.stop_at is None:  # its progress so far counts as done, saved or not
                kept, outcome = job.progress(end), "running"
            else:  # still writing its checkpoint
                kept, outcome = job.kept, "preempted"
            self._span(job, end, kept, outcome, job.stopping)
            job.saved_s += kept
            job.placement = None

    def result(self) -> JobsResult:
        jobs = []
        for job in self._jobs:
            sim = job.sim
            phase = (
                "succeeded" if job.finished is not None
                else "failed" if job.failed
                else "running" if job.spans and job.spans[-1].outcome == "running"
                else "queued"
            )  # fmt: skip
            jobs.append(
                JobResult(
                    job.name,
                    job.tenant,
                    job.priority_class,
                    sim.job.spec.resources.gpus,
                    sim.submit_s,
                    sim.work_s,
                    sim.work_s if job.finished is not None else min(sim.work_s, job.saved_s),
                    job.first_start,
                    job.finished,
                    phase,
                    job.attempt,
                    job.preemptions,
                    job.lost_s,
                    job.held_s / 3600,
                    job.waiting if phase == "queued" else "",
                )
            )
        spans = sorted((s for j in self._jobs for s in j.spans), key=lambda s: (s.start, s.job))
        return JobsResult(
            jobs,
            spans,
            list(self._preemptions),
            sum(j.held_s for j in self._jobs) / 3600,
            self._shared_s / 3600,
            self._idle_waiting_s / 3600,
        )

    # -- one pass of the queue ----------------------------------------------------------------

    def _admit(self, queued: Sequence[_Job], t: float) -> None:
        """The live scheduler's pass: the order once (by ``queue_key``, the GPUs each tenant
        holds as the pass starts), then each job in turn, held as soon as it is placed."""
        capacity = self._need()
        held: dict[str, int] = {}
        for job in self._jobs:
            if job.running:
                held[job.tenant] = held.get(job.tenant, 0) + job.sim.job.spec.resources.gpus

        def order(job: _Job) -> tuple[int, float, float, str]:
            weight = self._weights.get(job.tenant, 1.0)
            return queue_key(
                job.priority_class, held.get(job.tenant, 0), weight,
                self.epoch + job.sim.submit_s, job.name,
            )  # fmt: skip

        running = [(j.placement, j.runtime_end()) for j in self._jobs if j.placement is not None]
        reservation: Reservation | None = None
        for job in sorted(queued, key=order):
            spec = job.sim.job.spec
            if not is_open(spec.schedule, self.epoch + t):
                job.waiting = "waits for its schedule window"
                continue
            if spec.max_runtime is not None and job.used_s >= float(spec.max_runtime):
                job.failed, job.waiting = True, ""
                continue
            where = capacity.admit(job.dep)
            if isinstance(where, str):
                job.waiting = f"waits for GPUs: {where}"
                if reservation is None:  # the first that waits for GPUs has them kept
                    reservation = reserve(capacity, job.sim.job, running)
                continue
            left = None if spec.max_runtime is None else float(spec.max_runtime) - job.used_s
            if reservation is not None and not reservation.allows(where, t, left):
                job.waiting = reservation.why()
                continue
            capacity.hold(job.dep, where)
            self._version += 1
            self._start(job, where, t)

    def _idle_gpus(self, capacity: PlannerCapacity) -> int:
        """GPUs neither the plan's model replicas nor the jobs hold now."""
        used: set[tuple[str, int]] = set()
        for p in capacity.placements:
            if not p.replica.deployment.startswith(JOB_PREFIX):
                used |= p.slots
        for job in self._jobs:
            if job.placement is not None:
                used |= job.placement.slots
        return max(0, self._gpus - len(used))

    def _key(self, queued: Sequence[_Job], t: float) -> tuple[object, ...]:
        """What a pass's answers depend on: nothing changed, the pass would place nothing."""
        windows = tuple(
            is_open(j.sim.job.spec.schedule, self.epoch + t)
            for j in queued
            if j.sim.job.spec.schedule is not None
        )
        return (self._version, tuple(j.name for j in queued), windows)

    # -- attempts ------------------------------------------------------------------------------

    def _start(self, job: _Job, where: Placement, t: float) -> None:
        job.attempt += 1
        job.placement, job.started = where, t
        job.sigterm = job.stop_at = None
        job.stopping = job.waiting = ""
        if job.first_start is None:
            job.first_start = t

    def _preempt(self, job: _Job, t: float, why: str) -> None:
        """SIGTERM at ``t``: when it exits, and what its checkpoint then holds."""
        sim = job.sim
        end, _ = job.ends()
        if end <= t:  # it ended before the pass saw it
            self._settle(t)
            return
        progress = job.progress(t)
        periodic = math.floor(progress / sim.checkpoint_every_s) * sim.checkpoint_every_s
        if progress <= 0:  # still starting: nothing to save
            stop, kept, saved = t, 0.0, False
        elif sim.saves_on_sigterm and sim.save_s <= sim.grace_s:
            stop, kept, saved = t + sim.save_s, progress, True
        elif sim.saves_on_sigterm:  # killed at the end of its grace, mid-save
            stop, kept, saved = t + sim.grace_s, periodic, False
        else:
            stop, kept, saved = t, periodic, False
        job.sigterm, job.stop_at, job.stopping, job.kept = t, stop, why, kept
        lost = progress - kept
        job.preemptions += 1
        job.lost_s += lost
        self._preemptions.append(
            Preemption(job.name, job.attempt, t, why, stop, sim.grace_s, sim.checkpoint_every_s,
                       saved, lost)
        )  # fmt: skip

    def _ready(self, job: _Job, ready: float) -> None:
        """The replica that took ``job``'s GPUs is ready at ``ready``."""
        for i in range(len(self._preemptions) - 1, -1, -1):
            p = self._preemptions[i]
            if p.job == job.name and p.attempt == job.attempt:
                if p.taker_ready is None or ready > p.taker_ready:
                    self._preemptions[i] = dataclasses.replace(p, taker_ready=ready)
                return

    def _settle(self, t: float) -> None:
        """Attempts that ended by ``t``: finished, out of maxRuntime, or exited after SIGTERM;
        their GPUs released."""
        capacity = self._need()
        for job in self._jobs:
            if job.placement is None:
                continue
            if job.stop_at is not None:
                if job.stop_at <= t:
                    self._span(job, job.stop_at, job.kept, "preempted", job.stopping)
                    job.saved_s += job.kept
                    self._end(job, capacity)
                continue
            end, outcome = job.ends()
            if end <= t:
                progress = job.progress(end)
                self._span(job, end, progress, outcome)
                job.saved_s += progress
                if outcome == "succeeded":
                    job.finished = end
                else:
                    job.failed = True
                self._end(job, capacity)

    def _span(self, job: _Job, stop: float, progress: float, outcome: str, why: str = "") -> None:
        assert job.placement is not None
        p = job.placement
        job.spans.append(
            AttemptSpan(job.name, job.attempt, p.node, p.gpus, job.started, stop, progress,
                        outcome, why)
        )  # fmt: skip
        gpus = job.sim.job.spec.resources.gpus
        job.held_s += (stop - job.started) * gpus
        job.used_s += stop - job.started

    def _end(self, job: _Job, capacity: PlannerCapacity) -> None:
        capacity.release(job.dep.name)
        job.placement = None
        job.sigterm = job.stop_at = None
        job.stopping = ""
        self._version += 1

    def _need(self) -> PlannerCapacity:
        if self._capacity is None:
            raise ValueError("SimJobs is not attached to a simulation (simulate(jobs=...))")
        return self._capacity
