"""Model resolution: the name a client sent → the deployments to try, in order.

The name is looked up in the control plane's in-memory directory, and a model the caller may
not use answers exactly as one that does not exist (a private model is not even said to
exist). Then the chain: the deployment the model's split picks (sticky by tenant, key or
session when the spec says so, else a seeded draw), re-ordered by price when the model names
cheaper alternatives (``routing.rank_by_cost``: the cheapest that meets the TTFT objective and
has room now), then the spec's fallbacks that exist. Dispatch walks the chain; nothing here
waits or touches the network.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from gpufleet.controller import Directory, ModelEntry
from gpufleet.gateway.auth import Principal
from gpufleet.gateway.demand import DemandMeter
from gpufleet.gateway.errors import bad_request, model_not_found
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.request import Header, Parsed
from gpufleet.policies.pricing import Pricing
from gpufleet.routing import CostOption, choose_split, rank_by_cost
from gpufleet.spec import CostRoutingSpec

__all__ = ["Resolution", "Resolver", "split_key"]


@dataclass(frozen=True, slots=True)
class Resolution:
    #: The model the client named, as the directory has it.
    entry: ModelEntry
    #: What to try, in order; never empty (the last one answers or says why not).
    chain: list[ModelEntry]
    #: The client's session id (the model's ``routing.sessionHeader``), for stickiness.
    session: str | None


class Resolver:
    def __init__(
        self,
        directory: Directory,
        pricing: Pricing,
        demand: DemandMeter,
        metrics: GatewayMetrics,
        has_room: Callable[[ModelEntry], bool],
        *,
        seed: int | None = None,
    ) -> None:
        self._directory = directory
        self._pricing = pricing
        self._demand = demand
        self._metrics = metrics
        #: Ready replicas and a free slot now (a request there would not wait in the queue).
        self._has_room = has_room
        self._random = random.Random(seed)

    def entry(self, name: str, principal: Principal) -> ModelEntry:
        """The model ``name`` if ``principal`` may use it; 404 otherwise."""
        entry = self._directory.get(name)
        if entry is None or not principal.may_use(entry.spec):
            raise model_not_found(name)  # a private model is not even said to exist
        return entry

    def resolve(self, parsed: Parsed, principal: Principal, header: Header) -> Resolution:
        entry = self.entry(parsed.model, principal)
        self._demand.arrived(parsed.model)
        if parsed.embeddings and not entry.spec.embeddings:
            raise bad_request(
                f"The model '{parsed.model}' does not serve embeddings (its spec has "
                "'embeddings: false'); use a model with 'spec.embeddings: true'",
                param="model",
                code="model_not_supported",
            )
        session = header(entry.spec.routing.session_header)
        chain = self.chain(entry, split_key(entry, principal, session))
        return Resolution(entry, chain, session)

    def chain(self, entry: ModelEntry, sticky: str | None) -> list[ModelEntry]:
        """The deployment the split picks, then the fallbacks that exist, in order."""
        routing = entry.spec.routing
        first = entry
        if routing.split:
            splits = [(t.model, t.weight) for t in routing.split]
            chosen = choose_split(entry.name, splits, sticky, self._random)
            first = self._directory.get(chosen) or entry
            self._metrics.split.labels(entry.name, first.name).inc()
        cost = first.spec.routing.cost
        chain = [first] if cost is None else self._by_cost(first, cost)
        for name in routing.fallbacks:
            fallback = self._directory.get(name)
            if fallback is not None and fallback.name not in {c.name for c in chain}:
                chain.append(fallback)
        return chain

    def _by_cost(self, first: ModelEntry, cost: CostRoutingSpec) -> list[ModelEntry]:
        """``first`` and the alternatives its spec names, cheapest suitable first."""
        options = {first.name: first}
        for name in cost.alternatives:
            alternative = self._directory.get(name)
            if alternative is not None:
                options[alternative.name] = alternative
        order = rank_by_cost(
            [
                CostOption(
                    e.name,
                    self._pricing.per_token(e),
                    self._demand.recent_ttft_p90(e.name),
                    self._has_room(e),
                    per_token=e.spec.engine == "external",
                )
                for e in options.values()
            ],
            cost.ttft_objective,
        )
        return [options[n] for n in order]


def split_key(entry: ModelEntry, principal: Principal, session: str | None) -> str | None:
    """What keeps this caller on one side of the model's split (None: draw at random)."""
    by = entry.spec.routing.split_by
    if by == "tenant":
        return f"tenant:{principal.tenant}"
    if by == "key":
        return f"key:{principal.key_prefix}"
    return session if by == "session" else None
