"""Session affinity: requests carrying the same session (header) go to the same replica.

Rendezvous (highest-random-weight) hashing: each replica scores ``hash(session, replica)``
and the highest wins, so when replicas come or go only the sessions of the changed replica
move. Without a session header the request falls to the prefix-aware policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from gpufleet.routing.base import Choice, Endpoint, RequestFeatures, register
from gpufleet.routing.chwbl import hash64
from gpufleet.routing.prefix import PrefixAware

__all__ = ["SessionAffinity"]


@register
class SessionAffinity:
    name: ClassVar[str] = "session"

    def __init__(self) -> None:
        self.fallback = PrefixAware()

    def pick(
        self, request: RequestFeatures, endpoints: Sequence[Endpoint], now: float
    ) -> Choice | None:
        if not endpoints:
            return None
        if request.session is None:
            return self.fallback.pick(request, endpoints, now)
        e = max(endpoints, key=lambda e: (hash64(f"{request.session}|{e.id}"), e.id))
        return Choice(e.id, "session affinity")

    def record(self, request: RequestFeatures, choice: Choice) -> None:
        self.fallback.record(request, choice)

    def forget(self, endpoint: str) -> None:
        self.fallback.forget(endpoint)
