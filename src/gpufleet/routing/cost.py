"""Cost-aware choice between deployments of one model: the cheapest that meets its objective.

A public model may be served by several deployments of different price — say an L4 pool and
an H100 pool. ``rank_by_cost`` orders them for one request: deployments whose recent TTFT p90
meets the objective and which have room (no request waiting in their fair queue) come first,
cheapest first; a deployment with no recent TTFT counts as meeting it (it is tried, and so
measured again); the rest follow, fastest first, so that when nothing meets the objective the
request goes where it waits least. Pure: the gateway hands it what it measured.

A deployment priced per token (an external endpoint, ``per_token``) is paid for each token it
serves; one the fleet runs is paid for by the hour whether it serves or idles, so its
measured cost per token is an average, not what one more request costs. Among those that
meet the objective the fleet's own therefore come first, cheapest first, and a per-token one
only after them: the burst goes out when the fleet is full or too slow, not because a list
price undercuts an idle GPU's average (the simulated evening peak, docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CostOption", "rank_by_cost"]


@dataclass(frozen=True, slots=True)
class CostOption:
    name: str
    #: What a token costs there (dollars per token, or any unit shared by all options).
    cost_per_token: float
    #: 90th-percentile TTFT of its recent requests; None when there were none.
    ttft_p90: float | None
    #: Whether it can take a request now without queueing (ready replicas, free slots).
    has_room: bool
    #: Priced per token (an external endpoint): each request costs; the fleet's own do not.
    per_token: bool = False


def rank_by_cost(options: Sequence[CostOption], objective_s: float) -> list[str]:
    def meets(o: CostOption) -> bool:
        return o.has_room and (o.ttft_p90 is None or o.ttft_p90 <= objective_s)

    good = sorted(
        (o for o in options if meets(o)), key=lambda o: (o.per_token, o.cost_per_token, o.name)
    )
    rest = sorted(
        (o for o in options if not meets(o)),
        key=lambda o: (not o.has_room, o.ttft_p90 if o.ttft_p90 is not None else 0.0, o.name),
    )
    return [o.name for o in (*good, *rest)]
