"""`gpufleet plan` on the shipped examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def gpufleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpufleet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


def test_plan_examples_as_json() -> None:
    result = gpufleet(
        "plan", "-f", "examples/models.yaml", "--inventory", "examples/inventory.yaml", "-o", "json"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    placed = {
        f"{p['replica']['deployment']}#{p['replica']['index']}": p for p in data["placements"]
    }
    assert len(placed) == 8 and not data["unplaced"]
    assert len(placed["llama-3-70b#0"]["gpus"]) >= 2  # 70B in bf16 needs tensor parallelism
    assert placed["llama-3-70b#0"]["gpu_type"] == "H100"
    assert {placed[f"mistral-7b-batch#{i}"]["mig_profile"] for i in (0, 1)} == {"3g.40gb"}
    assert data["gpus_used"] < 8  # eight replicas, fewer GPUs


def test_plan_table_and_errors(tmp_path: Path) -> None:
    table = gpufleet("plan", "-f", "examples/models.yaml", "--inventory", "examples/inventory.yaml")
    assert (
        table.returncode == 0 and "GPUs used:" in table.stdout and "llama-3-70b#0" in table.stdout
    )
    bad = tmp_path / "inv.yaml"
    bad.write_text(
        (ROOT / "examples" / "inventory.yaml").read_text().replace("type: H100", "type: H1000")
    )
    result = gpufleet("plan", "-f", "examples/models.yaml", "--inventory", str(bad))
    assert result.returncode == 1
    assert "spec.nodes[0].gpus[0].type: unknown GPU type 'H1000'" in result.stderr
    assert "Traceback" not in result.stderr


def test_plan_shows_a_replica_across_nodes(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: huge}\nspec:\n"
        f"  source: file:{ROOT}/tests/data/configs/llama-3-70b.json\n  engine: vllm\n"
        "  resources: {gpus: 16, memory: 640Gi}\n"
    )
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: two}\nspec:\n"
        "  nodes:\n"
        "    - {name: gpu-a, gpus: [{type: H100, count: 8}]}\n"
        "    - {name: gpu-b, gpus: [{type: H100, count: 8}]}\n"
    )
    result = gpufleet("plan", "-f", str(models), "--inventory", str(inventory), "-o", "json")
    assert result.returncode == 0, result.stderr
    (placement,) = json.loads(result.stdout)["placements"]
    assert placement["node"] == "gpu-a" and placement["gpus"] == list(range(8))
    assert placement["workers"] == [["gpu-b", list(range(8))]]
    table = gpufleet("plan", "-f", str(models), "--inventory", str(inventory))
    assert table.returncode == 0, table.stderr
    assert "gpu-a/gpu-0,1,2,3,4,5,6,7" in table.stdout
    assert "gpu-b/gpu-0,1,2,3,4,5,6,7" in table.stdout
    assert "unplaced" not in table.stdout


def test_plan_places_a_disaggregated_models_pools_on_the_types_that_suit_them(
    tmp_path: Path,
) -> None:
    """Both pools accept H100 and L40S: prefill goes where bf16 FLOP/s per dollar is highest
    (L40S: 302 TFLOP/s per $/h against 247), decode where bandwidth per dollar is (H100: 838 GB/s
    per $/h against 720); with one GPU of each, a second prefill replica is unplaced with the
    planner's reason."""
    models = tmp_path / "models.yaml"
    models.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: pd}\nspec:\n"
        f"  source: file:{ROOT / 'tests/data/configs/llama-3-8b.json'}\n  engine: vllm\n"
        "  contextLength: 8192\n  resources: {gpus: 1, gpuTypes: [L40S, H100], memory: 40Gi}\n"
        "  disaggregation: {prefill: {replicas: 2}}\n"
    )
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: t}\nspec:\n"
        "  nodes:\n    - {name: a, gpus: [{type: H100, count: 1}]}\n"
        "    - {name: b, gpus: [{type: L40S, count: 1}]}\n"
    )
    result = gpufleet("plan", "-f", str(models), "--inventory", str(inventory), "-o", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    placed = {
        f"{p['replica']['deployment']}#{p['replica']['index']}": p["gpu_type"]
        for p in data["placements"]
    }
    assert placed == {"pd#0": "H100", "pd:prefill#0": "L40S"}
    (unplaced,) = data["unplaced"]
    assert unplaced["replica"] == {"deployment": "pd:prefill", "index": 1}
    assert unplaced["reason"]
    table = gpufleet("plan", "-f", str(models), "--inventory", str(inventory))
    assert "pd:prefill#0" in table.stdout and "unplaced pd:prefill#1" in table.stdout


def test_an_external_model_is_not_placed_and_said_so(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(
        (ROOT / "examples" / "models.yaml")
        .read_text()
        .split("---")[0]
        .replace("file:../", f"file:{ROOT}/")
        + "---\napiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: hosted}\n"
        "spec: {engine: external, endpoints: [{url: 'https://api.example.com/v1'}],"
        " pricing: {perMillionInputTokens: 3, perMillionOutputTokens: 15}}\n"
    )
    inventory = str(ROOT / "examples" / "inventory.yaml")
    data = json.loads(
        gpufleet("plan", "-f", str(models), "--inventory", inventory, "-o", "json").stdout
    )
    assert data["external"] == ["hosted"]
    assert {p["replica"]["deployment"] for p in data["placements"]} == {"llama-3-8b"}
    table = gpufleet("plan", "-f", str(models), "--inventory", inventory)
    assert table.returncode == 0, table.stderr
    assert "not placed: hosted (engine external: served by its endpoints)" in table.stdout
    sim = gpufleet("sim", "-f", str(models), "--inventory", inventory, "--trace",
                   "poisson:rate=1,duration=5", "--ttft", "1", "-o", "json")  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    assert "note: hosted: engine external is simulated as a hosted API" in sim.stderr
    simulated = {m["name"]: m for m in json.loads(sim.stdout)["models"]}
    assert simulated["hosted"]["gpu_hours_placed"] == 0 and simulated["hosted"]["requests"] == 0
    assert simulated["llama-3-8b"]["served"] > 0  # the trace names no model: the first one
