"""The gateway next to its peers — LiteLLM proxy and vllm-router — in front of one instant engine.

Every path ends at ``bench/null_engine.py``, which answers at once, so what is measured is each
proxy's own cost. The paths: direct to the engine, gpufleet (``gpufleet up`` as a process, with
keys, quotas and the ledger on, the null engine launched as its engine), LiteLLM proxy, and vllm-router with its default policy and with round robin (``peers.py`` says
how each is configured and why). The peers come from ``.cache/bench-peers``, made by
``scripts/setup-bench-peers``; a peer that is missing, does not start or breaks during the run
gets a "not available" row and the run goes on. Three measurements, in this order:

1. added latency: sequential non-streaming requests over kept-alive connections, one per path
   per round, the order rotated every round so that drift on this noisy machine hits all paths
   alike; p50/p99 of each path minus the direct path's. LiteLLM goes on working after it has
   answered (its logging and success callbacks run after the response is sent), which slowed
   the next request, whatever its path, by ~0.2 ms at p50 when measured; so LiteLLM runs in
   rounds of its own, alternating with the direct path, and is compared with that direct path;
2. per-chunk cost of streaming: sequential streams of ``--chunks`` chunks the engine writes back
   to back, in rounds as above. Per chunk = (median first-to-last-byte time through the proxy −
   the same direct) / (chunks − 1): what each further chunk costs once the stream flows, the
   request's fixed cost (the p50 column) left out;
3. requests/s with the proxy pinned to core 1 and the load generator and the engine on core 0,
   ``--connections`` at once (wrk when installed). The direct row is the ceiling of core 0. A
   proxy that, with its network interrupts, used under 90 % of its core is marked: "client-bound"
   when the core sat idle (the load generator or the engine on core 0 could not feed it), else
   "core shared" (other processes on this machine took the rest); either way its CPU µs per
   request still tells its own cost.

Goals (from the issue): gpufleet adds ≤ 0.5 ms at p50 and ≤ 3 ms at p99; serves ≥ 5× LiteLLM's
requests/s on one core; its overhead is within 2× of vllm-router's.
Run: python bench/gateway_peers.py [--requests 2000] [--streams 300] [--seconds 10]
     [--peers direct,gpufleet,litellm,vllm-router,vllm-router-rr] [--gpufleet-arg=--no-auth]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import uvloop

import loadgen
import peers
from common import ROOT, free_port, pct, stop, table, wait_http
from loadgen import Load, run_load, tool
from peers import Peer, Unavailable, drop_broken

CHAT = {"messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 1, "temperature": 0}
ALL = ["direct", "gpufleet", "litellm", "vllm-router", "vllm-router-rr"]
SOLO = {"litellm"}  # measured in rounds of their own with the direct path: see the docstring
PROXY_CPU, LOAD_CPU = 1, 0
SATURATED = 0.9


@dataclass(frozen=True)
class Core:
    """Shares of the proxy's core during the requests/s run."""

    proxy: float  # the proxy's processes, user and system
    softirq: float  # interrupts: mostly the loopback network stack, the proxy's own packets
    others: float  # other processes, and time the hypervisor stole
    idle: float

    @property
    def bound(self) -> str:
        """Why the proxy's core was not saturated, if it was not."""
        if self.proxy + self.softirq >= SATURATED:
            return ""
        return "client-bound" if self.idle >= 1 - SATURATED else "core shared"


@dataclass
class Measured:
    latency: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)  # streams: time to the first body bytes
    last: list[float] = field(default_factory=list)  # streams: time to the end of the stream
    load: Load | None = None
    core: Core | None = None  # how the proxy's core was spent under load
    cpu_us: float | None = None  # proxy CPU per request under load
    baseline: Measured | None = None  # the direct path measured alongside, for SOLO paths
    cpu_plain_us: float | None = None  # proxy CPU per sequential request
    cpu_stream_us: float | None = None  # proxy CPU per sequential stream


def body(peer: Peer, **extra: object) -> bytes:
    return json.dumps({**CHAT, "model": peer.model, **extra}).encode()


