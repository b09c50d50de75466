"""The renewal of the concurrency leases a gateway holds in Redis while their requests run.

Leases are short and renewed, as Kubernetes' Lease objects are: a slot lives ``lease_s``
(``SHARED_LEASE_S``, 30 s) past its admission or its last renewal, and the gateway renews the
slots of its requests still in flight every third of that (one script call per pass for all of
them, from ``start`` to ``close``), so a stream of many minutes keeps its slot while a gateway
SIGKILLed, OOM-killed or lost with its node — which never settles — frees its tenants' slots
within one lease (a 900 s lease locked a tenant with concurrency 3 out for 15 minutes). A
renewal only moves a lease that is still there (``ZADD XX``): one its settlement or void
removed, in whichever order Redis runs the two, is never brought back. A pass Redis does not
answer is one more failure of the ``redis`` dependency (reported with the admissions' and
settlements'), retried a second later; if Redis is away for longer than what is left of a lease
(20 to 30 s by default), the slots of requests still running expire, and until they finish their
tenant may run more requests than its limit (the gateway logs how many) — the same fault toward
availability that frees a dead gateway's slots.

``RedisQuotas`` (``gateway.quotas_redis``) owns one ``LeaseRenewer``: it tracks a lease once
its admission's answer came and untracks it when the request settles; the leases themselves are
written by its admission script and removed by its settlement script.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from gpufleet.gateway.settlements import PendingSettlements
from gpufleet.supervise import Supervisor

__all__ = ["LUA_KEEP", "LeaseRenewer"]

log = logging.getLogger("gpufleet.gateway.quotas")

#: Leases per renewal script call: a pass over more is several calls, so that no one call
#: holds Redis for long.
_RENEW_BATCH = 1_000
#: The wait before the next renewal pass after one Redis did not answer.
_RENEW_RETRY_S = 1.0
#: The renewal task's name (``gpufleet.supervise``: restarted after an error, counted).
_RENEWAL = "gateway:quota-leases"

#: An in-flight set's TTL is raised to cover the leases just given, never lowered: it may hold
#: longer leases of another gateway (one of an older version, during an upgrade). The admission
#: script uses it too.
LUA_KEEP = """
local function keep(key, ttl)
  if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
end
"""

# KEYS: in-flight zsets. ARGV: lease_s, the zsets' TTL, then per lease and zset: the zset's
# index in KEYS, the lease. A lease is renewed only where it still is (XX, after ZSCORE): one
# its settlement or void removed, or that expired and an admission pruned, stays gone. Replies
# with the leases that were not there.
_RENEW = (
    LUA_KEEP
    + """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
local lost = {}
for j = 3, #ARGV, 2 do
  local key, lease = KEYS[tonumber(ARGV[j])], ARGV[j + 1]
  if redis.call('ZSCORE', key, lease) then
    redis.call('ZADD', key, 'XX', expiry, lease)
  else
    lost[#lost + 1] = lease
  end
end
local ttl = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do keep(key, ttl) end
return lost
"""
)


class LeaseRenewer:
    """Renews the tracked leases every ``renew_every_s`` (a third of ``lease_s`` unless given)
    from ``start`` to ``close``, through ``client`` (``where`` names it in log lines).

    A failure is reported through ``pending``'s outage reporter (so a Redis outage is one report
    for admissions, settlements and renewals), and an answer after one wakes ``pending``, whose
    landing settlements then report the outage over. ``passes`` counts the passes Redis
    answered, ``failures`` those it did not (a pass with nothing to renew is neither), ``lost``
    the leases found gone while their requests ran (Redis away past a lease).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        where: str,
        lease_s: float,
        renew_every_s: float | None,
        pending: PendingSettlements[Any],
    ) -> None:
        self._every_s = lease_s / 3 if renew_every_s is None else renew_every_s
        if not 0 < self._every_s < lease_s:
            raise ValueError(
                f"leases must be renewed more often than they last ({lease_s} s), "
                f"not every {self._every_s} s"
            )
        self._lease_s = lease_s
        self._where = where
        self._pending = pending
        self._script = client.register_script(_RENEW)
        #: Lease -> the in-flight sets it holds a slot in, from admission to settlement.
        self._held: dict[str, tuple[str, ...]] = {}
        self._loops = Supervisor()
        self.passes = 0
        self.failures = 0
        self.lost = 0

    @property
    def held(self) -> int:
        """Leases of this gateway's requests in flight, renewed until they settle."""
        return len(self._held)

    def track(self, lease: str, sets: tuple[str, ...]) -> None:
        """Renew ``lease`` in the in-flight ``sets`` (none: nothing to renew) until untracked."""
        if sets:
            self._held[lease] = sets

    def untrack(self, lease: str) -> None:
        """No longer renewed, from now: a pass already on its way cannot bring the lease back
        after the settlement removed it (the script renews only what is there)."""
        self._held.pop(lease, None)

    def start(self) -> None:
        if _RENEWAL not in self._loops.loops:
            self._loops.spawn(_RENEWAL, self._renew_forever, critical=False)

    async def renew(self) -> bool:
        """One renewal pass: every lease still held gets ``lease_s`` more from now on Redis's
        clock. False when Redis did not answer (a failure of the ``redis`` dependency); leases
        Redis no longer has are dropped and logged."""
        held = list(self._held.items())
        if not held:
            return True
        lost: set[str] = set()
        for i in range(0, len(held), _RENEW_BATCH):
            keys: dict[str, int] = {}
            args: list[str | int] = [repr(self._lease_s), math.ceil(self._lease_s) + 1]
            for lease, sets in held[i : i + _RENEW_BATCH]:
                for key in sets:
                    args += [keys.setdefault(key, len(keys) + 1), lease]
            try:
                gone = await self._script(keys=list(keys), args=args)
            except (RedisError, OSError) as exc:
                self._failed(exc)
                return False
            lost.update(lease.decode() for lease in gone)
        self.passes += 1
        self._answered()
        dropped = [lease for lease in lost if self._held.pop(lease, None) is not None]
        if dropped:  # not those settled while the pass ran: their settlement removed them
            self.lost += len(dropped)
            log.warning(
                "%d concurrency slots of requests still in flight had expired on %s before "
                "their renewal (Redis away for longer than their %g s lease, or restarted "
                "without its data): until they finish, they no longer count against their "
                "tenants' limits",
                len(dropped),
                self._where,
                self._lease_s,
            )
        return True

    async def _renew_forever(self) -> None:
        answered = True
        while True:
            await asyncio.sleep(self._every_s if answered else min(self._every_s, _RENEW_RETRY_S))
            answered = await self.renew()

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        affected = (
            f"concurrency leases (running requests' slots expire {self._lease_s:g} s after "
            "their last renewal)"
        )
        self._pending.outages.failed(self._pending.dependency, exc, affected=affected)

    def _answered(self) -> None:
        if self._pending:
            self._pending.wake()  # what lands reports the outage over, with what landed
        else:
            self._pending.outages.recovered(self._pending.dependency)

    async def close(self) -> None:
        """Renewals stop."""
        await self._loops.close()
