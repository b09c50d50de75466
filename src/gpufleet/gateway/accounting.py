"""Accounting: what one request used, charged once, whichever way it ends.

An admitted request gets a ``Charge``. If a deployment answers, the charge's finisher runs when
the answer is complete (at the end of a stream): it gives the queue slot back, prices the
replica time the request held, settles the quota reservation with what was used, counts the
metrics, tells the demand meter (TTFT for cost routing, answers per generation for canary
analysis) and writes the usage ledger row. If nothing answers (refused, failed, cancelled) the
reservation is settled at nothing; a request that reached an engine still gets its row (the
engine failed: 502; the caller went away: 499), one refused before any engine took it is only
counted in the ledger's daily refusals (a row each would let abuse grow the ledger). Metric
children are looked up once per (model, tenant, route): ``labels()`` costs microseconds each
time.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections.abc import Callable
from typing import Any

from gpufleet.controller import Directory, ModelEntry
from gpufleet.gateway.admission import Admission
from gpufleet.gateway.auth import Principal
from gpufleet.gateway.demand import DemandMeter
from gpufleet.gateway.dispatch import Release
from gpufleet.gateway.ledger import Ledger
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.pricing import Pricing
from gpufleet.gateway.proxy import Outcome
from gpufleet.gateway.quotas import Ticket
from gpufleet.store import UsageRow

__all__ = ["Accounting", "Charge"]


class _Series:
    """One (model, tenant, route)'s metric children, looked up once."""

    def __init__(self, metrics: GatewayMetrics, model: str, tenant: str, route: str) -> None:
        self._metrics, self._key = metrics, (model, tenant, route)
        self._requests: dict[int, Any] = {}
        self.duration = metrics.duration.labels(model, tenant, route)
        self.ttft = metrics.ttft.labels(model, tenant)
        self.prompt = metrics.tokens.labels(model, tenant, "prompt")
        self.completion = metrics.tokens.labels(model, tenant, "completion")
        self.cached = metrics.tokens.labels(model, tenant, "cached")
        self.cost = metrics.cost.labels(model, tenant)

    def requests(self, status: int) -> Any:
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = self._metrics.requests.labels(*self._key, str(status))
        return child


class Charge:
    """One admitted request's account."""

    __slots__ = (
        "_accounting",
        "ids",
        "opened",
        "principal",
        "prompt_estimate",
        "requested",
        "route",
        "target",
        "ticket",
    )

    def __init__(
        self,
        accounting: Accounting,
        principal: Principal,
        ticket: Ticket,
        route: str,
        requested: str,
        ids: tuple[str, str | None],
        prompt_estimate: int,
    ) -> None:
        self._accounting = accounting
        self.principal = principal
        self.ticket = ticket
        self.route = route
        #: The model the client named (the one its refusals are counted under).
        self.requested = requested
        #: The gateway's own request id (the ledger's key), and the client's when it sent one.
        self.ids = ids
        #: The gateway's count of prompt tokens, for an engine that reports no usage.
        self.prompt_estimate = prompt_estimate
        #: The deployment last handed the request (None: no engine was asked).
        self.target: ModelEntry | None = None
        self.opened = time.perf_counter()

    def finisher(self, entry: ModelEntry, release: Release) -> Callable[[Outcome], None]:
        """What ``entry``'s answer, once complete, is charged by (``proxy.Done``)."""
        self.target = entry
        return functools.partial(self._accounting.finish, self, entry, release)

    def refused(self, status: int, reason: str | None = None) -> None:
        """No deployment answered: the error the client gets is counted — in a ledger row
        when an engine had the request (it failed, ``engine_error``; or the caller went away,
        499), else among the day's refusals."""
        accounting = self._accounting
        accounting.metrics.requests.labels(
            self.requested, self.principal.tenant, self.route, str(status)
        ).inc()
        if self.target is not None and (reason == "engine_error" or status == 499):
            accounting.failed(self, self.target, status)
        else:
            accounting.refused(self.principal, self.requested, status, reason)

    def void(self) -> None:
        """Nothing was answered: the reservation is given back whole."""
        self._accounting.admission.settle(self.ticket, 0, 0.0)


