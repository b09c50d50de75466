"""What a simulation reports: latency and SLO attainment, replicas, GPU-hours and cost.

Latencies are the client's: time to first token and end to end from the request's arrival at
the gateway (a wait there counts), inter-token as each request's mean gap after its first
token. SLO attainment is the share of *arrived* requests that met the objective — a refused
request met none — so a fleet cannot look better by refusing work.

Cost follows ``gpufleet.policies.costs`` (the cost report's definitions): a replica's placed
time from its start (loading counts) to its end, at its GPUs' catalog price or the spec's
``pricing.perReplicaHour``; its busy time is when it ran at least one sequence; idle is placed
minus busy; fleet idle is the inventory's GPUs nothing was placed on. The cost of a successful
request is the model's placed cost ÷ the requests it served; per 1M tokens likewise over their
prompt and completion tokens. An ``engine: external`` model is priced per token instead: its
cost is what its requests were charged at its price list (``cost_per_token``), with nothing
placed and no GPU-hours; the totals add it to the GPUs' placed cost.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "GpuUse",
    "ModelResult",
    "Objectives",
    "Percentiles",
    "ReplicaSpan",
    "ScaleEvent",
    "SimResult",
    "TenantResult",
    "percentiles",
    "render_table",
]


@dataclass(frozen=True, slots=True)
class Objectives:
    """Latency objectives a request must meet (None: not judged)."""

    ttft_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None


@dataclass(frozen=True, slots=True)
class Percentiles:
    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


def percentiles(values: Sequence[float]) -> Percentiles:
    """Nearest-rank percentiles (the value below which the share of samples lies)."""
    if not values:
        return Percentiles()
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))]

    return Percentiles(n, math.fsum(ordered) / n, rank(0.50), rank(0.95), rank(0.99))


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    t: float
    model: str
    before: int
    after: int
    reason: str
    #: The fleet could not place what the autoscaler asked for (the planner's reason).
    unschedulable: bool = False


@dataclass(frozen=True, slots=True)
class ModelResult:
    name: str
    requests: int
    served: int
    #: Refused: held past the gateway's hold bound, or too large for any engine's KV cache.
    refused: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft: Percentiles
    itl: Percentiles
    e2e: Percentiles
    #: Share of arrived requests within each objective ("all": within every one given).
    slo: dict[str, float]
    replicas_max: int
    #: Time-weighted mean replicas held (loading included).
    replicas_mean: float
    gpu_hours_placed: float
    gpu_hours_busy: float
    cost_placed: float
    cost_busy: float
    cost_per_request: float | None
    cost_per_million_tokens: float | None
    #: The planner's last reason when the fleet could not hold what the model wanted.
    unplaced: str | None = None
    #: Refusals by reason: ``rpm``, ``tpm``, ``concurrency``, ``budget`` (the tenant's quota),
    #: ``queue_full``, ``queue_timeout`` (the fair queue's bounds), ``no_replica`` (held past
    #: ``hold_s``), ``too_large`` (no engine's KV cache holds it),
    #: ``external_endpoint_not_allowed`` (a hosted API, and the tenant has not opted in).
    refused_by: dict[str, int] = field(default_factory=dict)
    #: What per-token-priced endpoints charged (``engine: external``): its cost beside
    #: ``cost_placed`` (the GPUs'); the cost per request and per 1M tokens count both.
    cost_per_token: float = 0.0

    @property
    def cost(self) -> float:
        """Everything it cost: GPUs placed, and tokens charged by external endpoints."""
        return self.cost_placed + self.cost_per_token


@dataclass(frozen=True, slots=True)
class TenantResult:
    """One tenant's requests over every model: what its quotas and its fair share gave it."""

    name: str
    priority: str
    weight: float
    requests: int
    served: int
    refused: int
    refused_by: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    ttft: Percentiles
    e2e: Percentiles
    #: From arrival to being sent to a replica: held for one, then in the fair queue.
    wait: Percentiles
    #: Share of its arrived requests within every objective given.
    slo: float | None
    #: What it was charged: each request's share of its replica's busy time × the price, or
    #: on an external model its tokens at the price list.
    cost: float


@dataclass(frozen=True, slots=True)
class GpuUse:
    gpu_type: str
    gpus: float
    price_per_hour: float
    hours_placed: float
    hours_busy: float
    #: GPU-hours of the inventory nothing was placed on.
    hours_free: float

    @property
    def hours_idle(self) -> float:
        return max(0.0, self.hours_placed - self.hours_busy)


@dataclass(frozen=True, slots=True)
class ReplicaSpan:
    """One replica's life: what the report draws GPUs and replicas over time from."""

    model: str
    gpu_type: str
    gpus: int
    start: float
    end: float
    busy_s: float


@dataclass(frozen=True, slots=True)
class SimResult:
    duration_s: float
    objectives: Objectives
    models: list[ModelResult]
    overall: ModelResult
    gpus: list[GpuUse]
    events: list[ScaleEvent]
    #: Everything the window cost: placed replicas and free GPUs of the inventory.
    fleet_cost: float
    fleet_idle_cost: float
    seed: int | None = None
    #: Wall-clock seconds the simulation took and its rate (requests per second of wall time).
    wall_s: float = 0.0
    #: Every replica started, in start order (an addition: older readers ignore it).
    replicas: list[ReplicaSpan] = field(default_factory=list)
    #: Per tenant, in name order.
    tenants: list[TenantResult] = field(default_factory=list)
    #: Of ``fleet_cost``, what per-token-priced endpoints (``engine: external``) charged.
    per_token_cost: float = 0.0

    @property
    def requests_per_wall_s(self) -> float:
        return self.overall.requests / self.wall_s if self.wall_s > 0 else 0.0

    def model(self, name: str) -> ModelResult:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def tenant(self, name: str) -> TenantResult:
        for t in self.tenants:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self, *, timing: bool = False) -> dict[str, Any]:
        """Plain values; without ``timing`` the wall-clock figures are left out, so two runs
        of one seed give equal dictionaries."""
        data: dict[str, Any] = dataclasses.asdict(self)
        for gpu, use in zip(data["gpus"], self.gpus, strict=True):
            gpu["hours_idle"] = use.hours_idle
        if timing:
            data["requests_per_wall_s"] = self.requests_per_wall_s
        else:
            del data["wall_s"]
        return data

    def to_json(self, *, timing: bool = True, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(timing=timing), indent=indent)