class Rounds:
    """Runs one request per live path per round, order rotated; a path that fails drops out."""

    def __init__(self, paths: list[Peer], results: dict[str, Measured], broken: dict[str, str]):
        self.paths, self.results, self.broken = paths, results, broken

    async def run(self, phase: str, n: int, warmup: int, chunks: int = 0) -> None:
        """``n`` counted rounds after ``warmup``; also the proxies' CPU per counted request."""
        cpu0: dict[str, float] = {}
        async with aiohttp.ClientSession() as http:
            for i in range(n + warmup):
                if i == warmup:
                    cpu0 = {p.name: p.cpu_seconds() for p in self.paths if p.proc}
                live = [p for p in self.paths if p.name not in self.broken]
                k = i % max(1, len(live))
                for peer in live[k:] + live[:k]:
                    try:
                        if chunks:
                            await self._stream(http, peer, chunks, i >= warmup)
                        else:
                            await self._plain(http, peer, i >= warmup)
                    except (aiohttp.ClientError, AssertionError, TimeoutError) as exc:
                        self.broken[peer.name] = f"{phase}: {type(exc).__name__}: {exc}"[:160]
        for p in self.paths:
            if p.proc is not None and p.name in cpu0 and p.name not in self.broken:
                us = (p.cpu_seconds() - cpu0[p.name]) / max(1, n) * 1e6
                if chunks:
                    self.results[p.name].cpu_stream_us = us
                else:
                    self.results[p.name].cpu_plain_us = us

    async def _plain(self, http: aiohttp.ClientSession, peer: Peer, keep: bool) -> None:
        headers = {"content-type": "application/json", **peer.headers}
        data = body(peer)
        start = time.perf_counter()
        async with http.post(peer.url, data=data, headers=headers) as resp:
            await resp.read()
            assert resp.status == 200, f"status {resp.status}"
        if keep:
            self.results[peer.name].latency.append(time.perf_counter() - start)

    async def _stream(
        self, http: aiohttp.ClientSession, peer: Peer, chunks: int, keep: bool
    ) -> None:
        headers = {"content-type": "application/json", **peer.headers}
        data = body(peer, stream=True, max_tokens=chunks)
        received = bytearray()
        first = 0.0
        start = time.perf_counter()
        async with http.post(peer.url, data=data, headers=headers) as resp:
            assert resp.status == 200, f"status {resp.status}"
            async for piece in resp.content.iter_any():
                if not first:
                    first = time.perf_counter() - start
                received += piece
        last = time.perf_counter() - start
        assert received.rstrip().endswith(b"[DONE]"), f"stream ended {bytes(received[-60:])!r}"
        assert received.count(b"data:") > chunks, f"{received.count(b'data:')} events"
        if keep:
            self.results[peer.name].first.append(first)
            self.results[peer.name].last.append(last)


def saturate(peer: Peer, seconds: float, connections: int) -> Measured:
    """Requests/s with the proxy alone on its core, and what its core did meanwhile."""
    data = body(peer)
    run_load(peer.url, data, peer.headers, 2, connections, LOAD_CPU)  # warm-up
    out = Measured()
    if peer.proc is None:
        out.load = run_load(peer.url, data, peer.headers, seconds, connections, LOAD_CPU)
        return out
    cpu0, core0 = peer.cpu_seconds(), peers.core_times(PROXY_CPU)
    wall0 = time.perf_counter()
    out.load = run_load(peer.url, data, peer.headers, seconds, connections, LOAD_CPU)
    wall = time.perf_counter() - wall0
    cpu = peer.cpu_seconds() - cpu0
    core = {k: (v - core0[k]) / wall for k, v in peers.core_times(PROXY_CPU).items()}
    others = max(0.0, core["tasks"] - cpu / wall) + core["steal"]
    out.core = Core(cpu / wall, core["softirq"], others, core["idle"])
    out.cpu_us = cpu / max(1, out.load.requests) * 1e6
    return out


@dataclass(frozen=True)
class Summary:
    """One path's numbers, relative to the direct path where that makes sense."""

    name: str
    added_p50: float | None
    added_p99: float | None
    chunk_us: float | None
    rps: float | None
    core: Core | None
    cpu_us: float | None
    cpu_chunk_us: float | None  # CPU of a stream beyond a plain request's, per chunk


def summarise(name: str, m: Measured, direct: Measured | None, chunks: int) -> Summary:
    direct = m.baseline or direct

    def added(q: float) -> float | None:
        if direct is None or name == "direct" or not m.latency:
            return None
        return (pct(m.latency, q) - pct(direct.latency, q)) * 1000

    chunk = None
    if direct is not None and name != "direct" and m.last and direct.last:
        flow = statistics.median(b - a for a, b in zip(m.first, m.last, strict=True))
        flow_direct = statistics.median(
            b - a for a, b in zip(direct.first, direct.last, strict=True)
        )
        chunk = (flow - flow_direct) / (chunks - 1) * 1e6
    rps = None if m.load is None else m.load.rps
    cpu_chunk = None
    if m.cpu_stream_us is not None and m.cpu_plain_us is not None:
        cpu_chunk = (m.cpu_stream_us - m.cpu_plain_us) / chunks
    return Summary(name, added(50), added(99), chunk, rps, m.core, m.cpu_us, cpu_chunk)


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def ratio(s: Summary, g: Summary | None) -> str:
    if g is None or s.name == "gpufleet":
        return ""
    parts = []
    if s.rps and g.rps:
        parts.append(f"req/s {s.rps / g.rps:.2f}×")
    if s.added_p50 is not None and g.added_p50 and g.added_p50 > 0:
        parts.append(f"added p50 {s.added_p50 / g.added_p50:.2f}×")
    return ", ".join(parts)


