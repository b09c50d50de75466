"""Servers the fleet does not run (``engine: external``) in the simulator, and the burst to them.

An external model's endpoints are modelled as a hosted API, not as engines: no GPUs, never
placed or scaled, ready from the start, and a latency that does not depend on its load — the
first token ``HostedLatency.ttft_s`` after the request is sent, then one token every
``tpot_s``. The spec has no latency fields (it says where the endpoints are and what they
charge, not how fast they are), so the figures are the simulation's assumption: ``sim_model``'s
``hosted`` argument, ``gpufleet sim --external-ttft/--external-tpot``. The defaults stand for a
hosted Llama-3.1-8B: a median TTFT of about 0.5 s across providers (cloudprice.net's listing,
0.49 s) and 100 output tokens/s, the slow end of the providers' published speeds (91 tok/s for
Together AI on inferencelatency.com, 280 for Fireworks and 780 for Groq on kickllm.com).

What bounds it is the gateway's, as under ``gpufleet up``: the requests in flight to a model
are its endpoints × ``routing.maxInFlightPerReplica`` (or the gateway's 64), more wait in its
fair queue. Each request is charged at the spec's prices by ``Pricing.charge`` — the ledger's
price — and the cost report counts it per token, beside the GPU-priced models.

The choice between the fleet's own deployment and an external one is the gateway's, with the
gateway's functions and inputs: ``routing.cost`` orders the model and its alternatives with
``routing.rank_by_cost`` (``gateway.resolve.Resolver._by_cost``): cost per token from
``Pricing.per_token`` (the own model's learnt from its requests' busy time, the external one's
price list), TTFT p90 over the last 30 s (``RecentTtfts``, the gateway's ``DemandMeter``), room
from the fair queue. Then the chain is walked as ``gateway.dispatch`` walks it (``walk``): a
tenant that has not opted in (``allowExternalEndpoints``) skips a deployment served only by
``location: external`` endpoints, and is refused (``external_endpoint_not_allowed``) when it
is the last; a deployment with no ready replica is skipped while a later one may serve.

Not modelled: ``routing.fallbacks``, and the gateway's move to the next deployment of a chain
when one answers 503 (a fair-queue timeout there): the request is refused where it waited.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from gpufleet.policies.pricing import Priced, Pricing
from gpufleet.routing import CostOption, rank_by_cost
from gpufleet.spec import CostRoutingSpec, ModelSpec

__all__ = [
    "NOT_ALLOWED",
    "RECENT_KEEP",
    "RECENT_S",
    "Deployment",
    "HostedLatency",
    "RecentTtfts",
    "by_cost",
    "only_external",
    "route",
    "walk",
]

#: The refusal of a tenant that has not opted in (the gateway's 403 code).
NOT_ALLOWED = "external_endpoint_not_allowed"
#: How far back, and over how many requests at most, cost routing looks at a deployment's TTFTs
#: (the gateway's ``demand._RECENT_S`` and ``_TTFT_KEEP``).
RECENT_S = 30.0
RECENT_KEEP = 512


@dataclass(frozen=True, slots=True)
class HostedLatency:
    """How fast a hosted API answers, whatever its load: the first token after ``ttft_s``,
    each further one ``tpot_s`` later."""

    ttft_s: float = 0.5
    tpot_s: float = 0.01

    def __post_init__(self) -> None:
        if not (self.ttft_s >= 0 and self.tpot_s >= 0):
            raise ValueError(
                f"a hosted API's latency is not negative: ttft {self.ttft_s}, tpot {self.tpot_s}"
            )

    def duration(self, output_tokens: int) -> float:
        """From sending a request to its last token."""
        return self.ttft_s + max(0, output_tokens - 1) * self.tpot_s


def only_external(spec: ModelSpec) -> bool:
    """Served by endpoints outside the company alone (the gateway's ``_only_external``)."""
    return spec.engine == "external" and all(e.location == "external" for e in spec.endpoints)


class RecentTtfts:
    """A deployment's TTFTs as the gateway's cost routing sees them: the last ``RECENT_KEEP``,
    stamped when their request ended, of which those of the last ``RECENT_S`` count."""

    __slots__ = ("_recent",)

    def __init__(self) -> None:
        self._recent: deque[tuple[float, float]] = deque(maxlen=RECENT_KEEP)

    def add(self, at: float, ttft: float) -> None:
        self._recent.append((at, ttft))

    def p90(self, now: float) -> float | None:
        """The p90 of the last ``RECENT_S`` before ``now`` (the gateway's nearest rank below
        ``0.9 × n``); None: none."""
        since = now - RECENT_S
        values = sorted(ttft for at, ttft in self._recent if at >= since)
        if not values:
            return None
        return values[min(len(values) - 1, int(0.9 * len(values)))]


class Deployment(Priced, Protocol):
    """A deployment as routing between deployments sees it (the simulator's model)."""

    @property
    def recent(self) -> RecentTtfts: ...

    @property
    def ready(self) -> bool:
        """It has a replica ready (an external one always has)."""
        ...

    def has_room(self) -> bool:
        """A request there would not wait in its fair queue."""
        ...


D = TypeVar("D", bound=Deployment)


def by_cost(
    first: D, alternatives: Sequence[D], cost: CostRoutingSpec, pricing: Pricing, now: float
) -> list[D]:
    """``first`` and its ``alternatives``, cheapest suitable first (the gateway's
    ``Resolver._by_cost``; alternatives that do not exist are already left out)."""
    options = {first.name: first}
    for alternative in alternatives:
        options.setdefault(alternative.name, alternative)
    order = rank_by_cost(
        [
            CostOption(
                d.name,
                pricing.per_token(d),
                d.recent.p90(now),
                d.has_room(),
                per_token=d.spec.engine == "external",
            )
            for d in options.values()
        ],
        cost.ttft_objective,
    )
    return [options[name] for name in order]


def walk(chain: Sequence[D], allow_external: bool) -> D | None:
    """Where a request of the chain goes, as the gateway's dispatch decides before taking a
    slot: past external-only deployments for a tenant that has not opted in, past those with
    no ready replica while a later one may serve; the last is held for. None: the last is
    external-only and the tenant has not opted in (refused)."""
    for i, target in enumerate(chain):
        last = i == len(chain) - 1
        if not allow_external and only_external(target.spec):
            if last:
                return None
            continue
        if last or target.ready:
            return target
    return None


def route(
    named: D, deployments: Mapping[str, D], pricing: Pricing, now: float, allow_external: bool
) -> tuple[D, bool]:
    """The deployment of ``deployments`` a request for ``named`` goes to at ``now``, and whether
    the tenant may be served there (False: the chain ends at an external-only deployment it has
    not opted in to)."""
    chain = [named]
    cost = named.spec.routing.cost
    if cost is not None:
        alternatives = [deployments[a] for a in cost.alternatives if a in deployments]
        chain = by_cost(named, alternatives, cost, pricing, now)
    target = walk(chain, allow_external)
    return (chain[-1], False) if target is None else (target, True)
