"""Engine steps: what one costs, the steps between two changes of the batch in closed form, and
the prompt chunks they carry.

**What a step costs** (``StepCost``). vLLM runs one forward pass per step over every token it
schedules: one per decoding sequence and, with chunked prefill, chunks of waiting prompts up to
its token budget. The step's time is the roofline of the whole pass, as the sizing layer's
``PerfModel`` draws it: compute ``2 × active params`` FLOPs per scheduled token (decode and
prefill alike) against memory — the active weights read once, plus the KV the step's attention
reads (each decoding sequence's context, each prefill chunk's prompt so far) — whichever is
longer, plus the fixed per-step overhead. With no prefill tokens this is exactly
``PerfModel.decode_step_s`` for the batch; with a chunk of 2,048 prompt tokens on an H100 it is
that chunk's compute (~66 ms for Llama-3-8B), however few sequences decode beside it, which is
how a long prompt stalls everyone's streams in an aggregated engine. Attention's own FLOPs are
left out, as ``PerfModel`` leaves them out of prefill.

**The grid.** While the batch holds still, every decoding sequence gains one token of context
per step and the prefill chunks are all the same size, so a roofline step time grows linearly:
step ``j`` after the grid's origin lasts ``a + b·j``, and boundary ``j`` (the moment every
decoding sequence emits a token) falls at ``origin + j·a + b·j(j−1)/2``. The one step that breaks
the line — the one that takes the last, short chunk of the prompts waiting — is planned apart
(``plan(…, last_at, last_step)``): it ends a prefill, so the batch changes there and nothing
after it is used before the grid is planned anew. ``count(t)`` inverts the quadratic, then
settles the rounding by comparing neighbours with the very expression ``time`` uses, so an event
planned at ``time(j)`` always finds boundary ``j`` passed — the engine model depends on that to
make progress.

**The prompts to compute** (``PromptQueue``): first come first served, each step taking the
next tokens its budget leaves after the decodes — the rest of the head's prompt and, when that
is short, the start of the next — so which prompt ends at which boundary, and what each planned
step carries, follow from a running count. Pure arithmetic: no clock.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from gpufleet.sizing.performance import PerfModel

__all__ = ["Prompt", "PromptQueue", "StepCost", "StepGrid"]

#: Shortest step the grid accepts, so a degenerate performance model cannot stall ``count``.
_MIN_STEP_S = 1e-9


@dataclass(frozen=True, slots=True)
class StepCost:
    """One step's time on ``PerfModel``'s roofline, its terms precomputed for the hot path."""

    token_s: float  # compute per scheduled token: 2 × active params ÷ (FLOP/s × MFU × TP)
    weights_s: float  # reading the active weights once
    kv_token_s: float  # reading one token's KV
    overhead_s: float  # per step: launches, scheduling

    @classmethod
    def of(cls, perf: PerfModel) -> StepCost:
        per_byte = 1 / (perf.gpu.bandwidth_bytes_per_s * perf.mbu * perf.tp)
        return cls(
            1 / perf.prefill_tokens_per_s(),
            perf.active_weight_bytes * per_byte,
            perf.kv_bytes_per_token * per_byte,
            perf.step_overhead_s,
        )

    def seconds(self, decodes: int, context: int, prefill: int = 0, prefix: int = 0) -> float:
        """A step of ``decodes`` sequences holding ``context`` tokens between them, and
        ``prefill`` prompt tokens whose attention reads ``prefix`` tokens' KV."""
        compute = (decodes + prefill) * self.token_s
        memory = self.weights_s + (context + prefix) * self.kv_token_s
        return (compute if compute > memory else memory) + self.overhead_s


@dataclass(slots=True)
class StepGrid:
    origin: float | None = None  # boundary 0; None while nothing runs
    a: float = _MIN_STEP_S  # the first step after the origin
    b: float = 0.0  # how much each further step is longer
    last_at: int = 0  # a boundary whose step is planned apart (0: none)
    last_shift: float = 0.0  # that step's length less the line's

    def plan(
        self, first_step: float, growth: float, last_at: int = 0, last_step: float = 0.0
    ) -> None:
        """Steps ``first_step + growth·(j − 1)`` after the origin, but step ``last_at`` (≥ 1),
        when given, lasts ``last_step``."""
        self.a = max(_MIN_STEP_S, first_step)
        self.b = max(0.0, growth)
        self.last_at = last_at
        if last_at:
            self.last_shift = max(_MIN_STEP_S, last_step) - (self.a + self.b * (last_at - 1))
        else:
            self.last_shift = 0.0

    def time(self, j: int) -> float:
        """When boundary ``j`` falls."""
        if self.origin is None:
            raise ValueError("the grid has no origin: nothing runs")
        t = self.origin + j * self.a + self.b * j * (j - 1) / 2
        if self.last_at and j >= self.last_at:
            t += self.last_shift
        return t

    def count(self, t: float) -> int:
        """How many boundaries (0, 1, …) have fallen by ``t``."""
        if self.origin is None or t < self.origin:
            return 0
        elapsed, a, b = t - self.origin, self.a, self.b
        if self.last_at and t >= self.time(self.last_at):
            elapsed -= self.last_shift
        if b > 0:
            h = a - b / 2
            j = int((math.sqrt(h * h + 2 * b * elapsed) - h) / b)
        else:
            j = int(elapsed / a)
        while self.time(j + 1) <= t:
            j += 1
        while j > 0 and self.time(j) > t:
            j -= 1
        return j + 1


