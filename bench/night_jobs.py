"""Night work on an emulated fleet: a day of interactive traffic, with and without GPU jobs
backfilling what it leaves free (simulated).

Simulated with ``gpufleet.sim`` (virtual time), one seed. The fleet: one node of 8 H100 — the
common unit of a GPU server, enough for the day's peak of one 8B model and for 4-GPU gangs at
night — at the catalog's price. One interactive model: Llama-3-8B under vLLM's engine model, one
whole GPU a replica (``placement.sharing: exclusive``, as vLLM takes 90 % of a GPU's memory),
1 to 8 replicas, the production autoscaler with its defaults, the gateway's 64 slots a replica.
Its traffic: ``traces.diurnal`` — a cosine day with its trough at 20 % of the peak and four
bursts at 1.5× for 10 minutes, the simulator's default lengths (prompts and outputs lognormal,
means 1,024 and 256 tokens). Objectives: TTFT ≤ 1 s and end to end ≤ 20 s (bench/burst.py's).

The simulated day starts at 18:00 (virtual time 0 is 18:00 UTC on a Monday; the traffic's peak
at 14:00, its trough at 02:00): the evening, when the night's jobs are submitted. The queue
(``JOBS``): twelve jobs of 1 to 4 GPUs from three tenants, submitted between 18:00 and 20:30,
with 2 to 6 hours of work each (85 GPU-hours in all, more than the model leaves free over the
day): LoRA fine-tunes that checkpoint every 10 minutes and on SIGTERM (a LoRA adapter and its
optimiser state are a few hundred MB: 10 s to write, within the 30 s grace), and analytics
jobs that only checkpoint every 10 minutes (they exit on SIGTERM and lose what their last
checkpoint does not hold). An attempt takes 60 s to start (the process, the base model and the
checkpoint read back). Three jobs may run only in a night window (22:00-07:00). Tenants'
weights: research 2, product 1, analytics 1.

Runs: (a) the interactive model alone; (b) the same trace with the jobs. The scheduler's
order (``controller.jobs.queue_key``), its placement (``PlannerCapacity.admit`` and ``hold``)
and its preemptions (``PlannerCapacity.displaced``, the autoscaler's plan) are the live code's,
driven by ``gpufleet.sim.jobs``; a replica the plan puts on a preempted job's GPUs starts its
engine once the job has exited.

Reported per run: GPU-hours of the inventory held by the model's replicas, by jobs, and idle
(neither), the idle share; idle GPU-hours while a job waited; interactive SLO attainment (share
of arrived requests within each objective) and TTFT p99; jobs finished and work done;
preemptions (by the plan, by a window), work lost per preemption, the time from the plan's
need to the GPUs handed back and to the model's replica on them ready, against the goals of
issue 22.

Run (from the repository root; the full day takes about 8 minutes on one core, ``--hours 6
--scale 0.5`` about a minute): python bench/night_jobs.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common import ROOT, table
from gpufleet.sim import (
    Bursts,
    Objectives,
    SimResult,
    SimSettings,
    diurnal,
    sim_model,
    simulate,
)
from gpufleet.sim.fleet import SimModel
from gpufleet.sim.jobs import FleetHours, JobsResult, SimJob, SimJobs, fleet_hours
from gpufleet.spec import GpuJob, Model, Tenant, load_inventory_text, parse_job

CONFIG = ROOT / "tests" / "data" / "configs" / "llama-3-8b.json"
GPUS = 8
OBJECTIVES = Objectives(ttft_s=1.0, e2e_s=20.0)
#: Virtual time 0: a Monday's 18:00 UTC (schedule windows are read against it).
EPOCH = dt.datetime(2026, 12, 7, 18, tzinfo=dt.UTC).timestamp()
#: The traffic's peak at 14:00 on the trace's clock, which starts at 18:00.
PEAK_HOUR = 14.0 - 18.0 + 24.0
CHECKPOINT_S = 600.0
GRACE_S = 30
SAVE_S = 10.0
JOB_START_S = 60.0
NIGHT = "22:00-07:00"
WEIGHTS = {"research": 2.0, "product": 1.0, "analytics": 1.0}

#: name, tenant, GPUs, hours of work, submitted (minutes after 18:00), saves on SIGTERM, window
JOBS: tuple[tuple[str, str, int, float, float, bool, str | None], ...] = (
    ("ft-llama-a", "research", 4, 3.0, 0, True, NIGHT),
    ("ft-llama-b", "research", 4, 2.5, 10, True, None),
    ("ft-mistral", "research", 2, 4.0, 20, True, None),
    ("ft-qwen", "research", 2, 3.0, 30, True, NIGHT),
    ("eval-sweep", "research", 1, 5.0, 40, True, None),
    ("ft-support", "product", 1, 3.0, 50, True, None),
    ("ft-search", "product", 1, 3.0, 60, True, None),
    ("distill", "product", 2, 5.0, 70, True, None),
    ("ft-llama-c", "product", 4, 2.0, 80, True, NIGHT),
    ("reindex", "analytics", 2, 4.0, 90, False, None),
    ("churn-model", "analytics", 1, 6.0, 120, False, None),
    ("forecast", "analytics", 1, 6.0, 150, False, None),
)


def model() -> Model:
    spec: dict[str, Any] = {
        "source": f"file:{CONFIG}",
        "engine": "vllm",
        "contextLength": 8192,
        "resources": {"gpus": 1, "gpuTypes": ["H100"]},
        "placement": {"sharing": "exclusive"},
        "replicas": {"min": 1, "max": GPUS},
    }
    return Model.model_validate(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Model", "metadata": {"name": "chat"}}
        | {"spec": spec}
    )


def gpu_job(name: str, tenant: str, gpus: int, window: str | None) -> GpuJob:
    spec: dict[str, Any] = {
        "command": ["python", "train.py"],
        "resources": {"gpus": gpus, "gpuTypes": ["H100"]},
        "checkpoint": {"path": "/ckpt", "graceSeconds": GRACE_S},
        "tenant": tenant,
    }
    if window is not None:
        spec["schedule"] = {"windows": [window]}
    return parse_job(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "GpuJob", "metadata": {"name": name}}
        | {"spec": spec}
    )


def jobs(hours: float) -> SimJobs:
    queue = [
        SimJob(
            gpu_job(name, tenant, gpus, window),
            submit_s=minutes * 60,
            work_s=work_h * 3600,
            checkpoint_every_s=CHECKPOINT_S,
            saves_on_sigterm=saves,
            save_s=SAVE_S,
            startup_s=JOB_START_S,
        )
        for name, tenant, gpus, work_h, minutes, saves, window in JOBS
        if minutes * 60 < hours * 3600
    ]
    return SimJobs(queue, epoch=EPOCH)


TENANTS = [
    Tenant.model_validate(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name}}
        | {"spec": {"weight": weight}}
    )
    for name, weight in WEIGHTS.items()
]
INVENTORY = load_inventory_text(
    "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: bench}\nspec:\n"
    f"  nodes:\n    - {{name: n1, gpus: [{{type: H100, count: {GPUS}}}]}}\n"
)


@dataclass(frozen=True)
class Run:
    name: str
    result: SimResult
    jobs: JobsResult | None
    hours: FleetHours
    wall_s: float


def run(name: str, sized: SimModel, args: argparse.Namespace, with_jobs: bool) -> Run:
    trace = diurnal(
        args.peak_rps * args.scale,
        args.hours * 3600,
        trough_ratio=0.2,
        peak_hour=PEAK_HOUR,
        bursts=Bursts(count=4, multiplier=1.5, length_s=600.0),
        seed=args.seed,
    )
    queue = jobs(args.hours) if with_jobs else None
    started = time.perf_counter()
    result = simulate(
        [sized], INVENTORY, trace, OBJECTIVES, SimSettings(seed=args.seed), TENANTS, queue
    )
    outcome = queue.result() if queue is not None else None
    return Run(name, result, outcome, fleet_hours(result, outcome), time.perf_counter() - started)


def _mean_max(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values):.0f} / {max(values):.0f}" if values else "-"


def _jobs_cells(j: JobsResult) -> list[str]:
    """The jobs' measures of one run, in ``JOB_MEASURES``' order."""
    p = j.preemptions
    by_plan = sum(x.reason.startswith("its GPUs are needed") for x in p)
    done = sum(x.done_s * x.gpus for x in j.jobs) / 3600
    work = sum(x.work_s * x.gpus for x in j.jobs) / 3600
    saving = {name for name, *_, saves, _ in JOBS if saves}
    saved = [x.lost_s for x in p if x.job in saving]
    periodic = [x.lost_s for x in p if x.job not in saving]
    return [
        f"{sum(x.finished is not None for x in j.jobs)} of {len(j.jobs)}",
        f"{done:.1f} of {work:.1f}",
        f"{len(p)} ({by_plan} / {len(p) - by_plan})",
        _mean_max([x.lost_s for x in p]),
        " / ".join(f"{max(x):.0f}" if x else "-" for x in (saved, periodic)),
        _mean_max([x.handback_s for x in p]),
        _mean_max([x.to_ready_s for x in p if x.to_ready_s is not None]),
    ]


#: The jobs' rows: measure, goal.
JOB_MEASURES = (
    ("jobs finished", ""),
    ("job work done, GPU-hours", ""),
    ("preemptions (plan / window)", ""),
    ("work lost per preemption, mean / max s", f"≤ {CHECKPOINT_S:.0f} s"),
    ("  max, jobs saving on SIGTERM / periodic only", f"0 / ≤ {CHECKPOINT_S:.0f} s"),
    ("need → GPUs handed back, mean / max s", f"≤ grace {GRACE_S} s"),
    ("need → replica ready on them, mean / max s", "≤ grace + engine start"),
)


def rows(runs: Sequence[Run]) -> list[list[str]]:
    """One row per measure, one column per run, then the goal."""
    h = [r.hours for r in runs]
    o = [r.result.overall for r in runs]
    out = [
        ["GPU-hours in the inventory", *(f"{x.total:.1f}" for x in h), ""],
        ["  held by the model's replicas", *(f"{x.models:.1f}" for x in h), ""],
        ["    of which running a request", *(f"{x.gpu_hours_busy:.1f}" for x in o), ""],
        ["  held by jobs", *(f"{x.jobs:.1f}" for x in h), ""],
        ["  idle (neither)", *(f"{x.idle:.1f}" for x in h), ""],
        ["idle share of GPU-hours", *(f"{x.idle_share:.1%}" for x in h), "≤ 5 % with jobs"],
        [
            "  idle while a job waited",
            *(f"{r.jobs.gpu_hours_idle_waiting:.1f}" if r.jobs else "-" for r in runs),
            "",
        ],
        ["requests (refused)", *(f"{x.requests:,} ({x.refused:,})" for x in o), ""],
        ["SLO TTFT ≤ 1 s", *(f"{x.slo.get('ttft', 0):.3%}" for x in o), "≥ 99 %, as (a)"],
        ["SLO E2E ≤ 20 s", *(f"{x.slo.get('e2e', 0):.3%}" for x in o), "≥ 99 %, as (a)"],
        ["SLO both", *(f"{x.slo.get('all', 0):.3%}" for x in o), "≥ 99 %, as (a)"],
        ["TTFT p99", *(f"{(x.ttft.p99 or 0) * 1000:.0f} ms" for x in o), ""],
        ["model replicas avg / max", *(f"{x.replicas_mean:.2f} / {x.replicas_max}" for x in o), ""],
    ]
    cells = [_jobs_cells(r.jobs) if r.jobs else ["-"] * len(JOB_MEASURES) for r in runs]
    for i, (measure, goal) in enumerate(JOB_MEASURES):
        out.append([measure, *(c[i] for c in cells), goal])
    return out


def job_rows(r: Run) -> list[list[str]]:
    assert r.jobs is not None
    out = []
    for j in r.jobs.jobs:
        out.append(
            [
                j.name,
                j.tenant,
                str(j.gpus),
                _clock(j.submitted),
                _clock(j.started) if j.started is not None else "-",
                _clock(j.finished) if j.finished is not None else j.phase,
                f"{j.done_s / 3600:.2f} / {j.work_s / 3600:.2f}",
                str(j.attempts),
                str(j.preemptions),
                f"{j.lost_s:.0f}",
            ]
        )
    return out


def _clock(t: float) -> str:
    at = dt.datetime.fromtimestamp(EPOCH + t, dt.UTC)
    day = "" if at.date() == dt.datetime.fromtimestamp(EPOCH, dt.UTC).date() else "+1 "
    return day + at.strftime("%H:%M")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hours", type=float, default=24.0, help="simulate this much from 18:00")
    p.add_argument("--scale", type=float, default=1.0, help="the traffic's rate × this")
    p.add_argument("--peak-rps", type=float, default=20.0, help="the traffic's peak, req/s")
    args = p.parse_args(argv)
    sized = sim_model(model())
    runs = []
    for name, with_jobs in (("(a) interactive only", False), ("(b) with jobs", True)):
        runs.append(run(name, sized, args, with_jobs))
        print(f"{name}: {runs[-1].wall_s:.0f} s wall", flush=True)
    print(
        f"\n{args.hours:g} h from 18:00, {GPUS}×H100, diurnal peak {args.peak_rps * args.scale:g}"
        f" req/s, seed {args.seed}; {len(JOBS)} jobs, checkpoint every {CHECKPOINT_S:.0f} s, "
        f"grace {GRACE_S} s, engine start {sized.startup_s:.0f} s\n"
    )
    print(table(["measure", *(r.name for r in runs), "goal"], rows(runs)))
    with_jobs = runs[-1]
    print()
    headers = ["job", "tenant", "GPUs", "submitted", "started", "finished", "work h done/all"]
    print(table([*headers, "attempts", "preempted", "lost s"], job_rows(with_jobs)))


if __name__ == "__main__":
    main()
