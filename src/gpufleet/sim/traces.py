"""Traces for the simulator: the request record, synthetic KV block hashes and synthetic traffic.

A trace is an iterator of :class:`TraceRequest` in arrival order. Real traces give no text, so
prefix-aware routing and the emulator's KV cache get *synthetic* block hashes: a prefix group
stands for one fixed token stream (a system prompt), a session for one growing conversation,
and anything else in a prompt is unique to its request. Block *k* of a stream gets the id
``seed(stream) + k``: one blake2b per request (and one per group, cached) instead of one per
block, so ids cost little more than building the list — the simulator asks for them on its hot
path, millions of times. An id still stands for everything before it, as the emulator's chained
hashes do: a stream's seed covers the group and the length of the shared part in front of it.

The generators are deterministic for a seed (their own ``random.Random``, never the global
one). Their defaults are a plausible chat service, not a measured one; pass the shapes you
have. File replay lives in :mod:`gpufleet.sim.trace_files`; the format is in docs/sim-traces.md.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, count
from operator import attrgetter

from gpufleet.emulator.kvcache import BLOCK_TOKENS

__all__ = [
    "BLOCK_TOKENS",
    "Bursts",
    "Lengths",
    "SharedPrefix",
    "TraceRequest",
    "batch_night",
    "block_hashes",
    "chats",
    "diurnal",
    "diurnal_rate",
    "merge",
    "poisson",
]

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class TraceRequest:
    at: float  # seconds from the trace's start (non-decreasing in a trace)
    prompt_tokens: int  # >= 1
    output_tokens: int  # >= 1
    model: str | None = None
    tenant: str | None = None
    session: str | None = None
    prefix_group: str | None = None
    prefix_tokens: int = (
        0  # tokens of the prompt shared with others of the same prefix_group (<= prompt_tokens)
    )


# --- synthetic block hashes ---------------------------------------------------------------------

_SEED_BITS = 62  # seeds + block index stay below 2**63: a signed 64-bit int holds every id


def _seed(key: str) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - _SEED_BITS)


_shared_seed = lru_cache(maxsize=65_536)(_seed)  # groups and sessions recur; requests do not


def block_hashes(request: TraceRequest) -> list[int]:
    """Ids of the prompt's whole ``BLOCK_TOKENS``-token blocks, as the emulator's KV cache keys them.

    The first ``prefix_tokens // BLOCK_TOKENS`` blocks are the prefix group's (equal for every
    request of the group); the rest are the session's conversation when ``session`` is set (a
    later turn repeats an earlier turn's prompt and output, so it shares all of the earlier
    turn's blocks) and the request's own otherwise. A request's own stream is keyed by all its
    fields, so two requests share nothing beyond their group unless they are identical.
    """
    n = request.prompt_tokens // BLOCK_TOKENS
    group = request.prefix_group
    shared = min(request.prefix_tokens, request.prompt_tokens) // BLOCK_TOKENS if group else 0
    if shared:
        start = _shared_seed(f"g\x1f{group}")
        hashes = list(range(start, start + shared))
        if shared == n:
            return hashes
    else:
        hashes = []
    if request.session is not None:
        start = _shared_seed(f"s\x1f{group}\x1f{request.prefix_tokens}\x1f{request.session}")
    else:
        start = _seed(
            f"r\x1f{group}\x1f{request.prefix_tokens}\x1f{request.at!r}\x1f{request.prompt_tokens}"
            f"\x1f{request.output_tokens}\x1f{request.model}\x1f{request.tenant}"
        )
    hashes.extend(range(start + shared, start + n))
    return hashes


# --- distributions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lengths:
    """A token count (or a count of turns, of requests): lognormal with this mean, clipped.

    ``sigma`` is the lognormal's shape (the standard deviation of the log); 0 makes every draw
    the mean. Clipping to ``[low, high]`` moves the mean a little when sigma is large.
    """

    mean: float
    sigma: float = 0.8
    low: int = 1
    high: int = 32_768

    def __post_init__(self) -> None:
        if not (self.mean > 0 and self.sigma >= 0 and 1 <= self.low <= self.high):
            raise ValueError(f"{self}: need mean > 0, sigma >= 0 and 1 <= low <= high")

    def sample(self, rng: random.Random) -> int:
        if self.sigma == 0:
            x = self.mean
        else:
            x = rng.lognormvariate(math.log(self.mean) - self.sigma**2 / 2, self.sigma)
        return min(self.high, max(self.low, round(x)))


def _lengths(value: int | Lengths) -> Lengths:
    return value if isinstance(value, Lengths) else Lengths(value, sigma=0.0, high=max(1, value))


PROMPT = Lengths(mean=1024, sigma=1.0)
OUTPUT = Lengths(mean=256, sigma=0.8, high=8192)
TURNS = Lengths(mean=4, sigma=0.8, high=64)
USER_TURN = Lengths(mean=128, sigma=1.0, high=8192)
JOB_REQUESTS = Lengths(mean=2000, sigma=0.5, high=100_000)


class _Mix:
    """Names drawn by weight (one uniform draw each); none given: always None."""

    __slots__ = ("cumulative", "names", "total")

    def __init__(self, weights: Mapping[str, float] | None, what: str) -> None:
        items = list((weights or {}).items())
        if any(not w > 0 for _, w in items):
            raise ValueError(f"{what} weights must be positive: {dict(items)}")
        self.names = [name for name, _ in items]
        self.cumulative = list(accumulate(w for _, w in items))
        self.total = self.cumulative[-1] if items else 0.0

    def pick(self, rng: random.Random) -> str | None:
        if len(self.names) < 2:
            return self.names[0] if self.names else None
        return self.names[bisect_right(self.cumulative, rng.random() * self.total)]


@dataclass(frozen=True, slots=True)
class SharedPrefix:
    """A ``share`` of requests begin with one of ``groups`` shared prompts of ``tokens`` tokens.

    The group is drawn uniformly; the shared tokens come on top of the request's own prompt
    length. Groups are named ``{name}-{i}``.
    """

    groups: int
    tokens: int
    share: float = 1.0
    name: str = "prefix"

    def __post_init__(self) -> None:
        if self.groups < 1 or self.tokens < 0 or not 0 <= self.share <= 1:
            raise ValueError(f"{self}: need groups >= 1, tokens >= 0, 0 <= share <= 1")


class _Draw:
    """One request's sizes and labels, in a fixed order of draws from the trace's generator."""

    __slots__ = ("models", "output", "prefix", "prompt", "rng", "tenants")

    def __init__(
        self,
        rng: random.Random,
        prompt: int | Lengths,
        output: int | Lengths,
        models: Mapping[str, float] | None,
        tenants: Mapping[str, float] | None,
        prefix: SharedPrefix | None,
    ) -> None:
        self.rng = rng
        self.prompt = _lengths(prompt)
        self.output = _lengths(output)
        self.models = _Mix(models, "model")
        self.tenants = _Mix(tenants, "tenant")
        self.prefix = prefix

    def __call__(self, at: float) -> TraceRequest:
        rng = self.rng
        prompt = self.prompt.sample(rng)
        output = self.output.sample(rng)
        group, shared = None, 0
        p = self.prefix
        if p is not None and p.tokens and (p.share == 1 or rng.random() < p.share):
            group, shared = f"{p.name}-{rng.randrange(p.groups)}", p.tokens
        return TraceRequest(
            at, prompt + shared, output, self.models.pick(rng), self.tenants.pick(rng), None, group,
            shared,
        )  # fmt: skip


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# --- generators -----------------------------------------------------------------------------------


def poisson(
    rate_per_s: float,
    duration_s: float,
    *,
    seed: int = 0,
    prompt: int | Lengths = PROMPT,
    output: int | Lengths = OUTPUT,
    models: Mapping[str, float] | None = None,
    tenants: Mapping[str, float] | None = None,
    prefix: SharedPrefix | None = None,
) -> Iterator[TraceRequest]:
    """Arrivals at a constant rate, exponential gaps, over ``[0, duration_s)``."""
    _need(rate_per_s > 0 and duration_s > 0, "poisson: rate_per_s and duration_s must be > 0")
    rng = random.Random(seed)
    return _poisson(
        rng, rate_per_s, duration_s, _Draw(rng, prompt, output, models, tenants, prefix)
    )


def _poisson(
    rng: random.Random, rate: float, duration: float, draw: _Draw
) -> Iterator[TraceRequest]:
    t = rng.expovariate(rate)
    while t < duration:
        yield draw(t)
        t += rng.expovariate(rate)


@dataclass(frozen=True, slots=True)
class Bursts:
    """Windows of ``length_s`` where the rate is ``multiplier`` times the diurnal curve.

    Their starts are ``starts`` when given, else ``count`` times drawn uniformly over the trace.
    Overlapping windows do not compound.
    """

    count: int = 0
    multiplier: float = 3.0
    length_s: float = 600.0
    starts: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.count < 0 or self.multiplier < 1 or self.length_s <= 0:
            raise ValueError(f"{self}: need count >= 0, multiplier >= 1, length_s > 0")


def diurnal_rate(
    t: float, peak_rate_per_s: float, trough_ratio: float = 0.2, peak_hour: float = 14.0
) -> float:
    """The daily curve without bursts: a cosine over 24 h, the trace starting at midnight.

    The rate is ``peak_rate_per_s`` at ``peak_hour`` and ``trough_ratio`` of that twelve hours
    away.
    """
    hour = t / 3600.0 % 24.0
    wave = 0.5 * (1.0 + math.cos(2.0 * math.pi * (hour - peak_hour) / 24.0))
    return peak_rate_per_s * (trough_ratio + (1.0 - trough_ratio) * wave)


def diurnal(
    peak_rate_per_s: float,
    duration_s: float = DAY_S,
    *,
    trough_ratio: float = 0.2,
    peak_hour: float = 14.0,
    bursts: Bursts | None = None,
    seed: int = 0,
    prompt: int | Lengths = PROMPT,
    output: int | Lengths = OUTPUT,
    models: Mapping[str, float] | None = None,
    tenants: Mapping[str, float] | None = None,
    prefix: SharedPrefix | None = None,
) -> Iterator[TraceRequest]:
    """A non-homogeneous Poisson process following :func:`diurnal_rate` and its bursts.

    Drawn by thinning (Lewis and Shedler): candidates at the highest rate the trace reaches,
    each kept with probability rate(t) / highest.
    """
    _need(peak_rate_per_s > 0 and duration_s > 0, "diurnal: rates and duration_s must be > 0")
    _need(0 < trough_ratio <= 1, "diurnal: trough_ratio must be in (0, 1]")
    rng = random.Random(seed)
    b = bursts or Bursts()
    starts = sorted(b.starts or [rng.uniform(0, duration_s) for _ in range(b.count)])
    draw = _Draw(rng, prompt, output, models, tenants, prefix)
    return _diurnal(rng, peak_rate_per_s, duration_s, trough_ratio, peak_hour, b, starts, draw)


def _diurnal(
    rng: random.Random,
    peak: float,
    duration: float,
    trough_ratio: float,
    peak_hour: float,
    bursts: Bursts,
    starts: list[float],
    draw: _Draw,
) -> Iterator[TraceRequest]:
    highest = peak * (bursts.multiplier if starts else 1.0)
    t = rng.expovariate(highest)
    while t < duration:
        rate = diurnal_rate(t, peak, trough_ratio, peak_hour)
        i = bisect_right(starts, t) - 1  # windows are equally long: the latest start decides
        if i >= 0 and t < starts[i] + bursts.length_s:
            rate *= bursts.multiplier
        if rng.random() * highest < rate:
            yield draw(t)
        t += rng.expovariate(highest)


class _Session:
    __slots__ = ("context", "group", "id", "model", "tenant", "turns_left")

    def __init__(
        self, id: str, group: str | None, model: str | None, tenant: str | None, turns: int
    ) -> None:
        self.id, self.group, self.model, self.tenant = id, group, model, tenant
        self.turns_left = turns
        self.context = 0  # prompt and output tokens of the turns so far


def chats(
    sessions_per_s: float,
    duration_s: float,
    *,
    turns: int | Lengths = TURNS,
    think_time_s: float = 20.0,
    decode_s_per_token: float = 0.02,
    system_prompt_tokens: int = 512,
    prefix_groups: int = 4,
    user: int | Lengths = USER_TURN,
    output: int | Lengths = OUTPUT,
    max_prompt_tokens: int = 32_768,
    models: Mapping[str, float] | None = None,
    tenants: Mapping[str, float] | None = None,
    name: str = "chat",
    seed: int = 0,
) -> Iterator[TraceRequest]:
    """Multi-turn conversations: each turn's prompt is the last prompt, its answer and new words.

    Sessions start as a Poisson process; each picks a system prompt (one of ``prefix_groups``,
    ``system_prompt_tokens`` long, shared by every session of the group), a model, a tenant and
    a number of turns. The next turn comes ``output × decode_s_per_token`` (reading the answer
    as it streams) plus an exponential think time after the last one: a trace cannot know the
    real response time. A session ends after its turns, when its prompt would pass
    ``max_prompt_tokens``, or at ``duration_s``. Sessions are ``{name}-{seed}-{n}`` so merged
    traces of different seeds do not share conversations.
    """
    _need(sessions_per_s > 0 and duration_s > 0, "chats: sessions_per_s, duration_s must be > 0")
    _need(think_time_s >= 0 and decode_s_per_token >= 0, "chats: times must be >= 0")
    _need(system_prompt_tokens >= 0 and prefix_groups >= 1, "chats: need a prefix group or more")
    _need(max_prompt_tokens >= 1, "chats: max_prompt_tokens must be >= 1")
    rng = random.Random(seed)
    shape = _ChatShape(
        _lengths(turns), think_time_s, decode_s_per_token, system_prompt_tokens, prefix_groups,
        _lengths(user), _lengths(output), max_prompt_tokens, _Mix(models, "model"),
        _Mix(tenants, "tenant"), f"{name}-{seed}", name,
    )  # fmt: skip
    return _chats(rng, sessions_per_s, duration_s, shape)


@dataclass(frozen=True, slots=True)
class _ChatShape:
    turns: Lengths
    think_s: float
    decode_s: float
    system: int
    groups: int
    user: Lengths
    output: Lengths
    max_prompt: int
    models: _Mix
    tenants: _Mix
    session_prefix: str
    group_prefix: str


def _chats(
    rng: random.Random, rate: float, duration: float, shape: _ChatShape
) -> Iterator[TraceRequest]:
    pending: list[tuple[float, int, _Session]] = []  # next turn of each open session
    order = count()
    next_start = rng.expovariate(rate)
    while True:
        while next_start < duration and (not pending or next_start <= pending[0][0]):
            n = next(order)
            group = f"{shape.group_prefix}-system-{rng.randrange(shape.groups)}"
            session = _Session(
                f"{shape.session_prefix}-{n}",
                group if shape.system else None,
                shape.models.pick(rng),
                shape.tenants.pick(rng),
                shape.turns.sample(rng),
            )
            session.context = shape.system
            heapq.heappush(pending, (next_start, n, session))
            next_start += rng.expovariate(rate)
        if not pending:
            return
        at, n, s = heapq.heappop(pending)
        prompt = s.context + shape.user.sample(rng)
        if prompt > shape.max_prompt:
            continue
        output = shape.output.sample(rng)
        yield TraceRequest(at, prompt, output, s.model, s.tenant, s.id, s.group, shape.system)
        s.context = prompt + output
        s.turns_left -= 1
        think = rng.expovariate(1.0 / shape.think_s) if shape.think_s else 0.0
        later = at + output * shape.decode_s + think
        if s.turns_left and later < duration:
            heapq.heappush(pending, (later, n, s))


def batch_night(
    jobs: int,
    *,
    window: tuple[float, float] = (1.0, 5.0),
    requests_per_job: int | Lengths = JOB_REQUESTS,
    job_rate_per_s: float = 20.0,
    duration_s: float = DAY_S,
    prefix_tokens: int = 0,
    prompt: int | Lengths = PROMPT,
    output: int | Lengths = OUTPUT,
    models: Mapping[str, float] | None = None,
    tenant: str | None = "batch",
    name: str = "batch",
    seed: int = 0,
) -> Iterator[TraceRequest]:
    """``jobs`` batch jobs a day, each starting at a uniform time within ``window`` (hours).

    A window may wrap midnight, (22, 6): a day's jobs then start in its first six hours or its
    last two, so a one-day trace holds whole nights' work. A job sends its requests as a
    Poisson process at ``job_rate_per_s`` from its start, all for one model (drawn from
    ``models``) and ``tenant``; with ``prefix_tokens`` its requests share that many tokens of
    instructions (prefix group ``{name}-{seed}-{job}``). Requests past ``duration_s`` are
    dropped.
    """
    start_h, end_h = window
    _need(jobs >= 0 and job_rate_per_s > 0 and duration_s > 0, "batch_night: bad counts or rates")
    _need(0 <= start_h <= 24 and 0 <= end_h <= 24 and start_h != end_h, "batch_night: window")
    _need(prefix_tokens >= 0, "batch_night: prefix_tokens must be >= 0")
    rng = random.Random(seed)
    span_h = (end_h - start_h) % 24.0
    mix = _Mix(models, "model")
    sizes, prompts, outputs = _lengths(requests_per_job), _lengths(prompt), _lengths(output)
    streams: list[Iterator[TraceRequest]] = []
    n = 0
    day = 0.0
    while day < duration_s:
        for _ in range(jobs):
            begin = day + (start_h + rng.random() * span_h) % 24.0 * 3600.0
            group = f"{name}-{seed}-{n}" if prefix_tokens else None
            job = _Draw(random.Random(rng.getrandbits(64)), prompts, outputs, None, None, None)
            model, size = mix.pick(rng), sizes.sample(rng)
            shape = (model, tenant, group, prefix_tokens, size)
            streams.append(_job(job, begin, job_rate_per_s, duration_s, shape))
            n += 1
        day += DAY_S
    return merge(*streams)


def _job(
    draw: _Draw,
    begin: float,
    rate: float,
    duration: float,
    shape: tuple[str | None, str | None, str | None, int, int],
) -> Iterator[TraceRequest]:
    model, tenant, group, shared, size = shape
    t = begin
    for _ in range(size):
        t += draw.rng.expovariate(rate)
        if t >= duration:
            return
        own = draw(t)
        yield TraceRequest(
            t, own.prompt_tokens + shared, own.output_tokens, model, tenant, None, group, shared
        )


def merge(*traces: Iterable[TraceRequest]) -> Iterator[TraceRequest]:
    """Several traces as one, by arrival time (ties keep the order of the arguments)."""
    return heapq.merge(*traces, key=attrgetter("at"))
