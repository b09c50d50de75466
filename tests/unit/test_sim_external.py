"""External endpoints in the simulator: a hosted API's latency and price, the burst to it by the
gateway's cost ranking, and tenants that have not opted in kept away from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gpufleet.policies.pricing import FLOOR_TOKENS_PER_S, Pricing
from gpufleet.sim import (
    GATEWAY_OVERHEAD_S,
    HostedLatency,
    Objectives,
    SimResult,
    SimSettings,
    SimTenant,
    TraceRequest,
    render_table,
    sim_model,
    simulate,
)
from gpufleet.sim.external import NOT_ALLOWED, RecentTtfts, only_external
from gpufleet.sim.fleet import unsimulated
from gpufleet.spec import Model, Tenant, load_inventory_text

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"
INVENTORY = load_inventory_text(
    "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: t}\nspec:\n"
    "  nodes:\n    - {name: n1, gpus: [{type: H100, count: 2}]}\n"
)
#: Instant warm replicas: what is measured here is routing, not start-up.
SETTINGS = SimSettings(seed=1)


def _model(name: str, spec: dict[str, Any]) -> Model:
    return Model.model_validate(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Model", "metadata": {"name": name}}
        | {"spec": spec}
    )


def own(slots: int = 2, cost: bool = True, objective: float = 1.0) -> Model:
    """One H100 replica (min = max = 1) taking ``slots`` requests at once, bursting to
    ``hosted`` with ``cost``."""
    spec: dict[str, Any] = {
        "source": f"file:{CONFIGS / 'llama-3-8b.json'}",
        "engine": "vllm",
        "contextLength": 8192,
        "resources": {"gpus": 1, "gpuTypes": ["H100"]},
        "replicas": {"min": 1, "max": 1},
        "routing": {"maxInFlightPerReplica": slots},
    }
    if cost:
        spec["routing"]["cost"] = {"alternatives": ["hosted"], "ttftObjective": objective}
    return _model("own", spec)


def hosted(
    per_million: tuple[float, float] = (1000.0, 3000.0),
    location: str = "external",
    endpoints: int = 1,
    slots: int | None = None,
) -> Model:
    spec: dict[str, Any] = {
        "engine": "external",
        "endpoints": [
            {"url": f"https://api-{i}.example.com/v1", "location": location}
            for i in range(endpoints)
        ],
        "pricing": {
            "perMillionInputTokens": per_million[0],
            "perMillionOutputTokens": per_million[1],
        },
    }
    if slots is not None:
        spec["routing"] = {"maxInFlightPerReplica": slots}
    return _model("hosted", spec)


def tenant(name: str, allow: bool) -> Tenant:
    return Tenant.model_validate(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name}}
        | {"spec": {"allowExternalEndpoints": allow}}
    )


def at_once(n: int, t: float = 0.0, **fields: Any) -> list[TraceRequest]:
    return [TraceRequest(t, 200, 40, **fields) for _ in range(n)]


def spaced(n: int, start: float, gap: float, **fields: Any) -> list[TraceRequest]:
    return [TraceRequest(start + i * gap, 200, 40, **fields) for i in range(n)]


def run(
    models: list[Model],
    trace: list[TraceRequest],
    tenants: list[Tenant | SimTenant] | None = None,
    latency: HostedLatency | None = None,
) -> SimResult:
    sized = [sim_model(m, hosted=latency) for m in models]
    everyone: list[Tenant | SimTenant] = [tenant("default", True)] if tenants is None else tenants
    return simulate(sized, INVENTORY, iter(trace), Objectives(ttft_s=1.0), SETTINGS, everyone)


def test_a_hosted_api_answers_at_its_latency_and_is_charged_per_token() -> None:
    latency = HostedLatency(ttft_s=0.3, tpot_s=0.02)
    model = hosted(per_million=(2.0, 8.0))
    trace = [TraceRequest(float(i), 100 + i, 11, model="hosted") for i in range(20)]
    result = run([model], trace, latency=latency)
    m = result.model("hosted")
    assert m.requests == m.served == 20 and m.refused == 0
    # Whatever its load, the first token after ttft_s and each further one tpot_s later.
    assert m.ttft.p50 == m.ttft.p99 == pytest.approx(0.3 + GATEWAY_OVERHEAD_S)
    assert m.e2e.p99 == pytest.approx(0.3 + 10 * 0.02 + GATEWAY_OVERHEAD_S)
    assert m.itl.p50 == pytest.approx(0.02)
    # Charged per token at its prices (the ledger's ``Pricing.charge``), no GPU in sight.
    charged = sum(
        Pricing().charge(model.spec, r.prompt_tokens, r.output_tokens) or 0.0 for r in trace
    )
    assert charged == pytest.approx(sum((100 + i) * 2e-6 + 11 * 8e-6 for i in range(20)))
    assert m.cost_per_token == pytest.approx(charged) and m.cost == pytest.approx(charged)
    assert m.cost_placed == 0 and m.gpu_hours_placed == 0 and m.replicas_max == 0
    assert m.cost_per_request == pytest.approx(charged / 20)
    tokens = m.prompt_tokens + m.completion_tokens
    assert m.cost_per_million_tokens == pytest.approx(charged / tokens * 1e6)
    assert result.per_token_cost == pytest.approx(charged)
    # The idle inventory is still the fleet's cost; the tokens come on top of it.
    assert result.fleet_cost == pytest.approx(result.fleet_idle_cost + charged)
    assert result.events == [] and result.replicas == []  # never placed, never scaled
    assert result.tenant("default").cost == pytest.approx(charged)
    table = render_table(result)
    assert (
        "PER-TOKEN" in table and f"tokens charged by external endpoints: ${charged:,.2f}" in table
    )


def test_its_concurrency_is_the_gateways_slots_per_endpoint() -> None:
    """Two endpoints × 3 slots: six answers at once, the seventh waits in the fair queue."""
    latency = HostedLatency(ttft_s=1.0, tpot_s=0.0)
    result = run([hosted(endpoints=2, slots=3)], at_once(7, model="hosted"), latency=latency)
    assert result.model("hosted").served == 7
    wait = result.tenant("default").wait
    assert wait.p50 == 0 and wait.p99 == pytest.approx(1.0)  # the seventh's: one answer long


def test_the_own_model_bursts_when_full_and_comes_home_when_not() -> None:
    """The hosted API is the dearer one: requests stay home while the own replica has room,
    the ones past its two slots go to the hosted API, and once the burst is over, home."""
    trace = at_once(10) + spaced(10, start=120.0, gap=5.0)
    result = run([own(slots=2), hosted(per_million=(1000.0, 3000.0))], trace)
    home, away = result.model("own"), result.model("hosted")
    assert home.requests + away.requests == 20 and result.overall.refused == 0
    assert away.served == 8  # at t=0 the own replica's two slots, then no room: hosted
    assert home.served == 2 + 10  # every spaced request found room at home
    assert away.cost_per_token > 0 and home.cost_per_token == 0


def test_without_routing_cost_the_own_model_queues_instead() -> None:
    result = run([own(slots=2, cost=False), hosted()], at_once(10))
    assert result.model("hosted").requests == 0
    assert result.model("own").served == 10
    assert result.tenant("default").wait.p99 is not None and result.tenant("default").wait.p99 > 0


def test_the_fleets_own_deployment_serves_while_it_has_room_whatever_the_list_price() -> None:
    """A hosted API priced far below what an unmeasured own deployment is taken to cost (a
    single stream's pace at its GPU's price) still waits while home has room and meets the
    objective: the GPU is paid for whether it serves or idles (``rank_by_cost``)."""
    own_per_token = 4.0 / 3600 / FLOOR_TOKENS_PER_S  # an H100 at the catalog's $4/h
    cheap = own_per_token * 1e6 / 10
    result = run([own(slots=2), hosted(per_million=(cheap, cheap))], spaced(5, 0.0, 5.0))
    assert result.model("own").served == 5 and result.model("hosted").requests == 0


def test_a_slow_hosted_api_is_passed_over_while_its_ttft_is_known() -> None:
    """Home misses a tight objective (5 ms) once measured: the unmeasured hosted API is tried;
    at 2 s it misses too, and both missing, the faster — home — serves for the 30 s the hosted
    TTFT is remembered; then the hosted API is tried, and measured, again."""
    result = run(
        [own(slots=4, objective=0.005), hosted(per_million=(0.01, 0.01))],
        [
            *spaced(1, 0.0, 1.0),
            *spaced(11, 5.0, 2.5),
            *spaced(1, 40.0, 1.0),
        ],  # 2.5 s: past a first token
        latency=HostedLatency(ttft_s=2.0, tpot_s=0.01),
    )
    assert result.model("hosted").requests == 2  # at 5 s (unmeasured) and 40 s (forgotten)
    assert result.model("own").served == 11


def test_a_tenant_not_opted_in_never_reaches_it() -> None:
    trace = at_once(10, tenant="inside") + at_once(10, t=0.001, tenant="research")
    tenants: list[Tenant | SimTenant] = [tenant("inside", False), tenant("research", True)]
    result = run([own(slots=2), hosted()], trace, tenants)
    inside, research = result.tenant("inside"), result.tenant("research")
    # inside's ten were all served at home (two at once, the rest queued there); research's
    # found the own replica full and went to the hosted API.
    assert inside.served == 10 and inside.cost < research.cost
    assert result.model("own").served == 10 and result.model("hosted").served == 10
    assert inside.wait.p99 is not None and inside.wait.p99 > 0
    assert research.wait.p99 == 0


def test_a_tenant_not_opted_in_naming_the_hosted_model_is_refused() -> None:
    result = run(
        [hosted()],
        at_once(3, model="hosted", tenant="inside") + at_once(2, t=1.0, model="hosted"),
        [tenant("inside", False)],  # "default" is undeclared: not opted in either
    )
    m = result.model("hosted")
    assert m.served == 0 and m.refused == 5 and m.refused_by == {NOT_ALLOWED: 5}
    assert result.tenant("inside").refused_by == {NOT_ALLOWED: 3}
    assert m.cost_per_token == 0


def test_an_internal_endpoint_needs_no_opt_in() -> None:
    model = hosted(location="internal")
    assert not only_external(model.spec) and only_external(hosted().spec)
    result = run([model], at_once(3, model="hosted"), [tenant("default", False)])
    assert result.model("hosted").served == 3


def test_recent_ttfts_are_the_gateways_p90_over_30_seconds() -> None:
    recent = RecentTtfts()
    assert recent.p90(0.0) is None
    for i in range(10):
        recent.add(float(i), float(i))
    assert recent.p90(9.0) == 9.0  # nearest rank int(0.9 × 10) = the 10th
    assert recent.p90(35.0) == 9.0  # those at 5 s and after are within 30 s of 35 s
    assert recent.p90(40.0) is None


def test_the_latency_is_not_negative() -> None:
    with pytest.raises(ValueError, match="not negative"):
        HostedLatency(ttft_s=-1.0)


def test_sizing_an_external_model_needs_no_architecture() -> None:
    sized = sim_model(hosted(slots=7), hosted=HostedLatency(0.2, 0.005))
    assert sized.arch is None and sized.deployment is None
    assert sized.hosted == HostedLatency(0.2, 0.005) and sized.slots_per_replica == 7
    assert sim_model(hosted()).hosted == HostedLatency()
    with pytest.raises(ValueError, match="runs no engine"):
        sized.engine(None)
    assert any("hosted API of fixed latency" in note for note in unsimulated(hosted()))


def test_the_cli_defaults_are_the_libraries() -> None:
    import inspect

    from gpufleet.cli.sim import sim_command

    options = inspect.signature(sim_command).parameters
    default = HostedLatency()
    assert options["external_ttft"].default == default.ttft_s
    assert options["external_tpot"].default == default.tpot_s


def test_the_cli_simulates_an_external_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gpufleet.cli.main import app

    models = tmp_path / "models.yaml"
    models.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: hosted}\n"
        "spec: {engine: external, endpoints: [{url: 'https://api.example.com/v1'}],"
        " pricing: {perMillionInputTokens: 3, perMillionOutputTokens: 15}}\n---\n"
        "apiVersion: gpufleet.io/v1alpha1\nkind: Tenant\nmetadata: {name: default}\n"
        "spec: {allowExternalEndpoints: true}\n"
    )
    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"at": i * 0.5, "prompt_tokens": 50, "output_tokens": 21}) + "\n"
            for i in range(8)
        )
    )
    args = ["sim", "-f", str(models), "--inventory", str(CONFIGS.parents[2] / "examples" /
            "inventory.yaml"), "--trace", str(trace), "--ttft", "1"]  # fmt: skip
    result = CliRunner().invoke(
        app, [*args, "--external-ttft", "0.25", "--external-tpot", "0.05", "-o", "json"]
    )
    assert result.exit_code == 0, result.output
    assert "note: hosted: engine external is simulated as a hosted API" in result.stderr
    (m,) = json.loads(result.stdout)["models"]
    assert m["served"] == 8
    assert m["ttft"]["p50"] == pytest.approx(0.25 + GATEWAY_OVERHEAD_S)
    assert m["e2e"]["p50"] == pytest.approx(0.25 + 20 * 0.05 + GATEWAY_OVERHEAD_S)
    assert m["cost_per_token"] == pytest.approx(8 * (50 * 3 + 21 * 15) / 1e6)
    bad = CliRunner().invoke(app, [*args, "--external-tpot", "-1"])
    assert bad.exit_code != 0 and "not negative" in bad.output
