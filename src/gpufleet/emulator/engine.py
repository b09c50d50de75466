"""One emulated engine replica: admission, prefill, decode, KV cache and faults, in real time.

Timing comes from the sizing layer's ``PerfModel`` (the same roofline the planner and simulator
use). Prefills run one at a time (a single compute lane, so TTFT stretches under load as queued
prefills wait); decodes of all running sequences proceed together, each step taking
``decode_step_s(batch=running, context)``, so inter-token latency grows with batch size. A
request waits (``num_requests_waiting``) while ``max_num_seqs`` sequences run or its KV blocks
do not fit. ``time_scale`` stretches or shrinks every delay, so tests run a slow GPU quickly.

This is an emulator for tests, benchmarks and the simulator. It generates no real text.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from gpufleet.emulator.kvcache import BLOCK_TOKENS, KVCache, block_hashes
from gpufleet.sizing.performance import PerfModel

__all__ = ["EmulatedEngine", "EmulatedFailure", "EmulatorCrash", "Faults", "RequestStats", "Token"]

_WORDS = (
    "This",
    " is",
    " an",
    " emulated",
    " reply",
    " from",
    " gpufleet",
    "'s",
    " engine",
    " emulator",
    ".",
)


class EmulatedFailure(Exception):
    """An injected failure: the request is answered with HTTP 500."""


class EmulatorCrash(Exception):
    """An injected crash: the replica stops serving."""


@dataclass
class Faults:
    fail_rate: float = 0.0  # share of requests answered 500
    stall_rate: float = 0.0  # share of requests that hang for stall_s before starting
    stall_s: float = 0.0
    slow_start_s: float = 0.0  # not ready for this long after start
    crash_after: int | None = None  # crash when this many requests have arrived


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    index: int


@dataclass
class RequestStats:
    prompt_tokens: int
    cached_tokens: int = 0
    completion_tokens: int = 0
    queued_s: float = 0.0
    ttft_s: float = 0.0
    finished_s: float = 0.0


@dataclass
class EmulatedEngine:
    perf: PerfModel
    kv_capacity_tokens: int
    max_num_seqs: int = 256
    time_scale: float = 1.0
    faults: Faults = field(default_factory=Faults)
    seed: int = 0

    def __post_init__(self) -> None:
        self.cache = KVCache(max(1, self.kv_capacity_tokens // BLOCK_TOKENS))
        self.running = 0
        self.waiting = 0
        self.arrived = 0
        self.started_at = time.monotonic()
        self.crashed = False
        self._prefill = asyncio.Lock()
        self._space = asyncio.Condition()
        self._random = random.Random(self.seed)
        self._context_sum = 0  # tokens held by running sequences, for the decode step estimate
        # Cumulative counters (vLLM names them in ``metrics``).
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @property
    def ready(self) -> bool:
        return not self.crashed and time.monotonic() - self.started_at >= self.faults.slow_start_s

    async def generate(
        self, prompt: list[int], max_tokens: int, stats: RequestStats
    ) -> AsyncGenerator[Token, None]:
        self.arrived += 1
        if self.faults.crash_after is not None and self.arrived > self.faults.crash_after:
            self.crashed = True
        if self.crashed:
            raise EmulatorCrash("the emulated replica crashed (fault injection)")
        if self._random.random() < self.faults.fail_rate:
            raise EmulatedFailure("injected failure (fault injection)")
        if self.faults.stall_s and self._random.random() < self.faults.stall_rate:
            await asyncio.sleep(self.faults.stall_s)

        arrived = time.monotonic()
        hashes = block_hashes(prompt)
        extra = math.ceil((len(prompt) + max_tokens) / BLOCK_TOKENS) - len(hashes)
        if len(hashes) + extra > self.cache.capacity:
            raise EmulatedFailure(
                f"prompt + max_tokens ({len(prompt) + max_tokens} tokens) exceed the KV cache "
                f"({self.cache.capacity * BLOCK_TOKENS} tokens)"
            )
        self.waiting += 1
        try:
            async with self._space:
                while True:
                    allocation = None
                    if self.running < self.max_num_seqs:
                        allocation = self.cache.allocate(hashes, extra)
                    if allocation is not None:
                        break
                    await self._space.wait()
        finally:
            self.waiting -= 1
        self.running += 1
        context = len(prompt)
        self._context_sum += context
        stats.queued_s = time.monotonic() - arrived
        try:
            cached = allocation.cached_blocks * BLOCK_TOKENS
            stats.cached_tokens = cached
            self.prefix_queries += len(prompt)
            self.prefix_hits += cached
            self.prompt_tokens_total += len(prompt)
            async with self._prefill:
                await asyncio.sleep(self.time_scale * self.perf.ttft_s(len(prompt), cached))
            stats.ttft_s = time.monotonic() - arrived
            # Steps are timed against a running deadline, not slept one by one: a late wake-up
            # (a busy event loop) shortens the next sleep instead of accumulating.
            due = time.monotonic()
            for i in range(max_tokens):
                if i:
                    batch = max(1, self.running)
                    due += self.time_scale * self.perf.decode_step_s(
                        batch, self._context_sum // batch
                    )
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                stats.completion_tokens += 1
                self.generation_tokens_total += 1
                self._context_sum += 1
                context += 1
                yield Token(_WORDS[i % len(_WORDS)], i)
        finally:
            self._context_sum -= context
            self.running -= 1
            stats.finished_s = time.monotonic() - arrived
            async with self._space:
                self.cache.release(allocation)
                self._space.notify_all()
