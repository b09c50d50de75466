"""The rules of the quotas: limits, demands, tickets, budget periods, retry delays, messages.

A request is admitted against several scopes at once — its tenant and its API key — and either
every scope takes it or none does. Admission *reserves*: one request slot, the tokens it may use
(prompt estimate plus ``max_tokens``), a concurrency slot and an upper estimate of its cost; settle
replaces the reservation by what the request really used. Checking spend without reserving is how
LiteLLM overshoots a budget: a hundred requests admitted in the same instant all see the old
spend. Here the check and the increment are one atomic step, so ``n`` concurrent admissions of
cost ``c`` against budget ``B`` admit exactly ``floor(B / c)``.

Windows are rolling and exact to one second: per scope, one bucket per second for requests and for
tokens; a request counts in the bucket of its admission second and the window is the last 60
buckets (a bucket leaves it ``WINDOW_S`` seconds after its second began). Money is counted in
integer nano-dollars so that sums are exact (in floats ``0.1 + 0.2 > 0.3``, which would refuse a
request that fits); budgets stay exact up to 2**53 nano-dollars, about nine million dollars per
scope and period. Budgets are per UTC calendar day, ISO week (Monday to Sunday) or month. The
checks run in a fixed order per scope — concurrency, requests, tokens, budget — and the first
that fails names the limit and when to retry: a concurrency slot in 1 s, a window when enough of
its oldest buckets have left it, a budget at the end of its period.

These are values and pure functions shared by both implementations of the arithmetic:
``policies.quota_counters`` (in memory, ``now`` passed in; the gateway's ``LocalQuotas`` and the
simulator) and the Lua scripts of ``gateway.quotas_redis``, which implement the same rules on
Redis's clock and use this module for their limits, retry delays and messages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal, get_args

from gpufleet.errors import TemporaryError
from gpufleet.spec import LimitsSpec

__all__ = [
    "DEFAULT_LEASE_S",
    "NANO",
    "SETTLE_WINDOW_S",
    "SHARED_LEASE_S",
    "WINDOW_S",
    "Demand",
    "LimitName",
    "Limits",
    "Period",
    "QuotaExceeded",
    "Ticket",
    "budget_period",
    "counted_scopes",
    "limits_of",
    "needs_settle_marker",
    "quota_exceeded",
    "to_nano",
    "window_retry_after",
]

Period = Literal["day", "week", "month"]
LimitName = Literal["rpm", "tpm", "concurrency", "budget"]

#: The rolling window of ``rpm`` and ``tpm``, in one-second buckets.
WINDOW_S = 60
#: How long a ticket may wait for its settle and still correct tokens and spend.
SETTLE_WINDOW_S = 86_400
#: In process (``QuotaCounters``, ``LocalQuotas``) a concurrency slot not settled within this
#: time is released. The counters die with their gateway, so nothing there outlives a crash:
#: this only bounds a settle that never comes, and must outlast the longest request.
DEFAULT_LEASE_S = 900.0
#: In a store shared by gateways (Redis) a concurrency slot lives this long unless the gateway
#: that took it renews it, which it does every third of it while the request is in flight: a
#: SIGKILLed gateway, a deleted pod, a dead node never settle their requests, and their slots
#: free within this time instead of locking the tenant out (900 s leases did, 1,771 refusals
#: in a minute after a restart). Long enough that a Redis away for up to 20 s (a restart, a
#: failover) costs no running request its slot; short enough that a dead gateway's tenants wait
#: half a minute at most.
SHARED_LEASE_S = 30.0
#: Nano-dollars per dollar.
NANO = 1_000_000_000
_EPOCH = date(1970, 1, 1)


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    """Requests per rolling minute."""
    tpm: int | None = None
    """Tokens per rolling minute, reserved at admission and corrected at settle."""
    concurrency: int | None = None
    """Requests in flight."""
    budget_usd: float | None = None
    """Spend per ``budget_period``."""
    budget_period: Period = "month"

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "concurrency"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be zero or more, not {value}")
        if self.budget_usd is not None and not 0 <= self.budget_usd < math.inf:
            raise ValueError(f"budget_usd must be a finite amount ≥ 0, not {self.budget_usd}")
        if self.budget_period not in get_args(Period):
            raise ValueError(
                f"budget_period must be day, week or month, not {self.budget_period!r}"
            )

    def empty(self) -> bool:
        """No limit set: the scope is not counted at all."""
        return (
            self.rpm is None
            and self.tpm is None
            and self.concurrency is None
            and self.budget_usd is None
        )


def limits_of(spec: LimitsSpec | None) -> Limits:
    """A tenant's or a key's ``limits`` field as the limits counted."""
    if spec is None:
        return Limits()
    return Limits(
        rpm=spec.requests_per_minute,
        tpm=spec.tokens_per_minute,
        concurrency=spec.concurrency,
        budget_usd=spec.budget.usd if spec.budget else None,
        budget_period=spec.budget.period if spec.budget else "month",
    )


@dataclass(frozen=True, slots=True)
class Demand:
    tokens: int
    """Prompt estimate plus ``max_tokens``: the most the request can use."""
    cost_usd: float
    """An upper estimate of the request's cost."""

    def __post_init__(self) -> None:
        if self.tokens < 0 or not 0 <= self.cost_usd < math.inf:
            raise ValueError(f"a demand is non-negative and finite, not {self}")


