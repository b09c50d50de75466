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
  counts every admitted sequence (but those pulling their KV) and ``context`` the tokens they
  hold, so inter-token latency grows with the batch and with context. A sequence whose prefill
  ends during a step joins the next one.
- **Remote prefill** (disaggregation, ``kvtransfer``). A generation submitted with ``remote``
  had its prompt prefilled on another replica. It is admitted as any other (a slot; its
  prompt's blocks, those already cached here counting as cached), then pulls the KV of its
  uncached prompt tokens over the replica's link instead of prefilling: ``latency + bytes ÷
  bandwidth``, pulls queued first come first served on the link as prefills are on the compute
  lane (the latency does not hold the link). Meanwhile it holds its slot and blocks, but
  neither the prefill lane nor a place in the decode batch. Then it joins the decode batch with
  its prompt done, and its first token comes out of its first decode step (vLLM's decode side
  recomputes only the prompt's last token, in that step); its ``first_token_at`` is known once
  that step has ended. Pulling counts as running, so ``max_num_seqs`` bounds pulls and decodes
  together (vLLM lists such a request as waiting, ``WAITING_FOR_REMOTE_KVS``, and gives it a
  slot when its KV has arrived).

Why events, not steps: between two changes of the batch — an admission, a prefill or a pull
ending, a sequence finishing or going away — only the context changes, by one token per decoding
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

__all__ = ["EngineModel", "Generation", "Phase", "RemoteKV", "RequestTooLarge"]

Phase = Literal["waiting", "prefill", "transfer", "decode", "done"]


class RequestTooLarge(ValueError):
    """A prompt and its output can never fit the KV cache: refused at once, never queued."""


@dataclass(frozen=True, slots=True)
class RemoteKV:
    """Where a generation's prompt KV comes from when another replica prefilled it."""

    bytes_per_token: float  # KV bytes moved per pulled prompt token, over every link
    bytes_per_s: float  # the links together
    latency_s: float  # per transfer, on top of the bytes (it does not hold the link)

    def __post_init__(self) -> None:
        if self.bytes_per_token < 0 or self.bytes_per_s <= 0 or self.latency_s < 0:
            raise ValueError(f"not a KV link: {self}")

    def busy_s(self, tokens: int) -> float:
        """How long pulling ``tokens`` tokens' KV holds the link."""
        return max(0, tokens) * self.bytes_per_token / self.bytes_per_s

    def seconds(self, tokens: int) -> float:
        """A pull of ``tokens`` tokens' KV on an idle link: latency + bytes ÷ bandwidth."""
        return self.latency_s + self.busy_s(tokens)


@dataclass(eq=False, slots=True)
class Generation:
    """One request's life in the model. Callers read it; only the model writes it.

    Times are model time. ``first_token_at`` is set when the request is admitted: the prefill
    lane is first come first served, so the end of its prefill is known then. A generation with
    ``remote`` KV gets it only once its first decode step has ended; ``transfer_ended_at`` (set
    at admission) is when its pull ends and ``pulled_tokens`` how many prompt tokens it pulled.
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
    remote: RemoteKV | None = None
    pulled_tokens: int = 0
    _hashes: list[int] = field(default_factory=list, repr=False)
    _extra_blocks: int = field(default=0, repr=False)
    _allocation: Allocation | None = field(default=None, repr=False)
    _prefill_from: float = field(default=0.0, repr=False)  # its slot in the prefill lane
    _prefill_to: float = field(default=0.0, repr=False)
    _pull_from: float = field(default=0.0, repr=False)  # its slot on the link
    _pull_to: float = field(default=0.0, repr=False)
    _pull_end: float = field(default=0.0, repr=False)  # its pull's end: ``_pull_to`` + latency

    @property
    def transfer_ended_at(self) -> float | None:
        """When its pull ends (or ended); None without ``remote`` or before admission."""
        return None if self.remote is None or self.admitted_at is None else self._pull_end

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
        self.kv_pulls = 0  # remote-KV generations whose pull has ended
        self.kv_pulled_bytes = 0.0
        self._generated = 0  # tokens out as of the grid's last settlement
        self._waiting: list[Generation] = []
        self._lane: deque[Generation] = deque()  # admitted, prefill not ended; in lane order
        self._lane_free_at = 0.0
        self._transfers: deque[Generation] = deque()  # pulling their KV; in link order
        self._link_free_at = 0.0
        #: Remote-KV generations in the decode batch whose first token is not yet settled.
        self._first_pending: list[Generation] = []
        self._decoding: list[Generation] = []
        self._context = 0  # tokens held by admitted sequences: prompts and tokens out
        self._grid = StepGrid()
        self._next_finish: float | None = None
        #: A sequence ended since the waiting requests were last tried: only that frees a slot
        #: or KV blocks, so until then a retry would fail as the last one did.
        self._freed = False

    @property
    def running(self) -> int:
        """Admitted sequences: prefilling, pulling their KV, or decoding."""
        return len(self._lane) + len(self._transfers) + len(self._decoding)

    @property
    def transferring(self) -> int:
        return len(self._transfers)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def generated_tokens(self) -> int:
        """Tokens emitted by ``now``, over all requests."""
        count = self._grid.count(self.now)
        return self._generated + sum(self._since_settled(g, count) for g in self._decoding)

    def submit(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        now: float,
        *,
        remote: RemoteKV | None = None,
    ) -> Generation:
        """A request arrives at ``now``: admitted at once if it fits, else it waits.

        It advances to ``now`` first, silently: a driver that needs to hear of the requests an
        earlier event changed calls ``advance(now)`` before. With ``remote``, another replica
        prefilled the prompt: it pulls the prompt's KV over that link instead of prefilling.
        """
        return self.submit_blocks(len(prompt), block_hashes(prompt), max_tokens, now, remote=remote)

    def submit_blocks(
        self,
        prompt_tokens: int,
        hashes: list[int],
        max_tokens: int,
        now: float,
        *,
        remote: RemoteKV | None = None,
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
        gen = Generation(
            prompt_tokens, max_tokens, now, remote=remote, _hashes=hashes, _extra_blocks=extra
        )
        if self.running < self.max_num_seqs and self._admit(gen, now):
            self._settle(now)  # the tokens out so far, under the steps planned before it came
            self._replan(now)
            self.batch_changes += 1
        else:
            self._waiting.append(gen)
        return gen

    def next_event_time(self) -> float | None:
        """When the batch changes next (a prefill or a pull ends, a sequence finishes), if ever."""
        t = self._next_finish
        if self._lane:
            ends = self._lane[0]._prefill_to
            t = ends if t is None or ends < t else t
        if self._transfers:  # only with disaggregation: the simulator's hot path skips it
            pulled = self._transfers[0]._pull_end
            t = pulled if t is None or pulled < t else t
        return t

    def advance(self, to: float) -> list[Generation]:
        """Process every event up to ``to``; the requests whose phase changed, in order."""
        if to < self.now:
            raise ValueError(f"time runs forward only: {to} < {self.now}")
        changed: list[Generation] = []
        while (t := self.next_event_time()) is not None and t <= to:
            self._settle(t)
            ended = self._end_prefills(t)
            if self._transfers:
                ended += self._end_transfers(t)
            ended += self._finish_decoded(t)
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
        its place and those whose prefill moved up in the lane (pulls behind it on the link move
        up too, silently: they have no first-token time yet).
        """
        changed = self.advance(now)
        if gen.phase == "done":
            return changed
        self._settle(now)
        if gen.phase == "waiting":
            self._waiting.remove(gen)
        elif gen.phase == "prefill":
            changed += self._leave_lane(gen, now)
        elif gen.phase == "transfer":
            self._leave_link(gen, now)
            self._context += gen.prompt_tokens  # ``_finish`` takes back what a joined one holds
        else:
            self._decoding.remove(gen)
            if gen in self._first_pending:
                self._first_pending.remove(gen)
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
        if gen.phase != "decode":  # waiting, pulling its KV, or done
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
        if gen.remote is not None:
            self._start_pull(gen, gen.remote, t)
            return True
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
        running = self.running  # each admission adds one: counted here, not re-read per request
        for gen in self._waiting:
            if running < self.max_num_seqs and self._admit(gen, t):
                running += 1
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

    def _start_pull(self, gen: Generation, remote: RemoteKV, t: float) -> None:
        """Queue ``gen``'s pull of its uncached prompt tokens' KV on the link."""
        gen.phase = "transfer"
        gen.pulled_tokens = gen.prompt_tokens - gen.cached_tokens
        gen._pull_from = max(t, self._link_free_at)
        gen._pull_to = self._link_free_at = gen._pull_from + remote.busy_s(gen.pulled_tokens)
        ends = gen._pull_to + remote.latency_s
        if self._transfers:  # pulls end in link order, whatever their latencies
            ends = max(ends, self._transfers[-1]._pull_end)
        gen._pull_end = ends
        self._transfers.append(gen)

    def _end_transfers(self, t: float) -> list[Generation]:
        ended: list[Generation] = []
        while self._transfers and self._transfers[0]._pull_end <= t:
            gen = self._transfers.popleft()
            assert gen.remote is not None
            ended.append(gen)
            self.kv_pulls += 1
            self.kv_pulled_bytes += gen.pulled_tokens * gen.remote.bytes_per_token
            self._context += gen.prompt_tokens
            if gen.max_tokens <= 0:
                self._finish(gen, t)
                continue
            gen.phase = "decode"  # its prompt is done: no prefill, its first token from a step
            gen._first = 0 if self._grid.origin is None else 1  # mid-step: joins the next
            self._decoding.append(gen)
            self._first_pending.append(gen)
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

    def _leave_link(self, gen: Generation, t: float) -> None:
        """Take ``gen`` off the link; the pulls behind it that have not begun move up."""
        i = self._transfers.index(gen)
        del self._transfers[i]
        if i:
            free, end = self._transfers[i - 1]._pull_to, self._transfers[i - 1]._pull_end
        else:
            free, end = min(t, gen._pull_to), t
        for other in list(self._transfers)[i:]:
            assert other.remote is not None
            if other._pull_from > t:
                busy = other._pull_to - other._pull_from
                other._pull_from = max(t, free)
                other._pull_to = other._pull_from + busy
            free = other._pull_to
            other._pull_end = end = max(other._pull_to + other.remote.latency_s, end)
        self._link_free_at = free

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
        if self._first_pending:
            self._settle_first_tokens(count)
        for gen in self._decoding:  # ``_since_settled``, inlined: the simulator's hot loop
            n = min(gen.max_tokens - gen._emitted, max(0, count - gen._first))
            gen._emitted += n
            gen._first = 0
            self._context += n
            self._generated += n
        # The step in flight keeps its length; one starting at ``t`` is planned anew.
        grid.origin = None if grid.time(count - 1) == t else grid.time(count)

    def _settle_first_tokens(self, count: int) -> None:
        """The first-token times of remote-KV generations whose first step ended by boundary
        ``count − 1``: boundary ``_first``, under the steps planned before the batch changes."""
        pending: list[Generation] = []
        for gen in self._first_pending:
            if count > gen._first:
                gen.first_token_at = self._grid.time(gen._first)
            else:
                pending.append(gen)
        self._first_pending = pending

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