class Prompt(Protocol):
    """A request whose prompt is being computed: its length and what is left of it."""

    prompt_tokens: int
    prompt_left: int


P = TypeVar("P", bound=Prompt)


class PromptQueue(Generic[P]):
    """The prompts schedulable and not all computed yet, first come first served, and the
    chunks steps take of them: each step takes the next prompt tokens its budget leaves after
    the decodes, from the head on, several prompts in one step when the head's rest is short.

    ``prompt_left`` counts what is left as of the grid's last settlement; the step in flight
    (ending at the grid's origin) takes ``inflight`` of it, applied once that step has ended,
    and each later planned step ``chunk`` more.
    """

    __slots__ = ("chunk", "entries", "inflight", "inflight_tokens", "tokens")

    def __init__(self) -> None:
        self.entries: deque[P] = deque()
        self.tokens = 0  # their ``prompt_left`` together
        self.inflight: list[tuple[P, int]] = []
        self.inflight_tokens = 0
        self.chunk = 0  # prompt tokens each planned step after the origin takes

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def append(self, prompt: P) -> None:
        self.entries.append(prompt)
        self.tokens += prompt.prompt_left

    def remove(self, prompt: P) -> list[P]:
        """Take ``prompt`` out (a step in flight computing part of it keeps its length); the
        prompts behind it, which move up."""
        i = self.entries.index(prompt)
        del self.entries[i]
        self.tokens -= prompt.prompt_left
        for j, (other, n) in enumerate(self.inflight):
            if other is prompt:
                del self.inflight[j]
                self.inflight_tokens -= n
                break
        return list(self.entries)[i:]

    def pop_done(self) -> list[P]:
        """The prompts at the head with nothing left: computed, in order."""
        done: list[P] = []
        while self.entries and self.entries[0].prompt_left <= 0:
            done.append(self.entries.popleft())
        return done

    def take(self, tokens: int) -> None:
        """The step in flight takes the next ``tokens`` prompt tokens (fewer if fewer wait)."""
        self.inflight, self.inflight_tokens = [], 0
        for prompt in self.entries:
            if tokens <= 0:
                break
            if prompt.prompt_left:
                n = min(prompt.prompt_left, tokens)
                self.inflight.append((prompt, n))
                self.inflight_tokens += n
                tokens -= n

    def settle(self, steps: int) -> None:
        """The step in flight and ``steps`` planned steps after it have ended."""
        for prompt, n in self.inflight:
            prompt.prompt_left -= n
            self.tokens -= n
        self.inflight, self.inflight_tokens = [], 0
        tokens = self.chunk * steps
        for prompt in self.entries:
            if tokens <= 0:
                break
            n = min(prompt.prompt_left, tokens)
            prompt.prompt_left -= n
            self.tokens -= n
            tokens -= n

    def step(self, skip: int, tokens: int) -> tuple[int, int]:
        """A step taking ``tokens`` prompt tokens after the next ``skip``: how many there are,
        and the KV its attention reads (each prompt's tokens cached or computed, this chunk's
        included)."""
        taken = prefix = 0
        for prompt in self.entries:
            left = prompt.prompt_left
            if skip >= left:
                skip -= left
                continue
            here = left - skip
            n = min(here, tokens)
            prefix += prompt.prompt_tokens - here + n
            taken += n
            tokens -= n
            skip = 0
            if tokens <= 0:
                break
        return taken, prefix

    def ends_in_flight(self) -> bool:
        """Whether the step in flight takes the rest of some prompt."""
        return any(prompt.prompt_left == n for prompt, n in self.inflight)

    def head_left(self, skip: int) -> int:
        """What the first prompt not done by the next ``skip`` tokens has left after them."""
        for prompt in self.entries:
            if prompt.prompt_left > skip:
                return prompt.prompt_left - skip
            skip -= prompt.prompt_left
        return 0

    def ends_at(self, prompt: P) -> int:
        """The boundary at which ``prompt``'s last chunk is planned to be taken, were every
        step after the origin to take ``chunk`` tokens."""
        through = 0
        for other in self.entries:
            through += other.prompt_left
            if other is prompt:
                break
        beyond = through - self.inflight_tokens
        return 0 if beyond <= 0 else -(-beyond // max(1, self.chunk))
