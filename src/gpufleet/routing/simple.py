"""Load-only policies: round-robin, least outstanding requests, power of two choices.

Least outstanding counts the gateway's in-flight requests plus the engine's waiting queue;
power of two choices (Ray Serve's default) samples two replicas and takes the shorter queue,
which avoids herding on a stale minimum. Ties rotate, so equal replicas share the load.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import ClassVar

from gpufleet.routing.base import Choice, Endpoint, RequestFeatures, register

__all__ = ["LeastOutstanding", "PowerOfTwo", "RoundRobin", "load"]


def load(e: Endpoint) -> float:
    return e.in_flight + e.waiting


class _Stateless:
    def record(self, request: RequestFeatures, choice: Choice) -> None:
        return None

    def forget(self, endpoint: str) -> None:
        return None


@register
class RoundRobin(_Stateless):
    name: ClassVar[str] = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(
        self, request: RequestFeatures, endpoints: Sequence[Endpoint], now: float
    ) -> Choice | None:
        if not endpoints:
            return None
        e = endpoints[self._next % len(endpoints)]
        self._next += 1
        return Choice(e.id, "round-robin")


@register
class LeastOutstanding(_Stateless):
    name: ClassVar[str] = "least-outstanding"

    def __init__(self) -> None:
        self._turn = 0

    def pick(
        self, request: RequestFeatures, endpoints: Sequence[Endpoint], now: float
    ) -> Choice | None:
        if not endpoints:
            return None
        least = min(load(e) for e in endpoints)
        tied = [e for e in endpoints if load(e) == least]
        self._turn += 1
        e = tied[self._turn % len(tied)]
        return Choice(e.id, f"least outstanding ({least:g})")


@register
class PowerOfTwo(_Stateless):
    name: ClassVar[str] = "power-of-two"

    def __init__(self, seed: int = 0) -> None:
        self._random = random.Random(seed)

    def pick(
        self, request: RequestFeatures, endpoints: Sequence[Endpoint], now: float
    ) -> Choice | None:
        if not endpoints:
            return None
        if len(endpoints) == 1:
            return Choice(endpoints[0].id, "only replica")
        a, b = self._random.sample(list(endpoints), 2)
        e = a if load(a) <= load(b) else b
        return Choice(e.id, f"shorter of two ({load(e):g})")
