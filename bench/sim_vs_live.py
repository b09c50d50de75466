"""The simulator against a live fleet: one trace through ``gpufleet sim`` and ``gpufleet up``.

Issue 19 asks that SLO attainment, GPU-hours and cost per request of ``gpufleet sim`` agree
within ±10 % with a live run of the same trace, time-scaled, through ``gpufleet up`` with
emulated replicas. Both sides run the same engine model (``emulator.model.EngineModel`` timed
by ``sizing.PerfModel``); what the simulator leaves out is everything between a client and an
engine: HTTP, the gateway's routing on metrics it scrapes every 250 ms, a busy event loop. This
bench measures how much that moves the figures.

The scenario: Llama-3-70B at TP 4 on eight emulated H100s (two fixed replicas), Poisson arrivals
with modest prompt and output lengths (lognormal), written to a CSV. Then:

- **sim**: ``simulate`` on that CSV (``read_trace``, as ``gpufleet sim -t FILE`` reads it), on an
  inventory of the same eight H100s, replicas warm at time 0;
- **live**: ``gpufleet up`` (a child process, its own data dir, admin key from
  ``GPUFLEET_ADMIN_KEY``) with the same spec and ``--time-scale S`` in the emulator's engine
  arguments: every model delay takes S× as long on the wall clock, so arrivals are replayed at
  ``S × at`` and every latency the client measures is divided by S to be model time. Requests
  go through the official ``openai`` client (``AsyncOpenAI``, streaming ``/v1/completions``),
  with a prompt of exactly the trace's prompt tokens under the emulator's stand-in tokenizer
  (one token per whitespace-led piece of ≤ 4 characters; a unique first piece, so no request
  reuses another's KV blocks, as the trace's own requests share none) and ``max_tokens`` the
  trace's output tokens (the emulator has no EOS: it emits exactly that many). GPU-hours and
  cost come from the cost report (``/admin/v1/report``, what ``gpufleet report -o json``
  prints) over the window from the first arrival to the last answer, divided by S.

The live run is read twice. **live (gateway)**: the gateway's own record of each answered
request (the ledger's timings: TTFT and duration from the request's arrival at the gateway, the
simulator's definition), read from the store after the run; the ±10 % verdicts are on this.
**live (client)**: what the client measured from each request's scheduled arrival time, so a
client that falls behind its schedule on a busy machine shows as latency. Below the table, where
the live latency goes: the client's lateness in sending, the engines' own mean TTFT and E2E
(their histograms), the gateway's percentiles. A scale below 1 replays faster than the
modelled GPU and multiplies every fixed wall-clock overhead (HTTP, the gateway's routing, the
client) by 1/S in model time. Autoscaling is not compared yet: a live replica starts in wall
seconds that the time scale does not stretch, where the simulator models a start-up in model
time (``sim.fleet.ENGINE_INIT_S`` plus the weights' load).
Run (about three minutes at the defaults):
python bench/sim_vs_live.py [--time-scale 0.5] [--rate 3] [--duration 240]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI

from common import BENCH_KEY, ROOT, emulated_prompt, get_json, start_up, table, wait_ready
from gpufleet.emulator.main import EmulatorOptions
from gpufleet.hardware import accelerator, load_inventory
from gpufleet.policies.latency import Timing
from gpufleet.sim import (
    GATEWAY_OVERHEAD_S,
    Lengths,
    Objectives,
    SimResult,
    SimSettings,
    poisson,
    read_trace,
    sim_model,
    simulate,
    write_trace,
)
from gpufleet.sim.result import percentiles
from gpufleet.sizing import load_architecture
from gpufleet.sizing.memory import engine_overhead_bytes
from gpufleet.sizing.performance import PerfModel
from gpufleet.spec import load_file
from gpufleet.store import Store
from gpufleet.store.db import sqlite_url

CONFIG = ROOT / "tests" / "data" / "configs" / "llama-3-70b.json"
MODEL = "llama-70b"
GPU = "H100"
TP = 4
REPLICAS = 2
TOLERANCE = 0.10


def spec_yaml(time_scale: float) -> str:
    return (
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {MODEL}}}\nspec:\n  source: file:{CONFIG}\n  engine: emulator\n"
        f"  contextLength: 8192\n  resources: {{gpus: {TP}, gpuTypes: [{GPU}]}}\n"
        f"  replicas: {{min: {REPLICAS}, max: {REPLICAS}}}\n"
        f"  engineArgs: ['--time-scale', '{time_scale:g}']\n"
    )


def inventory_yaml() -> str:
    return (
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: bench}\nspec:\n"
        f"  nodes:\n    - name: n1\n      gpus: [{{type: {GPU}, count: {TP * REPLICAS}}}]\n"
    )


# --- the live run -----------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    ttft: float = math.nan  # wall seconds
    e2e: float = math.nan
    itl: float | None = None
    tokens: int = 0
    prompt_tokens: int | None = None
    error: str = ""
    late: float = 0.0  # wall seconds the client started it after its arrival time


async def one(
    client: AsyncOpenAI, index: int, prompt: int, output: int, due: float | None = None
) -> Outcome:
    """One request, timed from ``due`` (its arrival time on ``perf_counter``; now if None),
    so a client that falls behind its schedule counts against latency, as a queue would."""
    started = time.perf_counter()
    sent = started if due is None else due
    first = last = None
    tokens = 0
    usage_prompt = None
    try:
        stream = await client.completions.create(
            model=MODEL,
            prompt=emulated_prompt(index, prompt),
            max_tokens=output,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage_prompt = chunk.usage.prompt_tokens
            if chunk.choices and chunk.choices[0].text:
                tokens += 1
                first = now if first is None else first
                last = now
    except Exception as exc:  # any failure is the live side's: counted, reported, not hidden
        return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:200], late=started - sent)
    if first is None or last is None:
        return Outcome(False, error="no tokens")
    end = time.perf_counter()
    itl = (last - first) / (tokens - 1) if tokens > 1 else None
    return Outcome(True, first - sent, end - sent, itl, tokens, usage_prompt, late=started - sent)


async def replay(
    base_url: str, requests: list[tuple[float, int, int]], scale: float
) -> tuple[list[Outcome], float, float]:
    """Each request at ``scale × at`` after the start; the outcomes, and the wall-clock epoch
    times of the start and of the last answer."""
    client = AsyncOpenAI(base_url=base_url, api_key=BENCH_KEY, max_retries=0, timeout=600)
    for i in range(2):  # warm the connections and both replicas, before the window
        await one(client, 36**4 - 1 - i, 32, 4)
    start_epoch, start = time.time(), time.perf_counter()
    tasks = []
    for i, (at, prompt, output) in enumerate(requests):
        due = start + at * scale
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(client, i, prompt, output, due), name=f"request-{i}"))
    outcomes = await asyncio.gather(*tasks)
    end_epoch = time.time()
    await client.close()
    return list(outcomes), start_epoch, end_epoch


@dataclass
class Live:
    outcomes: list[Outcome]
    report: dict[str, Any]
    window_s: float  # wall
    #: The gateway's own latency summary of the window (``/admin/v1/models/…/latency``), ms.
    gateway: dict[str, Any]
    #: The engines' mean TTFT and E2E (their histograms' sum ÷ count), wall seconds.
    engine_ttft_mean: float
    engine_e2e_mean: float
    #: The gateway's record of each answered request (the ledger's timings), wall time.
    timings: list[Timing]


def engine_means(server: str) -> tuple[float, float, float, float]:
    """Σ and count of the emulated engines' TTFT and E2E histograms, over every replica."""
    totals = [0.0, 0.0, 0.0, 0.0]
    names = (
        "vllm:time_to_first_token_seconds_sum",
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_sum",
        "vllm:e2e_request_latency_seconds_count",
    )
    for row in get_json(server + "/admin/v1/replicas", 30.0)["replicas"]:
        if row["model"] != MODEL or not row.get("url"):
            continue
        with urllib.request.urlopen(row["url"] + "/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                for i, name in enumerate(names):
                    if line.startswith(name + "{"):
                        totals[i] += float(line.rsplit(" ", 1)[1])
    return totals[0], totals[1], totals[2], totals[3]


def run_live(trace_csv: Path, spec: Path, scale: float, tmp: Path) -> Live:
    from common import free_port, stop

    requests = [(r.at, r.prompt_tokens, r.output_tokens) for r in read_trace(trace_csv)]
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    proc = start_up(tmp / "data", spec, port)
    try:
        wait_ready(server, MODEL, REPLICAS)
        before = engine_means(server)
        outcomes, since, until = asyncio.run(replay(server + "/v1", requests, scale))
        after = engine_means(server)
        query = urllib.parse.urlencode(
            {
                "by": "model",
                "since": dt.datetime.fromtimestamp(since, dt.UTC).isoformat(),
                "until": dt.datetime.fromtimestamp(until, dt.UTC).isoformat(),
            }
        )
        report = get_json(server + "/admin/v1/report?" + query, 30.0)
        back = urllib.parse.urlencode(
            {"since": dt.datetime.fromtimestamp(since, dt.UTC).isoformat(), "step": 600}
        )
        gateway = get_json(server + f"/admin/v1/models/{MODEL}/latency?{back}", 30.0)["summary"]
    finally:
        stop(proc)
    store = Store.open(sqlite_url(tmp / "data"))
    try:
        window = (dt.datetime.fromtimestamp(t, dt.UTC) for t in (since, until + 5))
        timings = store.timings(MODEL, *window)
    finally:
        store.close()
    d = [a - b for a, b in zip(after, before, strict=True)]
    return Live(
        outcomes,
        report,
        until - since,
        gateway,
        d[0] / d[1] if d[1] else math.nan,
        d[2] / d[3] if d[3] else math.nan,
        timings,
    )


# --- comparison -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    metric: str
    sim: float | None
    gateway: float | None  # the live run as the gateway recorded it: judged
    client: float | None  # as the client measured it, from each request's arrival time
    judged: bool = True  # one of the issue's ±10 % figures


def _ratio(live: float | None, sim: float | None) -> float | None:
    return None if live is None or sim is None or sim == 0 else live / sim


@dataclass(frozen=True)
class Measured:
    """One request's latencies in model time (ITL: its mean gap; None: one token)."""

    ttft: float
    itl: float | None
    e2e: float


def attainment(requests: list[Measured], o: Objectives, arrived: int) -> dict[str, float]:
    """Share of *arrived* requests within each objective, as ``sim.result`` counts it."""
    met = {"ttft": 0, "itl": 0, "e2e": 0, "all": 0}
    for r in requests:
        ok = {
            "ttft": o.ttft_s is None or r.ttft <= o.ttft_s,
            "itl": o.itl_s is None or (r.itl or 0.0) <= o.itl_s,
            "e2e": o.e2e_s is None or r.e2e <= o.e2e_s,
        }
        for k, v in ok.items():
            met[k] += v
        met["all"] += all(ok.values())
    return {k: v / arrived for k, v in met.items()}


def rows(sim: SimResult, live: Live, objectives: Objectives, scale: float) -> list[Row]:
    m = sim.model(MODEL)
    arrived = len(live.outcomes)
    client = [
        Measured(o.ttft / scale, None if o.itl is None else o.itl / scale, o.e2e / scale)
        for o in live.outcomes
        if o.ok
    ]
    gateway = [
        Measured(
            (t.ttft_ms if t.ttft_ms is not None else t.duration_ms) / 1000 / scale,
            None if t.itl_ms is None else t.itl_ms / 1000 / scale,
            t.duration_ms / 1000 / scale,
        )
        for t in live.timings
    ]
    line = next(x for x in live.report["lines"] if x["model"] == MODEL)
    hours = line["gpu_hours_placed"] / scale
    per_request = line["cost_per_successful_request"]
    per_request = None if per_request is None else per_request / scale
    slo_g = attainment(gateway, objectives, arrived)
    slo_c = attainment(client, objectives, arrived)
    out = [Row("requests served", m.served, len(gateway), len(client), judged=False)]
    for key, name in (("all", "all objectives"), ("ttft", "TTFT"), ("itl", "ITL"), ("e2e", "E2E")):
        out.append(Row(f"SLO attainment, {name}", m.slo[key], slo_g[key], slo_c[key]))
    for name, sim_p in (("TTFT", m.ttft), ("ITL", m.itl), ("E2E", m.e2e)):
        field = name.lower()
        g = percentiles([v for r in gateway if (v := getattr(r, field)) is not None])
        c = percentiles([v for r in client if (v := getattr(r, field)) is not None])
        out.append(Row(f"{name} p50 (s)", sim_p.p50, g.p50, c.p50, judged=False))
        out.append(Row(f"{name} p95 (s)", sim_p.p95, g.p95, c.p95, judged=False))
    out.append(Row("GPU-hours placed", m.gpu_hours_placed, hours, hours))
    out.append(Row("cost per successful request ($)", m.cost_per_request, per_request, per_request))
    return out


def diagnosis(sim: SimResult, live: Live, scale: float) -> str:
    """Where the live latency goes, in model time: the client's lateness in sending, the
    gateway's view, the engines' own view, against the simulator's means."""
    m = sim.model(MODEL)
    late = percentiles([o.late / scale for o in live.outcomes])
    ok = [o for o in live.outcomes if o.ok]
    g = live.gateway

    def ms(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value * 1000:.1f} ms"

    gateway_ttft = [
        (t.ttft_ms if t.ttft_ms is not None else t.duration_ms) / 1000 for t in live.timings
    ]
    overhead = (
        sum(gateway_ttft) / len(gateway_ttft) - live.engine_ttft_mean if gateway_ttft else math.nan
    )
    client_overhead = sum(o.ttft for o in ok) / len(ok) - live.engine_ttft_mean

    def gw(key: str) -> str:
        v = g.get(key)
        return "-" if v is None else f"{v / scale:.1f} ms"

    return "\n".join(
        [
            "where live latency goes (model time):",
            f"  client sent late by p50 {ms(late.p50)}, p95 {ms(late.p95)}, max "
            f"{ms(max(o.late for o in live.outcomes) / scale)}",
            f"  TTFT mean: sim {ms(m.ttft.mean)}; engines {ms(live.engine_ttft_mean / scale)}; "
            f"client {ms(sum(o.ttft for o in ok) / len(ok) / scale)}",
            f"  E2E mean: sim {ms(m.e2e.mean)}; engines {ms(live.engine_e2e_mean / scale)}; "
            f"client {ms(sum(o.e2e for o in ok) / len(ok) / scale)}",
            f"  fixed time over the engines' mean TTFT (wall): {ms(client_overhead)} as the "
            f"client sees it, {ms(overhead)} of it inside the gateway's own timing; the "
            f"simulator adds GATEWAY_OVERHEAD_S {ms(GATEWAY_OVERHEAD_S)} ÷ scale = "
            f"{ms(GATEWAY_OVERHEAD_S / scale)}",
            f"  gateway's own TTFT p50/p95 {gw('ttft_ms_p50')}/{gw('ttft_ms_p95')}, ITL p50/p95 "
            f"{gw('itl_ms_p50')}/{gw('itl_ms_p95')}, E2E p50/p95 {gw('e2e_ms_p50')}/"
            f"{gw('e2e_ms_p95')} ({g.get('requests')} requests)",
        ]
    )


def render(result: list[Row]) -> str:
    def num(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:.6g}" if abs(v) < 1e-3 else f"{v:.4f}"

    def judge(ratio: float | None, judged: bool) -> str:
        verdict = "-" if ratio is None else ("yes" if abs(ratio - 1) <= TOLERANCE else "NO")
        return verdict if judged else f"({verdict})"

    out = []
    for r in result:
        g, c = _ratio(r.gateway, r.sim), _ratio(r.client, r.sim)
        out.append(
            [
                r.metric,
                num(r.sim),
                num(r.gateway),
                "-" if g is None else f"{g:.3f}",
                judge(g, r.judged),
                num(r.client),
                "-" if c is None else f"{c:.3f}",
                judge(c, r.judged),
            ]
        )
    header = ["metric", "sim", "live (gateway)", "ratio", "±10 %?"]
    return table([*header, "live (client)", "ratio", "±10 %?"], out)


def engine_parameters(scale: float) -> str:
    """The engine model's parameters, as each side builds them: the simulator from the spec
    (``sim.fleet.SimModel.engine``), the emulator from its options (``emulator.main``)."""
    model = next(iter(load_file_text(spec_yaml(scale))))
    sized = sim_model(model)
    sim = sized.engine(None)
    arch = load_architecture(CONFIG)
    opts = EmulatorOptions(arch=arch, name=MODEL, gpu=GPU, tp=TP, time_scale=scale)
    gpu = accelerator(opts.gpu)
    perf = PerfModel(arch, gpu, opts.tp)
    kv = perf.kv_capacity_tokens(
        int(gpu.memory_bytes * opts.gpu_memory_utilization), engine_overhead_bytes("vllm", TP)
    )
    fields = [f.name for f in dataclasses.fields(PerfModel) if f.name not in ("arch", "gpu")]
    lines = [
        f"engine model ({arch.name or CONFIG.name}, {TP}× {gpu.name}): sizing.PerfModel "
        "(defaults in src/gpufleet/sizing/performance.py, GPU figures from hardware.CATALOG)",
        f"  GPU: {gpu.memory_bytes / 2**30:.0f} GiB, {gpu.bandwidth_bytes_per_s / 1e12:.2f} TB/s, "
        f"{gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16, ${gpu.price_per_hour:.2f}/GPU-hour",
        "  "
        + ", ".join(f"{name}={getattr(sim.perf, name)}" for name in fields)
        + f"  (emulator: {'same' if perf == sim.perf else 'DIFFERENT'})",
        f"  prefill {sim.perf.prefill_tokens_per_s():,.0f} tokens/s; decode step at batch 1, "
        f"512 context {sim.perf.decode_step_s(1, 512) * 1000:.1f} ms, at batch 8 "
        f"{sim.perf.decode_step_s(8, 512) * 1000:.1f} ms",
        f"  KV cache tokens: sim {sim.kv_tokens:,}, emulator {kv:,}; max_num_seqs: sim "
        f"{sim.max_num_seqs}, emulator {opts.max_num_seqs}; price/replica-hour: sim "
        f"${sim.price_per_hour:.2f}",
        f"  gateway slots per replica (sim): {sized.slots_per_replica}",
    ]
    return "\n".join(lines)


def load_file_text(text: str) -> list[Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.yaml"
        path.write_text(text)
        return list(load_file(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--time-scale", type=float, default=0.5, help="wall s per model s")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per model second")
    parser.add_argument("--duration", type=float, default=240.0, help="model seconds of trace")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ttft", type=float, default=0.08, help="TTFT objective, s")
    parser.add_argument("--itl", type=float, default=0.02, help="inter-token objective, s")
    parser.add_argument("--e2e", type=float, default=3.0, help="end-to-end objective, s")
    parser.add_argument("--sim-only", action="store_true")
    args = parser.parse_args()
    scale = args.time_scale
    objectives = Objectives(args.ttft, args.itl, args.e2e)
    with tempfile.TemporaryDirectory(prefix="sim-vs-live-") as tmp_name:
        tmp = Path(tmp_name)
        spec = tmp / "models.yaml"
        spec.write_text(spec_yaml(scale))
        (tmp / "inventory.yaml").write_text(inventory_yaml())
        trace_csv = tmp / "trace.csv"
        trace = poisson(
            args.rate,
            args.duration,
            seed=args.seed,
            prompt=Lengths(512, sigma=0.6, low=16, high=2048),
            output=Lengths(128, sigma=0.6, low=8, high=512),
        )
        count = write_trace(trace_csv, trace)
        print(f"trace: poisson {args.rate:g}/s for {args.duration:g} s, seed {args.seed}: ", end="")
        print(f"{count} requests; prompt ~512, output ~128 tokens (lognormal σ 0.6)")
        print(engine_parameters(scale))
        started = time.perf_counter()
        sized = [sim_model(m) for m in load_file(spec)]
        sim = simulate(
            sized,
            load_inventory(tmp / "inventory.yaml"),
            read_trace(trace_csv),
            objectives,
            # The gateway's fixed cost is wall time: at time scale S it is 1/S as long in model
            # time, as every fixed overhead of the live run is.
            SimSettings(seed=args.seed, gateway_overhead_s=GATEWAY_OVERHEAD_S / scale),
        )
        print(f"sim: {time.perf_counter() - started:.2f} s wall")
        if args.sim_only:
            m = sim.model(MODEL)
            print(json.dumps(dataclasses.asdict(m), indent=1, default=str))
            return
        started = time.perf_counter()
        live = run_live(trace_csv, spec, scale, tmp)
        print(f"live: {time.perf_counter() - started:.0f} s wall (window {live.window_s:.0f} s)")
        errors = [o.error for o in live.outcomes if not o.ok]
        wrong = sum(
            o.ok and (o.prompt_tokens not in (None, r.prompt_tokens) or o.tokens != r.output_tokens)
            for o, r in zip(live.outcomes, read_trace(trace_csv), strict=True)
        )
        print(f"  {len(errors)} failed ({errors[:3]}), {wrong} with other token counts than asked")
        print(diagnosis(sim, live, scale))
    print()
    print(
        f"Llama-3-70B, TP {TP}, {REPLICAS} fixed replicas on {TP * REPLICAS}× emulated {GPU}; "
        f"time scale {scale:g} (live latencies ÷ {scale:g}); objectives TTFT ≤ {args.ttft:g} s, "
        f"ITL ≤ {args.itl:g} s, E2E ≤ {args.e2e:g} s"
    )
    print(render(rows(sim, live, objectives, scale)))
    print(
        "(parenthesised: latency percentiles, shown for the reading, not one of the ±10 % figures)"
    )


if __name__ == "__main__":
    main()
