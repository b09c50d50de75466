"""Accounting: what one request used, charged once, whichever way it ends.

An admitted request gets a ``Charge``. If a deployment answers, the charge's finisher runs when
the answer is complete (at the end of a stream): it gives the queue slot back, prices the
replica time the request held, settles the quota reservation with what was used, counts the
metrics, tells the demand meter (TTFT for cost routing, answers per generation for canary
analysis) and writes the usage ledger row. If nothing answers (refused, failed, cancelled) the
reservation is settled at what the caller owes (nothing, unless it went away: ``billed``); a
request that reached an engine still gets its row (the engine failed: 502; the caller went
away: 499; its engine died and none came back within the hold: 503), one refused before any
engine took it is only counted in the ledger's daily refusals (a row each would let abuse grow
the ledger).

Every request an engine had gets exactly one row, whatever its outcome: the replica that had
it last and the GPU time it held on every replica that had it (``gpu_seconds``: replica-seconds
× the model's GPUs, attempts that gave no answer included), so the fleet's GPU time adds up;
what the tenant pays of it is ``billed``'s rule. A row also says whether the request left the
company (``external``: it was sent to a ``location: external`` endpoint, the one that answered or
one tried before) and whether its token counts are the gateway's estimate (``estimated``: the
engine reported no usage and its tokenizer could not count the stream), so no estimate is shown
as a count. Metric children are looked up once per (model, tenant, route): ``labels()`` costs
microseconds each time.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from gpufleet.controller import Directory, ModelEntry
from gpufleet.gateway.admission import Admission
from gpufleet.gateway.auth import Principal
from gpufleet.gateway.demand import DemandMeter
from gpufleet.gateway.dispatch import Release
from gpufleet.gateway.ledger import Ledger
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.proxy import Done, Outcome
from gpufleet.gateway.quotas import Ticket
from gpufleet.policies.pricing import Pricing
from gpufleet.store import UsageRow

__all__ = ["Accounting", "Charge", "billed"]


def billed(status: int, cost: float) -> float:
    """What the tenant pays of ``cost``, the price of the replica time a request held, given
    the status it ended with: nothing for a 5xx — the fleet failed it (the engine failed or
    broke the stream, or no replica came back in time) and its GPU time is still recorded in
    the row's ``gpu_seconds``; all of it otherwise — a caller that went away (499) pays for
    what it used, and its tokens so far are counted."""
    return 0.0 if status >= 500 else cost


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
        self.gpu_seconds = metrics.gpu_seconds.labels(model, tenant)

    def requests(self, status: int) -> Any:
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = self._metrics.requests.labels(*self._key, str(status))
        return child


class Charge:
    """One admitted request's account."""

    __slots__ = (
        "_accounting",
        "external",
        "gpu_seconds",
        "held",
        "ids",
        "opened",
        "owed",
        "principal",
        "prompt_estimate",
        "replica",
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
        #: What replicas that had the request and gave no answer spent: the deployment and
        #: replica of the last, the GPU-seconds of all, and what the caller owes of their price.
        self.held: ModelEntry | None = None
        self.replica = ""
        self.gpu_seconds = 0.0
        self.owed = 0.0
        #: A replica that gave no answer was an endpoint outside the company: the request left.
        self.external = False
        self.opened = time.perf_counter()

    def finisher(self, entry: ModelEntry, release: Release) -> Done:
        """What ``entry``'s answer, once complete, is charged by, and what its replicas that
        gave no answer spent is added to (``proxy.Done``)."""
        self.target = entry
        return _Finisher(self._accounting, self, entry, release)

    def refused(self, status: int, reason: str | None = None) -> None:
        """No deployment answered: the error the client gets is counted — in a ledger row
        when an engine had the request (it failed, ``engine_error``; the caller went away,
        499; its engine died under it and none came back in time), else among the day's
        refusals."""
        accounting = self._accounting
        accounting.metrics.requests.labels(
            self.requested, self.principal.tenant, self.route, str(status)
        ).inc()
        target = self.held or self.target
        if target is not None and (
            reason == "engine_error" or status == 499 or self.held is not None
        ):
            accounting.failed(self, target, status)
        else:
            accounting.refused(self.principal, self.requested, status, reason)

    def void(self) -> None:
        """Nothing was answered: the reservation is settled at what the caller owes (nothing,
        unless it went away while an engine had the request: ``billed``)."""
        self._accounting.admission.settle(self.ticket, 0, self.owed)


class _Finisher:
    """One deployment's ``proxy.Done`` for a charge: its answer finishes the charge; what its
    replicas spent without answering is added to it."""

    __slots__ = ("_accounting", "_charge", "_entry", "_release")

    def __init__(
        self, accounting: Accounting, charge: Charge, entry: ModelEntry, release: Release
    ) -> None:
        self._accounting, self._charge, self._entry = accounting, charge, entry
        self._release = release

    def __call__(self, outcome: Outcome) -> None:
        self._accounting.finish(self._charge, self._entry, self._release, outcome)

    def spent(self, attempt: Outcome) -> None:
        self._accounting.spent(self._charge, self._entry, attempt)


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

    def spent(self, charge: Charge, entry: ModelEntry, attempt: Outcome) -> None:
        """A replica of ``entry`` had ``charge``'s request and gave no answer (``attempt``: its
        id, how it ended, the replica-seconds it held): its GPU time goes into the request's
        row, and its price into what the caller owes if it is ``billed`` (it went away)."""
        charge.held, charge.replica = entry, attempt.replica
        charge.external = charge.external or attempt.external
        pool = entry.spec.pool("prefill" if attempt.pool == "prefill" else "decode")
        charge.gpu_seconds += attempt.replica_seconds * pool.resources.gpus
        charge.owed += billed(
            attempt.status, attempt.replica_seconds * self._pricing.per_second_of(pool)
        )

    def failed(self, charge: Charge, entry: ModelEntry, status: int) -> None:
        """``entry`` had the request but gave no answer: its row, with the failure's status,
        the replica that had it last and the GPU time it held (what the caller owes: only
        when it went away, ``billed``)."""
        if charge.owed:
            self.metrics.cost.labels(entry.name, charge.principal.tenant).inc(charge.owed)
        if charge.gpu_seconds:
            tenant = charge.principal.tenant
            self.metrics.gpu_seconds.labels(entry.name, tenant).inc(charge.gpu_seconds)
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
                replica=charge.replica,
                route=charge.route.removeprefix("/v1/"),
                status=status,
                prompt_tokens=0,
                cached_tokens=0,
                completion_tokens=0,
                ttft_ms=None,
                duration_ms=(time.perf_counter() - charge.opened) * 1000,
                gpu_seconds=charge.gpu_seconds,
                cost_usd=charge.owed,
                external=charge.external,
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
        metrics, demand and the ledger. The row's GPU time includes what replicas that gave no
        answer before spent; the tenant pays what ``billed`` says of this answer's price."""
        release()
        principal = charge.principal
        model, tenant, route = entry.name, principal.tenant, charge.route
        prompt = outcome.prompt_tokens if outcome.counted else charge.prompt_estimate
        completion = outcome.completion_tokens
        # A disaggregated model's pools may run on different GPUs (``ModelSpec.pool``; a model
        # that is not disaggregated is its own pool).
        decode, prefill_pool = entry.spec.pool("decode"), entry.spec.pool("prefill")
        per_token = self._pricing.charge(entry.spec, prompt, completion)
        if per_token is not None:  # an external endpoint: its price list, not replica time
            price = per_token
        else:
            price = outcome.replica_seconds * self._pricing.per_second_of(decode)
            price += outcome.prefill_seconds * self._pricing.per_second_of(prefill_pool)
        cost = billed(outcome.status, price) + charge.owed
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
        if outcome.itl_s is not None:
            self._demand.inter_token(model, outcome.itl_s)
        if entry.canary is not None:
            self._demand.outcome(model, outcome.replica, outcome.status, outcome.ttft_s)
        m.prompt.inc(prompt)
        m.completion.inc(completion)
        if outcome.cached_tokens:
            m.cached.inc(outcome.cached_tokens)
        if cost:
            m.cost.inc(cost)
        gpu_seconds = (
            outcome.replica_seconds * decode.resources.gpus
            + outcome.prefill_seconds * prefill_pool.resources.gpus
            + charge.gpu_seconds
        )
        if gpu_seconds:
            m.gpu_seconds.inc(gpu_seconds)
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
                    gpu_seconds=gpu_seconds,
                    cost_usd=cost,
                    # Sent outside the company: by the answer's endpoint or one tried before.
                    external=outcome.external or charge.external,
                    # Neither the engine's usage nor its tokenizer's count (``Outcome.counted``):
                    # the prompt as the gateway estimated it, the completion as events streamed.
                    estimated=not outcome.counted,
                )
            )
