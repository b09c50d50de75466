"""GPU jobs in the planner and the scheduler (``controller.jobs``): gangs placed whole or not at
all, a model's replicas (its minimum included) never taken by a job, a job displaced by a model
that needs its GPUs, the queue's fair order between tenants, and a budget that stops a job
before it starts. Jobs here are real child processes (``sleep``), the planner the real one on a
declared inventory; tests/integration/test_jobs_up.py runs the whole path under gpufleet up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpufleet.controller.capacity import PlannerCapacity, size_emulated
from gpufleet.controller.jobs import JobError, JobScheduler, job_deployment
from gpufleet.planner import Placement
from gpufleet.runtime.jobs import AttemptResult, JobAttempt, LocalJobRunner, Outcome
from gpufleet.spec import GpuJob, Tenant, load_jobs_text, load_text
from gpufleet.spec.inventory import load_inventory_text
from gpufleet.store import Store, sqlite_url
from tests.conftest import eventually

CONFIG = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"


def inventory(gpus: int) -> PlannerCapacity:
    text = (
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: box}\n"
        f"spec: {{nodes: [{{name: box, gpus: [{{type: H100, count: {gpus}}}]}}]}}\n"
    )
    return PlannerCapacity(load_inventory_text(text), size=size_emulated)


def model_wants(count: int, *, min_replicas: int = 0) -> dict[str, tuple[object, int]]:
    (m,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: chat}\n"
        f"spec: {{source: 'file:{CONFIG}', engine: emulator, resources: {{gpus: 1}},"
        f" replicas: {{min: {min_replicas}, max: 4}}}}\n"
    )
    return {"chat": (m.spec, count)}


def job(
    name: str, gpus: int = 1, *, tenant: str = "", priority: str = "batch", **extra: str
) -> GpuJob:
    lines = [
        "apiVersion: gpufleet.io/v1alpha1",
        "kind: GpuJob",
        f"metadata: {{name: {name}}}",
        "spec:",
        "  command: [sleep, '600']",
        f"  resources: {{gpus: {gpus}}}",
        f"  priorityClass: {priority}",
        *(f"  {k}: {v}" for k, v in extra.items()),
    ]
    if tenant:
        lines.append(f"  tenant: {tenant}")
    (parsed,) = load_jobs_text("\n".join(lines) + "\n")
    return parsed


def test_a_gang_is_placed_whole_or_not_at_all_and_never_on_a_models_gpu() -> None:
    capacity = inventory(2)
    capacity.bound(model_wants(1, min_replicas=1))  # the model's minimum holds one GPU
    two = job_deployment(job("wide", 2))
    assert isinstance(capacity.admit(two), str)  # one GPU free: not half a gang
    one = capacity.admit(job_deployment(job("narrow", 1)))
    assert isinstance(one, Placement) and len(one.gpus) == 1
    capacity.hold(job_deployment(job("narrow", 1)), one)
    # The model wants a second replica: the job's GPU is the only one left; the plan takes it.
    answer = capacity.bound(model_wants(2, min_replicas=1))
    assert answer == {}  # both of the model's replicas placed
    assert capacity.displaced == {"job:narrow": "given to chat#1"}
    # While the model wants both GPUs no job is admitted; once it wants none, the gang is.
    assert isinstance(capacity.admit(two), str)
    capacity.release("job:narrow")
    capacity.bound(model_wants(0))
    whole = capacity.admit(two)
    assert isinstance(whole, Placement) and sorted(whole.gpus) == [0, 1]


def test_a_job_ranks_below_every_model_whatever_their_classes() -> None:
    batch = job_deployment(job("b"))
    best_effort = job_deployment(job("e", priority="best-effort"))
    assert batch.priority < 10 and best_effort.priority < batch.priority  # best-effort models: 10
    assert batch.sharing == "exclusive" and batch.replicas == 1


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[JobScheduler]:
    store = Store.open(sqlite_url(tmp_path))
    runner = LocalJobRunner(tmp_path / "jobs")
    jobs = JobScheduler(store, runner, inventory(2), data_dir=tmp_path, interval_s=0.05)
    jobs.capacity.bound({})  # type: ignore[union-attr]
    await jobs.start()
    try:
        yield jobs
    finally:
        await jobs.close()
        await runner.close()
        store.close()


async def phase(jobs: JobScheduler, name: str) -> str:
    rec = await asyncio.to_thread(jobs.store.job, name)
    return rec.phase if rec is not None else ""


async def test_the_queue_serves_the_tenant_holding_less_first_then_age(
    scheduler: JobScheduler,
) -> None:
    jobs = scheduler
    for name, weight in (("a", 1.0), ("b", 1.0), ("c", 1.0)):
        jobs.store.apply_tenant(
            Tenant.model_validate(
                {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Tenant",
                 "metadata": {"name": name}, "spec": {"weight": weight}}
            )
        )  # fmt: skip

    async def running(*names: str) -> bool:
        return all([await phase(jobs, n) == "Running" for n in names])

    # Two GPUs: tenant a's first job holds one, tenant c's the other.
    await jobs.submit(job("a-first", tenant="a"), "a")
    await jobs.submit(job("c-filler", tenant="c"), "c")
    await eventually(lambda: running("a-first", "c-filler"), "both placed", timeout=30)
    # Queued while nothing is free: a's second (older) and b's first.
    await jobs.submit(job("a-second", tenant="a"), "a")
    await jobs.submit(job("b-first", tenant="b"), "b")
    await jobs.cancel("c-filler")

    # One GPU free: b holds none, a holds one — b's job goes first, although younger.
    async def started() -> str:
        for name in ("a-second", "b-first"):
            if await phase(jobs, name) == "Running":
                return name
        return ""

    assert await eventually(started, "one of them started", timeout=30) == "b-first"
    assert await phase(jobs, "a-second") == "Queued"
    assert await phase(jobs, "c-filler") == "Cancelled"
    # a's first ends: a's second, the only one left, gets its GPU.
    await jobs.cancel("a-first")
    await eventually(lambda: running("a-second", "b-first"), "a's second placed", timeout=30)


async def test_a_job_that_would_exceed_its_tenants_budget_is_not_started(
    scheduler: JobScheduler,
) -> None:
    jobs = scheduler
    jobs.store.apply_tenant(
        Tenant.model_validate(
            {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": "lab"},
             "spec": {"limits": {"budget": {"usd": 1.0, "period": "day"}}}}
        )
    )  # fmt: skip
    with pytest.raises(JobError, match="tenant 'nobody' does not exist"):
        await jobs.submit(job("stray", tenant="nobody", maxRuntime="1m"), "lab")
    with pytest.raises(JobError, match="maxRuntime is required"):
        await jobs.submit(job("open-ended", tenant="lab"), "lab")
    # Two H100 hours are more than the day's $1: the job waits, saying why.
    await jobs.submit(job("long", 2, tenant="lab", maxRuntime="1h"), "lab")

    async def said() -> str:
        rec = await asyncio.to_thread(jobs.store.job, "long")
        return rec.reason if rec is not None and "budget" in rec.reason else ""

    reason = await eventually(said, "the budget's refusal", timeout=30)
    assert "not started: tenant lab's budget is $1.00 a day" in reason
    assert await phase(jobs, "long") == "Queued"
    # A short one fits: it starts.
    await jobs.submit(job("short", tenant="lab", maxRuntime="30s"), "lab")

    async def running() -> bool:
        return await phase(jobs, "short") == "Running"

    await eventually(running, "the short job started", timeout=30)


class FakeAttempt:
    """An attempt a cluster still runs (a Job that outlived its operator): ended by the test."""

    def __init__(self, name: str, number: int) -> None:
        self.name, self.number = name, number
        self.asked: list[str] = []
        self.ended: asyncio.Future[AttemptResult] = asyncio.get_running_loop().create_future()

    def preempt(self, reason: str) -> None:
        self.asked.append(f"preempt: {reason}")

    def cancel(self, reason: str = "cancelled") -> None:
        self.asked.append(f"cancel: {reason}")

    async def wait(self) -> AttemptResult:
        return await asyncio.shield(self.ended)

    def end(self, outcome: Outcome) -> None:
        self.ended.set_result(
            AttemptResult(self.name, self.number, outcome, 0, False, outcome.value, 5.0, [])
        )


class AdoptingRunner:
    def __init__(self) -> None:
        self.kept: dict[tuple[str, int], FakeAttempt] = {}
        self.started: list[JobAttempt] = []

    async def start(self, attempt: JobAttempt, job: object = None) -> FakeAttempt:
        self.started.append(attempt)
        handle = self.kept[(attempt.job, attempt.attempt)] = FakeAttempt(
            attempt.job, attempt.attempt
        )
        return handle

    async def adopt(self, job: str, attempt: int) -> FakeAttempt | None:
        return self.kept.get((job, attempt))

    async def logs(self, job: str, attempt: int, tail: int = 200) -> list[str]:
        return []


async def test_a_scheduler_that_takes_over_adopts_the_attempts_still_running(
    tmp_path: Path,
) -> None:
    """An operator that loses its lead leaves the cluster's Jobs running; the next one adopts
    them — their GPUs stay held, nothing is started twice — and follows them to their end."""
    store = Store.open(sqlite_url(tmp_path))
    store.apply_tenant(
        Tenant.model_validate(
            {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": "a"}}
        )
    )
    runner = AdoptingRunner()
    first = JobScheduler(store, runner, inventory(1), data_dir=tmp_path, interval_s=0.05)
    first.capacity.bound({})  # type: ignore[union-attr]
    await first.start()
    try:
        await first.submit(job("long", tenant="a"), "a")
        await first.submit(job("next", tenant="a"), "a")
        await eventually(lambda: runner.started, "started")
        handle = runner.kept[("long", 1)]
        await first.close(stop_attempts=False)
        assert handle.asked == []  # left running

        second = JobScheduler(store, runner, inventory(1), data_dir=tmp_path, interval_s=0.05)
        second.capacity.bound({})  # type: ignore[union-attr]
        await second.start()
        events = [e.reason for e in store.events("long")]
        assert "Adopted" in events and "Requeued" not in events
        await second.tick()
        assert [a.job for a in runner.started] == ["long"]  # its GPU is still held
        assert await phase(second, "next") == "Queued"
        handle.end(Outcome.SUCCEEDED)
        await eventually(lambda: phase(second, "long"), "long ended")

        async def done() -> bool:
            return await phase(second, "long") == "Succeeded"

        await eventually(done, "long succeeded")
        await eventually(lambda: [a.job for a in runner.started] == ["long", "next"], "next")
        await second.close(stop_attempts=False)
    finally:
        store.close()


async def test_the_gang_first_in_the_queue_has_gpus_kept_for_it_and_shorter_jobs_backfill(
    tmp_path: Path,
) -> None:
    """Two GPUs, one held by a job that may run an hour more: the 2-GPU gang first in the queue
    keeps both as they free up — a younger 1-GPU job that may run 2 h waits, one that ends
    within 10 min takes the free GPU meanwhile — and the gang starts once they have ended."""
    store = Store.open(sqlite_url(tmp_path))
    store.apply_tenant(
        Tenant.model_validate(
            {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": "a"}}
        )
    )
    runner = AdoptingRunner()
    jobs = JobScheduler(store, runner, inventory(2), data_dir=tmp_path, interval_s=0.05)
    jobs.capacity.bound({})  # type: ignore[union-attr]
    await jobs.start()
    try:
        await jobs.submit(job("hour", tenant="a", maxRuntime="1h"), "a")
        await eventually(lambda: [a.job for a in runner.started] == ["hour"], "hour started")
        await jobs.submit(job("gang", 2, tenant="a"), "a")
        await jobs.submit(job("long", tenant="a", maxRuntime="2h"), "a")
        await jobs.submit(job("brief", tenant="a", maxRuntime="10m"), "a")
        await eventually(lambda: "brief" in [a.job for a in runner.started], "brief backfilled")
        # "long" was refused the free GPU (kept for the gang) before "brief" took it.
        said = [e.message for e in store.events("long") if e.reason == "Waiting"]
        assert any("GPUs box/0, box/1 are kept for job gang" in m for m in said), said
        assert await phase(jobs, "long") == "Queued" and await phase(jobs, "gang") == "Queued"
        # Both end: the gang, not the older-placed "long", gets the two GPUs.
        runner.kept[("hour", 1)].end(Outcome.SUCCEEDED)
        runner.kept[("brief", 1)].end(Outcome.SUCCEEDED)
        await eventually(lambda: "gang" in [a.job for a in runner.started], "the gang started")
        assert [a.job for a in runner.started] == ["hour", "brief", "gang"]
        assert await phase(jobs, "long") == "Queued"
        runner.kept[("gang", 1)].end(Outcome.SUCCEEDED)
        await eventually(lambda: "long" in [a.job for a in runner.started], "long ran last")
    finally:
        await jobs.close(stop_attempts=False)
        store.close()
