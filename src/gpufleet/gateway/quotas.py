"""Per-scope quotas (requests, tokens, concurrency, spend) admitted all-or-nothing, never overshot.

A request is admitted against several scopes at once — its tenant and its API key — and either
every scope takes it or none does. Admission *reserves*: one request slot, the tokens it may use
(prompt estimate plus ``max_tokens``), a concurrency slot and an upper estimate of its cost; settle
replaces the reservation by what the request really used. Checking spend without reserving is how
LiteLLM overshoots a budget: a hundred requests admitted in the same instant all see the old
spend. Here the check and the increment are one atomic step, so ``n`` concurrent admissions of
cost ``c`` against budget ``B`` admit exactly ``floor(B / c)``.

Windows are rolling and exact to one second: per scope, one bucket per second for requests and for
tokens; a request counts in the bucket of its admission second and the window is the last 60
buckets. Money is counted in integer nano-dollars so that sums are exact (in floats ``0.1 + 0.2 >
0.3``, which would refuse a request that fits); budgets stay exact up to 2**53 nano-dollars, about
nine million dollars per scope and period. Budgets are per UTC calendar day, ISO week (Monday to
Sunday) or month.

Two backends. ``LocalQuotas`` keeps the counters in process (embedded mode, one gateway): admission
has no ``await`` between check and increment, so it is atomic under asyncio. ``RedisQuotas`` serves
several gateway replicas: one Lua script per admission checks every scope and then increments all
of them, one per settle; the scripts read Redis's clock (``TIME``) so replicas agree on seconds and
periods. A gateway that dies mid-request must not hold a concurrency slot forever, so in-flight
requests are members of a sorted set scored by a lease expiry (15 minutes by default) and expired
members are dropped at each admission. The corrections settle makes are applied at most once per
admission (a marker key records that a ticket is still open), so settling twice changes nothing.
If Redis cannot be reached, admission fails closed with ``QuotaStoreUnavailable`` (the gateway
answers 503): quotas that silently stop applying would be worse than a short outage.

All keys a script touches are passed in ``KEYS``; with Redis Cluster, give a namespace with a hash
tag (``"{gpufleet:quota}"``) so they share one slot. Scopes with no limits cost nothing: a request
whose scopes are all unlimited is admitted without touching Redis.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Literal, Protocol, get_args

from gpufleet.errors import TemporaryError

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

Period = Literal["day", "week", "month"]
LimitName = Literal["rpm", "tpm", "concurrency", "budget"]

#: The rolling window of ``rpm`` and ``tpm``, in one-second buckets.
WINDOW_S = 60
#: How long a ticket may wait for its settle and still correct tokens and spend.
SETTLE_WINDOW_S = 86_400
#: A concurrency slot not settled within this time is released (its gateway presumably died).
DEFAULT_LEASE_S = 900.0
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


class QuotaStoreUnavailable(TemporaryError):
    """The shared quota store cannot be reached: refuse (503) rather than admit unchecked."""


class Quotas(Protocol):
    async def admit(
        self, request_id: str, scopes: Sequence[tuple[str, Limits]], demand: Demand
    ) -> Ticket:
        """Reserve ``demand`` in every scope, or raise ``QuotaExceeded`` and change nothing."""
        ...

    async def settle(self, ticket: Ticket, *, tokens: int, cost_usd: float) -> None:
        """Replace the reservation by the actual use and free the slot; idempotent per ticket."""
        ...

    async def snapshot(self, scope: str, limits: Limits) -> dict[str, float]:
        """Current use: ``rpm``, ``tpm``, ``concurrency``, ``spent_usd``, ``reserved_usd``."""
        ...

    async def close(self) -> None: ...


# The pure core: periods, retry delays and messages, shared by both backends.


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


def _exceeded(
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
        left = _nano(limits.budget_usd or 0.0) - used
        if need > _nano(limits.budget_usd or 0.0):
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


def _nano(usd: float) -> int:
    return round(usd * NANO)


def _counted(scopes: Sequence[tuple[str, Limits]]) -> tuple[tuple[str, Limits], ...]:
    """Scopes with limits, each once (the first limits given for a repeated scope win)."""
    seen: dict[str, Limits] = {}
    for scope, limits in scopes:
        if scope not in seen and not limits.empty():
            seen[scope] = limits
    return tuple(seen.items())


def _needs_marker(scopes: Iterable[tuple[str, Limits]]) -> bool:
    """Whether settle has anything to correct beyond freeing the concurrency slot."""
    return any(lim.tpm is not None or lim.budget_usd is not None for _, lim in scopes)


# In-process backend.


@dataclass(slots=True)
class _Usage:
    buckets: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)
    """Second -> [requests, tokens], oldest first."""
    requests: int = 0
    tokens: int = 0
    in_flight: int = 0
    periods: dict[str, list[int]] = field(default_factory=dict)
    """Period key -> [spent, reserved, period end] in nano-dollars."""

    def roll(self, second: int) -> None:
        horizon = second - WINDOW_S
        while self.buckets:
            oldest = next(iter(self.buckets))
            if oldest > horizon:
                break
            requests, tokens = self.buckets.popitem(last=False)[1]
            self.requests -= requests
            self.tokens -= tokens

    def period(self, second: int, kind: Period) -> list[int]:
        key, _, end = budget_period(second, kind)
        entry = self.periods.get(key)
        if entry is None:
            for old in [k for k, v in self.periods.items() if v[2] + SETTLE_WINDOW_S < second]:
                del self.periods[old]
            entry = self.periods[key] = [0, 0, end]
        return entry


class LocalQuotas:
    """Exact quotas for one gateway process; ``clock`` is wall time in seconds (for tests)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, lease_s: float = DEFAULT_LEASE_S
    ) -> None:
        self._clock = clock
        self._lease_s = lease_s
        self._scopes: dict[str, _Usage] = {}
        self._leases: OrderedDict[str, tuple[float, list[_Usage]]] = OrderedDict()
        self._open: OrderedDict[str, float] = OrderedDict()
        self._ids = itertools.count()

    async def admit(
        self, request_id: str, scopes: Sequence[tuple[str, Limits]], demand: Demand
    ) -> Ticket:
        counted = _counted(scopes)
        cost = _nano(demand.cost_usd)
        if not counted:
            return Ticket(request_id, request_id, (), 0, demand.tokens, cost)
        now = self._clock()
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
        # Every scope passed and nothing awaited since the checks: take the reservation.
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
        if _needs_marker(counted):
            self._open[lease] = now + SETTLE_WINDOW_S
        return Ticket(request_id, lease, counted, second, demand.tokens, cost)

    @staticmethod
    def _check(
        scope: str, limits: Limits, usage: _Usage, tokens: int, cost: int, now: float
    ) -> None:
        if limits.concurrency is not None and usage.in_flight + 1 > limits.concurrency:
            raise _exceeded(scope, limits, "concurrency", usage.in_flight, 1, 1.0)
        if limits.rpm is not None and usage.requests + 1 > limits.rpm:
            buckets = ((s, b[0]) for s, b in usage.buckets.items())
            retry = window_retry_after(buckets, usage.requests, 1, limits.rpm, now)
            raise _exceeded(scope, limits, "rpm", usage.requests, 1, retry)
        if limits.tpm is not None and usage.tokens + tokens > limits.tpm:
            buckets = ((s, b[1]) for s, b in usage.buckets.items())
            retry = window_retry_after(buckets, usage.tokens, tokens, limits.tpm, now)
            raise _exceeded(scope, limits, "tpm", usage.tokens, tokens, retry)
        if limits.budget_usd is not None:
            spent, reserved, end = usage.period(math.floor(now), limits.budget_period)
            if spent + reserved + cost > _nano(limits.budget_usd):
                raise _exceeded(scope, limits, "budget", spent + reserved, cost, end - now)

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

    async def settle(self, ticket: Ticket, *, tokens: int, cost_usd: float) -> None:
        self.settle_now(ticket, tokens=tokens, cost_usd=cost_usd)

    def settle_now(self, ticket: Ticket, *, tokens: int, cost_usd: float) -> None:
        """``settle`` without a coroutine: in process nothing waits, so the gateway settles
        inline instead of scheduling a task per request."""
        if not ticket.scopes:
            return
        lease = self._leases.pop(ticket.lease, None)
        if lease is not None:
            for usage in lease[1]:
                usage.in_flight -= 1
        if self._open.pop(ticket.lease, None) is None:
            return  # settled already, or nothing to correct
        extra_tokens = tokens - ticket.tokens
        actual = _nano(cost_usd)
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

    async def snapshot(self, scope: str, limits: Limits) -> dict[str, float]:
        now = self._clock()
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

    async def close(self) -> None:
        return None


def make_quotas(redis_url: str | None) -> Quotas:
    """Redis-backed quotas when several gateways share a Redis, in-process ones otherwise."""
    if not redis_url:
        return LocalQuotas()
    from gpufleet.gateway.quotas_redis import RedisQuotas

    return RedisQuotas(redis_url)
