"""Per-scope quotas (requests, tokens, concurrency, spend) admitted all-or-nothing, never overshot.

A request is admitted against its tenant and its API key at once, reserving its request, tokens,
concurrency slot and an upper estimate of its cost; settle replaces the reservation by what it
really used. The rules — rolling one-second windows, nano-dollar budgets per UTC period, leases,
retry delays and messages — are ``gpufleet.policies.quota_rules``'s, and the arithmetic over
in-memory counters is ``gpufleet.policies.quota_counters``'s, pure code the simulator runs in
virtual time. This module is what the gateway sees: the ``Quotas`` protocol and its backends.

``LocalQuotas`` keeps the counters in process (embedded mode, one gateway): it hands the pure
counters the wall clock, and admission has no ``await`` between check and increment, so it is
atomic under asyncio. ``RedisQuotas`` (``gateway.quotas_redis``) serves several gateway
replicas: one Lua script per admission checks every scope and then increments all of them, one
per settle; the scripts implement the same rules on Redis's clock (``TIME``) so replicas agree
on seconds and periods. If Redis cannot be reached, admission fails closed with
``QuotaStoreUnavailable`` (the gateway answers 503): quotas that silently stop applying would be
worse than a short outage. Scopes with no limits cost nothing in either backend. Settlements
Redis cannot take are retried until it does, from memory and — given a journal in the gateway's
local durable directory — from disk after a restart (``start`` resends them). Concurrency slots
in Redis are short leases the gateway renews while their requests run (from ``start`` to
``close``), so those of a gateway that dies without settling free themselves within a lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from gpufleet.errors import TemporaryError
from gpufleet.policies.quota_counters import QuotaCounters
from gpufleet.policies.quota_rules import (
    DEFAULT_LEASE_S,
    SHARED_LEASE_S,
    Demand,
    LimitName,
    Limits,
    Period,
    QuotaExceeded,
    Ticket,
    budget_period,
    window_retry_after,
)

__all__ = [
    "Demand",
    "LimitName",
    "Limits",
    "LocalQuotas",
    "Period",
    "QuotaExceeded",
    "QuotaStoreUnavailable",
    "Quotas",
    "Ticket",
    "budget_period",
    "make_quotas",
    "window_retry_after",
]


class QuotaStoreUnavailable(TemporaryError):
    """The shared quota store cannot be reached: refuse (503) rather than admit unchecked."""


class Quotas(Protocol):
    async def start(self) -> None:
        """Resume what a previous process left (settlements it could not land) and begin
        renewing the leases of this process's requests in flight."""
        ...

    async def admit(
        self, request_id: str, scopes: Sequence[tuple[str, Limits]], demand: Demand
    ) -> Ticket:
        """Reserve ``demand`` in every scope, or raise ``QuotaExceeded`` and change nothing."""
        ...

    async def settle(self, ticket: Ticket, *, tokens: int, cost_usd: float) -> None:
        """Replace the reservation by the actual use and free the slot; idempotent per ticket.
        A shared store that cannot take it now gets it later: a settlement is never dropped
        for an outage."""
        ...

    async def snapshot(self, scope: str, limits: Limits) -> dict[str, float]:
        """Current use: ``rpm``, ``tpm``, ``concurrency``, ``spent_usd``, ``reserved_usd``."""
        ...

    async def close(self) -> None: ...


class LocalQuotas:
    """Exact quotas for one gateway process: ``QuotaCounters`` on ``clock``, wall time in
    seconds (a test passes a fake one)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, lease_s: float = DEFAULT_LEASE_S
    ) -> None:
        self._clock = clock
        self._counters = QuotaCounters(lease_s=lease_s)

    async def start(self) -> None:
        return None

    async def admit(
        self, request_id: str, scopes: Sequence[tuple[str, Limits]], demand: Demand
    ) -> Ticket:
        return self._counters.admit(request_id, scopes, demand, self._clock())

    async def settle(self, ticket: Ticket, *, tokens: int, cost_usd: float) -> None:
        self._counters.settle(ticket, tokens=tokens, cost_usd=cost_usd)

    def settle_now(self, ticket: Ticket, *, tokens: int, cost_usd: float) -> None:
        """``settle`` without a coroutine: in process nothing waits, so the gateway settles
        inline instead of scheduling a task per request."""
        self._counters.settle(ticket, tokens=tokens, cost_usd=cost_usd)

    async def snapshot(self, scope: str, limits: Limits) -> dict[str, float]:
        return self._counters.snapshot(scope, limits, self._clock())

    async def close(self) -> None:
        return None


def make_quotas(
    redis_url: str | None,
    *,
    timeout_s: float = 1.0,
    journal: Path | None = None,
    lease_s: float = SHARED_LEASE_S,
) -> Quotas:
    """Redis-backed quotas when several gateways share a Redis, in-process ones otherwise.
    ``journal``: where Redis's quotas keep settlements across a restart (a file in a directory
    this process owns); ``lease_s``: how long a slot of theirs outlives a gateway that died
    (in process nothing outlives it, and the lease stays ``DEFAULT_LEASE_S``)."""
    if not redis_url:
        return LocalQuotas()
    from gpufleet.gateway.quotas_redis import RedisQuotas

    return RedisQuotas(redis_url, timeout_s=timeout_s, journal=journal, lease_s=lease_s)
