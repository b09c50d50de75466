"""Cost truth: what a window of the fleet cost, and who it is charged to, idle time included.

Pure: spans of placed capacity, the ledger's totals and the inventory come in as plain values,
``since`` and ``until`` as arguments. The definitions (issue 18, "Cost truth"):

- A model's **placed** cost is every replica it held in the window × the replica's price per
  hour, busy or idle (its replica spans, clipped to the window).
- Its **busy** cost is what its requests used: the ledger's replica time × price. A row's
  ``cost_usd`` is exactly that for an answered request; a 5xx row is billed nothing, so its
  busy part is its GPU-seconds × the model's price per GPU-second instead (a CPU replica has no
  GPU-seconds, so a failed request on one is counted idle).
- Its **idle** cost is placed − busy (never below zero). It is charged to the model, and shared
  among the tenants (and keys) that used the model in the window in proportion to their busy
  cost on it — the same proportion as their GPU-seconds, the price being the model's. A model
  nobody used keeps its idle cost under the model: ``unattributed`` in a tenant or key report.
- **Fleet idle** is, per GPU type, the inventory's GPU-seconds in the window minus those replicas
  held, × the type's price: GPUs with nothing placed, reported apart and charged to nobody.
  (A span that does not name its GPU type counts against the only type, or the first.)
- A **per-token-priced** deployment (``engine: external``: a server the fleet does not run,
  priced by ``spec.pricing.perMillion…Tokens``) costs what its ledger rows cost, beside the
  GPU-priced ones: all busy, nothing placed, no GPU-hours, no idle (it holds no capacity of the
  fleet's; whatever spans its stand-in replicas left are not counted).
- The cost of one **successful** request (status 2xx) of a scope is all the cost attributed to
  it, its share of idle included, ÷ its successful requests; per 1M tokens likewise over its
  prompt + completion tokens.

So a tenant report's totals plus its unattributed idle add up to the models' placed cost (or
their busy cost where requests were metered past what spans recorded), and that plus fleet idle
is the fleet's cost.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gpufleet.hardware import CATALOG
from gpufleet.spec import Inventory, ModelSpec

__all__ = [
    "By",
    "CostLine",
    "CostReport",
    "Span",
    "UsageTotals",
    "cost_report",
    "inventory_gpus",
    "placed_seconds",
    "replica_price_per_hour",
]

By = Literal["model", "tenant", "key"]


@dataclass(frozen=True, slots=True)
class Span:
    """A replica's hold on capacity: its GPUs (a share for a slice), its price per hour, and
    from when until when (epoch seconds; ``end`` None: still held)."""

    model: str
    replica: str
    gpus: float
    price_per_hour: float
    start: float
    end: float | None = None
    gpu_type: str | None = None


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """The ledger's rows of one (model, tenant, key) in the window, summed."""

    model: str
    tenant: str
    key: str
    requests: int
    successful: int
    prompt_tokens: int
    completion_tokens: int
    gpu_seconds: float
    #: Σ cost_usd of rows with status < 500 (what answered requests used).
    answered_cost: float
    #: Σ gpu_seconds of rows with status ≥ 500 (billed nothing, but the GPUs were busy).
    failed_gpu_seconds: float


@dataclass(frozen=True, slots=True)
class CostLine:
    """One row of a report: a model, tenant or key."""

    name: str
    busy_cost: float
    idle_cost: float
    #: Placed cost: only for a model (tenants and keys hold no replicas).
    placed_cost: float | None
    requests: int
    successful: int
    prompt_tokens: int
    completion_tokens: int
    gpu_seconds: float
    gpu_hours_placed: float | None = None
    #: Of ``busy_cost``, what per-token-priced deployments cost.
    per_token_cost: float = 0.0
    #: A model priced per token (no placed cost, no GPU-hours, no idle).
    per_token: bool = False

    @property
    def total_cost(self) -> float:
        return self.busy_cost + self.idle_cost

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost_per_successful_request(self) -> float | None:
        return self.total_cost / self.successful if self.successful else None

    @property
    def cost_per_million_tokens(self) -> float | None:
        return self.total_cost / self.tokens * 1e6 if self.tokens else None