@dataclass(frozen=True, slots=True)
class Ticket:
    """What admission returns and settle needs."""

    request_id: str
    lease: str
    """Unique per admission: the member of the concurrency sets and the settle marker's name."""
    scopes: tuple[tuple[str, Limits], ...]
    """The counted scopes (those with limits), with the limits in force at admission."""
    second: int
    """Admission second on the store's clock: the bucket of the reservation, and its period."""
    tokens: int
    """Tokens reserved."""
    cost_nano: int
    """Cost reserved, in nano-dollars."""

    @property
    def cost_usd(self) -> float:
        return self.cost_nano / NANO


class QuotaExceeded(TemporaryError):
    """A scope is over one of its limits; ``str(exc)`` is the sentence to show the client."""

    def __init__(self, scope: str, limit: LimitName, retry_after_s: float, message: str) -> None:
        super().__init__(message, retry_after=retry_after_s)
        self.scope = scope
        self.limit: LimitName = limit
        self.retry_after_s = retry_after_s


def budget_period(second: int, period: Period) -> tuple[str, int, int]:
    """The UTC calendar period holding ``second``: its key, first second and end (exclusive)."""
    day = second // 86_400
    if period == "day":
        return f"d{day}", day * 86_400, (day + 1) * 86_400
    if period == "week":
        monday = day - (day + 3) % 7  # 1970-01-01 was a Thursday
        return f"w{monday}", monday * 86_400, (monday + 7) * 86_400
    today = _EPOCH + timedelta(days=day)
    first = today.replace(day=1)
    following = date(today.year + today.month // 12, today.month % 12 + 1, 1)
    return (
        f"m{today.year * 12 + today.month - 1}",
        (first - _EPOCH).days * 86_400,
        (following - _EPOCH).days * 86_400,
    )


def window_retry_after(
    buckets: Iterable[tuple[int, int]], used: int, need: int, limit: int, now: float
) -> float:
    """Seconds until enough of the window's ``(second, amount)`` buckets expire to fit ``need``."""
    if need > limit:
        return float(WINDOW_S)  # never fits; the message says so
    excess = used + need - limit
    for second, amount in sorted(buckets):
        excess -= amount
        if excess <= 0:
            return max(0.0, second + WINDOW_S - now)
    return float(WINDOW_S)


def _who(scope: str) -> str:
    kind, sep, name = scope.partition(":")
    return f"{kind} '{name}'" if sep else f"scope '{scope}'"


def _wait(seconds: float) -> str:
    s = max(1, math.ceil(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7_200:
        return f"{math.ceil(s / 60)} min"
    if s < 172_800:
        return f"{math.ceil(s / 3_600)} h"
    return f"{math.ceil(s / 86_400)} days"


def quota_exceeded(
    scope: str, limits: Limits, limit: LimitName, used: int, need: int, retry_after_s: float
) -> QuotaExceeded:
    """The error for ``scope`` failing ``limit``; ``used`` and ``need`` in the limit's unit."""
    who = _who(scope)
    if limit == "concurrency":
        text = f"{who} already has {used} requests in flight, its limit of {limits.concurrency}"
    elif limit == "rpm":
        text = f"{who} is over its limit of {limits.rpm} requests per minute"
    elif limit == "tpm" and need > (limits.tpm or 0):
        text = (
            f"{who} allows {limits.tpm} tokens per minute and this request reserves {need} "
            "(prompt plus max_tokens); lower max_tokens or shorten the prompt"
        )
        return QuotaExceeded(scope, limit, retry_after_s, text)
    elif limit == "tpm":
        text = (
            f"{who} is over its limit of {limits.tpm} tokens per minute "
            f"({used} used, this request reserves {need})"
        )
    else:
        budget = f"${limits.budget_usd or 0.0:,.2f} per {limits.budget_period}"
        left = to_nano(limits.budget_usd or 0.0) - used
        if need > to_nano(limits.budget_usd or 0.0):
            text = (
                f"this request may cost up to ${need / NANO:,.4f}, more than the whole budget "
                f"of {who} ({budget}); lower max_tokens"
            )
            return QuotaExceeded(scope, limit, retry_after_s, text)
        if left > 0:
            text = (
                f"{who} has ${left / NANO:,.2f} left of its budget of {budget} (counting requests "
                f"in flight) and this request may cost up to ${need / NANO:,.4f}"
            )
        else:
            text = f"{who} has used its budget of {budget}"
    return QuotaExceeded(scope, limit, retry_after_s, f"{text}; retry in {_wait(retry_after_s)}")


def to_nano(usd: float) -> int:
    """Dollars as the integer nano-dollars every sum and comparison uses."""
    return round(usd * NANO)


def counted_scopes(scopes: Sequence[tuple[str, Limits]]) -> tuple[tuple[str, Limits], ...]:
    """Scopes with limits, each once (the first limits given for a repeated scope win)."""
    seen: dict[str, Limits] = {}
    for scope, limits in scopes:
        if scope not in seen and not limits.empty():
            seen[scope] = limits
    return tuple(seen.items())


def needs_settle_marker(scopes: Iterable[tuple[str, Limits]]) -> bool:
    """Whether settle has anything to correct beyond freeing the concurrency slot."""
    return any(lim.tpm is not None or lim.budget_usd is not None for _, lim in scopes)
