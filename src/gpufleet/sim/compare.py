"""Fleets side by side: one row per variant, each simulated on the same trace.

A comparison is only fair when every variant sees the same requests, so the caller replays
one trace per variant (a file re-read, or a synthetic trace regenerated from the same seed).
A row puts what a fleet is (GPUs by type) next to what it achieved (SLO attainment of each
objective, refusals) and what it cost (per successful request, per 1M tokens, GPU-hours busy,
idle and free), so a cheaper fleet that misses more requests shows as exactly that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gpufleet.sim.result import SimResult

__all__ = [
    "ComparisonRow",
    "Variant",
    "attainment",
    "compare_rows",
    "comparison_table",
    "comparison_to_dict",
    "render_comparison",
]

#: The objectives in the order the rows show them ("all": within every one given).
SLO_KEYS = ("all", "ttft", "itl", "e2e")


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    result: SimResult


@dataclass(frozen=True, slots=True)
class ComparisonRow:
    name: str
    #: GPU type → GPUs of the variant's inventory.
    gpus: dict[str, float]
    slo: dict[str, float]
    requests: int
    refused: int
    fleet_cost: float
    cost_per_request: float | None
    cost_per_million_tokens: float | None
    hours_busy: float
    hours_idle: float
    hours_free: float


def attainment(result: SimResult) -> float:
    """The share of arrived requests within every objective (served share when none given)."""
    return result.overall.slo.get("all", 0.0)


def compare_rows(variants: Sequence[Variant]) -> list[ComparisonRow]:
    return [
        ComparisonRow(
            v.name,
            {g.gpu_type: g.gpus for g in v.result.gpus},
            dict(v.result.overall.slo),
            v.result.overall.requests,
            v.result.overall.refused,
            v.result.fleet_cost,
            v.result.overall.cost_per_request,
            v.result.overall.cost_per_million_tokens,
            sum(g.hours_busy for g in v.result.gpus),
            sum(g.hours_idle for g in v.result.gpus),
            sum(g.hours_free for g in v.result.gpus),
        )
        for v in variants
    ]


def comparison_to_dict(variants: Sequence[Variant]) -> dict[str, Any]:
    """The rows, then each variant's full result (``SimResult.to_dict``)."""
    return {
        "rows": [asdict(row) for row in compare_rows(variants)],
        "variants": {v.name: v.result.to_dict() for v in variants},
    }


def _usd(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"${value:,.{digits}f}"


def comparison_table(rows: Sequence[ComparisonRow]) -> tuple[list[str], list[list[str]]]:
    """Header and cells, shared by the text table and the HTML report."""
    keys = [k for k in SLO_KEYS if any(k in r.slo for r in rows)]
    header = ["VARIANT", "GPUS", *(f"SLO {k.upper()}" for k in keys), "REFUSED", "COST"]
    header += ["PER REQUEST", "PER 1M TOKENS", "GPU-H BUSY", "IDLE", "FREE"]
    cells = [
        [
            r.name,
            " + ".join(f"{n:g}×{t}" for t, n in r.gpus.items()) or "-",
            *(f"{r.slo[k]:.1%}" if k in r.slo else "-" for k in keys),
            f"{r.refused}/{r.requests}",
            _usd(r.fleet_cost),
            _usd(r.cost_per_request, 5),
            _usd(r.cost_per_million_tokens),
            f"{r.hours_busy:.1f}",
            f"{r.hours_idle:.1f}",
            f"{r.hours_free:.1f}",
        ]
        for r in rows
    ]
    return header, cells


def render_comparison(rows: Sequence[ComparisonRow]) -> str:
    header, cells = comparison_table(rows)
    widths = [max(len(c) for c in col) for col in zip(header, *cells, strict=True)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (header, *cells)
    )
