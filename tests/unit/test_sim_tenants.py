"""Tenants in the simulator: the gateway's quotas, fair queue and cost metering, in virtual time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpufleet.sim import (
    Objectives,
    SimSettings,
    SimTenant,
    TraceRequest,
    merge,
    poisson,
    render_table,
    sim_model,
    simulate,
    write_trace,
)
from gpufleet.sim.fleet import SimModel
from gpufleet.spec import Tenant
from tests.unit.test_sim_core import CONFIGS, inventory, model


def tenant(name: str, **spec: Any) -> Tenant:
    return Tenant.model_validate(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name}}
        | {"spec": spec}
    )


def one_replica(slots: int = 4) -> SimModel:
    spec = model("llama", replicas={"min": 1, "max": 1}, engineArgs=["--max-num-seqs", "4"])
    return sim_model(spec, slots_per_replica=slots)


def steady(
    tenant: str, per_s: int, until_s: int, prompt: int = 100, output: int = 10
) -> Iterator[TraceRequest]:
    """``per_s`` requests a second from 0 (``k / per_s``: whole seconds land exactly)."""
    return (TraceRequest(k / per_s, prompt, output, tenant=tenant) for k in range(per_s * until_s))


def test_backlogged_tenants_share_a_busy_model_by_weight() -> None:
    """Two tenants each sending far more than one replica serves: the fair queue gives the
    weight-3 tenant three times the other's service, and the rest wait out the queue's bound."""
    trace = merge(
        poisson(20.0, 300, seed=1, prompt=1000, output=100, tenants={"heavy": 1.0}),
        poisson(20.0, 300, seed=2, prompt=1000, output=100, tenants={"light": 1.0}),
    )
    settings = SimSettings(queue_max_length=1_000_000, queue_max_wait_s=20.0, tick_s=60.0)
    result = simulate(
        [one_replica()],
        inventory(),
        trace,
        settings=settings,
        tenants=[tenant("heavy", weight=3), tenant("light", weight=1)],
    )
    heavy, light = result.tenant("heavy"), result.tenant("light")
    assert heavy.requests > 5000 and light.requests > 5000  # both far beyond capacity
    assert light.refused_by.keys() == {"queue_timeout"}
    assert heavy.served / light.served == pytest.approx(3.0, rel=0.15)
    assert (heavy.weight, light.weight) == (3.0, 1.0)
    # Served work is metered to whoever it was for: the two costs split as their service did.
    assert heavy.cost / light.cost == pytest.approx(heavy.served / light.served, rel=0.05)
    assert "TENANT" in render_table(result)


def test_equal_weights_share_equally_whoever_floods() -> None:
    """A tenant sending four times as much gets no more than its equal share."""
    trace = merge(
        poisson(40.0, 200, seed=3, prompt=1000, output=100, tenants={"flood": 1.0}),
        poisson(10.0, 200, seed=4, prompt=1000, output=100, tenants={"modest": 1.0}),
    )
    settings = SimSettings(queue_max_length=1_000_000, queue_max_wait_s=20.0, tick_s=60.0)
    result = simulate([one_replica()], inventory(), trace, settings=settings)
    flood, modest = result.tenant("flood"), result.tenant("modest")
    assert flood.requests > 3 * modest.requests
    assert flood.served / modest.served == pytest.approx(1.0, rel=0.15)
    # Undeclared tenants run as the gateway runs a tenant without a spec.
    assert (flood.priority, flood.weight) == ("interactive", 1.0)


def test_interactive_requests_go_before_a_batch_backlog() -> None:
    trace = merge(
        poisson(1.0, 300, seed=5, prompt=1000, output=100, tenants={"people": 1.0}),
        poisson(30.0, 300, seed=6, prompt=1000, output=100, tenants={"nightly": 1.0}),
    )
    result = simulate(
        [one_replica()],
        inventory(),
        trace,
        settings=SimSettings(queue_max_length=1_000_000, tick_s=60.0),
        tenants=[tenant("nightly", priority="batch", weight=100)],
    )
    people, nightly = result.tenant("people"), result.tenant("nightly")
    assert nightly.priority == "batch" and nightly.refused > 0
    assert people.refused == 0 and people.served == people.requests
    assert people.wait.p99 is not None and nightly.wait.p50 is not None
    # An interactive request waits for a slot to free (at most one request's service), the
    # batch backlog far longer, despite the batch tenant's weight.
    assert people.wait.p99 * 5 < nightly.wait.p50


def test_requests_per_minute_is_exact_over_the_rolling_window() -> None:
    """5 requests a second for 120 s against 60 a minute: seconds 0–11 take 60, the rest of the
    first minute is refused, and seconds 60–71 take 60 more once those buckets left the window."""
    trace = merge(steady("capped", 5, 120), steady("free", 2, 120))
    result = simulate(
        [one_replica(slots=64)],
        inventory(),
        trace,
        settings=SimSettings(tick_s=60.0),
        tenants=[tenant("capped", limits={"requestsPerMinute": 60})],
    )
    capped, free = result.tenant("capped"), result.tenant("free")
    assert capped.requests == 600
    assert (capped.served, capped.refused_by) == (120, {"rpm": 480})
    assert free.served == free.requests == 240 and free.refused == 0
    assert result.model("llama").refused_by == {"rpm": 480}


def test_concurrency_limit_refuses_the_third_at_once() -> None:
    trace = (TraceRequest(0.0, 100, 200, tenant="two") for _ in range(10))
    result = simulate(
        [one_replica(slots=64)],
        inventory(),
        trace,
        settings=SimSettings(tick_s=60.0),
        tenants=[tenant("two", limits={"concurrency": 2})],
    )
    assert (result.tenant("two").served, result.tenant("two").refused_by) == (2, {"concurrency": 8})


def test_a_budget_holds_and_stops_only_its_tenant() -> None:
    budget = 0.5
    trace = merge(
        poisson(2.0, 1800, seed=7, prompt=1000, output=200, tenants={"capped": 1.0}),
        poisson(2.0, 1800, seed=8, prompt=1000, output=200, tenants={"free": 1.0}),
    )
    result = simulate(
        [sim_model(model("llama", replicas={"min": 1, "max": 1}))],
        inventory(),
        trace,
        settings=SimSettings(tick_s=60.0),
        tenants=[tenant("capped", limits={"budget": {"usd": budget, "period": "day"}})],
    )
    capped, free = result.tenant("capped"), result.tenant("free")
    assert capped.refused_by.keys() == {"budget"} and capped.served > 0
    assert capped.cost <= budget
    # Left unspent: less than about one request's reservation, the pricing floor's estimate
    # (1,200 tokens at 20 tokens/s of a $4/h replica: $0.067).
    assert capped.cost > budget - 0.07
    assert free.refused == 0 and free.cost > capped.cost
    # Every request's cost adds up to the busy cost of the replica (the meter splits it all).
    busy = result.model("llama").cost_busy
    assert capped.cost + free.cost == pytest.approx(busy, rel=1e-6)


def test_gateway_overhead_adds_to_every_latency_and_nothing_else() -> None:
    def run(overhead: float) -> Any:
        settings = SimSettings(gateway_overhead_s=overhead, tick_s=60.0)
        trace = poisson(2.0, 120, seed=9, prompt=300, output=30)
        return simulate([one_replica()], inventory(), trace, Objectives(), settings).overall

    without, with_ = run(0.0), run(0.01)
    assert with_.ttft.mean == pytest.approx(without.ttft.mean + 0.01, abs=1e-9)
    assert with_.e2e.mean == pytest.approx(without.e2e.mean + 0.01, abs=1e-9)
    assert with_.itl == without.itl and with_.gpu_hours_busy == without.gpu_hours_busy


def test_the_cli_reads_tenants_from_the_spec_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gpufleet.cli.main import app

    spec = tmp_path / "fleet.yaml"
    spec.write_text(
        f"""apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: llama}}
