"""One emulated engine replica on the wall clock: a thin asyncio shell over ``EngineModel``.

The model (``model``) decides everything about timing — admission, steps that carry decodes
and chunks of prompts within a token budget, the KV cache — in model time. This shell maps the wall clock onto it, with
``time_scale`` stretching or shrinking every delay so tests run a slow GPU quickly, and owns what
only a live replica has: injected faults, readiness, and the requests in flight.

Nothing here wakes per decode step. One timer per replica fires at the model's next event (a
change of the batch) and wakes the requests that event changed; a streamed request sleeps until
its next token (a step in flight keeps its length, so that time never moves earlier) and a
request answered in one piece sleeps until it is finished. A wake-up a little early (uvloop's
timers round to the millisecond) counts as on time rather than costing a second sleep. A request
whose prompt another replica prefilled (``remote_prefill_tp``) pulls its KV over this replica's
``kv_link`` instead of prefilling (``kvtransfer``), asleep until the model says it has joined
the decode batch.

This is an emulator for tests, benchmarks and the simulator. It generates no real text.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from gpufleet.emulator.kvcache import KVCache
from gpufleet.emulator.kvtransfer import DEFAULT_KV_LINK, KV_LINKS, KVLink, remote_kv
from gpufleet.emulator.model import EngineModel, Generation, RequestTooLarge
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
    kv_pulled_tokens: int = 0  # prompt tokens whose KV was pulled from the prefill replica
    kv_pulled_bytes: float = 0.0
    #: Admission to the end of its pull (waiting for the link, then moving); None: no pull ended.
    kv_transfer_s: float | None = None


def _deadline(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(True)


class EmulatedEngine:
    """One replica: an ``EngineModel`` on the wall clock, with faults and readiness."""

    def __init__(
        self,
        perf: PerfModel,
        kv_capacity_tokens: int,
        max_num_seqs: int = 256,
        time_scale: float = 1.0,
        faults: Faults | None = None,
        seed: int = 0,
        kv_link: KVLink | None = None,
        max_num_batched_tokens: int | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0 (got {time_scale})")
        self.perf = perf
        self.kv_capacity_tokens = kv_capacity_tokens
        self.max_num_seqs = max_num_seqs
        self.faults = faults if faults is not None else Faults()
        self.seed = seed
        self.kv_link = kv_link if kv_link is not None else KV_LINKS[DEFAULT_KV_LINK]
        #: None: vLLM's default for the GPU (``model.default_max_num_batched_tokens``).
        self.model = EngineModel(perf, kv_capacity_tokens, max_num_seqs, max_num_batched_tokens)
        self.arrived = 0
        self.crashed = False
        self.started_at = time.monotonic()
        self._random = random.Random(seed)
        # Model time is ``_model0 + (wall − _wall0) / _scale``, re-anchored when the scale changes.
        self._scale = time_scale
        self._wall0 = self.started_at
        self._model0 = 0.0
        self._waiters: dict[Generation, asyncio.Future[bool]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    # What the metrics and the tests read, as of the model's last event or ``poll``.

    @property
    def cache(self) -> KVCache:
        return self.model.cache

    @property
    def running(self) -> int:
        return self.model.running

    @property
    def waiting(self) -> int:
        return self.model.waiting

    @property
    def max_num_batched_tokens(self) -> int:
        return self.model.max_num_batched_tokens

    @property
    def prefix_queries(self) -> int:
        return self.model.prefix_queries

    @property
    def prefix_hits(self) -> int:
        return self.model.prefix_hits

    @property
    def prompt_tokens_total(self) -> int:
        return self.model.prompt_tokens_total

    @property
    def generation_tokens_total(self) -> int:
        return self.model.generated_tokens

    @property
    def kv_pulls(self) -> int:
        return self.model.kv_pulls

    @property
    def kv_pulled_bytes(self) -> float:
        return self.model.kv_pulled_bytes

    @property
    def ready(self) -> bool:
        return not self.crashed and time.monotonic() - self.started_at >= self.faults.slow_start_s

    @property
    def time_scale(self) -> float:
        return self._scale

    @time_scale.setter
    def time_scale(self, value: float) -> None:
        if value <= 0:
            raise ValueError(f"time_scale must be > 0 (got {value})")
        self._model0, self._wall0 = self._model_now(), time.monotonic()
        self._scale = value
        for gen in list(self._waiters):  # their wall-clock deadlines were on the old scale
            self._wake(gen)
        self._cancel_timer()
        self._arm()

    def poll(self) -> None:
        """Bring the model up to now (the timer does so at each event; metrics call it too)."""
        self._advance()

    async def generate(
        self,
        prompt: list[int],
        max_tokens: int,
        stats: RequestStats,
        *,
        stream: bool = True,
        remote_prefill_tp: int | None = None,
    ) -> AsyncGenerator[Token, None]:
        """The request's tokens: each at its time when ``stream``, else all once it is done.

        With ``remote_prefill_tp``, a replica of that TP degree prefilled the prompt: its KV is
        pulled over ``kv_link`` and the request decodes without prefilling.
        """
        self.arrived += 1
        if self.faults.crash_after is not None and self.arrived > self.faults.crash_after:
            self.crashed = True
        if self.crashed:
            raise EmulatorCrash("the emulated replica crashed (fault injection)")
        if self._random.random() < self.faults.fail_rate:
            raise EmulatedFailure("injected failure (fault injection)")
        if self.faults.stall_s and self._random.random() < self.faults.stall_rate:
            await asyncio.sleep(self.faults.stall_s)

        remote = None
        if remote_prefill_tp is not None:
            remote = remote_kv(self.perf, self.kv_link, remote_prefill_tp)
        try:
            gen = self.model.submit(prompt, max_tokens, self._advance(), remote=remote)
        except RequestTooLarge as exc:
            raise EmulatedFailure(str(exc)) from exc
        self._arm()
        sent, on_time = 0, 0.0
        try:
            while True:
                self._advance(on_time)
                out = self.model.emitted(gen) if stream or gen.phase == "done" else 0
                for i in range(sent, out):
                    stats.completion_tokens = i + 1
                    yield Token(_WORDS[i % len(_WORDS)], i)
                sent = max(sent, out)
                if gen.phase == "done" and sent >= self.model.emitted(gen):
                    break
                # If the client was slow to take those, this deadline has passed: no wait.
                until = self.model.next_token_time(gen) if stream else None
                on_time = until if await self._sleep(gen, until) and until is not None else 0.0
        finally:
            if gen.phase != "done":
                for other in self.model.abort(gen, self._advance()):
                    self._wake(other)
                self._arm()
            self._record(gen, stats)

    def _record(self, gen: Generation, stats: RequestStats) -> None:
        stats.cached_tokens = gen.cached_tokens
        if gen.admitted_at is not None:
            stats.queued_s = (gen.admitted_at - gen.arrived_at) * self._scale
        if gen.first_token_at is not None and stats.completion_tokens:
            stats.ttft_s = (gen.first_token_at - gen.arrived_at) * self._scale
        if gen.finished_at is not None:
            stats.finished_s = (gen.finished_at - gen.arrived_at) * self._scale
        ended, admitted = gen.transfer_ended_at, gen.admitted_at
        if (  # its pull ended: not a request that left while it pulled
            gen.remote is not None
            and ended is not None
            and admitted is not None
            and ended <= (gen.finished_at if gen.finished_at is not None else self.model.now)
        ):
            stats.kv_pulled_tokens = gen.pulled_tokens
            stats.kv_pulled_bytes = gen.pulled_tokens * gen.remote.bytes_per_token
            stats.kv_transfer_s = (ended - admitted) * self._scale

    # Wall clock ↔ model time.

    def _model_now(self) -> float:
        wall = time.monotonic() - self._wall0
        return max(self.model.now, self._model0 + wall / self._scale)

    def _wall_delay(self, at: float) -> float:
        return max(0.0, self._wall0 + (at - self._model0) * self._scale - time.monotonic())

    def _advance(self, at_least: float = 0.0) -> float:
        """Advance the model to now (or ``at_least``), wake whom it changed, re-arm the timer
        if the batch changed."""
        now = max(self._model_now(), at_least)
        events = self.model.batch_changes
        for gen in self.model.advance(now):
            self._wake(gen)
        if self.model.batch_changes != events:
            self._arm()
        return now

    def _arm(self) -> None:
        """Have the timer fire at the model's next event."""
        at = self.model.next_event_time()
        if at is None:
            self._cancel_timer()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # read outside a loop (a metrics dump): nobody is waiting
            return
        if self._timer is not None and self._timer_loop is loop and self._timer_at <= at:
            return  # fires earlier and re-arms then
        self._cancel_timer()
        self._timer = loop.call_later(self._wall_delay(at), self._on_timer, at)
        self._timer_at, self._timer_loop = at, loop

    def _on_timer(self, at: float) -> None:
        self._timer = None
        self._advance(at)
        self._arm()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _sleep(self, gen: Generation, until: float | None) -> bool:
        """Until model time ``until`` (True) or until the model changes ``gen`` (False)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters[gen] = fut
        timer = None if until is None else loop.call_later(self._wall_delay(until), _deadline, fut)
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            if self._waiters.get(gen) is fut:
                del self._waiters[gen]

    def _wake(self, gen: Generation) -> None:
        fut = self._waiters.pop(gen, None)
        if fut is not None and not fut.done():
            fut.set_result(False)
