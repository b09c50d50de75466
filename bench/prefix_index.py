"""Precise against approximate prefix routing under cache pressure, same fleet, same trace (issue 20).

Four emulated L4s serve Llama-3-8B through a real ``gpufleet up`` (gateway, controller, one
emulator process per replica, real HTTP), twice, from cold caches, with the model's
``routing: {policy: prefix, prefixIndex: …}``:

- **approximate** (the default): the gateway's ``PrefixAware`` believes a replica holds the
  prompt blocks the gateway sent it — an LRU of 65,536 blocks per replica, a million tokens,
  far more than an L4 holds — so under cache pressure it still counts prefixes the engine
  evicted: it sends a request to a replica that must prefill it all, and counts that prefill
  as nothing in the replica's backlog;
- **precise**: the engines publish their KV-cache events (vLLM's ``--kv-events-config``), the
  gateway keeps a block index per replica, tokenizes each prompt through the engine's
  ``/tokenize`` and gives the same policy each replica's really-cached prefix. The gateway's
  ``gpufleet_prefix_lookups_total{index="precise"}`` proves the run routed on that view.

Cache pressure: an L4 at vLLM's default ``--gpu-memory-utilization`` 0.9 keeps 21.6 GB, of
which Llama-3-8B's bf16 weights take 16 GB and vLLM's overhead more, leaving ~26k tokens of KV a
replica — six 4k-token prefixes — which is how an 8B model is commonly served on a 24 GB card,
not a knob turned to make the cache small. The trace's prefix groups are as many as make the
distinct prefix tokens ``--pressure`` times the fleet's KV (3 by default: ~76 groups), so no
placement can cache them all, and the popular ones decide the hit rate.

The workload (many tenants, each with a long system prompt its users share, on four GPUs):
each request is one group's 4,096-token prefix and a unique suffix of 32–256 tokens, answered
with 16 streamed tokens; groups drawn with Zipf popularity (exponent ``--zipf``, 1 by default:
a few hot tenants, a long tail); Poisson arrivals for ``--duration`` model seconds at
``--load`` times the rate the fleet could prefill if no prompt hit the cache (the roofline's
prefill of the mean prompt, ≈1.1 s on an L4): at 1 and above the fleet keeps up only by
reusing prefixes, so where a prefix is cached, and whether the router knows it, decides the
queues. The first ``--warmup`` model seconds fill the caches and are not measured. The same
trace goes to both fleets, through ``/v1/completions``. ``--time-scale S`` makes every
modelled delay S× as long on the wall clock; arrivals are replayed at ``S × at`` and every
measured time divided by S back into model time.

Measured, per fleet, over the requests due after the warm-up: TTFT p50/p90/p99 at the client
(from the request's due time to its first token), and the p90 over each half of that window
(a fleet that falls behind shows a rising p90); the prefix-cache hit rate from the engines' own
counters (vLLM's ``prefix_cache_hits`` over ``prefix_cache_queries``, prompt tokens, summed over
the replicas, between the end of the warm-up and the end); each replica's share of those prompt
tokens (the balance); and the gateway's precise-lookup count. Verdict against issue 20's
anchor: precise TTFT p90 ≤ 0.5× approximate's.

Run (about five minutes at the defaults):
python bench/prefix_index.py [--time-scale 1] [--load 1.0] [--pressure 3] [--zipf 1.0]
    [--duration 120] [--warmup 30] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import tempfile
import time
import urllib.request
from bisect import bisect
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import aiohttp

from common import (
    BENCH_KEY,
    ROOT,
    free_port,
    get_json,
    pct,
    start_up,
    stop,
    table,
    wait_ready,
)
from gpufleet.emulator.kvcache import kv_capacity_tokens
from gpufleet.emulator.model import default_max_num_batched_tokens
from gpufleet.emulator.steps import StepCost
from gpufleet.engines import parse_vllm
from gpufleet.hardware import accelerator
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel

CONFIG = ROOT / "tests" / "data" / "configs" / "llama-3-8b.json"
MODEL = "llama-8b"
GPU = "L4"
GPUS = 4
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default, and the emulator's
PREFIX = 4096  # tokens a group's requests share (256 whole 16-token blocks)
SUFFIX = (32, 256)  # each request's own tokens after it
OUTPUT = 16
ANCHOR = 0.5  # precise TTFT p90 ≤ 0.5 × approximate's
INDEXES = ("approximate", "precise")

PERF = PerfModel(load_architecture(CONFIG), accelerator(GPU))
COST = StepCost.of(PERF)
BUDGET = default_max_num_batched_tokens(PERF.gpu)
KV_TOKENS = kv_capacity_tokens(
    PERF, int(PERF.gpu.memory_bytes * GPU_MEMORY_UTILIZATION), "emulator"
)


# --- the workload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    at: float  # model seconds after the start
    group: int
    suffix: int  # tokens after the prefix


def miss_prefill_s(prompt: float) -> float:
    """A lone prompt's prefill with nothing cached, on the roofline the emulator runs."""
    return prompt * COST.token_s + math.ceil(prompt / BUDGET) * COST.overhead_s


