"""The engine model: one replica's scheduler and timings as a pure, event-driven core.

It models continuous batching with chunked prefill the way vLLM's scheduler (V1) runs it, each
step timed on the sizing layer's ``PerfModel`` roofline (the one the planner and the simulator
use) by ``steps.StepCost``:

- **Admission.** A request is admitted while fewer than ``max_num_seqs`` sequences run and its
  KV blocks fit (``kvcache``: its prompt's blocks, reusing a cached prefix, plus blocks for the
  rest of the prompt and the output); otherwise it waits. Whenever a sequence ends, the waiting
  requests are tried in arrival order and each that fits is admitted, so a small request may
  pass a large one that does not fit yet. A newcomer that fits is admitted at once.
- **Request overhead.** An admitted request's prompt can be scheduled ``request_overhead_s``
  (``PerfModel``) later: tokenising it and handing it to the scheduler, which vLLM's API-server
  process does beside the engine's steps, so it holds no step.
- **Steps.** While anything runs the engine runs one step after another. A step schedules one
  token for every decoding sequence, then fills the rest of its token budget,
  ``max_num_batched_tokens``, with the prompts waiting to be computed, first come first served:
  several short prompts share a step, a long one is cut into chunks over several steps. That is
  vLLM V1's scheduler, where chunked prefill is always on (``vllm/v1/core/sched/scheduler.py``,
  ``schedule``: the running requests first — the decodes, then a prompt part-way through — then
  waiting ones while budget is left). A step lasts the roofline of everything it carries
  (``StepCost``), so in an aggregated engine every step that carries a chunk of a long prompt is
  compute-bound and the sequences decoding beside it wait that long for their next token: their
  inter-token latency jumps from a decode step (~10 ms for Llama-3-8B on an H100) to a chunk's
  compute (~270 ms for 8,192 tokens). That is the interference disaggregation removes
  (Sarathi-Serve, OSDI '24, calls it a generation stall; DistServe, OSDI '24, measures it).
- **First token.** The step that computes a prompt's last chunk samples its first token, when it
  ends; the sequence decodes from the next step. A prompt whose every block is cached still
  computes its last token (vLLM caps a cache hit at the prompt less one token).
- **Decode.** Every decoding sequence emits one token per step, so inter-token latency grows
  with the batch, with context, and with the prompt chunks sharing the steps.
- **Remote prefill** (disaggregation, ``kvtransfer``). A generation submitted with ``remote``
  had its prompt prefilled on another replica. It is admitted as any other (a slot; its
  prompt's blocks, those already cached here counting as cached), then pulls the KV of its
  uncached prompt tokens over the replica's link instead of prefilling: ``latency + bytes ÷
  bandwidth``, pulls queued first come first served on the link (the latency does not hold the
  link). Meanwhile it holds its slot and blocks but no token of any step. Then it joins the
  decode batch with its prompt done, and its first token comes out of its first decode step
  (vLLM's decode side computes only the prompt's last token, in that step); its
  ``first_token_at`` is known once that step has ended. Pulling counts as running, so
  ``max_num_seqs`` bounds pulls and decodes together (vLLM lists such a request as waiting,
  ``WAITING_FOR_REMOTE_KVS``, and gives it a slot when its KV has arrived).
- **Roles** need nothing of their own. A prefill-only replica is sent prefill calls
  (``max_tokens`` 1), so its steps carry prompt chunks back to back, a full budget each while
  prompts wait; a decode-only replica given remote KV computes no prompt token beyond each
  request's first decode step, so its streams never stall behind a prompt.

The budget's default is vLLM's for ``vllm serve`` on the replica's GPU
(``default_max_num_batched_tokens``); vLLM refuses a budget below ``max_num_seqs`` (every
running sequence needs a token of the step), and so does the model.

Why events, not steps: between two changes of the batch — an admission, a prompt becoming
schedulable, a prefill or a pull ending, a sequence finishing or going away — only the context
changes, by one token per decoding sequence per step, and every step carries the same prompt
chunk. Step ``j`` after a change is therefore ``a + b·j`` (``steps.StepGrid``): exact while the
roofline stays in one regime (memory-bound is linear in context, compute-bound constant); where
the steps cross from compute- to memory-bound, the chord from the first step to the last one
before the next change overestimates them slightly. The step that takes the last, short chunk of
the prompts waiting is timed apart: a prefill ends there. The time of a sequence's token ``k``
is then a quadratic in ``k`` and the tokens out by time ``t`` its inverse, so the model takes a
few events per request (a 1,000-token request alone: its admission, its prompt schedulable, its
prefill's end, its finish) and answers "how many tokens by now" and "when is the next one" in
closed form. A step in flight when the batch changes keeps its length and its contents; the new
batch shapes the steps after it, so the time of a sequence's next token never moves once that
step has begun.

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
from gpufleet.emulator.steps import PromptQueue, StepCost, StepGrid
from gpufleet.hardware import Accelerator
from gpufleet.sizing.performance import PerfModel

__all__ = [
    "EngineModel",
    "Generation",
    "Phase",
    "RemoteKV",
    "RequestTooLarge",
    "default_max_num_batched_tokens",
]

Phase = Literal["waiting", "prefill", "transfer", "decode", "done"]

_GIB = 2**30


def default_max_num_batched_tokens(gpu: Accelerator) -> int:
    """vLLM's token budget per step for ``vllm serve`` on ``gpu``: 16,384 with at least 160 GiB
    of memory (B200), 8,192 with at least 70 GiB unless an A100 (H100, H200, MI300X), else
    2,048 — ``EngineArgs.get_batch_defaults`` for the OpenAI API server (``vllm/engine/
    arg_utils.py``, read in vLLM 0.32.0; the A100 stays at 2,048 because a larger budget lowered
    its throughput, vLLM PR #17885). 2,048 is also ``SchedulerConfig.
    DEFAULT_MAX_NUM_BATCHED_TOKENS``, vLLM's fallback when the device cannot be queried."""
    if gpu.memory_bytes >= 160 * _GIB:
        return 16384
    if gpu.memory_bytes >= 70 * _GIB and "a100" not in gpu.name.lower():
        return 8192
    return 2048


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

    Times are model time. ``first_token_at`` is set when the first token is out: the end of
    the step that computed the prompt's last chunk or, with ``remote`` KV, of its first decode
    step (``EngineModel.next_token_time`` says when that is planned, meanwhile).
    ``transfer_ended_at`` (set at admission) is when its pull ends and ``pulled_tokens`` how
    many prompt tokens it pulled.
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
    #: Prompt tokens still to compute, as of the step grid's last settlement.
    prompt_left: int = 0
    _ready_at: float = field(default=0.0, repr=False)  # its prompt can be scheduled from then
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
    """One replica: waiting requests, the running batch, the prompts to compute, the KV cache.

    Drive it with ``submit`` (a request arrives), ``advance`` (time passes: processes every
    event up to then and returns the requests whose phase changed) and ``abort`` (a client goes
    away); ``next_event_time`` says when the batch changes next, ``next_token_time`` and
    ``emitted`` when a request's tokens come out.
    """

    def __init__(
        self,
        perf: PerfModel,
        kv_capacity_tokens: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be ≥ 1 (got {max_num_seqs})")
        budget = max_num_batched_tokens
        if budget is None:  # vLLM would refuse a larger max_num_seqs; the default bends
            budget = max(default_max_num_batched_tokens(perf.gpu), max_num_seqs)
        elif budget < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({budget}) must be ≥ max_num_seqs ({max_num_seqs}): "
                "every running sequence needs a token of each step (vLLM refuses it too)"
            )
        self.perf = perf
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = budget
        self.cache = KVCache(max(1, kv_capacity_tokens // BLOCK_TOKENS))
        self.now = 0.0
        self.batch_changes = 0  # events processed: admissions, prefills ended, finishes, aborts
        # Cumulative counters (vLLM names them in the shell's metrics).
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens_total = 0
        self.kv_pulls = 0  # remote-KV generations whose pull has ended
        self.kv_pulled_bytes = 0.0
        self._cost = StepCost.of(perf)
        self._generated = 0  # tokens out as of the grid's last settlement
        self._waiting: list[Generation] = []
        self._preparing: deque[Generation] = deque()  # admitted, in their request overhead
        #: Admitted, their prompt schedulable and not all computed; first come first served.
        self._lane: PromptQueue[Generation] = PromptQueue()
        self._transfers: deque[Generation] = deque()  # pulling their KV; in link order
        self._link_free_at = 0.0
        #: Remote-KV generations in the decode batch whose first token is not yet settled.
        self._first_pending: list[Generation] = []
        self._decoding: list[Generation] = []
        self._context = 0  # tokens the decoding sequences hold: prompts and tokens out
        self._grid = StepGrid()
        self._next_step_event: float | None = None  # a prefill or a sequence ends at a boundary
        #: A sequence ended since the waiting requests were last tried: only that frees a slot
        #: or KV blocks, so until then a retry would fail as the last one did.
        self._freed = False

    @property
    def running(self) -> int:
        """Admitted sequences: prefilling, pulling their KV, or decoding."""
        return len(self._preparing) + len(self._lane) + len(self._transfers) + len(self._decoding)

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
            self._join_lane(now)
            self._replan(now)
            self.batch_changes += 1
        else:
            self._waiting.append(gen)
        return gen

    def next_event_time(self) -> float | None:
        """When the batch changes next (a prompt becomes schedulable, a prefill or a pull ends,
        a sequence finishes), if ever."""
        t = self._next_step_event
        if self._preparing:
            ready = self._preparing[0]._ready_at
            t = ready if t is None or ready < t else t
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
            joined = self._join_lane(t)
            ended = self._end_prefills(t)
            if self._transfers:
                ended += self._end_transfers(t)
            ended += self._finish_decoded(t)
            if not ended and not joined:  # a planned event must change the batch, or this spins
                raise RuntimeError(f"the engine model planned an event at {t} that changes nothing")
            admitted = self._admit_waiting(t)
            if admitted:
                self._join_lane(t)
            changed += ended + admitted
            self._replan(t)
            self.batch_changes += 1
        self.now = to
        return changed

    def abort(self, gen: Generation, now: float) -> list[Generation]:
        """``gen`` goes away at ``now`` (its client left); its slot and KV blocks are freed.

        Returns the other requests whose phase changed or whose first token comes sooner:
        those admitted in its place and those whose prompt was behind its own (pulls behind it
        on the link move up too, silently: they have no first-token time yet).
        """
        changed = self.advance(now)
        if gen.phase == "done":
            return changed
        self._settle(now)
        if gen.phase == "waiting":
            self._waiting.remove(gen)
        elif gen.phase == "prefill":
            changed += self._leave_lane(gen)
        elif gen.phase == "transfer":
            self._leave_link(gen, now)
        else:
            self._decoding.remove(gen)
            self._context -= gen.prompt_tokens + gen._emitted
            if gen in self._first_pending:
                self._first_pending.remove(gen)
        gen.aborted = True
        self._finish(gen, now)
        admitted = self._admit_waiting(now)
        if admitted:
            self._join_lane(now)
        changed += admitted
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

        Exact while it is before ``next_event_time``; a later change of the batch moves it. For
        a prompt still being computed it is the plan's estimate, never later than the events
        it waits on (when its prompt becomes schedulable, the next boundary).
        """
        if gen.phase == "prefill":
            return self._first_token_estimate(gen)
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
        gen.prompt_left = max(1, gen.prompt_tokens - gen.cached_tokens)
        gen._ready_at = t + self.perf.request_overhead_s
        self._preparing.append(gen)  # the overhead is the same for all: ready in this order
        return True

    def _join_lane(self, t: float) -> int:
        """Prompts whose request overhead has passed by ``t`` become schedulable."""
        joined = 0
        while self._preparing and self._preparing[0]._ready_at <= t:
            self._lane.append(self._preparing.popleft())
            joined += 1
        return joined

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
        """The prompts computed by the step that ended at ``t``: their first token is out."""
        ended = self._lane.pop_done()
        for gen in ended:
            gen._emitted = min(1, gen.max_tokens)
            self._generated += gen._emitted
            gen.first_token_at = t  # the prompt is done: the token, if it is to have one, is out
            if gen._emitted >= gen.max_tokens:
                self._finish(gen, t)
            else:
                gen.phase = "decode"
                self._context += gen.prompt_tokens + gen._emitted
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
            if gen.max_tokens <= 0:
                self._finish(gen, t)
                continue
            gen.phase = "decode"  # its prompt is done: no prefill, its first token from a step
            self._context += gen.prompt_tokens
            gen._first = 0 if self._grid.origin is None else 1  # mid-step: joins the next
            self._decoding.append(gen)
            self._first_pending.append(gen)
        return ended

    def _finish_decoded(self, t: float) -> list[Generation]:
        done = [g for g in self._decoding if g._emitted >= g.max_tokens]
        if done:
            self._decoding = [g for g in self._decoding if g._emitted < g.max_tokens]
            for gen in done:
                self._context -= gen.prompt_tokens + gen._emitted
                self._finish(gen, t)
        return done

    def _finish(self, gen: Generation, t: float) -> None:
        gen.phase, gen.finished_at = "done", t
        self._freed = True
        if gen._allocation is not None:
            self.cache.release(gen._allocation)
            gen._allocation = None

    def _leave_lane(self, gen: Generation) -> list[Generation]:
        """Take ``gen``'s prompt out of those to compute; those behind it move up."""
        if gen in self._preparing:
            self._preparing.remove(gen)
            return []
        return self._lane.remove(gen)

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

    def _first_token_estimate(self, gen: Generation) -> float | None:
        if gen._ready_at > self.now:  # in its request overhead
            return gen._ready_at
        grid = self._grid
        if grid.origin is None:
            return None
        return grid.time(max(self._lane.ends_at(gen), grid.count(self.now)))

    # The step grid.

    def _since_settled(self, gen: Generation, boundaries: int) -> int:
        return min(gen.max_tokens - gen._emitted, max(0, boundaries - gen._first))

    def _settle(self, t: float) -> None:
        """Count the tokens out and the prompt tokens computed by ``t`` under the current
        steps, before the batch changes."""
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
        lane = self._lane
        if lane:
            lane.settle(count - 1)
        # The step in flight keeps its length and its chunk; one starting at ``t`` is planned anew.
        if grid.time(count - 1) == t:
            grid.origin = None
            lane.take(0)
        else:
            grid.origin = grid.time(count)
            lane.take(lane.chunk)

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
        grid, decoding, lane, cost = self._grid, self._decoding, self._lane, self._cost
        if not decoding and not lane:
            grid.origin, self._next_step_event = None, None
            lane.take(0)
            lane.chunk = 0
            return
        budget = self.max_num_batched_tokens
        joining = sum([g._first for g in decoding])  # 0 or 1 each: those joining next step
        if grid.origin is not None and joining == len(decoding) and not lane.inflight:
            grid.origin = None  # the step in flight carries nothing anyone waits for
        if grid.origin is None:  # start a step now
            for gen in decoding:
                gen._first = 0
            joining = 0
            lane.take(budget - len(decoding))
            chunk, prefix = lane.step(0, lane.inflight_tokens)
            grid.origin = t + cost.seconds(len(decoding), self._context, chunk, prefix)
        d = len(decoding)
        skip = lane.inflight_tokens
        rest = lane.tokens - skip  # prompt tokens left after the step in flight
        c = lane.chunk = budget - d if rest > 0 else 0
        context = self._context + d - joining  # at the origin
        # The next event on the grid: a sequence's last token, or a prompt's last chunk.
        event = min([g._first + g.max_tokens - g._emitted - 1 for g in decoding], default=-1)
        if lane.ends_in_flight():
            event = 0
        elif rest > 0:
            ends = -(-lane.head_left(skip) // c)
            event = ends if event < 0 else min(event, ends)
        if event < 0:
            raise RuntimeError("the engine model has a batch but no event to plan")
        tokens, prefix = lane.step(skip, c)
        first = cost.seconds(d, context, tokens, prefix)
        empty = -(-rest // c) if c else 0  # the step that takes the last prompt chunk
        short = bool(c) and event == empty and rest - c * (event - 1) < c
        full = event - 1 if short else event  # steps up to it take ``c`` prompt tokens each
        growth = 0.0
        if full >= 2:
            tokens, prefix = lane.step(skip + c * (full - 1), c)
            last = cost.seconds(d, context + d * (full - 1), tokens, prefix)
            growth = (last - first) / (full - 1)
        if short and event >= 2:
            tokens, prefix = lane.step(skip + c * (event - 1), c)
            step = cost.seconds(d, context + d * (event - 1), tokens, prefix)
            grid.plan(first, growth, event, step)
        else:
            grid.plan(first, growth)
        self._next_step_event = grid.time(event)
