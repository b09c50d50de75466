"""Disaggregated serving against aggregated, at the same number of emulated GPUs (issue 20).

Four emulated H100s serve Llama-3-8B through a real ``gpufleet up`` (a child process: gateway,
controller, engines as child processes over real HTTP), twice:

- **aggregated**: four replicas, each prefilling and decoding (vLLM with chunked prefill);
- **disaggregated**: ``spec.disaggregation`` with ``P`` prefill replicas and ``4 − P`` decode
  replicas; the gateway sends each long prompt to a prefill replica (``max_tokens: 1`` and
  ``kv_transfer_params``), then the request with the returned parameters to a decode replica,
  which pulls the prompt's KV over the emulated link (InfiniBand, the emulator's default) and
  streams the answer.

``P`` is sized as NVIDIA Dynamo's planner sizes a prefill pool — prefill demand over one
replica's prefill throughput — from the same roofline the emulator runs (``split``): a
request's prefill costs its prompt's compute-bound steps, and ``P`` is the fewest prefill
replicas that keep the pool's utilisation at or under ``PREFILL_UTILISATION`` (0.7: an M/D/1
queue there waits 1.2 prefills on average), at least one, the other GPUs decoding. The bench
prints, for the decode pool, the batch each replica holds at that rate (Little's law on the
step time) and its KV use, which must fit.

The workload (issue 20: long prompts, ISL:OSL ≈ 10:1): Poisson arrivals at each rate in
``--rates`` (requests per model second, for ``--duration`` model seconds: long enough for the
decode batches to reach their steady size), prompts uniform in 4,096–8,192 tokens, outputs a
tenth of their prompt, every prompt unique (no prefix reuse), every answer streamed through
``/v1/completions``. The same trace goes to both fleets. The emulator's ``--time-scale S``
makes every modelled delay S× as long on the wall clock, so that a 2-core machine keeps up with
the streams; arrivals are replayed at ``S × at`` and every time the client measures is divided
by S back into model time.

Measured by the client, per fleet and rate: TTFT p90 (from the request's due time to its first
token); ITL p99 over every gap between two streamed tokens (vLLM's ``benchmark_serving``
definition: a stall counts once per token it delays, so it reaches the p99 only once more than
1 % of gaps are stalled), with its p50 and p99.9 and, for reference, the p99 of each request's
mean gap (TPOT, DistServe's measure, which dilutes a stall over the whole answer); output
tokens per model second per GPU streamed while the requests arrived (the offered load when a
fleet keeps up, less when it falls behind; the drain after the last arrival is left out, as a
fleet that keeps up has nothing to prove there); and the gateway's own count of how the
disaggregated fleet's prompts were prefilled. The verdict is against issue 20's anchors:
disaggregated ITL p99 ≤ 0.5× aggregated's, TTFT p90 no worse (≤ 1×), throughput per GPU ≥
0.95×.

Run (about seven minutes at the defaults):
python bench/disagg.py [--time-scale 2] [--rates 3,6] [--duration 30] [--prefill-replicas P]
    [--max-num-batched-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from common import (
    BENCH_KEY,
    ROOT,
    emulated_prompt,
    free_port,
    pct,
    start_up,
    stop,
    table,
    wait_ready,
)
from gpufleet.emulator.kvcache import kv_capacity_tokens
from gpufleet.emulator.kvtransfer import DEFAULT_KV_LINK, KV_LINKS, remote_kv
from gpufleet.emulator.model import default_max_num_batched_tokens
from gpufleet.emulator.steps import StepCost
from gpufleet.hardware import accelerator
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel

CONFIG = ROOT / "tests" / "data" / "configs" / "llama-3-8b.json"
MODEL = "llama-8b"
GPU = "H100"
GPUS = 4
GPU_MEMORY_UTILIZATION = 0.9  # the emulator's default, as vLLM's
PROMPTS = (4096, 8192)
OUTPUT_SHARE = 0.1  # ISL:OSL ≈ 10:1
ANCHOR_ITL = 0.5  # disaggregated ITL p99 ≤ 0.5 × aggregated
ANCHOR_TTFT = 1.0  # TTFT p90 no worse
ANCHOR_THROUGHPUT = 0.95  # output tokens/s per GPU ≥ 0.95 ×
PREFILL_UTILISATION = 0.7  # the prefill pool's sizing target (``split``)

PERF = PerfModel(load_architecture(CONFIG), accelerator(GPU))
COST = StepCost.of(PERF)
BUDGET = default_max_num_batched_tokens(PERF.gpu)


# --- the workload and the split ---------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    at: float  # model seconds after the start
    prompt: int
    output: int


def trace(rate: float, duration: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    out, at = [], rng.expovariate(rate)
    while at < duration:
        prompt = rng.randint(*PROMPTS)
        out.append(Request(at, prompt, round(prompt * OUTPUT_SHARE)))
        at += rng.expovariate(rate)
    return out


@dataclass(frozen=True)
class Split:
    prefill: int
    prefill_s: float  # GPU-seconds of prefill per request
    utilisation: float  # of the prefill pool
    batch: float  # sequences a decode replica holds at that rate
    step_s: float  # a decode step at that batch
    kv_share: float  # of a decode replica's KV cache


def split(requests: list[Request], rate: float, budget: int) -> Split:
    """The fewest prefill replicas at or under ``PREFILL_UTILISATION``; the decode pool's batch."""
    prompt = sum(r.prompt for r in requests) / len(requests)
    output = sum(r.output for r in requests) / len(requests)
    prefill_s = prompt * COST.token_s + math.ceil(prompt / budget) * COST.overhead_s
    prefill = min(GPUS - 1, max(1, math.ceil(rate * prefill_s / PREFILL_UTILISATION)))
    decode = GPUS - prefill
    context = prompt + output / 2
    batch = 1.0
    for _ in range(100):  # Little's law: batch = arrivals per replica × output × step(batch)
        step = PERF.decode_step_s(max(1, round(batch)), round(context))
        batch = max(1.0, rate / decode * output * step)
    step = PERF.decode_step_s(max(1, round(batch)), round(context))
    kv = batch * (prompt + output) / kv_capacity_tokens(PERF, _kv_budget(), "emulator")
    return Split(prefill, prefill_s, rate * prefill_s / prefill, batch, step, kv)