@dataclass(frozen=True, slots=True)
class CostReport:
    by: By
    since: float
    until: float
    lines: list[CostLine]
    #: Idle cost of models nobody used in the window (tenant and key reports only), by model.
    unattributed: dict[str, float] = field(default_factory=dict)
    #: The inventory's GPUs and what they cost over the window, placed or not.
    fleet_gpus: float = 0.0
    fleet_gpu_cost: float = 0.0
    #: Placed cost of every model (GPU and CPU replicas).
    placed_cost: float = 0.0
    #: GPU-hours replicas held (a slice counts its share).
    placed_gpu_hours: float = 0.0
    #: GPUs with nothing placed, × their price: charged to nobody.
    fleet_idle_cost: float = 0.0
    #: What per-token-priced deployments cost (part of ``attributed_cost``).
    per_token_cost: float = 0.0

    @property
    def seconds(self) -> float:
        return self.until - self.since

    @property
    def attributed_cost(self) -> float:
        return sum(line.total_cost for line in self.lines) + sum(self.unattributed.values())

    @property
    def total_cost(self) -> float:
        """Everything the window cost: what models were charged, and the idle GPUs."""
        return self.attributed_cost + self.fleet_idle_cost


def replica_price_per_hour(spec: ModelSpec) -> float:
    """What one replica costs per hour: ``spec.pricing.perReplicaHour`` when given, otherwise
    its GPUs × the catalog's price of the first GPU type it accepts; a CPU model without a
    price costs nothing."""
    if spec.pricing.per_replica_hour is not None:
        return spec.pricing.per_replica_hour
    for name in spec.resources.gpu_types:
        accelerator = CATALOG.get(name)
        if accelerator is not None:
            return spec.resources.gpus * accelerator.price_per_hour
    return 0.0


def inventory_gpus(inventory: Inventory | None) -> list[tuple[str, float, float]]:
    """(GPU type, count, catalog price per GPU-hour) of each GPU type an inventory holds. A
    type the catalog does not know is priced at zero (it is still counted)."""
    counts: dict[str, float] = {}
    for node in inventory.nodes if inventory is not None else ():
        for group in node.gpus:
            counts[group.type] = counts.get(group.type, 0.0) + group.count
    out = []
    for gpu_type, count in counts.items():
        accelerator = CATALOG.get(gpu_type)
        out.append((gpu_type, count, accelerator.price_per_hour if accelerator else 0.0))
    return out


def placed_seconds(span: Span, since: float, until: float) -> float:
    """How long ``span`` held its capacity within [since, until)."""
    end = until if span.end is None else min(span.end, until)
    return max(0.0, end - max(span.start, since))


@dataclass(slots=True)
class _Model:
    placed: float = 0.0
    gpu_hours: float = 0.0
    #: Σ price × seconds and Σ gpus × seconds: the price per GPU-second of its spans.
    gpu_priced: float = 0.0
    gpu_seconds_held: float = 0.0


def _models(spans: Iterable[Span], since: float, until: float) -> dict[str, _Model]:
    out: dict[str, _Model] = {}
    for span in spans:
        held = placed_seconds(span, since, until)
        m = out.setdefault(span.model, _Model())
        if held <= 0:
            continue
        cost = span.price_per_hour * held / 3600.0
        m.placed += cost
        if span.gpus > 0:
            m.gpu_hours += span.gpus * held / 3600.0
            m.gpu_priced += cost
            m.gpu_seconds_held += span.gpus * held
    return out


def _busy(row: UsageTotals, model: _Model | None) -> float:
    per_gpu_second = (
        model.gpu_priced / model.gpu_seconds_held if model and model.gpu_seconds_held else 0.0
    )
    return row.answered_cost + row.failed_gpu_seconds * per_gpu_second


