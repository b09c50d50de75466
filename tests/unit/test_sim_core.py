"""The simulator's core: virtual time, the production policies, hand-checkable queues, the planner."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpufleet.emulator.steps import StepCost
from gpufleet.sim import (
    Objectives,
    SharedPrefix,
    SimSettings,
    TraceRequest,
    poisson,
    render_table,
    sim_model,
    simulate,
)
from gpufleet.sim.fleet import SimModel
from gpufleet.spec import Inventory, Model, load_inventory_text

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"


def model(name: str, config: str = "llama-3-8b.json", **spec: Any) -> Model:
    body = {
        "source": f"file:{CONFIGS / config}",
        "engine": "vllm",
        "contextLength": 8192,
        "resources": {"gpus": 1, "gpuTypes": ["H100"]},
        **spec,
    }
    return Model.model_validate(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Model", "metadata": {"name": name}}
        | {"spec": body}
    )


def inventory(gpu: str = "H100", count: int = 8) -> Inventory:
    return load_inventory_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: t}\nspec:\n"
        f"  nodes:\n    - name: n1\n      gpus: [{{type: {gpu}, count: {count}}}]\n"
    )


@pytest.fixture
def no_sleeping(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("the simulator slept")

    monkeypatch.setattr(time, "sleep", refuse)
    monkeypatch.setattr(asyncio, "sleep", refuse)


def test_a_day_runs_in_virtual_time_and_a_seed_repeats(no_sleeping: None) -> None:
    sized = sim_model(model("llama", replicas={"min": 1, "max": 4}))

    def run() -> dict[str, Any]:
        trace = poisson(0.2, 24 * 3600, seed=7, prompt=200, output=50)
        settings = SimSettings(tick_s=15.0, seed=7)
        result = simulate([sized], inventory(), trace, Objectives(ttft_s=1.0), settings)
        assert result.duration_s > 23 * 3600
        assert result.overall.served > 15_000 and result.overall.refused == 0
        return result.to_dict()

    started = time.perf_counter()
    first = run()
    assert time.perf_counter() - started < 30  # a simulated day; no wall-clock waits
    assert run() == first
    assert first["gpus"][0]["gpu_type"] == "H100" and first["fleet_cost"] > 0


def shared_prefix_trace(seed: int) -> Iterator[TraceRequest]:
    return poisson(
        8.0, 300, seed=seed, prompt=200, output=40, prefix=SharedPrefix(groups=60, tokens=1024)
    )


def test_the_routing_policy_is_the_production_one() -> None:
    results = {}
    for policy in ("prefix", "round-robin"):
        spec = model("llama", replicas={"min": 4, "max": 4}, routing={"policy": policy})
        result = simulate([sim_model(spec)], inventory(), shared_prefix_trace(3))
        results[policy] = result.model("llama")
    # The prefix-aware policy keeps each group's prefix on few replicas: more cache hits.
    assert results["prefix"].cached_tokens > 1.3 * results["round-robin"].cached_tokens
    assert results["prefix"].ttft != results["round-robin"].ttft
    # The override swaps the policy of every model without touching the spec.
    spec = model("llama", replicas={"min": 4, "max": 4})
    swapped = simulate(
        [sim_model(spec)],
        inventory(),
        shared_prefix_trace(3),
        settings=SimSettings(routing="round-robin"),
    )
    assert swapped.model("llama").cached_tokens == results["round-robin"].cached_tokens


def test_one_replica_with_fixed_service_waits_as_m_d_1() -> None:
    """One replica admitting one sequence at a time (``--max-num-seqs 1``), every request the
    same 1,000-token prompt with a single output token: its service is that prefill, a constant
    S (the request's overhead plus the roofline prefill). Poisson arrivals at ρ = 0.6; the mean
    wait before service must match Pollaczek–Khinchine for M/D/1, W = ρ·S / (2(1 − ρ))."""
    spec = model("md1", replicas={"min": 1, "max": 1}, engineArgs=["--max-num-seqs", "1"])
    sized: SimModel = sim_model(spec)
    assert sized.max_num_seqs == 1
    perf = sized.engine(None).perf
    service = perf.request_overhead_s + StepCost.of(perf).seconds(0, 0, 1000, 1000)  # one step
    rho = 0.6
    rng = random.Random(11)

    def arrivals() -> Iterator[TraceRequest]:
        t = 0.0
        for _ in range(20_000):
            t += rng.expovariate(rho / service)
            yield TraceRequest(t, 1000, 1)

    # The queue under test is the engine's: no fixed gateway time on top of its service.
    settings = SimSettings(hold_s=1e9, tick_s=60.0, gateway_overhead_s=0.0)
    result = simulate([sized], inventory(), arrivals(), settings=settings)
    m = result.model("md1")
    assert m.served == 20_000 and m.cached_tokens == 0
    assert m.ttft.mean is not None
    waited = m.ttft.mean - service
    expected = rho * service / (2 * (1 - rho))
    assert waited == pytest.approx(expected, rel=0.10)
    assert m.gpu_hours_busy == pytest.approx(rho * result.duration_s / 3600, rel=0.05)


def test_a_fleet_too_small_reports_the_planners_reason() -> None:
    big = model("big", "llama-3-70b.json", resources={"gpuTypes": ["L4"]})
    small = model("small", contextLength=2048, resources={"gpus": 1})
    trace = (TraceRequest(float(i), 100, 10, model=m) for i in range(20) for m in ("big", "small"))
    result = simulate(
        [sim_model(big), sim_model(small)],
        inventory("L4", 2),
        trace,
        settings=SimSettings(hold_s=5.0),
    )
    unplaced = result.model("big")
    assert unplaced.served == 0 and unplaced.refused == 20 and unplaced.unplaced
    assert any(e.unschedulable and e.model == "big" for e in result.events)
    assert result.model("small").served == 20 and result.model("small").unplaced is None
    text = render_table(result)
    assert f"unplaced big: {unplaced.unplaced}" in text
    assert json.loads(result.to_json())["models"][0]["unplaced"] == unplaced.unplaced


def test_the_cli_runs_a_synthetic_trace_as_json() -> None:
    from typer.testing import CliRunner

    from gpufleet.cli.main import app

    examples = CONFIGS.parents[2] / "examples"
    args = ["sim", "-f", str(examples / "models.yaml"), "--inventory"]
    args += [str(examples / "inventory.yaml"), "--trace", "poisson:rate=2,duration=60"]
    result = CliRunner().invoke(app, [*args, "--ttft", "1", "-o", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["overall"]["served"] == data["overall"]["requests"] > 60
    assert data["models"][0]["name"] == "llama-3-8b" and data["requests_per_wall_s"] > 0


def test_the_cli_says_what_it_does_not_simulate(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gpufleet.cli.main import app

    examples = CONFIGS.parents[2] / "examples"
    models = tmp_path / "models.yaml"
    models.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: llama-pd}\n"
        f"spec:\n  source: file:{CONFIGS / 'llama-3-8b.json'}\n  engine: vllm\n"
        "  resources: {gpus: 1, gpuTypes: [H100]}\n"
        "  routing: {prefixIndex: precise}\n  disaggregation: {prefill: {replicas: 1}}\n"
    )
    args = ["sim", "-f", str(models), "--inventory", str(examples / "inventory.yaml")]
    args += ["--trace", "poisson:rate=1,duration=10", "--ttft", "1", "-o", "json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "note: llama-pd: spec.disaggregation is not simulated" in result.stderr
    assert (
        "note: llama-pd: routing.prefixIndex: precise is simulated as approximate" in result.stderr
    )
    assert json.loads(result.stdout)["overall"]["requests"] > 0