def timings(m: Measured) -> list[str]:
    """p50 and p99 of the plain requests, medians of the streams' first and last byte, in ms."""
    return [
        fmt(pct(m.latency, 50) * 1000 if m.latency else None, ".3f"),
        fmt(pct(m.latency, 99) * 1000 if m.latency else None, ".3f"),
        fmt(statistics.median(m.first) * 1000 if m.first else None, ".3f"),
        fmt(statistics.median(m.last) * 1000 if m.last else None, ".3f"),
    ]


def report(
    results: dict[str, Measured], missing: list[Unavailable], args: argparse.Namespace
) -> None:
    chunks = args.chunks
    direct = results.get("direct")
    sums = {name: summarise(name, m, direct, chunks) for name, m in results.items()}
    g = sums.get("gpufleet")
    rows = []
    for s in sums.values():
        bound = f" ({s.core.bound})" if s.core is not None and s.core.bound else ""
        rows.append(
            [
                s.name,
                fmt(s.added_p50, "+.3f"),
                fmt(s.added_p99, "+.3f"),
                fmt(s.chunk_us, "+.1f"),
                fmt(s.rps, ".0f") + bound,
                ratio(s, g),
            ]
        )
    rows += [[m.name, f"not available: {m.reason}", "", "", "", ""] for m in missing]
    head = ["path", "p50 added ms", "p99 added ms", "stream per-chunk µs", "max req/s (1 core)"]
    print(table([*head, "ratio vs gpufleet (this ÷ gpufleet)"], rows))

    details = []
    for name, m in results.items():
        s = sums[name]
        if m.baseline is not None:
            details.append([f"direct, in {name}'s rounds", *timings(m.baseline), *[""] * 8])
        details.append(
            [
                name,
                *timings(m),
                fmt(m.cpu_plain_us, ".0f"),
                fmt(s.cpu_chunk_us, ".1f"),
                *(
                    [""] * 4
                    if s.core is None
                    else [
                        f"{v * 100:.0f}"
                        for v in (s.core.proxy, s.core.softirq, s.core.others, s.core.idle)
                    ]
                ),
                fmt(s.cpu_us, ".0f"),
                "" if m.load is None else str(m.load.errors),
            ]
        )
    print()
    print(
        table(
            [
                "path",
                "p50 ms",
                "p99 ms",
                "stream first byte ms",
                "stream last byte ms",
                "CPU µs/req (sequential)",
                "CPU µs/chunk",
                "core 1 under load: proxy %",
                "softirq %",
                "others %",
                "idle %",
                "CPU µs/req (under load)",
                "load errors",
            ],
            details,
        )
    )
    gap = f"{args.chunk_gap_ms:g} ms apart" if args.chunk_gap_ms else "back to back"
    print(
        f"\nstreams: {chunks} chunks, {gap}; CPU µs/chunk: a stream's CPU beyond a plain request's"
    )
    print(
        f"requests/s: {tool()}, {args.connections} connections, on core {LOAD_CPU} with the engine;"
        f" proxy pinned to core {PROXY_CPU}. Not saturated = proxy + softirq < {SATURATED:.0%} of"
        f" core {PROXY_CPU}:\n'client-bound' when the core sat idle ≥ {1 - SATURATED:.0%},"
        " else 'core shared' (other processes took it)"
    )
    goals(sums)