def _kv_budget() -> int:
    return int(PERF.gpu.memory_bytes * GPU_MEMORY_UTILIZATION)


def spec_yaml(scale: float, prefill: int | None, budget: int | None) -> str:
    decode = GPUS if prefill is None else GPUS - prefill
    text = (
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {MODEL}}}\nspec:\n  source: file:{CONFIG}\n  engine: emulator\n"
        f"  contextLength: 16384\n  resources: {{gpus: 1, gpuTypes: [{GPU}]}}\n"
        f"  replicas: {{min: {decode}, max: {decode}}}\n"
        f"  engineArgs: ['--time-scale', '{scale:g}'"
        + (f", '--max-num-batched-tokens', '{budget}'" if budget is not None else "")
        + "]\n"
    )
    if prefill is not None:
        text += f"  disaggregation: {{prefill: {{replicas: {prefill}}}}}\n"
    return text


# --- the live run -----------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    ttft: float = math.nan  # wall seconds from its due time
    times: list[float] = field(default_factory=list)  # perf_counter of each streamed token
    late: float = 0.0  # wall seconds it was sent after its due time
    error: str = ""

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.times)]


async def one(http: aiohttp.ClientSession, url: str, index: int, r: Request, due: float) -> Outcome:
    body = {
        "model": MODEL,
        "prompt": emulated_prompt(index, r.prompt),
        "max_tokens": r.output,
        "stream": True,
    }
    times: list[float] = []
    late = time.perf_counter() - due
    try:
        async with http.post(url, json=body) as resp:
            if resp.status != 200:
                text = (await resp.text())[:200]
                return Outcome(False, late=late, error=f"HTTP {resp.status}: {text}")
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    times.append(now)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(False, late=late, error=f"{type(exc).__name__}: {exc}"[:200])
    if not times:
        return Outcome(False, late=late, error="no tokens")
    return Outcome(True, times[0] - due, times, late)


async def replay(
    base_url: str, requests: list[Request], scale: float
) -> tuple[list[Outcome], float]:
    """Each request at ``scale × at`` after the start; the outcomes and the start time."""
    url = base_url + "/v1/completions"
    headers = {"authorization": f"Bearer {BENCH_KEY}"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(
        headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as http:
        for i in range(2):  # warm the connections and the replicas, before the window
            await one(http, url, 36**4 - 1 - i, Request(0.0, PROMPTS[0], 4), time.perf_counter())
        start = time.perf_counter()
        tasks = []
        for i, r in enumerate(requests):
            due = start + r.at * scale
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(http, url, i, r, due), name=f"request-{i}"))
        return list(await asyncio.gather(*tasks)), start


