"""GPU jobs in the simulator (``sim.jobs``): a job backfills a GPU the model leaves free, is
preempted when the autoscaler's plan gives that GPU to a new replica, loses nothing when it
saves on SIGTERM (at most its checkpoint interval when it does not), resumes when the model
scales down and finishes; the queue between tenants follows the live scheduler's
``queue_key``; a closing window preempts. Minutes of virtual time on the real planner."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gpufleet.controller.jobs import queue_key
from gpufleet.sim import Objectives, SimResult, SimSettings, TraceRequest, poisson, sim_model
from gpufleet.sim import simulate as run_sim
from gpufleet.sim.fleet import SimModel
from gpufleet.sim.jobs import JobsResult, SimJob, SimJobs, fleet_hours
from gpufleet.spec import GpuJob, Model, Tenant, load_inventory_text, parse_job

CONFIG = Path(__file__).resolve().parents[1] / "data" / "configs" / "llama-3-8b.json"


def chat(max_replicas: int = 2) -> SimModel:
    spec = {
        "source": f"file:{CONFIG}",
        "engine": "vllm",
        "contextLength": 8192,
        "resources": {"gpus": 1, "gpuTypes": ["H100"]},
        "placement": {"sharing": "exclusive"},
        "replicas": {"min": 1, "max": max_replicas},
        "autoscaling": {"targetInFlight": 1, "scaleDownDelay": 30},
    }
    return sim_model(
        Model.model_validate(
            {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Model", "metadata": {"name": "chat"}}
            | {"spec": spec}
        )
    )


def gpu_job(name: str, gpus: int = 1, **spec: Any) -> GpuJob:
    body = {"command": ["train"], "resources": {"gpus": gpus}} | spec
    return parse_job(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "GpuJob", "metadata": {"name": name}}
        | {"spec": body}
    )


def inventory(gpus: int) -> Any:
    return load_inventory_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: t}\nspec:\n"
        f"  nodes:\n    - {{name: n1, gpus: [{{type: H100, count: {gpus}}}]}}\n"
    )


def segments(*parts: tuple[float, float, float]) -> Iterator[TraceRequest]:
    """Poisson segments (start, rate, length), one after another."""
    for start, rate, length in parts:
        for r in poisson(rate, length, seed=int(start), prompt=200, output=50):
            yield replace(r, at=start + r.at)


#: Quiet, then a rush that wants a second replica, then quiet long enough to scale down.
RUSH = ((0.0, 0.1, 300.0), (300.0, 6.0, 300.0), (600.0, 0.1, 1200.0))


def simulate(
    jobs: SimJobs, gpus: int, trace: Iterator[TraceRequest], tenants: list[Tenant] | None = None
) -> tuple[SimResult, JobsResult]:
    result = run_sim(
        [chat()], inventory(gpus), trace, Objectives(ttft_s=1.0), SimSettings(seed=1),
        tenants or [], jobs,
    )  # fmt: skip
    return result, jobs.result()


@pytest.mark.parametrize("saves", [True, False], ids=["saves-on-sigterm", "periodic-only"])
def test_a_job_backfills_is_preempted_by_a_scale_up_and_resumes_to_finish(saves: bool) -> None:
    every, save = 120.0, 5.0
    job = SimJob(gpu_job("tune"), 10.0, 900.0, every, saves_on_sigterm=saves, save_s=save,
                 startup_s=20.0)  # fmt: skip
    sized = chat()
    result, out = simulate(SimJobs([job], until_s=7200.0), 2, segments(*RUSH))

    first, second = out.attempts
    # Backfill: the model's minimum holds one GPU; the job takes the other at its submission.
    assert first.start == 10.0 and first.outcome == "preempted"
    scale_up = next(e for e in result.events if e.before == 1 and e.after == 2)
    scale_down = next(e for e in result.events if e.before == 2 and e.after == 1)
    (p,) = out.preemptions
    # Preempted by the plan of the scale-up (not faked): its GPU is given to the new replica.
    assert p.at == scale_up.t and p.reason == "its GPUs are needed: given to chat#1"
    progress = p.at - first.start - job.startup_s
    if saves:  # it writes its checkpoint within its grace and loses nothing
        assert p.saved and p.lost_s == 0.0 and p.stopped == p.at + save
    else:  # it exits at once and loses what its last periodic checkpoint does not hold
        assert not p.saved and p.stopped == p.at
        assert p.lost_s == pytest.approx(progress % every) and 0 < p.lost_s < every
    assert first.stop == p.stopped and first.progress_s == pytest.approx(progress - p.lost_s)
    # The replica on its GPU starts its engine once the job has handed the GPU back.
    assert p.handback_s <= job.grace_s
    assert p.taker_ready == pytest.approx(p.stopped + sized.startup_s)
    # It resumes when the model scales back down, from its checkpoint, and finishes.
    assert second.start == scale_down.t and second.outcome == "succeeded"
    (done,) = out.jobs
    assert done.phase == "succeeded" and done.done_s == job.work_s
    assert done.attempts == 2 and done.preemptions == 1
    rest = job.work_s - first.progress_s
    assert done.finished == pytest.approx(second.start + job.startup_s + rest)
    # GPU-hours: the job's attempts, the handover counted once.
    held = sum(a.stop - a.start for a in out.attempts) / 3600
    assert out.gpu_hours_held == pytest.approx(held)
    assert out.gpu_hours_shared == pytest.approx((p.stopped - p.at) / 3600)
    hours = fleet_hours(result, out)
    assert hours.jobs == pytest.approx(held) and 0 < hours.idle < hours.total
    assert result.overall.refused == 0


def tenant(name: str, weight: float = 1.0) -> Tenant:
    return Tenant.model_validate(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name}}
        | {"spec": {"weight": weight}}
    )


def test_the_queue_between_tenants_follows_queue_key() -> None:
    # Three GPUs, the model's minimum on one: two for jobs. Tenant a's long job and short job
    # take both; a's third job is older than b's, but when the short one ends a still holds a
    # GPU and b none: b goes first (the fair share before age), as the live scheduler orders.
    def job(name: str, tenant: str, at: float, work: float) -> SimJob:
        return SimJob(gpu_job(name, tenant=tenant), at, work, 60.0, startup_s=10.0)

    queue = [
        job("a-long", "a", 1.0, 2000.0),
        job("a-short", "a", 1.0, 300.0),
        job("a-late", "a", 5.0, 100.0),
        job("b-late", "b", 20.0, 100.0),
    ]
    trace = segments((0.0, 0.1, 900.0))
    _, out = simulate(SimJobs(queue, until_s=3000.0), 3, trace, [tenant("a"), tenant("b")])
    started = {j.name: j.started for j in out.jobs}
    short = out.job("a-short")
    assert short.finished is not None
    assert started["b-late"] is not None and started["a-late"] is not None
    assert started["b-late"] < started["a-late"]  # younger, but its tenant holds nothing
    assert started["b-late"] == pytest.approx(short.finished, abs=1.0)
    # The order is queue_key's: a holds one GPU, b none, at the pass that chose.
    assert queue_key("batch", 0, 1.0, 20.0, "b-late") < queue_key("batch", 1, 1.0, 5.0, "a-late")
    assert all(j.phase == "succeeded" for j in out.jobs)


def test_a_closing_window_preempts_and_the_job_waits_for_the_next_one() -> None:
    # Virtual 0 is 06:50 UTC: the night window closes 10 minutes in.
    epoch = dt.datetime(2026, 12, 7, 6, 50, tzinfo=dt.UTC).timestamp()
    night = {"windows": ["22:00-07:00"]}
    job = SimJob(gpu_job("nightly", schedule=night), 0.0, 3600.0, 300.0, startup_s=10.0)
    _, out = simulate(SimJobs([job], epoch=epoch), 2, segments((0.0, 0.1, 1200.0)))
    (p,) = out.preemptions
    assert p.reason == "its schedule window closed" and p.at == 600.0
    assert p.saved and p.lost_s == 0.0
    (waiting,) = out.jobs
    assert waiting.phase == "queued" and waiting.waiting == "waits for its schedule window"
    # Its work: from the first tick (1 s) and its start (10 s) to the window's end.
    assert waiting.done_s == pytest.approx(600.0 - 1.0 - 10.0)


def test_a_job_set_is_one_runs() -> None:
    jobs = SimJobs([SimJob(gpu_job("once"), 0.0, 60.0, 30.0)])
    simulate(jobs, 2, segments((0.0, 0.1, 60.0)))
    with pytest.raises(ValueError, match="make a SimJobs per run"):
        simulate(jobs, 2, segments((0.0, 0.1, 60.0)))
    with pytest.raises(ValueError, match="named 'twice'"):
        SimJobs([SimJob(gpu_job("twice"), 0.0, 1.0, 1.0)] * 2)


def test_a_gang_first_in_the_queue_has_gpus_kept_for_it_as_in_the_live_scheduler() -> None:
    # Three GPUs, the model's minimum on one: two for jobs. A 1-GPU job holds one; the 2-GPU
    # gang is next in the queue, a younger 1-GPU job after it: the free GPU is kept for the
    # gang (controller.jobs.reserve), which starts as the first job ends, the younger after it.
    queue = [
        SimJob(gpu_job("first"), 1.0, 600.0, 60.0, startup_s=10.0),
        SimJob(gpu_job("gang", 2), 5.0, 300.0, 60.0, startup_s=10.0),
        SimJob(gpu_job("younger"), 10.0, 600.0, 60.0, startup_s=10.0),
    ]
    _, out = simulate(SimJobs(queue, until_s=4000.0), 3, segments((0.0, 0.1, 900.0)))
    first, gang, younger = out.job("first"), out.job("gang"), out.job("younger")
    assert first.finished is not None and gang.started is not None
    assert gang.started == pytest.approx(first.finished, abs=1.0)
    assert younger.started is not None and gang.finished is not None
    assert younger.started == pytest.approx(gang.finished, abs=1.0)
    assert all(j.phase == "succeeded" for j in out.jobs)
