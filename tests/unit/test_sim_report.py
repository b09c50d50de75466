"""The simulator's faces: the HTML report, --compare, --search and the progress feed."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpufleet.cli.main import app
from gpufleet.cli.sim import parse_compare
from gpufleet.sim import Objectives, SimResult, SimSettings, poisson, sim_model, simulate
from gpufleet.sim.compare import Variant, attainment, compare_rows, render_comparison
from gpufleet.sim.report import ReportUnavailable, render_report, write_report
from gpufleet.sim.search import for_gpu_type, node_inventory, render_search, search_fleet
from tests.unit.test_sim_core import CONFIGS, inventory, model

PNG = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def small_run(gpus: int = 1, rate: float = 1.0, duration: float = 60.0) -> SimResult:
    """Light requests at a low rate; the generator's default lengths at a high one (load)."""
    sized = sim_model(model("llama", replicas={"min": 1, "max": 4}))
    lengths = {"prompt": 200, "output": 50} if rate < 5 else {}
    trace = poisson(rate, duration, seed=3, **lengths)
    return simulate(
        [sized], inventory("H100", gpus), trace, Objectives(ttft_s=0.5), SimSettings(seed=3)
    )


def write_specs(tmp_path: Path) -> dict[str, Path]:
    models = tmp_path / "models.yaml"
    models.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: small}\nspec:\n"
        f"  source: file:{CONFIGS / 'llama-3-8b.json'}\n  engine: vllm\n  contextLength: 8192\n"
        "  resources: {gpus: 1, gpuTypes: [H100]}\n  replicas: {min: 1, max: 4}\n"
    )
    paths = {"models": models}
    for n in (1, 4):
        path = paths[f"inv{n}"] = tmp_path / f"inv{n}.yaml"
        path.write_text(
            "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: t}\nspec:\n"
            f"  nodes:\n    - name: n1\n      gpus: [{{type: H100, count: {n}}}]\n"
        )
    return paths


def test_the_report_is_one_html_file_with_its_sections_and_png_plots(tmp_path: Path) -> None:
    result = small_run()
    assert result.replicas and result.replicas[0].gpu_type == "H100"
    assert result.to_dict()["replicas"][0]["model"] == "llama"  # additive: a new key only
    out = tmp_path / "report.html"
    write_report(out, [Variant("one", result)])
    text = out.read_text(encoding="utf-8")
    for section in (
        "Summary",
        "Tenants",
        "GPUs in use over time",
        "Replicas over time",
        "GPU-hours by type",
        "Latency percentiles",
    ):
        assert f"<h3>{section}</h3>" in text
    assert "<td>default</td><td>interactive</td>" in text  # the trace names no tenant
    assert "Comparison" not in text and "http" not in text  # self-contained
    images = PNG.findall(text)
    assert len(images) == 4
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)


def test_compare_puts_a_cheaper_fleet_with_worse_attainment_beside_a_dearer_one() -> None:
    one, four = small_run(1, rate=20, duration=90), small_run(4, rate=20, duration=90)
    rows = compare_rows([Variant("one", one), Variant("four", four)])
    assert [r.name for r in rows] == ["one", "four"]
    assert rows[0].gpus == {"H100": 1.0} and rows[1].gpus == {"H100": 4.0}
    assert rows[0].fleet_cost < rows[1].fleet_cost
    assert rows[0].slo["all"] < rows[1].slo["all"]
    table = render_comparison(rows).splitlines()
    assert len(table) == 3 and table[1].startswith("one") and "1×H100" in table[1]
    html = render_report([Variant("one", one), Variant("four", four)])
    assert "<h2>Comparison</h2>" in html and len(PNG.findall(html)) == 1 + 2 * 4


def test_the_cli_compares_variants_on_the_same_trace(tmp_path: Path) -> None:
    p = write_specs(tmp_path)
    args = ["sim", "-f", str(p["models"]), "--trace", "poisson:rate=20,duration=60"]
    args += ["--ttft", "0.5", "--compare", f"one=:{p['inv1']}"]
    args += ["--compare", f"four={p['models']}:{p['inv4']}", "-o", "json"]
    args += ["--report", str(tmp_path / "c.html")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["rows"]] == ["one", "four"]
    # One trace, replayed for each: the same requests arrive at both.
    assert data["rows"][0]["requests"] == data["rows"][1]["requests"] > 600
    assert data["rows"][0]["slo"]["all"] < data["rows"][1]["slo"]["all"]
    assert "<h2>Comparison</h2>" in (tmp_path / "c.html").read_text(encoding="utf-8")


def test_compare_syntax() -> None:
    assert parse_compare("a=m.yaml+n.yaml:inv.yaml") == (
        "a",
        [Path("m.yaml"), Path("n.yaml")],
        Path("inv.yaml"),
    )
    assert parse_compare("b=:inv.yaml") == ("b", [], Path("inv.yaml"))
    assert parse_compare("c=m.yaml:") == ("c", [Path("m.yaml")], None)
    with pytest.raises(ValueError, match="NAME=MODELS"):
        parse_compare("m.yaml:inv.yaml")