def groups_for(pressure: float) -> int:
    """As many prefix groups as make their distinct tokens ``pressure`` × the fleet's KV."""
    return max(GPUS, round(pressure * GPUS * KV_TOKENS / PREFIX))


def rate_for(load: float) -> float:
    """Requests per model second: ``load`` × what the fleet prefills with no cache hit."""
    return load * GPUS / miss_prefill_s(PREFIX + sum(SUFFIX) / 2)


def trace(rate: float, duration: float, groups: int, zipf: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    cumulative = list(accumulate(1 / (k + 1) ** zipf for k in range(groups)))
    order = list(range(groups))
    rng.shuffle(order)  # popularity rank is not the group's id (nor its first arrival)
    out, at = [], rng.expovariate(rate)
    while at < duration:
        rank = min(groups - 1, bisect(cumulative, rng.random() * cumulative[-1]))
        out.append(Request(at, order[rank], rng.randint(*SUFFIX)))
        at += rng.expovariate(rate)
    return out


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(digits[(n // 36**k) % 36] for k in range(4))


def prompt_text(index: int, r: Request) -> str:
    """``PREFIX`` + ``r.suffix`` tokens under the emulator's tokenizer (one token per 4-char
    piece): the group's id and ``" tok"`` pieces, then the request's own id and more. The
    prefix is 16,384 characters, so the gateway's 64-character blocks and the engine's
    16-token blocks end at the same places."""
    prefix = "g" + _base36(r.group)[:3] + " tok" * (PREFIX - 1)
    return prefix + " " + _base36(index) + " tok" * (r.suffix - 1)


def spec_yaml(index: str, scale: float) -> str:
    return (
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {MODEL}}}\nspec:\n  source: file:{CONFIG}\n  engine: emulator\n"
        f"  contextLength: 8192\n  resources: {{gpus: 1, gpuTypes: [{GPU}]}}\n"
        f"  replicas: {{min: {GPUS}, max: {GPUS}}}\n"
        f"  routing: {{policy: prefix, prefixIndex: {index}}}\n"
        f"  engineArgs: ['--time-scale', '{scale:g}', '--gpu-memory-utilization', "
        f"'{GPU_MEMORY_UTILIZATION:g}']\n"
    )


# --- the live run -----------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    ttft: float = math.nan  # wall seconds from its due time
    late: float = 0.0  # wall seconds it was sent after its due time
    error: str = ""


async def one(http: aiohttp.ClientSession, url: str, index: int, r: Request, due: float) -> Outcome:
    body = {"model": MODEL, "prompt": prompt_text(index, r), "max_tokens": OUTPUT, "stream": True}
    late = time.perf_counter() - due
    first = math.nan
    try:
        async with http.post(url, json=body) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                return Outcome(False, late=late, error=f"HTTP {resp.status}: {text}")
            async for line in resp.content:
                if math.isnan(first) and line.startswith(b"data: {"):
                    choices = json.loads(line[6:]).get("choices") or []
                    if choices and choices[0].get("text"):
                        first = time.perf_counter()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(False, late=late, error=f"{type(exc).__name__}: {exc}"[:200])
    if math.isnan(first):
        return Outcome(False, late=late, error="no tokens")
    return Outcome(True, first - due, late)


@dataclass
class Counters:
    """The engines' prompt-token counters at one instant, per replica."""

    queries: dict[str, float] = field(default_factory=dict)
    hits: dict[str, float] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)  # vllm:cache_config_info

    def minus(self, earlier: Counters) -> Counters:
        return Counters(
            {k: v - earlier.queries.get(k, 0.0) for k, v in self.queries.items()},
            {k: v - earlier.hits.get(k, 0.0) for k, v in self.hits.items()},
            self.blocks,
        )

    @property
    def hit_rate(self) -> float:
        queries = sum(self.queries.values())
        return sum(self.hits.values()) / queries if queries else math.nan


async def counters(http: aiohttp.ClientSession, urls: dict[str, str]) -> Counters:
    out = Counters()
    for rid, url in urls.items():
        async with http.get(url + "/metrics") as resp:
            text = await resp.text()
        load = parse_vllm(text)
        out.queries[rid], out.hits[rid] = load.prefix_queries, load.prefix_hits
        for line in text.splitlines():
            if line.startswith("vllm:cache_config_info{"):
                out.blocks[rid] = int(line.split('num_gpu_blocks="', 1)[1].split('"', 1)[0])
    return out


async def replay(
    base_url: str, urls: dict[str, str], requests: list[Request], scale: float, warmup: float
) -> tuple[list[Outcome], Counters]:
    """Each request at ``scale × at`` after the start; the outcomes, and the engines' counters
    from the end of the warm-up to the end."""
    url = base_url + "/v1/completions"
    headers = {"authorization": f"Bearer {BENCH_KEY}"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(
        headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as http:
        start = time.perf_counter()
        tasks: list[asyncio.Task[Outcome]] = []
        at_warmup: asyncio.Task[Counters] | None = None
        for i, r in enumerate(requests):
            due = start + r.at * scale
            if at_warmup is None and r.at >= warmup:
                delay = start + warmup * scale - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                at_warmup = asyncio.create_task(counters(http, urls), name="counters-warmup")
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(http, url, i, r, due), name=f"request-{i}"))
        outcomes = list(await asyncio.gather(*tasks))
        end = await counters(http, urls)
        begin = await at_warmup if at_warmup is not None else Counters()
        return outcomes, end.minus(begin)


def gateway_lookups(server: str) -> dict[str, float]:
    """``gpufleet_prefix_lookups_total{model, index}`` for the model, by index."""
    with urllib.request.urlopen(server + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gpufleet_prefix_lookups_total{") and f'model="{MODEL}"' in line:
            index = line.split('index="', 1)[1].split('"', 1)[0]
            out[index] = float(line.rsplit(" ", 1)[1])
    return out


@dataclass
class Result:
    index: str
    requests: list[Request]
    outcomes: list[Outcome]
    engines: Counters
    lookups: dict[str, float]
    scale: float
    warmup: float

    @property
    def measured(self) -> list[Outcome]:
        return [o for r, o in zip(self.requests, self.outcomes, strict=True) if r.at >= self.warmup]

    def ttft(self, q: float, half: int | None = None) -> float:
        """A percentile of TTFT over the measured requests (model s); ``half`` 0 or 1: over
        those due in the first or the second half of the measured window only."""
        measured = [(r.at, o) for r, o in zip(self.requests, self.outcomes, strict=True)
                    if r.at >= self.warmup and o.ok]  # fmt: skip
        if half is not None:
            middle = (self.warmup + self.requests[-1].at) / 2
            measured = [(at, o) for at, o in measured if (at >= middle) == bool(half)]
        values = [o.ttft / self.scale for _, o in measured]
        return pct(values, q) if values else math.nan

    def late_p99(self) -> float:
        return pct([o.late / self.scale for o in self.outcomes], 99)


def run_fleet(
    index: str, requests: list[Request], scale: float, warmup: float, tmp: Path
) -> Result:
    spec = tmp / f"{index}.yaml"
    spec.write_text(spec_yaml(index, scale))
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    proc = start_up(tmp / f"data-{index}", spec, port)
    try:
        wait_ready(server, MODEL, GPUS)
        rows = get_json(server + "/admin/v1/replicas", 30.0)["replicas"]
        urls = {r["id"]: r["url"] for r in rows if r["model"] == MODEL and r["phase"] == "Ready"}
        outcomes, engines = asyncio.run(replay(server, urls, requests, scale, warmup))
        lookups = gateway_lookups(server)
    finally:
        stop(proc)
    return Result(index, requests, outcomes, engines, lookups, scale, warmup)


# --- report -----------------------------------------------------------------------------------


def parameters(requests: list[Request], groups: int, rate: float, args: argparse.Namespace) -> str:
    drawn = len({r.group for r in requests})
    mean_prompt = PREFIX + sum(SUFFIX) / 2
    fleet_kv = GPUS * KV_TOKENS
    working = drawn * PREFIX
    hot = sorted(
        {g: sum(r.group == g for r in requests) for g in range(groups)}.values(), reverse=True
    )
    fits = fleet_kv // PREFIX
    return "\n".join(
        [
            f"engine model: {PERF.arch.name or CONFIG.name} on 1× {GPU} per replica "
            f"({PERF.gpu.memory_bytes / 1e9:.0f} GB, {PERF.gpu.bandwidth_bytes_per_s / 1e12:.2f} "
            f"TB/s, {PERF.gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16), PerfModel mfu={PERF.mfu} "
            f"mbu={PERF.mbu} step_overhead_s={PERF.step_overhead_s} request_overhead_s="
            f"{PERF.request_overhead_s}; max_num_batched_tokens {BUDGET} (vLLM's default here)",
            f"  KV cache {KV_TOKENS:,} tokens a replica (gpu_memory_utilization "
            f"{GPU_MEMORY_UTILIZATION:g}), fleet {fleet_kv:,} tokens = {fits} prefixes of "
            f"{PREFIX:,}",
            f"  prefill of a mean prompt ({mean_prompt:,.0f} tokens) with nothing cached "
            f"{miss_prefill_s(mean_prompt) * 1000:.0f} ms, with its prefix cached "
            f"{miss_prefill_s(mean_prompt - PREFIX) * 1000:.0f} ms (+ {PERF.request_overhead_s * 1000:.0f}"
            " ms request overhead)",
            f"workload: {groups} prefix groups of {PREFIX:,} tokens ({drawn} drawn): working set "
            f"{working:,} tokens = {working / fleet_kv:.1f}× the fleet's KV; Zipf {args.zipf:g} "
            f"(the {fits} hottest groups take {sum(hot[:fits]) / len(requests):.0%} of requests); "
            f"suffix {SUFFIX[0]}–{SUFFIX[1]} tokens, {OUTPUT} output tokens streamed",
            f"  Poisson {rate:.2f} req/s (load {args.load:g} × the fleet's no-hit prefill rate) for "
            f"{args.duration:g} model s: {len(requests)} requests, the first "
            f"{sum(r.at < args.warmup for r in requests)} (before {args.warmup:g} s) warm-up, "
            f"not measured; time scale {args.time_scale:g}",
        ]
    )


def report(results: list[Result]) -> str:
    rows = []
    for r in results:
        measured = r.measured
        ok = [o for o in measured if o.ok]
        failed = len(measured) - len(ok)
        queries = r.engines.queries  # prompt tokens each replica took after the warm-up
        total = sum(queries.values())
        shares = "/".join(f"{v / total:.0%}" if total else "-" for _, v in sorted(queries.items()))
        precise = r.lookups.get("precise")
        rows.append(
            [
                r.index,
                f"{len(ok)}/{len(measured)}" + (f" ({failed} failed)" if failed else ""),
                f"{r.ttft(50) * 1000:.0f}",
                f"{r.ttft(90) * 1000:.0f}",
                f"{r.ttft(99) * 1000:.0f}",
                f"{r.ttft(90, 0) * 1000:.0f} / {r.ttft(90, 1) * 1000:.0f}",
                f"{r.engines.hit_rate:.1%}",
                shares,
                "-" if precise is None else f"{precise:.0f} of {sum(r.lookups.values()):.0f}",
            ]
        )
    headers = ["prefix index", "served", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms",
               "p90 1st / 2nd half", "engine hit rate", "replica shares", "precise lookups"]  # fmt: skip
    return table(headers, rows)


def verdict(results: list[Result]) -> str:
    by = {r.index: r for r in results}
    approx, precise = by.get("approximate"), by.get("precise")
    if approx is None or precise is None:
        return "verdict: needs both fleets"
    ratio = precise.ttft(90) / approx.ttft(90)
    used = precise.lookups.get("precise", 0.0)
    lines = [
        f"precise vs approximate: TTFT p90 {ratio:.2f}× "
        f"({'met' if ratio <= ANCHOR else 'MISSED'}, anchor ≤ {ANCHOR}); "
        f"p50 {precise.ttft(50) / approx.ttft(50):.2f}×, p99 {precise.ttft(99) / approx.ttft(99):.2f}×"
    ]
    if used < len(precise.outcomes):
        lines.append(
            f"  {len(precise.outcomes) - used:.0f} of the precise fleet's {len(precise.outcomes)} "
            "requests (warm-up included) were routed on the approximate index: the gateway's "
            "fallback when no event stream is live or /tokenize fails or times out"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--time-scale", type=float, default=1.0, help="wall s per model s")
    parser.add_argument(
        "--load", type=float, default=1.0, help="arrivals as a share of the no-hit prefill rate"
    )
    parser.add_argument(
        "--pressure", type=float, default=3.0, help="distinct prefix tokens ÷ the fleet's KV"
    )
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    parser.add_argument("--duration", type=float, default=120.0, help="model s of arrivals")
    parser.add_argument("--warmup", type=float, default=30.0, help="model s not measured")
    parser.add_argument("--indexes", default=",".join(INDEXES), help="fleets to run, in order")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    groups = groups_for(args.pressure)
    rate = rate_for(args.load)
    requests = trace(rate, args.duration, groups, args.zipf, args.seed)
    print(parameters(requests, groups, rate, args), flush=True)
    results: list[Result] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="prefix-index-") as tmp_name:
        for index in args.indexes.split(","):
            r = run_fleet(index, requests, args.time_scale, args.warmup, Path(tmp_name))
            results.append(r)
            blocks = sorted(set(r.engines.blocks.values()))
            print(f"  {index}: {sum(o.ok for o in r.outcomes)}/{len(r.outcomes)} served, client "
                  f"late p99 {r.late_p99() * 1000:.1f} ms, engines' KV {blocks} blocks, "
                  f"{time.monotonic() - began:.0f} s so far", flush=True)  # fmt: skip
            errors = sorted({o.error for o in r.outcomes if not o.ok})
            if errors:
                print("    failures: " + "; ".join(errors[:3]), flush=True)
    print()
    print(f"model time (wall ÷ {args.time_scale:g}); requests due after the warm-up")
    print(report(results))
    print()
    print(verdict(results))
    print(f"\nwall time {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