class Accounting:
    def __init__(
        self,
        directory: Directory,
        metrics: GatewayMetrics,
        pricing: Pricing,
        demand: DemandMeter,
        admission: Admission,
        ledger: Ledger | None,
    ) -> None:
        self._directory = directory
        self.metrics = metrics
        self.admission = admission
        self._pricing = pricing
        self._demand = demand
        #: None: no usage rows are written.
        self._ledger = ledger
        self._series: dict[tuple[str, str, str], _Series] = {}

    def open(
        self,
        principal: Principal,
        ticket: Ticket,
        route: str,
        requested: str,
        ids: tuple[str, str | None],
        prompt_estimate: int,
    ) -> Charge:
        return Charge(self, principal, ticket, route, requested, ids, prompt_estimate)

    def refused(
        self, principal: Principal | None, model: str, status: int, reason: str | None
    ) -> None:
        """A request refused before any engine had it: counted per day, tenant, key, model
        (empty unless it is one served here: names a client made up would grow the counts),
        status and reason."""
        if self._ledger is None:
            return
        tenant, key = ("", "") if principal is None else (principal.tenant, principal.key_prefix)
        known = model if self._directory.get(model) is not None else ""
        day = dt.datetime.now(dt.UTC).date()
        self._ledger.refuse((day, tenant, key, known, status, reason or f"http_{status}"))

    def failed(self, charge: Charge, entry: ModelEntry, status: int) -> None:
        """``entry`` had the request but gave no answer: its row, with the failure's status."""
        if self._ledger is None:
            return
        self._ledger.record(
            UsageRow(
                request_id=charge.ids[0],
                client_request_id=charge.ids[1],
                at=dt.datetime.now(dt.UTC),
                tenant=charge.principal.tenant,
                key_prefix=charge.principal.key_prefix,
                model=entry.name,
                replica="",
                route=charge.route.removeprefix("/v1/"),
                status=status,
                prompt_tokens=0,
                cached_tokens=0,
                completion_tokens=0,
                ttft_ms=None,
                duration_ms=(time.perf_counter() - charge.opened) * 1000,
                gpu_seconds=0.0,
                cost_usd=0.0,
            )
        )

    def engine_error(self, model: str, replica_id: str, status: int) -> None:
        """An engine failed (``Upstream.on_engine_error``): counted for a canary's analysis,
        even when another replica then answered."""
        entry = self._directory.get(model)
        if entry is not None and entry.canary is not None:
            self._demand.outcome(model, replica_id, status, None)

    def finish(self, charge: Charge, entry: ModelEntry, release: Release, outcome: Outcome) -> None:
        """``entry`` answered ``charge``'s request: the slot back, then price, quota,
        metrics, demand and the ledger."""
        release()
        principal = charge.principal
        model, tenant, route = entry.name, principal.tenant, charge.route
        prompt = outcome.prompt_tokens if outcome.counted else charge.prompt_estimate
        completion = outcome.completion_tokens
        cost = outcome.replica_seconds * self._pricing.per_second(entry)
        self._pricing.observe(entry, outcome.replica_seconds, prompt + completion)
        self.admission.settle(charge.ticket, prompt + completion, cost)
        m = self._series.get((model, tenant, route))
        if m is None:
            m = self._series[(model, tenant, route)] = _Series(self.metrics, model, tenant, route)
        m.requests(outcome.status).inc()
        m.duration.observe(outcome.duration_s)
        if outcome.ttft_s is not None:
            m.ttft.observe(outcome.ttft_s)
            self._demand.first_token(model, outcome.ttft_s)
        if entry.canary is not None:
            self._demand.outcome(model, outcome.replica, outcome.status, outcome.ttft_s)
        m.prompt.inc(prompt)
        m.completion.inc(completion)
        if outcome.cached_tokens:
            m.cached.inc(outcome.cached_tokens)
        if cost:
            m.cost.inc(cost)
        if self._ledger is not None:
            self._ledger.record(
                UsageRow(
                    request_id=charge.ids[0],
                    client_request_id=charge.ids[1],
                    at=dt.datetime.now(dt.UTC),
                    tenant=tenant,
                    key_prefix=principal.key_prefix,
                    model=model,
                    replica=outcome.replica,
                    route=route.removeprefix("/v1/"),
                    status=outcome.status,
                    prompt_tokens=prompt,
                    cached_tokens=outcome.cached_tokens,
                    completion_tokens=completion,
                    ttft_ms=outcome.ttft_s * 1000 if outcome.ttft_s is not None else None,
                    duration_ms=outcome.duration_s * 1000,
                    gpu_seconds=outcome.replica_seconds * entry.spec.resources.gpus,
                    cost_usd=cost,
                )
            )