def paths(server: str) -> dict[str, float]:
    """The gateway's count of how the disaggregated model's prompts were prefilled."""
    with urllib.request.urlopen(server + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gpufleet_disaggregation_requests_total{") and MODEL in line:
            path = line.split('path="', 1)[1].split('"', 1)[0]
            out[path] = float(line.rsplit(" ", 1)[1])
    return out


@dataclass
class Result:
    fleet: str
    rate: float
    outcomes: list[Outcome]
    window: tuple[float, float]  # perf_counter: the first arrival and the last
    scale: float
    paths: dict[str, float]

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok]

    def ttft_p90(self, scale: float) -> float:
        values = [o.ttft / scale for o in self.ok]
        return pct(values, 90) if values else math.nan

    def itl(self, scale: float, q: float) -> float:
        values = [g / scale for o in self.ok for g in o.gaps]
        return pct(values, q) if values else math.nan

    def tpot(self, scale: float, q: float) -> float:
        """A percentile of requests' mean inter-token latency (DistServe's TPOT)."""
        values = [sum(o.gaps) / len(o.gaps) / scale for o in self.ok if o.gaps]
        return pct(values, q) if values else math.nan

    def throughput_per_gpu(self) -> float:
        """Output tokens streamed while requests arrived, per model second and GPU: the
        offered load when the fleet keeps up, less when it does not."""
        start, end = self.window
        tokens = sum(start <= t <= end for o in self.ok for t in o.times)
        return tokens / ((end - start) / self.scale) / GPUS

    def late_p99(self) -> float:
        """How late the client sent its requests (p99, model seconds): a client that falls
        behind on a busy machine would flatter both fleets alike."""
        return pct([o.late / self.scale for o in self.outcomes], 99)


def run_fleet(
    name: str,
    prefill: int | None,
    requests: list[Request],
    rate: float,
    scale: float,
    budget: int | None,
    tmp: Path,
) -> Result:
    spec = tmp / f"{name}-{rate:g}.yaml"
    spec.write_text(spec_yaml(scale, prefill, budget))
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    proc = start_up(tmp / f"data-{name}-{rate:g}", spec, port)
    try:
        wait_ready(server, MODEL, GPUS)
        outcomes, start = asyncio.run(replay(server, requests, scale))
        counted = paths(server) if prefill is not None else {}
    finally:
        stop(proc)
    window = (start + requests[0].at * scale, start + requests[-1].at * scale)
    return Result(name, rate, outcomes, window, scale, counted)


# --- report -----------------------------------------------------------------------------------


def parameters(splits: dict[float, Split], budget: int) -> str:
    link = KV_LINKS[DEFAULT_KV_LINK]
    pull = remote_kv(PERF, link)
    lines = [
        f"engine model: {PERF.arch.name or CONFIG.name} on 1× {GPU} per replica "
        f"({PERF.gpu.bandwidth_bytes_per_s / 1e12:.2f} TB/s, {PERF.gpu.bf16_flops / 1e12:.0f} "
        f"TFLOP/s bf16), PerfModel mfu={PERF.mfu} mbu={PERF.mbu} step_overhead_s="
        f"{PERF.step_overhead_s} request_overhead_s={PERF.request_overhead_s}",
        f"  prefill {PERF.prefill_tokens_per_s():,.0f} tokens/s; decode step at batch 1, 6k "
        f"context {PERF.decode_step_s(1, 6000) * 1000:.1f} ms; a step with a full chunk "
        f"{COST.seconds(1, 6000, budget - 1, budget) * 1000:.0f} ms",
        f"  max_num_batched_tokens {budget}"
        + (" (vLLM's default for vllm serve on an H100)" if budget == BUDGET else "")
        + f", max_num_seqs 256, KV cache {kv_capacity_tokens(PERF, _kv_budget(), 'emulator'):,}"
        " tokens",
        f"  KV link {link.name}: {link.gbytes_per_s:g} GB/s per GPU + {link.latency_s * 1e6:g} µs; "
        f"a 6,000-token prompt's KV ({6000 * PERF.kv_bytes_per_token / 1e9:.2f} GB) in "
        f"{pull.seconds(6000) * 1000:.1f} ms",
    ]
    for rate, s in splits.items():
        lines.append(
            f"  split at {rate:g} req/s: prefill {s.prefill_s * 1000:.0f} ms a request → "
            f"{s.prefill} prefill replica(s) at {s.utilisation:.0%}; {GPUS - s.prefill} decode "
            f"replicas, each ≈ {s.batch:.1f} sequences, steps of {s.step_s * 1000:.1f} ms, "
            f"{s.kv_share:.0%} of its KV cache"
        )
    return "\n".join(lines)


def report(results: list[Result], scale: float) -> str:
    rows = []
    for r in results:
        failed = len(r.outcomes) - len(r.ok)
        remote = r.paths.get("remote")
        rows.append(
            [
                f"{r.rate:g}",
                r.fleet,
                f"{len(r.ok)}/{len(r.outcomes)}" + (f" ({failed} failed)" if failed else ""),
                f"{r.ttft_p90(scale) * 1000:.0f}",
                f"{r.itl(scale, 50) * 1000:.1f}",
                f"{r.itl(scale, 99) * 1000:.1f}",
                f"{r.itl(scale, 99.9) * 1000:.1f}",
                f"{r.tpot(scale, 99) * 1000:.1f}",
                f"{r.throughput_per_gpu():.0f}",
                "-" if remote is None else f"{remote:.0f} of {sum(r.paths.values()):.0f}",
            ]
        )
    headers = ["req/s", "fleet", "served", "TTFT p90 ms", "ITL p50 ms", "ITL p99 ms",
               "ITL p99.9 ms", "TPOT p99 ms", "out tok/s/GPU", "remote prefills"]  # fmt: skip
    return table(headers, rows)


def verdicts(results: list[Result], scale: float) -> str:
    lines = []
    for rate in sorted({r.rate for r in results}):
        agg = next(r for r in results if r.rate == rate and r.fleet == "aggregated")
        for dis in (r for r in results if r.rate == rate and r.fleet != "aggregated"):
            itl = dis.itl(scale, 99) / agg.itl(scale, 99)
            ttft = dis.ttft_p90(scale) / agg.ttft_p90(scale)
            tput = dis.throughput_per_gpu() / agg.throughput_per_gpu()
            checks = [
                ("ITL p99", itl, itl <= ANCHOR_ITL, f"≤ {ANCHOR_ITL}"),
                ("TTFT p90", ttft, ttft <= ANCHOR_TTFT, f"≤ {ANCHOR_TTFT}"),
                ("tok/s/GPU", tput, tput >= ANCHOR_THROUGHPUT, f"≥ {ANCHOR_THROUGHPUT}"),
            ]
            parts = [
                f"{n} {v:.2f}× ({'met' if ok else 'MISSED'}, {want})" for n, v, ok, want in checks
            ]
            lines.append(f"{rate:g} req/s, {dis.fleet} vs aggregated: " + "; ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--time-scale", type=float, default=2.0, help="wall s per model s")
    parser.add_argument("--rates", default="3,6", help="requests per model second, rising")
    parser.add_argument(
        "--duration", type=float, default=30.0, help="model seconds of arrivals per rate"
    )
    parser.add_argument("--prefill-replicas", type=int, help="P (default: the split's)")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, help="engines' step budget (default: vLLM's)"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    scale = args.time_scale
    rates = [float(r) for r in args.rates.split(",")]
    traces = {rate: trace(rate, args.duration, args.seed) for rate in rates}
    budget = args.max_num_batched_tokens or BUDGET
    splits = {rate: split(traces[rate], rate, budget) for rate in rates}
    print(parameters(splits, budget), flush=True)
    results: list[Result] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="disagg-") as tmp_name:
        tmp = Path(tmp_name)
        for rate in rates:
            p = args.prefill_replicas or splits[rate].prefill
            for name, prefill in (("aggregated", None), (f"{p}P+{GPUS - p}D", p)):
                results.append(
                    run_fleet(
                        name, prefill, traces[rate], rate, scale, args.max_num_batched_tokens, tmp
                    )
                )
                r = results[-1]
                print(f"  {rate:g} req/s {name}: {len(r.ok)}/{len(r.outcomes)} served, client "
                      f"late p99 {r.late_p99() * 1000:.1f} ms, {time.monotonic() - began:.0f} s "
                      "so far", flush=True)  # fmt: skip
                errors = sorted({o.error for o in r.outcomes if not o.ok})
                if errors:
                    print("    failures: " + "; ".join(errors[:3]), flush=True)
    print()
    counts = ", ".join(f"{len(traces[r])} at {r:g} req/s" for r in rates)
    print(
        f"model time (wall ÷ {scale:g}); {args.duration:g} model s of arrivals per rate "
        f"({counts}), prompts {PROMPTS[0]}–{PROMPTS[1]} tokens, outputs a tenth; {GPUS} "
        f"emulated {GPU}s each"
    )
    print(report(results, scale))
    print()
    print(verdicts(results, scale))
    print(f"\nwall time {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
