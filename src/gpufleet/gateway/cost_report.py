"""The cost report as the admin API serves it (``GET /admin/v1/report``) and the CLI prints it.

The arithmetic is ``policies.costs`` (pure); here the store's spans and ledger totals for the
window are read and the answer put into JSON. Figures are USD, rounded to the micro-dollar.
Per-token-priced deployments (``engine: external``) are counted beside the GPU-priced ones: a
model line says how it is priced (``priced``: ``per_token`` or ``replica_time``; a per-token one
has no placed cost nor GPU-hours), every line and the fleet what per-token prices cost
(``per_token_cost``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Collection, Iterable
from typing import Any

from gpufleet.policies.costs import By, CostLine, CostReport, cost_report, inventory_gpus
from gpufleet.policies.pricing import Pricing
from gpufleet.spec import Inventory, ModelSpec
from gpufleet.store import Store

__all__ = ["build_report", "per_token_models", "report_view"]

#: Where the fleet's inventory comes from (None: not known here, e.g. a gateway on Kubernetes).
InventorySource = Callable[[], Inventory | None]


async def build_report(
    store: Store,
    by: By,
    since: dt.datetime,
    until: dt.datetime,
    inventory: Inventory | None,
    per_token: Collection[str] = (),
) -> CostReport:
    """The report over [since, until); ``per_token``: the models priced per token
    (``per_token_models``)."""
    spans = await asyncio.to_thread(store.spans_between, since, until)
    usage = await asyncio.to_thread(store.usage_totals, since, until)
    return cost_report(
        spans,
        usage,
        since=since.timestamp(),
        until=until.timestamp(),
        by=by,
        inventory_gpus=inventory_gpus(inventory),
        per_token=per_token,
    )


def per_token_models(models: Iterable[tuple[str, ModelSpec]]) -> frozenset[str]:
    """The names of the models, of (name, spec) pairs, that are priced per token."""
    return frozenset(name for name, spec in models if Pricing.per_token_prices(spec) is not None)


def _usd(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _line(by: By, line: CostLine) -> dict[str, Any]:
    view: dict[str, Any] = {by: line.name}
    if by == "model":
        view["priced"] = "per_token" if line.per_token else "replica_time"
    if line.placed_cost is not None:
        view["placed_cost"] = _usd(line.placed_cost)
        view["gpu_hours_placed"] = round(line.gpu_hours_placed or 0.0, 6)
    view.update(
        busy_cost=_usd(line.busy_cost),
        idle_cost=_usd(line.idle_cost),
        total_cost=_usd(line.total_cost),
        requests=line.requests,
        successful=line.successful,
        prompt_tokens=line.prompt_tokens,
        completion_tokens=line.completion_tokens,
        gpu_seconds=round(line.gpu_seconds, 6),
        cost_per_successful_request=_usd(line.cost_per_successful_request),
        cost_per_million_tokens=_usd(line.cost_per_million_tokens),
        per_token_cost=_usd(line.per_token_cost),
    )
    return view


def report_view(report: CostReport, *, inventory_known: bool) -> dict[str, Any]:
    successful = sum(line.successful for line in report.lines)
    tokens = sum(line.tokens for line in report.lines)
    notes = []
    if not inventory_known:
        notes.append("the fleet's inventory is not known here: fleet idle is not counted")
    elif not report.fleet_gpus:
        notes.append(
            "this fleet has no GPUs: CPU replicas are priced by spec.pricing.perReplicaHour "
            "(zero unless set)"
        )
    if report.per_token_cost or any(line.per_token for line in report.lines):
        notes.append(
            "per-token-priced deployments (engine external) cost what their requests cost: "
            "no placed cost, GPU-hours or idle time"
        )
    total = report.total_cost
    return {
        "by": report.by,
        "since": dt.datetime.fromtimestamp(report.since, dt.UTC).isoformat(),
        "until": dt.datetime.fromtimestamp(report.until, dt.UTC).isoformat(),
        "currency": "USD",
        "fleet": {
            "gpus": report.fleet_gpus,
            "gpu_cost": _usd(report.fleet_gpu_cost),
            "placed_cost": _usd(report.placed_cost),
            "placed_gpu_hours": round(report.placed_gpu_hours, 6),
            "idle_cost": _usd(report.fleet_idle_cost),
            "attributed_cost": _usd(report.attributed_cost),
            "per_token_cost": _usd(report.per_token_cost),
            "total_cost": _usd(total),
            "successful": successful,
            "tokens": tokens,
            "cost_per_successful_request": _usd(total / successful if successful else None),
            "cost_per_million_tokens": _usd(total / tokens * 1e6 if tokens else None),
        },
        "lines": [_line(report.by, line) for line in report.lines],
        "unattributed": [
            {"model": model, "idle_cost": _usd(cost)}
            for model, cost in sorted(report.unattributed.items())
        ],
        "notes": notes,
    }