def _s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"


def _usd(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"${value:,.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def render_table(result: SimResult) -> str:
    """The result as plain text: latency and SLOs, cost, GPUs, then the scaling events."""
    lines = [f"simulated {result.duration_s / 3600:.2f} h"]
    if result.wall_s:
        lines[0] += (
            f" in {result.wall_s:.1f} s of wall time ({result.requests_per_wall_s:,.0f} requests/s)"
        )
    objectives = [
        f"{k} ≤ {_s(v)}"
        for k, v in (
            ("ttft", result.objectives.ttft_s),
            ("itl", result.objectives.itl_s),
            ("e2e", result.objectives.e2e_s),
        )
        if v is not None
    ]
    lines.append("objectives: " + (", ".join(objectives) or "none given"))
    lines.append("")
    rows = []
    for m in (*result.models, result.overall):
        rows.append(
            [
                m.name,
                str(m.requests),
                str(m.served),
                str(m.refused),
                f"{_s(m.ttft.p50)}/{_s(m.ttft.p95)}/{_s(m.ttft.p99)}",
                f"{_s(m.itl.p50)}/{_s(m.itl.p99)}",
                f"{_s(m.e2e.p50)}/{_s(m.e2e.p99)}",
                f"{m.slo['all']:.1%}" if "all" in m.slo else "-",
                f"{m.replicas_mean:.1f}/{m.replicas_max}",
            ]
        )
    header = ["MODEL", "REQUESTS", "SERVED", "REFUSED", "TTFT p50/95/99", "ITL p50/99"]
    header += ["E2E p50/99", "SLO", "REPLICAS avg/max"]
    lines += _table(header, rows)
    lines.append("")
    per_token = result.per_token_cost > 0  # GPUs' and tokens' cost apart, then their sum
    rows = [
        [
            m.name,
            f"{m.gpu_hours_placed:.1f}",
            f"{m.gpu_hours_busy:.1f}",
            *([_usd(m.cost_placed), _usd(m.cost_per_token)] if per_token else []),
            _usd(m.cost),
            _usd(m.cost_per_request, 5),
            _usd(m.cost_per_million_tokens),
        ]
        for m in (*result.models, result.overall)
    ]
    header = ["MODEL", "GPU-H PLACED", "GPU-H BUSY", *(["GPU COST", "PER-TOKEN"] * per_token)]
    header += ["COST", "PER REQUEST", "PER 1M TOKENS"]
    lines += _table(header, rows)
    lines.append("")
    rows = [
        [
            g.gpu_type,
            f"{g.gpus:g}",
            _usd(g.price_per_hour),
            f"{g.hours_placed:.1f}",
            f"{g.hours_busy:.1f}",
            f"{g.hours_idle:.1f}",
            f"{g.hours_free:.1f}",
        ]
        for g in result.gpus
    ]
    header = ["GPU", "COUNT", "PRICE/H", "PLACED H", "BUSY H", "IDLE H", "FREE H"]
    lines += _table(header, rows)
    fleet = f"fleet cost {_usd(result.fleet_cost)} (GPUs with nothing placed: "
    fleet += _usd(result.fleet_idle_cost)
    if per_token:
        fleet += f"; tokens charged by external endpoints: {_usd(result.per_token_cost)}"
    lines.append(fleet + ")")
    for m in result.models:
        if m.unplaced:
            lines.append(f"unplaced {m.name}: {m.unplaced}")
    refusals = [f"{k} {v}" for k, v in result.overall.refused_by.items()]
    if refusals:
        lines.append("refused: " + ", ".join(refusals))
    if len(result.tenants) > 1 or any(t.refused for t in result.tenants):
        lines.append("")
        rows = [
            [
                t.name,
                f"{t.priority}×{t.weight:g}",
                str(t.requests),
                str(t.served),
                ", ".join(f"{k} {v}" for k, v in t.refused_by.items()) or "0",
                f"{_s(t.wait.p50)}/{_s(t.wait.p99)}",
                f"{_s(t.ttft.p50)}/{_s(t.ttft.p99)}",
                f"{t.slo:.1%}" if t.slo is not None else "-",
                _usd(t.cost),
            ]
            for t in result.tenants
        ]
        header = ["TENANT", "CLASS", "REQUESTS", "SERVED", "REFUSED", "WAIT p50/99"]
        header += ["TTFT p50/99", "SLO", "COST"]
        lines += _table(header, rows)
    if result.events:
        lines.append("")
        lines.append(f"scaling events: {len(result.events)}")
        for e in result.events[:20]:
            mark = " (unschedulable)" if e.unschedulable else ""
            lines.append(f"  {e.t:>9.0f}s {e.model}: {e.before} → {e.after}{mark} — {e.reason}")
        if len(result.events) > 20:
            lines.append(f"  … {len(result.events) - 20} more (-o json has them all)")
    return "\n".join(lines)
