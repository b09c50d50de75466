"""The simulator at fleet scale: 10 M requests on 1,000 GPUs over a simulated day, one core.

The issue's target: 10 M requests, 1,000 GPUs (125 nodes × 8 H100), 24 simulated hours in
≤ 5 minutes of one core — about 33k requests/s, each with a real routing decision. The fleet
serves a mix of models (two 8B-class models on one GPU, a 7B one, a 70B one at TP 4), each
autoscaled by the production autoscaler and routed by its spec's policy (prefix-aware by
default). The trace is ``traces.diurnal`` (a trough of 20% of the peak at 02:00, the peak at
14:00) with a share of requests behind shared system prompts, scaled so that the day holds
``--requests`` requests; the simulation runs in-process (timed, then profiled on a smaller run)
and once through ``gpufleet sim`` in a child process, to show the CLI costs the same per request.

Run: python bench/sim_scale.py [--requests 200000] [--hours 24] [--cli-hours 1] [--profile-hours 1]
(``--requests`` sets the day's rate; ``--hours`` how much of the day, from midnight, to run).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import ROOT, table
from gpufleet.sim import SharedPrefix, SimSettings, TraceRequest, sim_model, simulate
from gpufleet.sim.fleet import SimModel
from gpufleet.sim.traces import DAY_S, diurnal
from gpufleet.spec import Inventory, Model, load_inventory_text

CONFIGS = ROOT / "tests" / "data" / "configs"
NODES, GPUS_PER_NODE = 125, 8
#: name → (config, GPUs per replica, min replicas, max replicas, share of the requests).
MODELS = {
    "llama-3-8b": ("llama-3-8b.json", 1, 8, 400, 0.45),
    "qwen2.5-7b": ("qwen2.5-7b.json", 1, 4, 200, 0.25),
    "mistral-7b": ("mistral-7b.json", 1, 2, 100, 0.15),
    "llama-3-70b": ("llama-3-70b.json", 4, 2, 70, 0.15),
}
TROUGH = 0.2  # of the peak; the day's mean rate is then 0.6 of the peak
PREFIX = SharedPrefix(groups=200, tokens=512, share=0.5, name="system")


def model(name: str, config: str, gpus: int, low: int, high: int) -> Model:
    spec = {
        "source": f"file:{CONFIGS / config}",
        "engine": "vllm",
        "contextLength": 8192,
        "resources": {"gpus": gpus, "gpuTypes": ["H100"]},
        "replicas": {"min": low, "max": high},
    }
    return Model.model_validate(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Model", "metadata": {"name": name}}
        | {"spec": spec}
    )


def models() -> list[Model]:
    return [model(name, c, g, lo, hi) for name, (c, g, lo, hi, _) in MODELS.items()]


def inventory_yaml() -> str:
    nodes = "".join(
        f"    - name: n{i:03d}\n      gpus: [{{type: H100, count: {GPUS_PER_NODE}}}]\n"
        for i in range(NODES)
    )
    return (
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: bench}\n"
        f"spec:\n  nodes:\n{nodes}"
    )


def inventory() -> Inventory:
    return load_inventory_text(inventory_yaml())


def peak_rate(requests: int) -> float:
    """The peak that puts about ``requests`` arrivals in a day."""
    return requests / (DAY_S * (TROUGH + (1 - TROUGH) / 2))


def trace(requests: int, duration_s: float, seed: int) -> Iterator[TraceRequest]:
    """The first ``duration_s`` of a day of ``requests`` (from midnight, the quiet hours)."""
    return diurnal(
        peak_rate(requests),
        duration_s,
        trough_ratio=TROUGH,
        seed=seed,
        models={name: m[4] for name, m in MODELS.items()},
        prefix=PREFIX,
    )


def run(sized: list[SimModel], requests: int, duration_s: float, seed: int) -> dict[str, Any]:
    settings = SimSettings(tick_s=1.0, seed=seed)
    cpu = time.process_time()
    wall = time.perf_counter()
    result = simulate(sized, inventory(), trace(requests, duration_s, seed), settings=settings)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    o = result.overall
    return {
        "path": "in-process",
        "requests": o.requests,
        "served": o.served,
        "hours": result.duration_s / 3600,
        "replicas_max": o.replicas_max,
        "wall_s": wall,
        "cpu_s": cpu,
        "rate": o.requests / wall,
    }


def run_cli(requests: int, duration_s: float, seed: int) -> dict[str, Any]:
    """The same fleet through ``gpufleet sim`` in a child process (its own CPU time counted)."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "models.yaml"
        docs = [m.model_dump(mode="json", by_alias=True, exclude_none=True) for m in models()]
        spec.write_text(yaml.safe_dump_all(docs))
        inv = Path(tmp) / "inventory.yaml"
        inv.write_text(inventory_yaml())
        # The CLI's synthetic trace takes numbers only: one model, no shared prefixes — the
        # same per-request path (routing, engine, autoscaler), a simpler mix.
        peak = peak_rate(requests)
        args = ["-m", "gpufleet", "sim", "-f", str(spec), "-i", str(inv), "--seed"]
        args += [str(seed), "-o", "json", "--trace"]
        args.append(f"diurnal:peak={peak:.6f},duration={duration_s:g},trough_ratio={TROUGH}")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        out = subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=True
        )
        wall = time.perf_counter() - wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    data = json.loads(out.stdout)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "path": "gpufleet sim (child)",
        "requests": data["overall"]["requests"],
        "served": data["overall"]["served"],
        "hours": data["duration_s"] / 3600,
        "replicas_max": data["overall"]["replicas_max"],
        "wall_s": wall,
        "cpu_s": cpu,
        "rate": data["requests_per_wall_s"],  # the simulation alone, as the CLI reports it
    }


def profile(sized: list[SimModel], requests: int, duration_s: float, seed: int, top: int) -> str:
    settings = SimSettings(tick_s=1.0, seed=seed)
    profiler = cProfile.Profile()
    profiler.enable()
    simulate(sized, inventory(), trace(requests, duration_s, seed), settings=settings)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000_000, help="in a whole day")
    parser.add_argument("--hours", type=float, default=24.0, help="simulate the day's first H")
    parser.add_argument("--cli-hours", type=float, default=1.0, help="for the CLI run; 0: none")
    parser.add_argument("--profile-hours", type=float, default=1.0, help="0: no profile")
    parser.add_argument("--top", type=int, default=25, help="profile rows")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    duration = args.hours * 3600
    started = time.perf_counter()
    sized = [sim_model(m) for m in models()]
    print(f"sized {len(sized)} models in {time.perf_counter() - started:.1f} s")
    rows = [run(sized, args.requests, duration, args.seed)]
    if args.cli_hours:
        rows.append(run_cli(args.requests, args.cli_hours * 3600, args.seed))
    headers = ["path", "requests", "served", "sim h", "replicas max", "wall s", "CPU s", "req/s"]
    print(
        table(
            headers,
            [
                [
                    r["path"],
                    f"{r['requests']:,}",
                    f"{r['served']:,}",
                    f"{r['hours']:.1f}",
                    str(r["replicas_max"]),
                    f"{r['wall_s']:.1f}",
                    f"{r['cpu_s']:.1f}",
                    f"{r['rate']:,.0f}",
                ]
                for r in rows
            ],
        )
    )
    if args.profile_hours:
        print(f"\nprofile: the first {args.profile_hours:g} h of the day, in-process")
        print(profile(sized, args.requests, args.profile_hours * 3600, args.seed, args.top))


if __name__ == "__main__":
    main()
