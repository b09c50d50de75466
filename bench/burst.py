"""An evening peak on a small own fleet: own GPUs only against own + burst to a hosted API.

Simulated (``gpufleet.sim``, virtual time): one Llama-3-8B deployment (vLLM's engine model on
H100, the production autoscaler's defaults, 1 to 4 replicas on an inventory of 4 H100 at the
catalog's $4.00/h) under the same trace in every run; only what the own model may route to
changes.

- **own only** — the fleet alone: past its 4 GPUs requests wait in the fair queue (and are
  refused past its 30 s bound or 1,000 waiters).
- **own + burst** — ``routing.cost: {alternatives: [hosted], ttftObjective: 1s}`` to an
  ``engine: external`` model, one endpoint, priced like a hosted Llama-3.1-8B: $0.22 per 1M
  input and output tokens, Amazon Bedrock's on-demand list price for Llama 3.1 8B Instruct as
  listed on cloudprice.net (the providers it lists range from $0.03/$0.05, DeepInfra, to
  $0.30/$0.61, Azure). The burst decision is the gateway's own ``rank_by_cost`` (see
  ``gpufleet.sim.external``).
- **own + burst, frontier price** (an extra row, not the issue's) — the same endpoint at
  $3/$15 per 1M (the README's example; a frontier model's list price), so the own deployment
  is the cheaper one and the hosted API serves only what does not fit.

The hosted API's latency is an assumption, not a measurement: TTFT 0.5 s (cloudprice.net's
median time to first token for Llama 3.1 8B across its providers: 0.49 s), then 100 output
tokens/s (the slow end of published provider speeds: about 91 tok/s for Together AI on
inferencelatency.com, 280 for Fireworks on kickllm.com). Its concurrency is the gateway's
bound under ``gpufleet up``: one endpoint × 64 slots.

The evening: 17:00 to 23:00 in 30-minute Poisson segments whose rates rise to the peak at
20:00-21:00 and fall back (``RATES``), prompts and outputs lognormal (the simulator's default
lengths: means 1,024 and 256 tokens). All requests come from one tenant that may use external
endpoints (``allowExternalEndpoints: true``). Objectives: TTFT ≤ 1 s and end to end ≤ 20 s.

Reported per run: requests, served, refused, SLO attainment (share of arrived requests within
TTFT, within E2E, within both), cost per successful request and per 1M tokens (the cost
report's: GPUs placed + tokens charged), GPU-hours placed, the window's fleet cost (GPUs
with nothing placed included: the 4 H100 are held all evening either way), and the hosted
API's share of the requests and of the cost.

Run (from the repository root, a few minutes on one core): python bench/burst.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from common import ROOT, table
from gpufleet.sim import (
    HostedLatency,
    Objectives,
    SimResult,
    SimSettings,
    TraceRequest,
    poisson,
    sim_model,
    simulate,
)
from gpufleet.spec import Model, Tenant, load_inventory_text

CONFIG = ROOT / "tests" / "data" / "configs" / "llama-3-8b.json"
#: Requests per second of each 30-minute segment from 17:00 to 23:00.
RATES = (10.0, 14.0, 18.0, 22.0, 26.0, 30.0, 30.0, 26.0, 22.0, 18.0, 14.0, 10.0)
SEGMENT_S = 1800.0
#: Hosted Llama-3.1-8B, USD per 1M input and output tokens (see the module's docstring).
LIST_PRICE = (0.22, 0.22)
FRONTIER_PRICE = (3.0, 15.0)
HOSTED = HostedLatency(ttft_s=0.5, tpot_s=0.01)
OBJECTIVES = Objectives(ttft_s=1.0, e2e_s=20.0)


def _model(name: str, spec: dict[str, Any]) -> Model:
    return Model.model_validate(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Model", "metadata": {"name": name}}
        | {"spec": spec}
    )


def own(burst: bool) -> Model:
    spec: dict[str, Any] = {
        "source": f"file:{CONFIG}",
        "engine": "vllm",
        "contextLength": 8192,
        "resources": {"gpus": 1, "gpuTypes": ["H100"]},
        "replicas": {"min": 1, "max": 4},
    }
    if burst:
        spec["routing"] = {"cost": {"alternatives": ["hosted"], "ttftObjective": 1.0}}
    return _model("own", spec)


def hosted(price: tuple[float, float]) -> Model:
    return _model(
        "hosted",
        {
            "engine": "external",
            "endpoints": [{"url": "https://api.example.com/v1", "location": "external"}],
            "pricing": {"perMillionInputTokens": price[0], "perMillionOutputTokens": price[1]},
        },
    )


TENANT = Tenant.model_validate(
    {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": "default"}}
    | {"spec": {"allowExternalEndpoints": True}}
)
INVENTORY = load_inventory_text(
    "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: bench}\nspec:\n"
    "  nodes:\n    - {name: n1, gpus: [{type: H100, count: 4}]}\n"
)


def evening(seed: int, scale: float) -> Iterator[TraceRequest]:
    """Poisson segments at ``RATES`` × ``scale``, one after another."""
    for i, rate in enumerate(RATES):
        start = i * SEGMENT_S
        for r in poisson(rate * scale, SEGMENT_S, seed=seed * 100 + i):
            yield replace(r, at=start + r.at)


@dataclass(frozen=True)
class Run:
    name: str
    result: SimResult
    wall_s: float


def run(name: str, models: list[Model], seed: int, scale: float) -> Run:
    sized = [sim_model(m, hosted=HOSTED) for m in models]
    started = time.perf_counter()
    result = simulate(
        sized, INVENTORY, evening(seed, scale), OBJECTIVES, SimSettings(seed=seed), [TENANT]
    )
    return Run(name, result, time.perf_counter() - started)


def row(r: Run) -> list[str]:
    o = r.result.overall
    external = next((m for m in r.result.models if m.name == "hosted"), None)
    cost = o.cost
    return [
        r.name,
        f"{o.requests:,}",
        f"{o.served:,}",
        f"{o.refused:,}",
        f"{o.slo.get('ttft', 0):.2%}",
        f"{o.slo.get('e2e', 0):.2%}",
        f"{o.slo.get('all', 0):.2%}",
        f"${o.cost_per_request:.6f}" if o.cost_per_request else "-",
        f"${o.cost_per_million_tokens:.3f}" if o.cost_per_million_tokens else "-",
        f"{o.gpu_hours_placed:.1f}",
        f"${r.result.fleet_cost:,.2f}",
        f"{external.requests / o.requests:.1%}" if external and o.requests else "0.0%",
        f"{external.cost / cost:.1%}" if external and cost else "0.0%",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0, help="every segment's rate × this")
    args = p.parse_args(argv)
    runs = [
        run("own only (4×H100)", [own(False)], args.seed, args.scale),
        run("own + burst, $0.22/$0.22", [own(True), hosted(LIST_PRICE)], args.seed, args.scale),
        run("own + burst, $3/$15", [own(True), hosted(FRONTIER_PRICE)], args.seed, args.scale),
    ]
    headers = ["run", "requests", "served", "refused", "SLO TTFT", "SLO E2E", "SLO both"]
    headers += ["$/request", "$/1M tokens", "GPU-h", "fleet $", "ext. requests", "ext. cost"]
    print(table(headers, [row(r) for r in runs]))
    for r in runs:
        refused = ", ".join(f"{k} {v}" for k, v in r.result.overall.refused_by.items())
        by_model = "; ".join(
            f"{m.name}: {m.served:,} served, TTFT p50/p99 {m.ttft.p50 or 0:.2f}/"
            f"{m.ttft.p99 or 0:.2f} s, replicas avg {m.replicas_mean:.1f}, "
            f"GPU ${m.cost_placed:,.2f} + tokens ${m.cost_per_token:,.2f}"
            for m in r.result.models
        )
        print(f"{r.name}: {by_model}; refused: {refused or 'none'} ({r.wall_s:.0f} s wall)")


if __name__ == "__main__":
    main()
