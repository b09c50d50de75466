"""The Redis backend of the quotas: one Lua script per admission and per settle.

Several gateway replicas share the counters: an admission checks every scope and then
increments all of them in one script, so replicas never overshoot a limit between them; the
scripts read Redis's clock (``TIME``) so replicas agree on seconds and budget periods.
Concurrency slots are members of a sorted set scored by a lease expiry, so a dead gateway's
slots free themselves (short leases, renewed while their requests run: ``gateway.quota_leases``);
settle corrections apply at most once per admission. Unreachable Redis fails closed
(``QuotaStoreUnavailable``); a settlement it cannot take is kept and retried until it lands
(``gateway.settlements``), so a Redis restarted from its append-only file gets the releases of
the requests that finished while it was down. With a ``journal`` path (the gateway's local
durable directory) kept settlements are also on disk (``gateway.settle_journal``) and ``start``
resends what a previous process left: a gateway restarted or SIGKILLed during the outage loses
none. The rules are ``gpufleet.policies.quota_rules``'s and the scripts do what
``gpufleet.policies.quota_counters`` does in memory.

All keys a script touches are passed in ``KEYS``; with Redis Cluster, give a namespace with a hash
tag (``"{gpufleet:quota}"``) so they share one slot. Scopes with no limits cost nothing: a request
whose scopes are all unlimited is admitted without touching Redis.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpufleet.gateway.quota_leases import LUA_KEEP, LeaseRenewer
from gpufleet.gateway.quotas import QuotaStoreUnavailable
from gpufleet.gateway.settle_journal import SettleJournal
from gpufleet.gateway.settlements import PendingSettlements
from gpufleet.outages import OutageReporter
from gpufleet.policies.quota_rules import (
    NANO,
    SETTLE_WINDOW_S,
    SHARED_LEASE_S,
    Demand,
    LimitName,
    Limits,
    Ticket,
    counted_scopes,
    needs_settle_marker,
    quota_exceeded,
    to_nano,
    window_retry_after,
)

__all__ = ["RedisQuotas"]

#: How long a void's tombstone refuses the admission it voids, should a Redis that hung run it
#: late (its slot would free with its lease, but its tokens and spend would stay reserved). Not
#: the lease: an admission can wait in a hung Redis's socket for as long as it hangs.
_VOID_TOMBSTONE_S = 900
# The Lua below mirrors ``QuotaCounters``: ``period`` is ``budget_period`` (a test compares them
# over many dates), the checks run in the same order and the same retry delays follow.

_LUA_PERIOD = """
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function period(sec, kind)
  local day = math.floor(sec / 86400)
  if kind == 'day' then return 'd' .. day, day * 86400, (day + 1) * 86400 end
  if kind == 'week' then
    local monday = day - (day + 3) % 7
    return 'w' .. monday, monday * 86400, (monday + 7) * 86400
  end
  local z = day + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  local ny, nm = y, m + 1
  if m == 12 then ny, nm = y + 1, 1 end
  return 'm' .. (y * 12 + m - 1), days_from_civil(y, m, 1) * 86400,
    days_from_civil(ny, nm, 1) * 86400
end
"""

_LUA_WINDOW = """
local WINDOW = 60

