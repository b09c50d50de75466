"""What a replica costs per second, and a bound on what one request may cost before it runs.

A replica's price per hour is ``spec.pricing.perReplicaHour`` when given, otherwise its GPUs ×
the catalog's price of the first GPU type it accepts (``spec.resources.gpuTypes``); a CPU model
without a price costs nothing (its usage is still counted in tokens and seconds). An
``engine: external`` model is priced by the token instead, at its endpoints' prices
(``pricing.perMillionInputTokens`` / ``perMillionOutputTokens``): ``charge`` says what a
request cost, ``estimate`` bounds it (every token at the dearer price).

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

    @staticmethod
    def per_token_prices(spec: ModelSpec) -> tuple[float, float] | None:
        """USD per input and per output token of an ``engine: external`` model (priced by the
        token, ``pricing.perMillion…Tokens``); None for a model priced by replica time."""
        p = spec.pricing
        if spec.engine != "external":
            return None
        return (p.per_million_input_tokens or 0.0) / 1e6, (p.per_million_output_tokens or 0.0) / 1e6

    def charge(self, spec: ModelSpec, prompt: int, completion: int) -> float | None:
        """What a request of ``prompt`` and ``completion`` tokens costs on a per-token-priced
        model; None for one priced by replica time."""
        prices = self.per_token_prices(spec)
        if prices is None:
            return None
        return prompt * prices[0] + completion * prices[1]

    def estimate(self, entry: Priced, tokens: int) -> float:
        prices = self.per_token_prices(entry.spec)
        if prices is not None:  # every token at the dearer of the two prices: an upper bound
            return tokens * max(prices)
        price = self.per_second(entry)
        if not price:
            return 0.0
        learnt = 2.0 * self._seconds_per_token.get(entry.name, 0.0)
        return tokens * max(learnt, 1.0 / FLOOR_TOKENS_PER_S) * price

    def per_token(self, entry: Priced) -> float:
        """What a token costs on this deployment: its price × the replica-seconds a token has
        taken there (before any is measured, a slow single stream's pace)."""
        prices = self.per_token_prices(entry.spec)
        if prices is not None:  # its price list, input and output tokens weighed alike
            return (prices[0] + prices[1]) / 2
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
