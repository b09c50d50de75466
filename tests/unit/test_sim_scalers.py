"""A plugged scaler drives the simulator, and the benchmark's baselines give hand-computed answers.

The baselines (KubeAI's autoscaler, the Kubernetes HPA as KEDA drives it) live in bench/ — they
are a benchmark's yardsticks, not the product — so they are loaded from the file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from gpufleet.autoscale import Sample
from gpufleet.sim import Objectives, SimSettings, poisson, sim_model, simulate
from gpufleet.sim.scaler import Scaler
from gpufleet.spec import Inventory, Model, ModelSpec, load_inventory_text

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "data" / "configs" / "llama-3-8b.json"


def _bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scalers = _bench("scalers")


def model() -> Model:
    spec = {
        "source": f"file:{CONFIG}",
        "engine": "vllm",
        "contextLength": 8192,
        "resources": {"gpus": 1, "gpuTypes": ["H100"]},
        "replicas": {"min": 1, "max": 4},
    }
    return Model.model_validate(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Model", "metadata": {"name": "llama"}}
        | {"spec": spec}
    )


def inventory() -> Inventory:
    return load_inventory_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: t}\nspec:\n"
        "  nodes:\n    - name: n1\n      gpus: [{type: H100, count: 8}]\n"
    )


class Scripted:
    """Asks for 3 replicas from t = 30 s and 2 from t = 90 s; records what it was shown."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []

    def decide(self, sample: Sample, ready: int, current: int, now: float) -> int:
        self.calls.append((now, current))
        assert sample.t == now
        return 3 if 30 <= now < 90 else 2 if now >= 90 else 1


def test_the_simulator_runs_a_plugged_scaler() -> None:
    made: list[Scripted] = []

    def factory(spec: ModelSpec) -> Scaler:
        assert spec.replicas.max == 4
        made.append(Scripted())
        return made[-1]

    trace = poisson(1.0, 150.0, seed=3, prompt=100, output=20)
    settings = SimSettings(tick_s=1.0, scalers={"llama": factory})
    result = simulate([sim_model(model())], inventory(), trace, Objectives(ttft_s=5.0), settings)
    moves = [(e.t, e.before, e.after, e.reason) for e in result.events if e.t > 0]
    assert moves == [(30.0, 1, 3, "scripted"), (90.0, 3, 2, "scripted")]
    (scaler,) = made
    assert scaler.calls[0] == (1.0, 1) and (31.0, 3) in scaler.calls and (91.0, 2) in scaler.calls
    assert result.overall.replicas_max == 3 and result.overall.served > 100


def test_without_a_plugged_scaler_the_production_one_runs() -> None:
    trace = poisson(1.0, 60.0, seed=3, prompt=100, output=20)
    result = simulate([sim_model(model())], inventory(), trace, Objectives(ttft_s=5.0))
    assert all(e.reason != "scripted" for e in result.events)


def test_kubeai_formula_window_and_consecutive_scale_downs() -> None:
    assert scalers.kubeai_desired([10.0, 20.0, 30.0, 0.0], 10.0) == 2  # ceil(15 / 10)
    # A 30 s window at a 10 s interval: three values; a 30 s delay: three consecutive downs.
    k = scalers.KubeAIScaler(10.0, 1, 100, interval_s=10.0, time_window_s=30.0)
    current, seen = 1, []
    for t in range(1, 81):
        demand = 60.0 if t <= 35 else 0.0
        current = k.decide(Sample(float(t), demand), current, current, float(t))
        if t % 10 == 0:
            seen.append(current)
    # t=10: mean(60,0,0)=20 → 2; 20: 40 → 4; 30: 60 → 6; then 4, 2, 0→1 are held three times.
    assert seen == [2, 4, 6, 6, 6, 6, 1, 1]
    assert k.decide(Sample(85.0, 500.0), 1, 1, 85.0) == 1  # not a sync instant


def test_kubeai_defaults_are_its_sources() -> None:
    k = scalers.KubeAIScaler()
    assert (k.target_requests, k.interval_s, k.time_window_s, k.scale_down_delay_s) == (
        100,
        10.0,
        600.0,
        30.0,
    )
    assert len(k.history) == 60


def test_hpa_formulas() -> None:
    # GetExternalPerPodMetricReplicas: 100 / (10 × 9) = 1.11 is out of tolerance; 95 / 90 is in.
    assert scalers.hpa_external_per_pod(100.0, 10.0, 9) == 10
    assert scalers.hpa_external_per_pod(95.0, 10.0, 9) == 9
    assert scalers.hpa_external_per_pod(0.0, 10.0, 3) == 0
    # convertDesiredReplicasWithRules: at most max(2 × current, 4); stabilization: the highest.
    assert scalers.hpa_normalize(2, 20, [], 1, 100) == 4
    assert scalers.hpa_normalize(5, 20, [], 1, 100) == 10
    assert scalers.hpa_normalize(5, 20, [], 1, 7) == 7
    assert scalers.hpa_normalize(6, 2, [5, 3], 1, 100) == 5
    assert scalers.hpa_normalize(6, 0, [], 1, 100) == 1


def test_hpa_syncs_every_15_s_and_waits_out_its_stabilization_window() -> None:
    h = scalers.HpaScaler(10.0, 1, 100)
    current, at = 1, {}
    for t in range(1, 400):
        demand = 100.0 if t <= 50 else 0.0
        current = h.decide(Sample(float(t), demand), current, current, float(t))
        at[t] = current
    assert (at[14], at[15], at[30], at[45]) == (1, 4, 8, 10)  # ×2 or +4 a sync, then the need
    assert at[345] == 10  # the recommendation of 10 at t = 45 is within 300 s
    assert at[360] == 1


def test_keda_activates_from_zero_and_cools_down_to_zero() -> None:
    h = scalers.HpaScaler(10.0, 0, 100)
    current, at = 0, {}
    for t in range(1, 700):
        demand = 5.0 if 20 <= t <= 100 else 0.0
        current = h.decide(Sample(float(t), demand), current, current, float(t))
        at[t] = current
    assert at[29] == 0 and at[30] == 1  # the first poll that sees activity (every 30 s)
    # Last active poll at t = 90; inactive polls after it; zero once 300 s have passed (t=390).
    assert at[389] == 1 and at[390] == 0
