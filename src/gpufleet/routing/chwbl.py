"""Consistent hashing with bounded loads (CHWBL), on a prefix key — KubeAI's PrefixHash.

Each replica has 256 points on a 64-bit ring; a request hashes its key (the start of its first
user message), walks the ring from there and takes the first replica whose in-flight count is
within ``(total in-flight + 1) / n × 1.25``, so equal prefixes meet on one replica until it is
busier than its share allows. The ring is rebuilt only when the set of replicas changes.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from typing import ClassVar

from gpufleet.routing.base import Choice, Endpoint, RequestFeatures, register

__all__ = ["Chwbl", "hash64"]

VNODES = 256
LOAD_FACTOR = 1.25


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@register
class Chwbl:
    name: ClassVar[str] = "chwbl"

    def __init__(self) -> None:
        self._ids: tuple[str, ...] = ()
        self._ring: list[tuple[int, str]] = []
        self._points: list[int] = []

    def record(self, request: RequestFeatures, choice: Choice) -> None:
        return None

    def forget(self, endpoint: str) -> None:
        return None

    def pick(
        self, request: RequestFeatures, endpoints: Sequence[Endpoint], now: float
    ) -> Choice | None:
        if not endpoints:
            return None
        ids = tuple(sorted(e.id for e in endpoints))
        if ids != self._ids:
            self._ids = ids
            self._ring = sorted((hash64(f"{i}#{v}"), i) for i in ids for v in range(VNODES))
            self._points = [p for p, _ in self._ring]
        by_id = {e.id: e for e in endpoints}
        total = sum(e.in_flight for e in endpoints)
        bound = math.ceil((total + 1) / len(endpoints) * LOAD_FACTOR)
        start = bisect.bisect(self._points, hash64(request.prefix_key))
        seen: set[str] = set()
        for step in range(len(self._ring)):
            _, endpoint = self._ring[(start + step) % len(self._ring)]
            if endpoint in seen:
                continue
            seen.add(endpoint)
            if by_id[endpoint].in_flight + 1 <= bound:
                return Choice(
                    endpoint,
                    "ring owner" if len(seen) == 1 else f"ring, {len(seen) - 1} over their bound",
                )
            if len(seen) == len(ids):
                break
        least = min(endpoints, key=lambda e: (e.in_flight, e.id))
        return Choice(least.id, "all over bound: least loaded")
