"""Prefix hints shared by gateway replicas through Redis, so several gateways route alike.

Each gateway keeps its own approximate prefix index; alone, a gateway that has not seen a
conversation would send its next turn anywhere (the trap of per-replica indexes when the
gateway is scaled out). With Redis configured, every routing decision also records, per prompt
block, which engine replica received it (a set per block hash, expiring after ``ttl_s``), and
before a decision a gateway reads, in one pipelined round trip, which replicas hold the longest
run of the prompt's leading blocks. The policy takes the larger of its own and the shared view.

The lookup sits on the request path, so it fails open: every call is bounded by ``timeout_s``
(socket reads, connecting, and the whole round trip), and after a failure the hints are skipped
for ``down_s`` — routing goes on with the gateway's own index — rather than making every request
wait out the timeout of a hung Redis. An outage is reported once when it begins and once when
Redis answers again, through ``outages`` (the gateway's ``OutageReporter``: one Redis outage,
whichever of admission, settlements and hints meets it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gpufleet.outages import OutageReporter

__all__ = ["RedisPrefixHints"]

#: Leading blocks looked up and recorded per request (64 characters each: ~16k tokens).
MAX_BLOCKS = 1024
#: What an outage of Redis stops here.
AFFECTED = "prefix hints (routing without them)"


class RedisPrefixHints:
    def __init__(
        self,
        url: str,
        *,
        ttl_s: int = 600,
        namespace: str = "gpufleet:prefix",
        timeout_s: float = 1.0,
        down_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        outages: OutageReporter | None = None,
    ) -> None:
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self.ttl = ttl_s
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.down_s = down_s
        self._clock = clock
        self._outages = outages or OutageReporter()
        #: While Redis is taken for down: hints are skipped until then (None while up).
        self._down_until: float | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def _available(self) -> bool:
        return self._down_until is None or self._clock() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        self._outages.failed("redis", exc, affected=AFFECTED)
        self._down_until = self._clock() + self.down_s

    def _answered(self) -> None:
        self._outages.recovered("redis")
        self._down_until = None

    def _key(self, model: str, block: int) -> str:
        return f"{self.namespace}:{model}:{block:016x}"

    async def lookup(self, model: str, blocks: Sequence[int]) -> dict[str, int]:
        """Replica id -> how many of the prompt's leading blocks were routed there."""
        if not blocks or not self._available():
            return {}
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for block in blocks[:MAX_BLOCKS]:
                        pipe.smembers(self._key(model, block))
                    members: list[set[bytes]] = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return {}
        self._answered()
        matched: dict[str, int] = {}
        alive: set[bytes] | None = None
        for depth, holders in enumerate(members, start=1):
            alive = set(holders) if alive is None else alive & holders
            if not alive:
                break
            for replica in alive:
                matched[replica.decode()] = depth
        return matched

    def record(self, model: str, blocks: Sequence[int], replica: str) -> None:
        """Remember where this prompt went; written in the background, off the hot path."""
        if not blocks or not self._available():
            return
        task = asyncio.create_task(
            self._write(model, blocks[:MAX_BLOCKS], replica), name="gateway:prefix-hint"
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, model: str, blocks: Sequence[int], replica: str) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for block in blocks:
                        key = self._key(model, block)
                        pipe.sadd(key, replica)
                        pipe.expire(key, self.ttl)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return
        self._answered()

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        with contextlib.suppress(RedisError):
            await self._redis.aclose()