local function window(key, sec, prune)
  local flat = redis.call('HGETALL', key)
  local used, live, dead = 0, {}, {}
  for j = 1, #flat, 2 do
    local s = tonumber(flat[j])
    if s > sec - WINDOW then
      local v = tonumber(flat[j + 1])
      used = used + v
      live[#live + 1] = s
      live[#live + 1] = v
    else
      dead[#dead + 1] = flat[j]
    end
  end
  if prune and #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
  return used, live
end
"""

# KEYS: settle marker, then per scope: requests hash, tokens hash, in-flight zset, budget hash.
# A marker already there is a void's tombstone: the admission answers 2 and takes nothing.
# ARGV: lease, lease_s, lease_ttl, tokens, cost, settle_ttl, n, whether to set the marker (0/1),
# then per scope: rpm, tpm, concurrency, budget (-1 when unset), period ('' when no budget).
_ADMIT = (
    _LUA_PERIOD
    + _LUA_WINDOW
    + LUA_KEEP
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {2} end
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec + tonumber(t[2]) / 1000000
local lease, tokens, cost = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[5])
local n = tonumber(ARGV[7])
local budgets = {}
for i = 1, n do
  local a, k = 8 + (i - 1) * 5, 1 + (i - 1) * 4
  local rpm, tpm = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local conc, budget = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if conc >= 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now)
    local used = redis.call('ZCARD', KEYS[k + 3])
    if used + 1 > conc then return {0, i, 'concurrency', used, t[1], t[2], {}} end
  end
  if rpm >= 0 then
    local used, live = window(KEYS[k + 1], sec, true)
    if used + 1 > rpm then return {0, i, 'rpm', used, t[1], t[2], live} end
  end
  if tpm >= 0 then
    local used, live = window(KEYS[k + 2], sec, true)
    if used + tokens > tpm then return {0, i, 'tpm', used, t[1], t[2], live} end
  end
  if budget >= 0 then
    local key, start, stop = period(sec, ARGV[a + 5])
    local got = redis.call('HMGET', KEYS[k + 4], key .. ':s', key .. ':r')
    if not got[1] and not got[2] then
      local keep = period(start - 1, ARGV[a + 5])
      local stale = {}
      for _, f in ipairs(redis.call('HKEYS', KEYS[k + 4])) do
        local p = string.match(f, '^(.*):[sr]$')
        if p ~= key and p ~= keep then stale[#stale + 1] = f end
      end
      if #stale > 0 then redis.call('HDEL', KEYS[k + 4], unpack(stale)) end
    end
    local used = (tonumber(got[1]) or 0) + (tonumber(got[2]) or 0)
    if used + cost > budget then return {0, i, 'budget', used, t[1], t[2], {stop}} end
    budgets[i] = {key, stop}
  end
end
for i = 1, n do
  local a, k = 8 + (i - 1) * 5, 1 + (i - 1) * 4
  if ARGV[a + 1] ~= '-1' then
    redis.call('HINCRBY', KEYS[k + 1], t[1], 1)
    redis.call('EXPIRE', KEYS[k + 1], WINDOW + 2)
  end
  if ARGV[a + 2] ~= '-1' then
    redis.call('HINCRBY', KEYS[k + 2], t[1], ARGV[4])
    redis.call('EXPIRE', KEYS[k + 2], WINDOW + 2)
  end
  if ARGV[a + 3] ~= '-1' then
    redis.call('ZADD', KEYS[k + 3], now + tonumber(ARGV[2]), lease)
    keep(KEYS[k + 3], tonumber(ARGV[3]))
  end
  if budgets[i] then
    local key, stop = budgets[i][1], budgets[i][2]
    redis.call('HINCRBY', KEYS[k + 4], key .. ':r', ARGV[5])
    redis.call('HSETNX', KEYS[k + 4], key .. ':s', 0)
    redis.call('EXPIRE', KEYS[k + 4], stop - sec + tonumber(ARGV[6]))
  end
end
if ARGV[8] == '1' then redis.call('SET', KEYS[1], t[1], 'EX', ARGV[6]) end
return {1, t[1]}
"""
)

# KEYS as for admission. ARGV: lease, ticket second, token correction, -reserved cost, actual
# cost, n, marker ('0' none, '1' one, 'void' for an admission whose answer never came), the
# void's tombstone TTL, then per scope: has tpm, has concurrency (0/1), budget period ('' when
# no budget). The marker holds the admission second (a void does not know it; '1' from older
# gateways means "the ticket's"). Applying it twice changes nothing: the lease is removed by
# id and the corrections apply only while the marker is there. A void finding no marker leaves
# a tombstone in its place, so an admission still on its way (a Redis that hung, then resumed)
# is refused when it runs.
_SETTLE = (
    _LUA_PERIOD
    + _LUA_WINDOW
    + """
local sec = tonumber(redis.call('TIME')[1])
local first, tfield = false, ARGV[2]
if ARGV[7] ~= '0' then
  local mark = redis.call('GET', KEYS[1])
  if mark and mark ~= 'void' then
    first = true
    if mark ~= '1' then tfield = mark end
    redis.call('DEL', KEYS[1])
  elseif not mark and ARGV[7] == 'void' then
    redis.call('SET', KEYS[1], 'void', 'EX', ARGV[8])
  end
end
local tsec = tonumber(tfield)
for i = 1, tonumber(ARGV[6]) do
  local a, k = 8 + (i - 1) * 3, 1 + (i - 1) * 4
  if ARGV[a + 2] == '1' then redis.call('ZREM', KEYS[k + 3], ARGV[1]) end
  if first and ARGV[a + 1] == '1' and tsec > sec - WINDOW
      and redis.call('HEXISTS', KEYS[k + 2], tfield) == 1 then
    redis.call('HINCRBY', KEYS[k + 2], tfield, ARGV[3])
  end
  if first and ARGV[a + 3] ~= '' then
    local key = period(tsec, ARGV[a + 3])
    if redis.call('HEXISTS', KEYS[k + 4], key .. ':r') == 1 then
      redis.call('HINCRBY', KEYS[k + 4], key .. ':r', ARGV[4])
      redis.call('HINCRBY', KEYS[k + 4], key .. ':s', ARGV[5])
    end
  end
end
return first and 1 or 0
"""
)

# KEYS: requests hash, tokens hash, in-flight zset, budget hash. ARGV: budget period.
_SNAPSHOT = (
    _LUA_PERIOD
    + _LUA_WINDOW
    + """
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec + tonumber(t[2]) / 1000000
local requests = window(KEYS[1], sec, false)
local tokens = window(KEYS[2], sec, false)
local in_flight = redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf')
local key = period(sec, ARGV[1])
local got = redis.call('HMGET', KEYS[4], key .. ':s', key .. ':r')
return {requests, tokens, in_flight, tonumber(got[1]) or 0, tonumber(got[2]) or 0}
"""
)


def _opt(value: float | None) -> int:
    return -1 if value is None else int(value)


#: A settlement's script call: its keys and arguments.
_Call = tuple[list[str], list[str | int]]


def _encode_call(call: _Call) -> object:
    return {"keys": call[0], "args": call[1]}


def _decode_call(value: object) -> _Call:
    """A journal's settlement back into a script call (``ValueError`` when it is not one)."""
    if not isinstance(value, dict):
        raise ValueError("not a settlement")
    keys, args = value["keys"], value["args"]
    if not (
        isinstance(keys, list)
        and keys
        and all(isinstance(k, str) for k in keys)
        and isinstance(args, list)
        and all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in args)
    ):
        raise ValueError("not a settlement script call")
    return keys, args


class RedisQuotas:
    """Quotas shared by gateway replicas through Redis; fails closed when Redis is unreachable.

    Settlements always land: one Redis cannot take now is kept and retried
    (``gateway.settlements``) until it does, and an admission whose answer never came (a
    timeout, a connection lost mid-call) is voided the same way, since the script may have run.
    ``journal``: the file that keeps them across a restart (read by ``start``); ``outages``:
    the gateway's reporter, so a Redis outage is one report for admissions and settlements.

    ``leases`` (``gateway.quota_leases``) renews the leases of concurrency slots this gateway
    took and has not settled every ``renew_every_s`` (a third of ``lease_s`` unless given), from
    ``start`` to ``close``.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "gpufleet:quota",
        lease_s: float = SHARED_LEASE_S,
        renew_every_s: float | None = None,
        timeout_s: float = 1.0,
        max_connections: int = 64,
        max_pending: int = 10_000,
        journal: Path | None = None,
        outages: OutageReporter | None = None,
    ) -> None:
        # A burst of admissions waits (up to ``timeout_s``) for one of ``max_connections``
        # instead of failing when the pool is exhausted, which a plain pool does. One quick retry
        # covers a pooled connection Redis closed; a dead Redis then fails within about
        # ``timeout_s`` instead of stalling every request behind backoff. Timeouts are not
        # retried: the script may have run, and running it again would count the request twice.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis = redis.Redis.from_pool(pool)
        self._where = _redact(url)
        self.namespace = namespace
        self._lease_s = lease_s
        self._tag = secrets.token_hex(4)
        self._ids = itertools.count()
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._snapshot = self._redis.register_script(_SNAPSHOT)
        self.pending: PendingSettlements[_Call] = PendingSettlements(
            self._send_settlement,
            _temporary,
            where=self._where,
            outages=outages,
            journal=SettleJournal(journal, _encode_call, _decode_call) if journal else None,
            max_items=max_pending,
        )
        self.leases = LeaseRenewer(
            self._redis,
            where=self._where,
            lease_s=lease_s,
            renew_every_s=renew_every_s,
            pending=self.pending,
        )

    async def start(self) -> None:
        """Settlements a previous process left in the journal are sent again, at once, and the
        renewal of this process's leases begins."""
        self.pending.start()
        self.leases.start()

    def _keys(self, scope: str) -> list[str]:
        base = f"{self.namespace}:s:{scope}"
        return [f"{base}:r", f"{base}:t", f"{base}:c", f"{base}:b"]

    def _unavailable(self, exc: Exception) -> QuotaStoreUnavailable:
        return QuotaStoreUnavailable(
            f"the quota store {self._where} is unavailable ({exc.__class__.__name__}: {exc}); "
            "requests are refused until it is back"
        )

    async def admit(
        self, request_id: str, scopes: Sequence[tuple[str, Limits]], demand: Demand
    ) -> Ticket:
        counted = counted_scopes(scopes)
        cost = to_nano(demand.cost_usd)
        if not counted:
            return Ticket(request_id, request_id, (), 0, demand.tokens, cost)
        lease = f"{request_id}#{self._tag}{next(self._ids)}"
        marker = needs_settle_marker(counted)
        keys = [f"{self.namespace}:t:{lease}"]
        args: list[str | int] = [
            lease,
            repr(self._lease_s),
            math.ceil(self._lease_s) + 1,
            demand.tokens,
            cost,
            SETTLE_WINDOW_S,
            len(counted),
            int(marker),
        ]
        for scope, limits in counted:
            keys += self._keys(scope)
            budget = None if limits.budget_usd is None else to_nano(limits.budget_usd)
            args += [_opt(limits.rpm), _opt(limits.tpm), _opt(limits.concurrency), _opt(budget)]
            args.append(limits.budget_period if budget is not None else "")
        # What voids this admission if its answer never comes (the marker has its second).
        void = Ticket(request_id, lease, counted, 0, demand.tokens, cost)
        reply = await self._try_admit(keys, args, void)
        if reply[0] == 0 and self.pending:
            # Refused while settlements are pending: they may be what holds the slots.
            self.pending.wake()
            await self.pending.flush()
            reply = await self._try_admit(keys, args, void)
        elif self.pending:
            # Redis is back: the backlog lands before the gateway reports the outage over, so
            # that report says what landed (a pass, not a wait: it stops at a failure).
            await self.pending.flush()
        if reply[0] == 1:
            held = tuple(self._keys(s)[2] for s, lim in counted if lim.concurrency is not None)
            self.leases.track(lease, held)
            return Ticket(request_id, lease, counted, int(reply[1]), demand.tokens, cost)
        if reply[0] == 2:
            raise self._unavailable(RuntimeError("the admission was voided before it ran"))
        _, index, name, used, secs, micros, extra = reply
        scope, limits = counted[int(index) - 1]
        limit: LimitName = name.decode()
        now = int(secs) + int(micros) / 1_000_000
        need = {"concurrency": 1, "rpm": 1, "tpm": demand.tokens, "budget": cost}[limit]
        if limit == "concurrency":
            retry = 1.0
        elif limit == "budget":
            retry = int(extra[0]) - now
        else:
            cap = limits.rpm if limit == "rpm" else limits.tpm
            buckets = zip(extra[::2], extra[1::2], strict=True)
            retry = window_retry_after(buckets, int(used), need, cap or 0, now)
        raise quota_exceeded(scope, limits, limit, int(used), need, retry)

    async def _try_admit(self, keys: list[str], args: list[str | int], ticket: Ticket) -> Any:
        """The admission script's reply; on an error, the admission is voided unless it surely
        never reached Redis (``ticket`` names its lease and scopes), and the error raised."""
        try:
            reply = await self._admit(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            if not _never_sent(exc):
                self.pending.keep(ticket.lease, self._settle_call(ticket, 0, 0.0, void=True), exc)
            raise self._unavailable(exc) from exc
        self.pending.wake()
        return reply

    def _settle_call(self, ticket: Ticket, tokens: int, cost_usd: float, *, void: bool) -> _Call:
        marker = needs_settle_marker(ticket.scopes)
        keys = [f"{self.namespace}:t:{ticket.lease}"]
        args: list[str | int] = [
            ticket.lease,
            ticket.second,
            tokens - ticket.tokens,
            -ticket.cost_nano,
            to_nano(cost_usd),
            len(ticket.scopes),
            "void" if void else int(marker),
            _VOID_TOMBSTONE_S,
        ]
        for scope, limits in ticket.scopes:
            keys += self._keys(scope)
            args += [
                int(limits.tpm is not None),
                int(limits.concurrency is not None),
                limits.budget_period if limits.budget_usd is not None else "",
            ]
        return keys, args

    async def _send_settlement(self, call: _Call) -> None:
        await self._settle(keys=call[0], args=call[1])

    async def settle(self, ticket: Ticket, *, tokens: int, cost_usd: float) -> None:
        """Never raises for an unreachable Redis: the settlement is kept and retried."""
        self.leases.untrack(ticket.lease)
        if not ticket.scopes:
            return
        if not needs_settle_marker(ticket.scopes) and all(
            lim.concurrency is None for _, lim in ticket.scopes
        ):
            return  # requests per minute only: nothing to release or correct
        call = self._settle_call(ticket, tokens, cost_usd, void=False)
        try:
            await self._send_settlement(call)
        except (RedisError, OSError) as exc:
            if not _temporary(exc):
                raise self._unavailable(exc) from exc
            self.pending.keep(ticket.lease, call, exc)
            return
        self.pending.wake()

    async def snapshot(self, scope: str, limits: Limits) -> dict[str, float]:
        try:
            reply = await self._snapshot(keys=self._keys(scope), args=[limits.budget_period])
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        self.pending.wake()
        requests, tokens, in_flight, spent, reserved = (int(v) for v in reply)
        return {
            "rpm": requests,
            "tpm": tokens,
            "concurrency": in_flight,
            "spent_usd": spent / NANO,
            "reserved_usd": reserved / NANO,
        }

    async def close(self) -> None:
        """Renewals stop, pending settlements get one last try, then the connections close."""
        await self.leases.close()
        await self.pending.close()
        await self._redis.aclose()


def _temporary(exc: Exception) -> bool:
    """Errors of a Redis that is away, restarting or failing over: a retry may succeed."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError))


def _never_sent(exc: Exception) -> bool:
    """redis-py's errors for a connection that never opened (or none free in the pool): the
    script cannot have run, so there is nothing to void."""
    text = str(exc)
    return "connecting to" in text or "No connection available" in text


def _redact(url: str) -> str:
    """Hide a password in a Redis URL before it reaches a message."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