def cost_report(
    spans: Sequence[Span],
    usage: Sequence[UsageTotals],
    *,
    since: float,
    until: float,
    by: By,
    inventory_gpus: Sequence[tuple[str, float, float]] = (),
    per_token: Collection[str] = (),
) -> CostReport:
    """The window's cost by ``by``. ``inventory_gpus``: (GPU type, count, price per GPU-hour)
    of the fleet's inventory (empty: no GPUs), taken as held for the whole window.
    ``per_token``: the models priced per token (their rows' cost is all they cost)."""
    if until < since:
        raise ValueError(f"the window ends ({until}) before it starts ({since})")
    per_token = frozenset(per_token)
    spans = [span for span in spans if span.model not in per_token]
    models = _models(spans, since, until)
    busy: dict[tuple[str, str], float] = {}  # (model, name) → busy cost
    totals: dict[str, list[float]] = {}  # name → requests, successful, prompt, completion, gpu_s
    by_token: dict[str, float] = {}  # name → busy cost on per-token-priced models
    for row in usage:
        name = {"model": row.model, "tenant": row.tenant, "key": row.key}[by]
        cost = _busy(row, models.get(row.model))
        busy[row.model, name] = busy.get((row.model, name), 0.0) + cost
        acc = totals.setdefault(name, [0, 0, 0, 0, 0.0])
        acc[0] += row.requests
        acc[1] += row.successful
        acc[2] += row.prompt_tokens
        acc[3] += row.completion_tokens
        acc[4] += row.gpu_seconds
        if row.model in per_token:
            by_token[name] = by_token.get(name, 0.0) + cost
        else:
            models.setdefault(row.model, _Model())
    busy_of_model: dict[str, float] = {}
    for (model, _), cost in busy.items():
        busy_of_model[model] = busy_of_model.get(model, 0.0) + cost
    idle_of_model = {m: max(0.0, v.placed - busy_of_model.get(m, 0.0)) for m, v in models.items()}

    busy_of: dict[str, float] = {}
    idle_of: dict[str, float] = {}
    unattributed: dict[str, float] = {}
    for (model, name), cost in busy.items():
        busy_of[name] = busy_of.get(name, 0.0) + cost
        used = busy_of_model[model]
        idle = idle_of_model.get(model, 0.0)  # none for a per-token-priced model
        share = idle * cost / used if used > 0 else 0.0
        idle_of[name] = idle_of.get(name, 0.0) + share
    for model, idle in idle_of_model.items():
        if by == "model":
            idle_of[model] = idle
        elif idle > 0 and busy_of_model.get(model, 0.0) <= 0:
            unattributed[model] = idle

    names = set(totals) | (set(models) if by == "model" else set())
    lines = []
    for name in sorted(names):
        acc = totals.get(name, [0, 0, 0, 0, 0.0])
        held = models.get(name) if by == "model" else None
        lines.append(
            CostLine(
                name=name,
                busy_cost=busy_of.get(name, 0.0),
                idle_cost=idle_of.get(name, 0.0),
                placed_cost=held.placed if held is not None else None,
                requests=int(acc[0]),
                successful=int(acc[1]),
                prompt_tokens=int(acc[2]),
                completion_tokens=int(acc[3]),
                gpu_seconds=float(acc[4]),
                gpu_hours_placed=held.gpu_hours if held is not None else None,
                per_token_cost=by_token.get(name, 0.0),
                per_token=by == "model" and name in per_token,
            )
        )
    fleet_gpus, fleet_cost, fleet_idle = _fleet(spans, inventory_gpus, since, until)
    return CostReport(
        by=by,
        since=since,
        until=until,
        lines=lines,
        unattributed=unattributed,
        fleet_gpus=fleet_gpus,
        fleet_gpu_cost=fleet_cost,
        placed_cost=sum(m.placed for m in models.values()),
        placed_gpu_hours=sum(m.gpu_hours for m in models.values()),
        fleet_idle_cost=fleet_idle,
        per_token_cost=sum(by_token.values()),
    )


def _fleet(
    spans: Iterable[Span],
    inventory: Sequence[tuple[str, float, float]],
    since: float,
    until: float,
) -> tuple[float, float, float]:
    """The inventory's GPUs, their cost over the window, and the cost of what nothing held."""
    if not inventory:
        return 0.0, 0.0, 0.0
    seconds = until - since
    held = {gpu_type: 0.0 for gpu_type, _, _ in inventory}
    first = inventory[0][0]
    for span in spans:
        if span.gpus > 0:
            gpu_type = (
                span.gpu_type if span.gpu_type is not None and span.gpu_type in held else first
            )
            held[gpu_type] += span.gpus * placed_seconds(span, since, until)
    idle = 0.0
    for gpu_type, count, price in inventory:
        idle += max(0.0, count * seconds - held[gpu_type]) * price / 3600.0
    gpus = sum(count for _, count, _ in inventory)
    cost = sum(count * price * seconds / 3600.0 for _, count, price in inventory)
    return gpus, cost, idle
