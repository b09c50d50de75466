"""Tenants in the simulator: who sends each request, with the gateway's quotas and fair share.

A trace request names its tenant (the ``tenant`` column; none: ``default``). A tenant declared
with ``kind: Tenant`` in the simulated files brings its ``limits`` (requests and tokens per
minute, concurrency, budget), its ``priority`` (interactive before batch) and its ``weight``
(its share of a busy model), and the simulator applies them with the gateway's own code:

- **quotas** — ``policies.quota_counters.QuotaCounters`` in virtual time, at arrival, with the
  demand the gateway reserves (prompt + output tokens; cost estimated by
  ``policies.pricing.Pricing``, which learns each model's replica-seconds per token as the
  gateway does), settled at the end with the tokens used and the request's cost;
- **fair queue** — ``policies.fair_order.FairOrder`` per model, with the gateway's bounds
  (``queue_max_length`` waiters, ``queue_max_wait_s`` each);
- **cost** — ``policies.busy_meter.BusyMeter``: each request's share of its replica's busy
  time, at the placement's price (an external model's: its per-token charge);
- **external endpoints** — ``allowExternalEndpoints``: only a tenant that opted in is sent to a
  deployment served by hosted APIs alone (``sim.external.walk``).

A tenant the trace names but no file declares runs as the gateway would run a tenant created
without a spec: no limits, interactive, weight 1, not opted in to external endpoints.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from gpufleet.policies.fair_order import QUEUE_PRIORITIES
from gpufleet.policies.quota_rules import Limits, limits_of
from gpufleet.sim.result import TenantResult, percentiles
from gpufleet.spec import Tenant

__all__ = ["DEFAULT_TENANT", "SimTenant", "TenantBook", "sim_tenants"]

DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class SimTenant:
    name: str
    #: The fair queue's class: 0 interactive, 1 batch (``QUEUE_PRIORITIES``).
    priority: int = 0
    weight: float = 1.0
    limits: Limits = field(default_factory=Limits)
    #: Its requests may go to a hosted API (``allowExternalEndpoints``; prompts leave).
    allow_external: bool = False

    @classmethod
    def of(cls, tenant: Tenant) -> SimTenant:
        spec = tenant.spec
        return cls(
            tenant.name,
            QUEUE_PRIORITIES[spec.priority],
            spec.weight,
            limits_of(spec.limits),
            spec.allow_external_endpoints,
        )

    @property
    def scopes(self) -> list[tuple[str, Limits]]:
        """The quota scopes of its requests (the gateway's ``Principal.scopes`` without a key:
        a simulated tenant's traffic is one key's)."""
        return [(f"tenant:{self.name}", self.limits)]


def sim_tenants(tenants: Iterable[Tenant | SimTenant]) -> list[SimTenant]:
    return [t if isinstance(t, SimTenant) else SimTenant.of(t) for t in tenants]


class TenantBook:
    """One tenant's statistics: requests, refusals by reason, latency, queue wait, cost."""

    __slots__ = (
        "completion_tokens",
        "cost",
        "e2e",
        "met",
        "prompt_tokens",
        "refused",
        "requests",
        "served",
        "tenant",
        "ttft",
        "waits",
    )

    def __init__(self, tenant: SimTenant) -> None:
        self.tenant = tenant
        self.requests = self.served = 0
        self.refused: Counter[str] = Counter()
        self.prompt_tokens = self.completion_tokens = 0
        self.cost = 0.0
        self.ttft = array("d")
        self.e2e = array("d")
        #: Seconds from arrival to being sent to a replica (held, then the fair queue).
        self.waits = array("d")
        self.met = 0

    def result(self) -> TenantResult:
        t = self.tenant
        priority = next((k for k, v in QUEUE_PRIORITIES.items() if v == t.priority), "?")
        return TenantResult(
            t.name,
            priority,
            t.weight,
            self.requests,
            self.served,
            sum(self.refused.values()),
            dict(sorted(self.refused.items())),
            self.prompt_tokens,
            self.completion_tokens,
            percentiles(self.ttft),
            percentiles(self.e2e),
            percentiles(self.waits),
            self.met / self.requests if self.requests else None,
            self.cost,
        )