def goals(sums: dict[str, Summary]) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print("\ngoals:")
    g = sums.get("gpufleet")
    if g is None or g.added_p50 is None or g.added_p99 is None:
        print("  gpufleet or the direct path did not run: no verdicts")
        return
    print(f"  gpufleet added p50 ≤ 0.5 ms: {g.added_p50:+.3f} ms — {verdict(g.added_p50 <= 0.5)}")
    print(f"  gpufleet added p99 ≤ 3 ms: {g.added_p99:+.3f} ms — {verdict(g.added_p99 <= 3.0)}")
    lite = sums.get("litellm")
    if lite is not None and lite.rps and g.rps:
        times = g.rps / lite.rps
        print(f"  ≥ 5× LiteLLM's requests/s (1 core): {times:.1f}× — {verdict(times >= 5)}")
    else:
        print("  ≥ 5× LiteLLM's requests/s (1 core): LiteLLM not measured")
    for label in ("vllm-router", "vllm-router-rr"):
        r = sums.get(label)
        if r is None or r.added_p50 is None or r.added_p99 is None:
            print(f"  within 2× of {label}'s overhead: {label} not measured")
            continue
        ok = r.added_p50 > 0 and g.added_p50 <= 2 * r.added_p50
        x = f"{g.added_p50 / r.added_p50:.1f}×" if r.added_p50 > 0 else "n/a"
        print(f"  within 2× of {label}'s overhead, added p50: {x} — {verdict(ok)}")
        print(f"    added p50 {g.added_p50:+.3f} vs {r.added_p50:+.3f} ms", end="")
        print(f", p99 {g.added_p99:+.3f} vs {r.added_p99:+.3f} ms", end="")
        if g.cpu_us and r.cpu_us:
            print(f", CPU/request {g.cpu_us:.0f} vs {r.cpu_us:.0f} µs", end="")
        if g.chunk_us is not None and r.chunk_us is not None:
            print(f", per chunk {g.chunk_us:+.1f} vs {r.chunk_us:+.1f} µs", end="")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="sequential, per path")
    parser.add_argument("--streams", type=int, default=300, help="sequential streams, per path")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument(
        "--chunk-gap-ms", type=float, default=0, help="engine's pause between chunks (0: none)"
    )
    parser.add_argument("--warmup", type=int, default=100, help="uncounted, per path and phase")
    parser.add_argument("--seconds", type=float, default=10, help="requests/s run, per path")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--peers", default=",".join(ALL), help=f"subset of {','.join(ALL)}")
    parser.add_argument(
        "--gpufleet-arg", action="append", default=[], help="appended to 'gpufleet up'"
    )
    parser.add_argument(
        "--gpufleet-header", action="append", default=[], help="'Name: value' on its requests"
    )
    args = parser.parse_args()
    loadgen.PREFER = args.loadgen
    peers.GPUFLEET_ARGS.extend(args.gpufleet_arg)
    peers.ENGINE_ARGS[:] = [str(args.chunk_gap_ms)]  # the engine gpufleet launches: the same
    for h in args.gpufleet_header:
        k, _, v = h.partition(":")
        peers.GPUFLEET_HEADERS[k.strip()] = v.strip()
    names = [n for n in ALL if n in args.peers.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="gateway-peers-"))

    engine_port = free_port()
    with (logs / "null-engine.log").open("wb") as out:
        engine = subprocess.Popen(
            [sys.executable, "bench/null_engine.py", str(engine_port), str(args.chunk_gap_ms)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running: list[Peer] = []
    missing: list[Unavailable] = []
    broken: dict[str, str] = {}
    results: dict[str, Measured] = {}
    try:
        wait_http(f"http://127.0.0.1:{engine_port}/health")
        for name in names:
            got = peers.start(name, engine_port, logs)
            if isinstance(got, Unavailable):
                missing.append(got)
                continue
            running.append(got)
            results[name] = Measured()
            if got.proc is not None:
                print(f"{name} ready in {got.start_s:.1f} s", file=sys.stderr)
        direct = next((p for p in running if p.name == "direct"), None)
        shared = [p for p in running if p.name not in SOLO or direct is None]
        groups = [(Rounds(shared, results, broken), "")]
        for peer in running:
            if peer.name in SOLO and direct is not None:
                m = results[peer.name]
                m.baseline = Measured()
                group = {"direct": m.baseline, peer.name: m}
                groups.append(
                    (Rounds([direct, peer], group, broken), f" ({peer.name} with direct)")
                )
        for rounds, label in groups:
            print(f"latency: {args.requests} rounds{label} ...", file=sys.stderr)
            uvloop.run(rounds.run("latency", args.requests, args.warmup))
            print(f"streams: {args.streams} rounds{label} ...", file=sys.stderr)
            uvloop.run(rounds.run("streams", args.streams, args.warmup, args.chunks))
        if (os.cpu_count() or 1) >= 2:
            peers.pin(engine.pid, LOAD_CPU)
            for peer in running:
                if peer.name in broken:
                    continue
                print(f"requests/s: {peer.name} ...", file=sys.stderr)
                peer.pin(PROXY_CPU)
                try:
                    under_load = saturate(peer, args.seconds, args.connections)
                    if peer.proc is not None and peer.proc.poll() is not None:
                        broken[peer.name] = f"requests/s: exited with {peer.proc.returncode}"
                        continue
                except subprocess.CalledProcessError as exc:
                    broken[peer.name] = f"requests/s: {exc.stderr or exc}"[:160]
                    continue
                finally:
                    # done with it: work it left queued (LiteLLM's logging) must not run on
                    # the next proxy's core
                    peer.close()
                m = results[peer.name]
                m.load, m.core, m.cpu_us = under_load.load, under_load.core, under_load.cpu_us
        else:
            print("one core only: requests/s not measured", file=sys.stderr)
    finally:
        for peer in running:
            peer.close()
        stop(engine)  # type: ignore[arg-type]
    drop_broken(broken, running, results, missing)
    report(results, missing, args)
    print(f"\npeer logs: {logs}")


if __name__ == "__main__":
    main()
