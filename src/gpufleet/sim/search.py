"""The cheapest fleet of one GPU type that meets an SLO attainment target.

For each GPU type the search finds the fewest GPUs (in nodes of ``node_gpus``, the last one
partial) whose simulation reaches the target, by binary search on the count between 1 and
``max_gpus``. That rests on attainment being monotone in GPUs — more GPUs never place fewer
replicas nor slow the ones placed — which holds for placement and capacity but only roughly
for latency (routing and the autoscaler's timing can make one more GPU a hair worse), so
the answer is the smallest count the bisection lands on, not a proof that no smaller count
works. A count meets the target when attainment reaches it and the planner placed every
model (a model without traffic in the trace still has to fit). The search checks ``max_gpus``
first: a type that misses the target even there is reported as infeasible. Types are then
ranked by the fleet's price per hour (GPUs × catalog price), the type's name breaking ties, so
the same inputs always give the same winner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gpufleet.hardware import CATALOG, normalise_gpu_name
from gpufleet.sim.compare import attainment
from gpufleet.sim.result import SimResult
from gpufleet.spec import Inventory, Model

__all__ = [
    "SearchRow",
    "for_gpu_type",
    "gpu_type_name",
    "node_inventory",
    "render_search",
    "search_fleet",
]

#: Runs the fleet on ``count`` GPUs of one type and returns what it achieved.
Runner = Callable[[str, int], SimResult]


@dataclass(frozen=True, slots=True)
class SearchRow:
    gpu_type: str
    #: The fewest GPUs found to meet the target; None: not even ``max_gpus`` does.
    gpus: int | None
    price_per_hour: float
    attainment: float
    result: SimResult
    #: (GPUs, attainment) of every count simulated, in the order tried.
    tried: list[tuple[int, float]] = field(default_factory=list)

    @property
    def fleet_per_hour(self) -> float | None:
        return None if self.gpus is None else self.gpus * self.price_per_hour


def gpu_type_name(name: str) -> str:
    """The catalog's name for a GPU type; an unknown one is refused with the known names."""
    known = normalise_gpu_name(name)
    if known is None or known not in CATALOG:
        raise ValueError(f"unknown GPU type {name!r}; known: {', '.join(sorted(CATALOG))}")
    return known


def node_inventory(gpu_type: str, gpus: int, node_gpus: int = 8) -> Inventory:
    """``gpus`` GPUs of ``gpu_type`` in nodes of ``node_gpus`` (the last one holds the rest)."""
    nodes = []
    for i, start in enumerate(range(0, gpus, node_gpus)):
        count = min(node_gpus, gpus - start)
        nodes.append(
            {"name": f"{gpu_type.lower()}-{i}", "gpus": [{"type": gpu_type, "count": count}]}
        )
    return Inventory.model_validate(
        {
            "apiVersion": "gpufleet.io/v1alpha1",
            "kind": "Inventory",
            "metadata": {"name": f"search-{gpu_type.lower()}-{gpus}"},
            "spec": {"nodes": nodes},
        }
    )


def for_gpu_type(model: Model, gpu_type: str) -> Model:
    """``model`` allowed on ``gpu_type`` only: the search asks what each type alone needs."""
    resources = model.spec.resources.model_copy(update={"gpu_types": [gpu_type]})
    spec = model.spec.model_copy(update={"resources": resources})
    return model.model_copy(update={"spec": spec})


def _search_one(run: Runner, gpu_type: str, target: float, max_gpus: int) -> SearchRow:
    price = CATALOG[gpu_type].price_per_hour
    results: dict[int, SimResult] = {}
    tried: list[tuple[int, float]] = []

    def meets(count: int) -> bool:
        if count not in results:
            results[count] = run(gpu_type, count)
            tried.append((count, attainment(results[count])))
        result = results[count]
        # A model the fleet cannot place fails the search even when it had no traffic.
        return attainment(result) >= target and not any(m.unplaced for m in result.models)

    if not meets(max_gpus):
        top = results[max_gpus]
        return SearchRow(gpu_type, None, price, attainment(top), top, tried)
    lo, hi = 1, max_gpus
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid + 1
    return SearchRow(gpu_type, lo, price, attainment(results[lo]), results[lo], tried)


def search_fleet(
    run: Runner, gpu_types: Iterable[str], target: float = 0.99, max_gpus: int = 64
) -> list[SearchRow]:
    """One row per GPU type, cheapest feasible fleet first, infeasible types last."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"the attainment target must be in (0, 1], not {target}")
    if max_gpus < 1:
        raise ValueError(f"--max-gpus must be at least 1, not {max_gpus}")
    rows = [_search_one(run, t, target, max_gpus) for t in dict.fromkeys(gpu_types)]
    return sorted(
        rows,
        key=lambda r: (r.fleet_per_hour is None, r.fleet_per_hour or 0.0, r.gpu_type),
    )


def render_search(rows: Sequence[SearchRow], target: float) -> str:
    header = ["GPU", "GPUS", "$/H", "ATTAINMENT", "PER REQUEST", "PER 1M TOKENS", "TRIED"]
    cells = []
    for r in rows:
        o = r.result.overall
        cells.append(
            [
                r.gpu_type,
                "-" if r.gpus is None else str(r.gpus),
                "-" if r.fleet_per_hour is None else f"${r.fleet_per_hour:,.2f}",
                f"{r.attainment:.1%}",
                "-" if o.cost_per_request is None else f"${o.cost_per_request:,.5f}",
                "-" if o.cost_per_million_tokens is None else f"${o.cost_per_million_tokens:,.2f}",
                " ".join(f"{n}:{a:.0%}" for n, a in r.tried),
            ]
        )
    widths = [max(len(c) for c in col) for col in zip(header, *cells, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (header, *cells)
    ]
    best = rows[0] if rows and rows[0].gpus is not None else None
    lines.append("")
    if best is None:
        lines.append(f"no GPU type reaches {target:.1%} attainment within the bound")
    else:
        lines.append(
            f"cheapest: {best.gpus}×{best.gpu_type} at ${best.fleet_per_hour or 0:,.2f}/h "
            f"({best.attainment:.1%} ≥ {target:.1%})"
        )
    return "\n".join(lines)
