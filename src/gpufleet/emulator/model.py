"""The engine model: one replica's scheduler and timings as a pure, event-driven core.

It models continuous batching the way vLLM schedules it, timed by the sizing layer's
``PerfModel`` (the roofline the planner and the simulator use):

- **Admission.** A request is admitted while fewer than ``max_num_seqs`` sequences run and its
  KV blocks fit (``kvcache``: its prompt's blocks, reusing a cached prefix, plus blocks for the
  rest of the prompt and the output); otherwise it waits. Whenever a sequence ends, the waiting
  requests are tried in arrival order and each that fits is admitted, so a small request may
  pass a large one that does not fit yet. A newcomer that fits is admitted at once.
- **Prefill.** One compute lane, first come first served: a prefill starts when its request is
  admitted and the lane is free, and takes ``ttft_s(prompt, cached)``; the first token is out
  when it ends. So time to first token stretches under load as queued prefills wait.
- **Decode.** Every sequence past its prefill emits one token per step, and they step
  together: a step takes ``decode_step_s(running, context // running)``, where ``running``
  counts every admitted sequence and ``context`` the tokens they hold, so inter-token latency
  grows with the batch and with context. A sequence whose prefill ends during a step joins
  the next one.

Why events, not steps: between two changes of the batch — an admission, a prefill ending, a
sequence finishing or going away — only the context changes, by one token per decoding
sequence per step. Step ``j`` after a change is therefore ``a + b·j``: exact while the roofline
stays in one regime (memory-bound is linear in context, compute-bound constant); where the
steps cross from compute- to memory-bound, the chord from the first step to the last one before
the next finish overestimates them slightly. The time of a sequence's token ``k`` is then a
quadratic in ``k`` and the tokens out by time ``t`` its inverse, so the model takes one event
per change of the batch (a 1,000-token request alone: its admission, its prefill's end, its
finish) and answers "how many tokens by now" and "when is the next one" in closed form. A step
in flight when the batch changes keeps its length; the new batch shapes the steps after it, so
the time of a sequence's next token never moves once that step has begun.

No clock and no event loop: time is a parameter (float seconds of model time) and only ever
moves forward. The HTTP shell (``engine.EmulatedEngine``) maps the wall clock onto it and
streams; the simulator drives the same object in virtual time.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from gpufleet.emulator.kvcache import BLOCK_TOKENS, Allocation, KVCache, block_hashes
from gpufleet.emulator.steps import StepGrid
from gpufleet.sizing.performance import PerfModel

__all__ = ["EngineModel", "Generation", "Phase", "RequestTooLarge"]

Phase = Literal["waiting", "prefill", "decode", "done"]


class RequestTooLarge(ValueError):
    """A prompt and its output can never fit the KV cache: refused at once, never queued."""


@dataclass(eq=False, slots=True)
class Generation:
    """One request's life in the model. Callers read it; only the model writes it.

    Times are model time. ``first_token_at`` is set when the request is admitted: the prefill
    lane is first come first served, so the end of its prefill is known then.
    """

    prompt_tokens: int
    max_tokens: int
    arrived_at: float
    phase: Phase = "waiting"
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    cached_tokens: int = 0
    aborted: bool = False
    _hashes: list[int] = field(default_factory=list, repr=False)
    _extra_blocks: int = field(default=0, repr=False)
    _allocation: Allocation | None = field(default=None, repr=False)
    _prefill_from: float = field(default=0.0, repr=False)  # its slot in the prefill lane
    _prefill_to: float = field(default=0.0, repr=False)
    _emitted: int = field(default=0, repr=False)  # tokens out as of the grid's last settlement
    _first: int = field(default=0, repr=False)  # first grid boundary it emits at (0 or 1)


class EngineModel:
    """One replica: waiting requests, the running batch, the prefill lane, the KV cache.

    Drive it with ``submit`` (a request arrives), ``advance`` (time passes: processes every
    event up to then and returns the requests whose phase changed) and ``abort`` (a client goes
    away); ``next_event_time`` says when the batch changes next, ``next_token_time`` and
    ``emitted`` when a request's tokens come out.
    """

    def __init__(self, perf: PerfModel, kv_capacity_tokens: int, max_num_seqs: int = 256) -> None:
        self.perf = perf
        self.max_num_seqs = max_num_seqs
        self.cache = KVCache(max(1, kv_capacity_tokens // BLOCK_TOKENS))
        self.now = 0.0
        self.batch_changes = 0  # events processed: admissions, prefills ended, finishes, aborts
        # Cumulative counters (vLLM names them in the shell's metrics).
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens_total = 0
        self._generated = 0  # tokens out as of the grid's last settlement
        self._waiting: list[Generation] = []
        self._lane: deque[Generation] = deque()  # admitted, prefill not ended; in lane order
        self._lane_free_at = 0.0
        self._decoding: list[Generation] = []
        self._context = 0  # tokens held by admitted sequences: prompts and tokens out
        self._grid = StepGrid()
        self._next_finish: float | None = None
        #: A sequence ended since the waiting requests were last tried: only that frees a slot
        #: or KV blocks, so until then a retry would fail as the last one did.
        self._freed = False

    @property
    def running(self) -> int:
        return len(self._lane) + len(self._decoding)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def generated_tokens(self) -> int:
        """Tokens emitted by ``now``, over all requests."""
        count = self._grid.count(self.now)
        return self._generated + sum(self._since_settled(g, count) for g in self._decoding)

    def submit(self, prompt: Sequence[int], max_tokens: int, now: float) -> Generation:
        """A request arrives at ``now``: admitted at once if it fits, else it waits.

        It advances to ``now`` first, silently: a driver that needs to hear of the requests an
        earlier event changed calls ``advance(now)`` before.
        """
        return self.submit_blocks(len(prompt), block_hashes(prompt), max_tokens, now)

    def submit_blocks(
        self, prompt_tokens: int, hashes: list[int], max_tokens: int, now: float
    ) -> Generation:
        """``submit`` for a prompt known only by its length and its blocks' chained hashes.

        The simulator's traces carry token counts, not tokens, and synthetic hashes for their
        shared prefixes; hashing a made-up prompt per request would cost more than the rest of
        its simulation. ``hashes`` may cover only the prompt's leading blocks (a shared
        prefix): the rest of the prompt is then held in blocks no other request can reuse.
        """
        self.advance(now)
        max_tokens = max(0, max_tokens)
        hashes = hashes[: prompt_tokens // BLOCK_TOKENS]  # only whole prompt blocks are hashed
        extra = math.ceil((prompt_tokens + max_tokens) / BLOCK_TOKENS) - len(hashes)
        if len(hashes) + extra > self.cache.capacity:
            raise RequestTooLarge(
                f"prompt + max_tokens ({prompt_tokens + max_tokens} tokens) exceed the KV cache "
                f"({self.cache.capacity * BLOCK_TOKENS} tokens)"
            )
        gen = Generation(prompt_tokens, max_tokens, now, _hashes=hashes, _extra_blocks=extra)
        if self.running < self.max_num_seqs and self._admit(gen, now):
            self._settle(now)  # the tokens out so far, under the steps planned before it came
            self._replan(now)
            self.batch_changes += 1
        else:
            self._waiting.append(gen)
        return gen

    def next_event_time(self) -> float | None:
        """When the batch changes next (a prefill ends or a sequence finishes), if ever."""
        if not self._lane:
            return self._next_finish
        ends = self._lane[0]._prefill_to
        return ends if self._next_finish is None else min(ends, self._next_finish)

    def advance(self, to: float) -> list[Generation]:
        """Process every event up to ``to``; the requests whose phase changed, in order."""
        if to < self.now:
            raise ValueError(f"time runs forward only: {to} < {self.now}")
        changed: list[Generation] = []
        while (t := self.next_event_time()) is not None and t <= to:
            self._settle(t)
            ended = self._end_prefills(t) + self._finish_decoded(t)
            if not ended:  # a planned event must change the batch, or this would spin
                raise RuntimeError(f"the engine model planned an event at {t} that changes nothing")
            changed += ended + self._admit_waiting(t)
            self._replan(t)
            self.batch_changes += 1
        self.now = to
        return changed

    def abort(self, gen: Generation, now: float) -> list[Generation]:
        """``gen`` goes away at ``now`` (its client left); its slot and KV blocks are freed.

        Returns the other requests whose phase or first-token time changed: those admitted in
        its place and those whose prefill moved up in the lane.
        """
        changed = self.advance(now)
        if gen.phase == "done":
            return changed
        self._settle(now)
        if gen.phase == "waiting":
            self._waiting.remove(gen)
        elif gen.phase == "prefill":
            changed += self._leave_lane(gen, now)
        else:
            self._decoding.remove(gen)
        gen.aborted = True
        self._finish(gen, now)
        changed += self._admit_waiting(now)
        self._replan(now)
        self.batch_changes += 1
        return changed

    def emitted(self, gen: Generation) -> int:
        """Tokens ``gen`` has emitted by ``now``."""
        if gen.phase != "decode":
            return gen._emitted
        return gen._emitted + self._since_settled(gen, self._grid.count(self.now))

    def next_token_time(self, gen: Generation) -> float | None:
        """When ``gen``'s next token comes out as planned now; None while it waits or when done.

        Exact while it is before ``next_event_time``; a later change of the batch moves it.
        """
        if gen.phase == "prefill":
            return gen.first_token_at
        if gen.phase != "decode":
            return None
        return self._grid.time(max(self._grid.count(self.now), gen._first))

    # Events.

    def _admit(self, gen: Generation, t: float) -> bool:
        allocation = self.cache.allocate(gen._hashes, gen._extra_blocks)
        if allocation is None:
            return False
        gen._allocation, gen._hashes = allocation, []
        gen.phase, gen.admitted_at = "prefill", t
        gen.cached_tokens = allocation.cached_blocks * BLOCK_TOKENS
        self.prefix_queries += gen.prompt_tokens
        self.prefix_hits += gen.cached_tokens
        self.prompt_tokens_total += gen.prompt_tokens
        self._context += gen.prompt_tokens
        gen._prefill_from = max(t, self._lane_free_at)
        gen._prefill_to = gen._prefill_from + self.perf.ttft_s(gen.prompt_tokens, gen.cached_tokens)
        gen.first_token_at = self._lane_free_at = gen._prefill_to
        self._lane.append(gen)
        return True

    def _admit_waiting(self, t: float) -> list[Generation]:
        if not self._freed or not self._waiting:
            return []
        self._freed = False
        admitted: list[Generation] = []
        left: list[Generation] = []
        for gen in self._waiting:
            if self.running < self.max_num_seqs and self._admit(gen, t):
                admitted.append(gen)
            else:
                left.append(gen)
        self._waiting = left
        return admitted

    def _end_prefills(self, t: float) -> list[Generation]:
        ended: list[Generation] = []
        while self._lane and self._lane[0]._prefill_to <= t:
            gen = self._lane.popleft()
            ended.append(gen)
            gen._emitted = min(1, gen.max_tokens)  # the first token comes out of the prefill
            self._context += gen._emitted
            self._generated += gen._emitted
            if gen._emitted >= gen.max_tokens:
                self._finish(gen, t)
            else:
                gen.phase = "decode"
                gen._first = 0 if self._grid.origin is None else 1  # mid-step: joins the next
                self._decoding.append(gen)
        return ended

    def _finish_decoded(self, t: float) -> list[Generation]:
        done = [g for g in self._decoding if g._emitted >= g.max_tokens]
        if done:
            self._decoding = [g for g in self._decoding if g._emitted < g.max_tokens]
            for gen in done:
                self._finish(gen, t)
        return done

    def _finish(self, gen: Generation, t: float) -> None:
        gen.phase, gen.finished_at = "done", t
        self._freed = True
        if gen._allocation is not None:
            self.cache.release(gen._allocation)
            self._context -= gen.prompt_tokens + gen._emitted
            gen._allocation = None

    def _leave_lane(self, gen: Generation, t: float) -> list[Generation]:
        """Take ``gen`` out of the prefill lane; the prefills behind it move up."""
        behind = list(self._lane)[self._lane.index(gen) + 1 :]
        self._lane.remove(gen)
        saved = gen._prefill_to - max(t, gen._prefill_from)
        for other in behind:
            other._prefill_from -= saved
            other.first_token_at = other._prefill_to = other._prefill_to - saved
        self._lane_free_at -= saved
        return behind

    # The decode grid.

    def _since_settled(self, gen: Generation, boundaries: int) -> int:
        return min(gen.max_tokens - gen._emitted, max(0, boundaries - gen._first))

    def _settle(self, t: float) -> None:
        """Count the tokens out by ``t`` under the current steps, before the batch changes."""
        grid = self._grid
        if grid.origin is None:
            return
        count = grid.count(t)
        if count == 0:
            return  # the step in flight ends at the origin, as planned
        for gen in self._decoding:  # ``_since_settled``, inlined: the simulator's hot loop
            n = min(gen.max_tokens - gen._emitted, max(0, count - gen._first))
            gen._emitted += n
            gen._first = 0
            self._context += n
            self._generated += n
        # The step in flight keeps its length; one starting at ``t`` is planned anew.
        grid.origin = None if grid.time(count - 1) == t else grid.time(count)

    def _replan(self, t: float) -> None:
        """Plan the steps after the grid's origin for the batch as it now is."""
        grid, decoding = self._grid, self._decoding
        if not decoding:
            grid.origin, self._next_finish = None, None
            return
        joining = sum([g._first for g in decoding])  # 0 or 1 each: those joining next step
        if joining == len(decoding):  # nobody was stepping: start now
            grid.origin = None
            for gen in decoding:
                gen._first = 0
            joining = 0
        batch = len(self._lane) + len(decoding)
        if grid.origin is None:
            grid.origin = t + self.perf.decode_step_s(batch, self._context // batch)
        context = self._context + len(decoding) - joining  # at the origin
        finish = min([g._first + g.max_tokens - g._emitted - 1 for g in decoding])
        first = self.perf.decode_step_s(batch, context // batch)
        last = first
        if finish >= 2:  # the last step before the first finish
            last = self.perf.decode_step_s(batch, (context + len(decoding) * (finish - 1)) // batch)
        grid.plan(first, (last - first) / max(1, finish - 1))
        self._next_finish = grid.time(finish)
