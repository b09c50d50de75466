"""What a replica costs per second, and a bound on what one request may cost before it runs.

A replica's price per hour is ``spec.pricing.perReplicaHour`` when given, otherwise its GPUs ×
the catalog's price of the first GPU type it accepts (``spec.resources.gpuTypes``); a CPU model
without a price costs nothing (its usage is still counted in tokens and seconds).

Budgets are reserved before a request runs, so the gateway needs an upper estimate of its cost:
tokens × the replica-seconds per token the model has been seen to take (a moving average,
doubled for safety), never below the cost of generating them alone at ``FLOOR_TOKENS_PER_S``.
"""

from __future__ import annotations

from typing import Protocol

from gpufleet.policies.costs import replica_price_per_hour as price_of_spec
from gpufleet.spec import ModelSpec

__all__ = ["FLOOR_TOKENS_PER_S", "Priced", "Pricing"]

#: A slow single stream; busy-time shares per token are far smaller once requests batch.
FLOOR_TOKENS_PER_S = 20.0
_ALPHA = 0.05


class Priced(Protocol):
    """A deployment as pricing sees it: the gateway's ``ModelEntry``, the simulator's model."""

    @property
    def name(self) -> str: ...

    @property
    def spec(self) -> ModelSpec: ...


class Pricing:
    def __init__(self) -> None:
        self._seconds_per_token: dict[str, float] = {}

    def per_second(self, entry: Priced) -> float:
        return self.per_second_of(entry.spec)

    @staticmethod
    def per_second_of(spec: ModelSpec) -> float:
        """What one replica running ``spec`` costs per second (a disaggregated model's pool:
        ``ModelSpec.pool``)."""
        return price_of_spec(spec) / 3600.0

    def estimate(self, entry: Priced, tokens: int) -> float:
        price = self.per_second(entry)
        if not price:
            return 0.0
        learnt = 2.0 * self._seconds_per_token.get(entry.name, 0.0)
        return tokens * max(learnt, 1.0 / FLOOR_TOKENS_PER_S) * price

    def per_token(self, entry: Priced) -> float:
        """What a token costs on this deployment: its price × the replica-seconds a token has
        taken there (before any is measured, a slow single stream's pace)."""
        learnt = self._seconds_per_token.get(entry.name, 1.0 / FLOOR_TOKENS_PER_S)
        return self.per_second(entry) * learnt

    def observe(self, entry: Priced, replica_seconds: float, tokens: int) -> None:
        if tokens <= 0:
            return
        sample = replica_seconds / tokens
        old = self._seconds_per_token.get(entry.name)
        self._seconds_per_token[entry.name] = (
            sample if old is None else old + _ALPHA * (sample - old)
        )
