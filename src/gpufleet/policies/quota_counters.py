"""The quota arithmetic in memory, with time a parameter: windows, leases, budgets, settlement.

``QuotaCounters`` keeps, per scope, one bucket per second of the rolling window (requests and
tokens), the requests in flight, and the spend and reservations per budget period, and applies
``policies.quota_rules`` to them: ``admit`` checks every scope and only then reserves in all of
them, ``settle`` replaces a reservation by the actual use, ``snapshot`` reports. Every method that
depends on time takes ``now`` (seconds since the epoch; a budget period is a UTC calendar one),
and nothing awaits, so an admission is atomic for whoever calls it: the gateway's
``LocalQuotas`` on the wall clock, the simulator in virtual time.

A concurrency slot is a lease that expires ``lease_s`` after admission unless settled first (a
request whose settle never comes must not hold the slot forever); a ticket's corrections apply
once, within ``SETTLE_WINDOW_S``. In memory the counters die with their gateway, so the lease
only bounds a lost settle (``DEFAULT_LEASE_S``). The Lua scripts of ``gateway.quotas_redis``
implement the same rules on Redis's clock for gateways that share counters (a sorted set of
leases, hashes of buckets and periods, a marker per open ticket); there a gateway that dies
leaves its slots behind, so their leases are short (``SHARED_LEASE_S``) and renewed while the
request lives. The Redis integration tests mirror this module's and ``LocalQuotas``' tests case
by case.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpufleet.policies.quota_rules import (
    DEFAULT_LEASE_S,
    NANO,
    SETTLE_WINDOW_S,
    WINDOW_S,
    Demand,
    Limits,
    Period,
    Ticket,
    budget_period,
    counted_scopes,
    needs_settle_marker,
    quota_exceeded,
    to_nano,
    window_retry_after,
)

__all__ = ["QuotaCounters"]


@dataclass(slots=True)
class _Usage:
    """One scope's use: its window's buckets and their sums, its requests in flight, its spend."""

    buckets: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)
    """Second -> [requests, tokens], oldest first."""
    requests: int = 0
    tokens: int = 0
    in_flight: int = 0
    periods: dict[str, list[int]] = field(default_factory=dict)
    """Period key -> [spent, reserved, period end] in nano-dollars."""

    def roll(self, second: int) -> None:
        """Drop the buckets that have left the window ending at ``second``."""
        horizon = second - WINDOW_S
        while self.buckets:
            oldest = next(iter(self.buckets))
            if oldest > horizon:
                break
            requests, tokens = self.buckets.popitem(last=False)[1]
            self.requests -= requests
            self.tokens -= tokens

    def period(self, second: int, kind: Period) -> list[int]:
        """The budget period holding ``second``; periods past their settle window are dropped."""
        key, _, end = budget_period(second, kind)
        entry = self.periods.get(key)
        if entry is None:
            for old in [k for k, v in self.periods.items() if v[2] + SETTLE_WINDOW_S < second]:
                del self.periods[old]
            entry = self.periods[key] = [0, 0, end]
        return entry


class QuotaCounters:
    """Exact quotas over in-memory counters; every scope's use, every lease and open ticket."""

    def __init__(self, *, lease_s: float = DEFAULT_LEASE_S) -> None:
        self._lease_s = lease_s
        self._scopes: dict[str, _Usage] = {}
        #: Lease -> (expiry, the usages whose concurrency it holds), in admission order.
        self._leases: OrderedDict[str, tuple[float, list[_Usage]]] = OrderedDict()
        #: Lease -> until when its settle may still correct tokens and spend.
        self._open: OrderedDict[str, float] = OrderedDict()
        self._ids = itertools.count()

    def admit(
        self, request_id: str, scopes: Sequence[tuple[str, Limits]], demand: Demand, now: float
    ) -> Ticket:
        """Reserve ``demand`` at ``now`` in every scope with limits, or raise ``QuotaExceeded``
        for the first scope and limit that refuse it and change nothing."""
        counted = counted_scopes(scopes)
        cost = to_nano(demand.cost_usd)
        if not counted:
            return Ticket(request_id, request_id, (), 0, demand.tokens, cost)
        second = math.floor(now)
        self._expire(now)
        usages = []
        for scope, limits in counted:
            usage = self._scopes.get(scope)
            if usage is None:
                usage = self._scopes[scope] = _Usage()
            usage.roll(second)
            self._check(scope, limits, usage, demand.tokens, cost, now)
            usages.append(usage)
        # Every scope passed: take the reservation in all of them.
        lease = f"{request_id}#{next(self._ids)}"
        held = []
        for (_, limits), usage in zip(counted, usages, strict=True):
            if limits.rpm is not None or limits.tpm is not None:
                bucket = usage.buckets.get(second)
                if bucket is None:
                    bucket = usage.buckets[second] = [0, 0]
                if limits.rpm is not None:
                    bucket[0] += 1
                    usage.requests += 1
                if limits.tpm is not None:
                    bucket[1] += demand.tokens
                    usage.tokens += demand.tokens
            if limits.concurrency is not None:
                usage.in_flight += 1
                held.append(usage)
            if limits.budget_usd is not None:
                usage.period(second, limits.budget_period)[1] += cost
        if held:
            self._leases[lease] = (now + self._lease_s, held)
        if needs_settle_marker(counted):
            self._open[lease] = now + SETTLE_WINDOW_S
        return Ticket(request_id, lease, counted, second, demand.tokens, cost)

    @staticmethod
    def _check(
        scope: str, limits: Limits, usage: _Usage, tokens: int, cost: int, now: float
    ) -> None:
        if limits.concurrency is not None and usage.in_flight + 1 > limits.concurrency:
            raise quota_exceeded(scope, limits, "concurrency", usage.in_flight, 1, 1.0)
        if limits.rpm is not None and usage.requests + 1 > limits.rpm:
            buckets = ((s, b[0]) for s, b in usage.buckets.items())
            retry = window_retry_after(buckets, usage.requests, 1, limits.rpm, now)
            raise quota_exceeded(scope, limits, "rpm", usage.requests, 1, retry)
        if limits.tpm is not None and usage.tokens + tokens > limits.tpm:
            buckets = ((s, b[1]) for s, b in usage.buckets.items())
            retry = window_retry_after(buckets, usage.tokens, tokens, limits.tpm, now)
            raise quota_exceeded(scope, limits, "tpm", usage.tokens, tokens, retry)
        if limits.budget_usd is not None:
            spent, reserved, end = usage.period(math.floor(now), limits.budget_period)
            if spent + reserved + cost > to_nano(limits.budget_usd):
                raise quota_exceeded(scope, limits, "budget", spent + reserved, cost, end - now)

    def _expire(self, now: float) -> None:
        while self._leases:
            deadline, held = next(iter(self._leases.values()))
            if deadline > now:
                break
            self._leases.popitem(last=False)
            for usage in held:
                usage.in_flight -= 1
        while self._open and next(iter(self._open.values())) <= now:
            self._open.popitem(last=False)

    def settle(self, ticket: Ticket, *, tokens: int, cost_usd: float) -> None:
        """Replace ``ticket``'s reservation by the actual use and free its concurrency slot.

        Needs no ``now``: tokens correct the bucket of the admission second while it is still
        kept, spend the admission's budget period while it is kept (``SETTLE_WINDOW_S`` past
        its end). Settling twice, or after the ticket's ``SETTLE_WINDOW_S``, changes nothing.
        """
        if not ticket.scopes:
            return
        lease = self._leases.pop(ticket.lease, None)
        if lease is not None:
            for usage in lease[1]:
                usage.in_flight -= 1
        if self._open.pop(ticket.lease, None) is None:
            return  # settled already, or nothing to correct
        extra_tokens = tokens - ticket.tokens
        actual = to_nano(cost_usd)
        for scope, limits in ticket.scopes:
            usage = self._scopes[scope]
            bucket = usage.buckets.get(ticket.second)
            if limits.tpm is not None and bucket is not None:
                bucket[1] += extra_tokens
                usage.tokens += extra_tokens
            if limits.budget_usd is not None:
                key = budget_period(ticket.second, limits.budget_period)[0]
                entry = usage.periods.get(key)
                if entry is not None:
                    entry[0] += actual
                    entry[1] -= ticket.cost_nano

    def snapshot(self, scope: str, limits: Limits, now: float) -> dict[str, float]:
        """Use at ``now``: ``rpm``, ``tpm``, ``concurrency``, ``spent_usd``, ``reserved_usd``."""
        self._expire(now)
        usage = self._scopes.get(scope) or _Usage()
        usage.roll(math.floor(now))
        key = budget_period(math.floor(now), limits.budget_period)[0]
        spent, reserved, _ = usage.periods.get(key, (0, 0, 0))
        return {
            "rpm": usage.requests,
            "tpm": usage.tokens,
            "concurrency": usage.in_flight,
            "spent_usd": spent / NANO,
            "reserved_usd": reserved / NANO,
        }
