"""Prefix hints shared by gateway replicas through Redis, so several gateways route alike.

Each gateway keeps its own approximate prefix index; alone, a gateway that has not seen a
conversation would send its next turn anywhere (the trap of per-replica indexes when the
gateway is scaled out). With Redis configured, every routing decision also records, per prompt
block, which engine replica received it (a set per block hash, expiring after ``ttl_s``), and
before a decision a gateway reads, in one pipelined round trip, which replicas hold the longest
run of the prompt's leading blocks. The policy takes the larger of its own and the shared view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import redis.asyncio as redis
from redis.exceptions import RedisError

__all__ = ["RedisPrefixHints"]

log = logging.getLogger("gpufleet.gateway.prefix_hints")

#: Leading blocks looked up and recorded per request (64 characters each: ~16k tokens).
MAX_BLOCKS = 1024


class RedisPrefixHints:
    def __init__(self, url: str, *, ttl_s: int = 600, namespace: str = "gpufleet:prefix") -> None:
        self._redis = redis.Redis.from_url(url)
        self.ttl = ttl_s
        self.namespace = namespace
        self._pending: set[asyncio.Task[None]] = set()

    def _key(self, model: str, block: int) -> str:
        return f"{self.namespace}:{model}:{block:016x}"

    async def lookup(self, model: str, blocks: Sequence[int]) -> dict[str, int]:
        """Replica id -> how many of the prompt's leading blocks were routed there."""
        if not blocks:
            return {}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for block in blocks[:MAX_BLOCKS]:
                    pipe.smembers(self._key(model, block))
                members: list[set[bytes]] = await pipe.execute()
        except RedisError as exc:
            log.warning("prefix hints unavailable: %s", exc)
            return {}
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
        if not blocks:
            return
        task = asyncio.create_task(
            self._write(model, blocks[:MAX_BLOCKS], replica), name="gateway:prefix-hint"
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, model: str, blocks: Sequence[int], replica: str) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for block in blocks:
                    key = self._key(model, block)
                    pipe.sadd(key, replica)
                    pipe.expire(key, self.ttl)
                await pipe.execute()
        except RedisError as exc:
            log.warning("could not record prefix hints: %s", exc)

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        with contextlib.suppress(RedisError):
            await self._redis.aclose()
