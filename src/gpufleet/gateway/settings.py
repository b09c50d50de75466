"""The gateway's settings: one frozen value read by every part of the request path."""

from __future__ import annotations

from dataclasses import dataclass

from gpufleet.policies.quota_rules import SHARED_LEASE_S

__all__ = ["GatewaySettings"]


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    max_body_bytes: int = 8 * 1024 * 1024
    #: Slow clients are closed (and counted): a request's headers must arrive within
    #: ``header_timeout_s``, and its body make progress at least every ``body_idle_s``.
    header_timeout_s: float = 30.0
    body_idle_s: float = 30.0
    #: How long a request waits for a replica of a model that has none ready (starting, or
    #: scaled to zero) before it is answered 503 with Retry-After. Never unbounded.
    hold_s: float = 60.0
    #: Seeds the draws of canary splits without a stickiness key (tests fix it).
    seed: int | None = None
    #: Redis shared by gateway replicas: prefix hints, and (in ``assemble``) quota counters.
    #: None: each gateway routes and counts alone.
    redis_url: str | None = None
    #: The longest a request waits on one Redis call (quotas fail closed past it, prefix
    #: hints are skipped): a hung Redis must not hang the request path.
    redis_timeout_s: float = 1.0
    #: How long a concurrency slot in Redis outlives the gateway that took it (SIGKILLed, its
    #: pod deleted): each gateway renews its requests' slots every third of it while they run.
    quota_lease_s: float = SHARED_LEASE_S
    #: Requests one replica gets from this gateway at once; more wait in the model's fair
    #: queue (priority first, then weighted fair share between tenants).
    slots_per_replica: int = 64
    queue_max_length: int = 1000
    queue_max_wait_s: float = 30.0
    #: Output tokens reserved for a request without max_tokens (capped by the context left).
    default_max_tokens: int = 4096
    #: Batch lines this gateway keeps in flight at once (they queue behind interactive ones).
    batch_concurrency: int = 16
    #: The only gateway (``gpufleet up``): resume batches a previous process had claimed
    #: without waiting for its claims to expire.
    batch_take_over: bool = False