def test_search_finds_the_fewest_gpus_of_each_type_and_the_cheapest() -> None:
    """A 70B model in bf16 (~140 GB of weights, TP a power of two) under a light load: it
    fits on 4 H100s (2×80 GB leaves no room for its KV cache), 4 L40S (4×48) and 8 L4
    (8×24), and is refused everywhere with fewer; so 4×L40S ($4.80/h) beats 8×L4 ($5.60/h)
    and 4×H100 ($16/h)."""
    big = model("big", "llama-3-70b.json", resources={}, replicas={"min": 1, "max": 1})
    calls: list[tuple[str, int]] = []

    def run(gpu_type: str, count: int) -> SimResult:
        calls.append((gpu_type, count))
        sized = sim_model(for_gpu_type(big, gpu_type))
        trace = poisson(0.5, 60, seed=1, prompt=200, output=50)
        fleet = node_inventory(gpu_type, count, node_gpus=8)
        return simulate([sized], fleet, trace, Objectives(ttft_s=2.0), SimSettings(seed=1))

    rows = search_fleet(run, ["H100", "L4", "L40S"], target=0.99, max_gpus=8)
    assert [(r.gpu_type, r.gpus) for r in rows] == [("L40S", 4), ("L4", 8), ("H100", 4)]
    assert rows[0].fleet_per_hour == pytest.approx(4.8) and rows[0].attainment >= 0.99
    assert rows[0].tried[0] == (8, 1.0)  # the bound first, then bisection
    assert "cheapest: 4×L40S" in render_search(rows, 0.99)
    first = list(calls)
    calls.clear()
    assert [(r.gpu_type, r.gpus) for r in search_fleet(run, ["H100", "L4", "L40S"], 0.99, 8)] == [
        ("L40S", 4),
        ("L4", 8),
        ("H100", 4),
    ]
    assert calls == first  # deterministic


def test_search_reports_a_type_that_misses_the_target_at_the_bound() -> None:
    big = model("big", "llama-3-70b.json", resources={}, replicas={"min": 1, "max": 1})

    def run(gpu_type: str, count: int) -> SimResult:
        fleet = node_inventory(gpu_type, count)
        trace = poisson(0.5, 30, seed=1, prompt=200, output=50)
        return simulate([sim_model(for_gpu_type(big, gpu_type))], fleet, trace)

    [row] = search_fleet(run, ["L4"], target=0.99, max_gpus=4)
    assert row.gpus is None and row.fleet_per_hour is None and row.tried == [(4, 0.0)]
    assert "no GPU type reaches" in render_search([row], 0.99)


def test_search_counts_a_model_it_cannot_place_as_a_miss_even_without_traffic() -> None:
    """The trace only asks the small model, which is placed first (interactive); the batch
    70B one must still fit, as it would have to in the fleet being bought: 8 L4s serve the
    whole trace yet are a miss, since the 70B needs all 8 of one node."""
    big = model(
        "big",
        "llama-3-70b.json",
        resources={},
        replicas={"min": 1, "max": 1},
        priorityClass="batch",
    )
    small = model("small", resources={}, replicas={"min": 1, "max": 1})

    def run(gpu_type: str, count: int) -> SimResult:
        fleet = node_inventory(gpu_type, count)
        trace = poisson(0.5, 30, seed=1, prompt=200, output=50, models={"small": 1.0})
        sized = [sim_model(for_gpu_type(m, gpu_type)) for m in (big, small)]
        return simulate(sized, fleet, trace)

    [row] = search_fleet(run, ["L4"], target=0.99, max_gpus=16)
    assert (8, 1.0) in row.tried  # the trace served in full...
    assert row.gpus is not None and row.gpus > 8  # ...but 8 was not enough for both
    assert row.result.model("big").unplaced is None


def test_node_inventory_splits_gpus_into_nodes() -> None:
    inv = node_inventory("H100", 19, node_gpus=8)
    assert [n.gpu_count for n in inv.spec.nodes] == [8, 8, 3]


def test_without_matplotlib_the_report_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = small_run(duration=20)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(ReportUnavailable, match=r"pip install 'gpufleet\[sim\]'"):
        render_report([Variant("one", result)])
    p = write_specs(tmp_path)
    args = ["sim", "-f", str(p["models"]), "-i", str(p["inv1"]), "--trace"]
    args += ["poisson:rate=1,duration=10", "--report", str(tmp_path / "r.html")]
    cli = CliRunner().invoke(app, args)
    assert cli.exit_code == 1
    assert "gpufleet[sim]" in cli.output and not (tmp_path / "r.html").exists()


def test_the_progress_feed_sees_virtual_time_advance() -> None:
    seen: list[float] = []
    sized = sim_model(model("llama"))
    trace = poisson(1.0, 120, seed=2, prompt=100, output=20)
    settings = SimSettings(tick_s=10.0, progress=seen.append)
    result = simulate([sized], inventory(), trace, settings=settings)
    assert seen == sorted(seen) and len(seen) >= 11 and seen[-1] <= result.duration_s
    assert attainment(result) == 1.0
