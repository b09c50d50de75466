"""The Grafana dashboard of the Helm chart: a ConfigMap that Grafana's sidecar loads (on by
default, off by a value), and every metric its queries name is one gpufleet serves — the names
are collected from the expositions the code itself generates (the assembled gateway's registry,
the GPU collector with a reading), so renaming a metric in the code fails here instead of
leaving a panel empty."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.controller import Controller
from gpufleet.gateway import assemble
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.store import Store, sqlite_url
from gpufleet.telemetry import GpuCollector
from gpufleet.telemetry.gpus import GpuReading
from tests.unit.test_helm_chart import CHART, STORE, render, validate_all

DASHBOARD = CHART / "dashboards" / "gpufleet.json"

#: PromQL's words that are not metric names (functions are told apart by their parenthesis).
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, label matchers,
    ranges, grouping clauses, Grafana's variables, numbers, keywords and function names are
    taken out."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w$.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = m.group(0)
        if word.lower() in _KEYWORDS or re.match(r"\s*\(", expr[m.end() :]):
            continue
        names.add(word)
    return names


def test_the_scanner_finds_metric_names_and_only_them() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$model", '
        'x="by(b)"}[$__rate_interval]))) / on (model) group_left max(b) * 1e6 > bool 2'
    )
    assert promql_metrics(expr) == {"a_bucket", "b"}
    assert promql_metrics("sum(rate(c_total[5m] offset 1h)) unless d") == {"c_total", "d"}


def dashboard_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard: its panels' (and rows' panels') targets, and
    the metric of each ``label_values`` variable."""
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(board["panels"])
    for var in board["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var["type"] == "query":
            (metric,) = re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)", query)
            exprs.append(metric)
    return exprs


def exposition_names(text: str) -> set[str]:
    """Every series name an exposition can hold: a histogram's _bucket/_sum/_count, a counter's
    _total (and _created), whether or not a series of it has been written yet."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        if family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
    return names


async def served_metric_names(tmp_path: Path) -> set[str]:
    """What gpufleet serves: an assembled gateway's /metrics registry (its own metrics, the
    supervisors', the controller's start-up histogram, the loop watch, the ledger's), and the
    GPU collector with one reading."""
    store = Store.open(sqlite_url(tmp_path))
    stack = assemble(Controller(store, FakeRuntime()))
    try:
        names = exposition_names(generate_latest(stack.gateway.metrics.registry).decode())
    finally:
        await stack.close()
        store.close()
    gpu = GpuReading(
        node="node-1",
        device="GPU-0",
        index="0",
        name="NVIDIA H100 80GB HBM3",
        parent=None,
        memory_used=40 << 30,
        memory_total=80 << 30,
        util=0.5,
        sm_active=0.4,
        power_w=300.0,
        temp_c=60.0,
        replica="m-g1-abc",
        model="m",
        at=0.0,
    )
    registry = CollectorRegistry()
    registry.register(GpuCollector(lambda: [gpu]))
    return names | exposition_names(generate_latest(registry).decode())


async def test_every_metric_the_dashboard_queries_is_one_gpufleet_serves(tmp_path: Path) -> None:
    served = await served_metric_names(tmp_path)
    board = json.loads(DASHBOARD.read_text())
    used: dict[str, set[str]] = {}
    for expr in dashboard_queries(board):
        for name in promql_metrics(expr):
            used.setdefault(name, set()).add(expr)
    missing = {name: sorted(exprs) for name, exprs in used.items() if name not in served}
    assert missing == {}
    # The sections the issue asks for, on the names they rest on.
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Fleet", "Models", "Tenants", "Cost"]
    for name in (
        "gpufleet_gpus_idle",
        "gpufleet_gpu_memory_used_bytes",
        "gpufleet_gpu_memory_total_bytes",
        "gpufleet_gpu_utilization_ratio",
        "gpufleet_gpu_power_watts",
        "gpufleet_requests_total",
        "gpufleet_time_to_first_token_seconds_bucket",
        "gpufleet_request_duration_seconds_bucket",
        "gpufleet_tokens_total",
        "gpufleet_replicas",
        "gpufleet_replica_startup_seconds_bucket",
        "gpufleet_rejections_total",
        "gpufleet_cost_usd_total",
        "gpufleet_gpu_seconds_total",
    ):
        assert name in used, name
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"


def dashboards(values: dict[str, Any]) -> list[dict[str, Any]]:
    docs = render({**STORE, **values})
    validate_all(docs)
    return [d for d in docs if d["kind"] == "ConfigMap" and "gpufleet.json" in d["data"]]


def test_the_dashboard_is_a_configmap_grafanas_sidecar_loads_unless_turned_off() -> None:
    (cm,) = dashboards({})
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "gpufleet"
    assert "annotations" not in cm["metadata"]
    assert json.loads(cm["data"]["gpufleet.json"]) == json.loads(DASHBOARD.read_text())
    (elsewhere,) = dashboards(
        {"grafana": {"dashboard": {"namespace": "monitoring", "folder": "LLM serving"}}}
    )
    assert elsewhere["metadata"]["namespace"] == "monitoring"
    assert elsewhere["metadata"]["annotations"] == {"grafana_folder": "LLM serving"}
    assert dashboards({"grafana": {"dashboard": {"enabled": False}}}) == []