spec:
  source: file:{CONFIGS / "llama-3-8b.json"}
  engine: vllm
  contextLength: 8192
  resources: {{gpus: 1, gpuTypes: [H100]}}
---
apiVersion: gpufleet.io/v1alpha1
kind: Tenant
metadata: {{name: capped}}
spec:
  limits: {{requestsPerMinute: 60}}
"""
    )
    inv = tmp_path / "inventory.yaml"
    inv.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: t}\nspec:\n"
        "  nodes:\n    - name: n1\n      gpus: [{type: H100, count: 1}]\n"
    )
    trace = tmp_path / "trace.csv"
    write_trace(trace, merge(steady("capped", 5, 120), steady("free", 2, 120)))
    args = ["sim", "-f", str(spec), "-i", str(inv), "--trace", str(trace)]
    result = CliRunner().invoke(app, [*args, "-o", "json"])
    assert result.exit_code == 0, result.output
    tenants = {t["name"]: t for t in json.loads(result.output)["tenants"]}
    assert tenants["capped"]["refused_by"] == {"rpm": 480}
    assert tenants["free"]["served"] == 240
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "capped" in table.output and "rpm 480" in table.output


def test_a_scaler_for_a_model_not_simulated_is_a_clear_error() -> None:
    def factory(spec: Any) -> Any:
        raise AssertionError("not called")

    with pytest.raises(ValueError, match=r"'lama'.*not simulated.*llama"):
        simulate(
            [one_replica()],
            inventory(),
            iter(()),
            settings=SimSettings(scalers={"lama": factory}),
        )


def test_sim_tenant_from_a_spec() -> None:
    t = SimTenant.of(tenant("t", priority="batch", weight=2.5, limits={"concurrency": 3}))
    assert (t.priority, t.weight, t.limits.concurrency) == (1, 2.5, 3)
    assert t.scopes == [("tenant:t", t.limits)]
