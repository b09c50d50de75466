"""Soak: many streams held at once on one core, and the gateway's memory over many requests.

Both parts run the production gateway (``bench/gateway_only.py``: API keys, quotas and the usage
ledger on) pinned to core 1, and the null engine, the clients and this script on core 0.

**Part 1 — concurrent streams held on one core** (goal: 10,000). ``--streams`` streaming chat
completions are opened as fast as the gateway takes them and held while the engine writes
``--chunks`` chunks ``--gap-ms`` apart, as an engine's decode steps are. What it rests on:

- The gateway lets at most 64 requests per replica through at once
  (``GatewaySettings.slots_per_replica``) and queues 1,000 more, refusing the rest: one replica
  holds 64 streams, not 10,000. So the model gets ``ceil(streams / 64)`` replicas (157 for
  10,000; ``--replicas`` overrides), all served by one engine process listening on consecutive
  ports (null_engine's handler; 157 processes would take a minute of core 0 just to start).
  The gateway scrapes every replica's ``/metrics`` each 0.25 s, ~630 requests/s for 157
  replicas, and that cost is part of what is measured.
- Each stream holds two sockets in the gateway (to the client, to the engine). ``ulimit -n``
  here is 20,000 soft and hard, which runs out just short of 10,000 streams, so every child's
  RLIMIT_NOFILE is raised to ``--nofile`` (root may raise the hard limit too; otherwise the
  hard limit is the ceiling); the table prints what the gateway got.
- ``--clients`` processes of aiohttp (``limit=0``) on uvloop open the streams, each with at
  most 256 waiting for their first chunk, so the gateway's listen backlog (2,048) does not
  overflow into SYN retries of a second or more.
- "Open" is counted from the clients' own timestamps, not sampled: a stream is open from its
  first content chunk to its end, and the peak is a sweep over those events (CLOCK_MONOTONIC is
  one clock for all processes). The gateway's RSS, fds and CPU time are sampled every 0.25 s;
  its CPU % is taken over the hold window, while ≥ 95 % of the peak were open. Chunk gaps are
  between consecutive content chunks as the client read them: the engine's gap plus whatever
  delay the loaded gateway (or the loaded core 0, whose busy share is printed) added.

**Part 2 — memory flat over many requests** (goal: ±5 % over 1 M). ``--requests`` requests go
through the gateway with wrk, in ten slices of a tenth each; wrk's ``-d`` cannot stop at a
count, so the slice's Lua script counts answers and exits wrk at its share. The gateway's RSS is
read after every slice; the first slice is the warm-up, and growth is from 10 % to 100 %. The
bodies rotate over a few prompts and output lengths, one in five streaming. Every request is one
ledger row, written to SQLite in batches behind the hot path; rows are counted in the database
the gateway holds open (found through ``/proc/PID/fd``), so a ledger falling behind shows.

Run: python bench/gateway_soak.py [--part 1|2|both] [--streams 10000] [--gap-ms 500]
     [--chunks 40] [--requests 1000000] [--connections 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import AUTH, BENCH_KEY, ROOT, free_port, pct, stop, table, wait_http
from gpufleet.gateway.app import GatewaySettings
from peers import core_times, cpu_seconds

GATEWAY_CPU, LOAD_CPU = 1, 0
MODEL = "null-model"
SLOTS = GatewaySettings().slots_per_replica
OPENING = 256  # streams per client waiting for their first chunk
HOLD_SHARE = 0.95
STREAM_GOAL, REQUEST_GOAL, FLAT = 10_000, 1_000_000, 5.0
PROMPTS = [
    "Say yes.",
    "Summarise the plot of Hamlet in one line.",
    "Translate 'good morning' into French, German and Italian.",
    "List three prime numbers above one hundred and say why each is prime.",
]


def _body(prompt: str, max_tokens: int, *, stream: bool = False) -> str:
    data = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
    return json.dumps({**data, "max_tokens": max_tokens, **({"stream": True} if stream else {})})


# --- processes and what /proc says about them ------------------------------------------------


def _nofile(limit: int) -> Callable[[], None]:
    def raise_limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
        except (ValueError, OSError):  # not root: the hard limit is the ceiling
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))

    return raise_limit


def launch(cmd: list[str], cpu: int, log: Path, nofile: int) -> subprocess.Popen[bytes]:
    """``cmd`` pinned to ``cpu`` with its output in ``log``; taskset execs, so the pid is cmd's."""
    with log.open("wb") as out:
        return subprocess.Popen(
            ["taskset", "-c", str(cpu), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=_nofile(nofile),
        )


def memory_kib(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM (the peak RSS), KiB."""
    found = dict.fromkeys(("VmRSS", "VmHWM"), 0)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in found:
            found[key] = int(value.split()[0])
    return found["VmRSS"], found["VmHWM"]


def nofile_of(pid: int) -> tuple[int, int]:
    """The soft and hard RLIMIT_NOFILE the process ``pid`` runs with."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise ValueError(f"no open-file limit for {pid}")


def ledger_rows(pid: int) -> int | None:
    """Rows in the usage ledger of the gateway ``pid``: its SQLite file is in a temporary
    directory of its own, found through the descriptors it holds open."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = fd.readlink()
            if target.name == "gpufleet.db":
                uri = f"file:{target}?mode=ro"
                with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
                    count: int = db.execute("SELECT count(*) FROM usage").fetchone()[0]
                    return count
    return None


def tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    return "\n".join(text[-lines:]) or "(empty)"


def start_gateway(
    tmp: Path, upstream_port: int, replicas: int, nofile: int
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port, log = free_port(), tmp / "gateway.log"
    cmd = [sys.executable, "bench/gateway_only.py", str(port), f"http://127.0.0.1:{upstream_port}"]
    proc = launch([*cmd, MODEL, str(replicas)], GATEWAY_CPU, log, nofile)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz")
        ready = re.compile(r'^gpufleet_replicas\{[^}]*phase="ready"[^}]*\} ([\d.]+)', re.M | re.I)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # /readyz wants one replica; the bench wants all
            request = urllib.request.Request(f"{base}/metrics", headers=AUTH)
            with urllib.request.urlopen(request, timeout=10) as resp:
                found = ready.search(resp.read().decode())
            if found and int(float(found.group(1))) >= replicas:
                return proc, f"{base}/v1/chat/completions", log
            time.sleep(0.2)
        raise TimeoutError(f"the gateway has not {replicas} ready replicas; log:\n{tail(log)}")
    except BaseException:
        stop(proc)  # type: ignore[arg-type]
        raise


# --- part 1: streams held ---------------------------------------------------------------------


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free ports, below the ephemeral range so that the
    clients' 10,000 outgoing connections cannot take one."""
    import socket

    for base in range(20_000, 32_000 - count, count):
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + count):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


async def serve_engine(gap_ms: float, base: int, count: int) -> None:
    """null_engine's handlers on ports ``base`` .. ``base + count - 1``, one per replica."""
    from aiohttp import web

    import null_engine

    null_engine.GAP_S = gap_ms / 1000
    app = web.Application()
    app.router.add_post("/v1/chat/completions", null_engine.chat)
    app.router.add_get("/v1/models", null_engine.models)
    app.router.add_get("/health", null_engine.health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for port in range(base, base + count):
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()


async def hold_streams(url: str, count: int, chunks: int, start_at: float) -> str:
    """Open ``count`` streams and read them to the end: what each saw, as JSON."""
    import aiohttp

    bodies = [_body(p, chunks, stream=True).encode() for p in PROMPTS]
    headers = {"content-type": "application/json", **AUTH}
    records: list[tuple[float, float, float, bool]] = []  # sent, first chunk, end, complete
    gaps: list[float] = []
    errors: Counter[str] = Counter()
    opening = asyncio.Semaphore(OPENING)

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        await opening.acquire()
        sent, first, last, seen, done = time.monotonic(), math.nan, math.nan, 0, False
        try:
            async with http.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
                if resp.status != 200:
                    code = (await resp.json(content_type=None)).get("error", {}).get("code")
                    errors[f"HTTP {resp.status} {code}"] += 1
                    return
                rest = b""
                async for data in resp.content.iter_any():  # cheaper than line by line
                    now = time.monotonic()
                    *events, rest = (rest + data).split(b"\n\n")
                    for event in events:
                        if event.startswith(b"data: [DONE]"):
                            done = True
                        elif event.startswith(b'data: {"error"'):
                            errors[f"error event: {event[6:120].decode(errors='replace')}"] += 1
                        elif b'"content"' in event:
                            if seen:
                                gaps.append(now - last)
                            else:
                                first = now
                                opening.release()
                            last, seen = now, seen + 1
            if not done or seen != chunks:
                errors[
                    f"cut short: {'no [DONE]' if not done else f'{seen} of {chunks} chunks'}"
                ] += 1
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            errors[f"{type(exc).__name__}: {str(exc).split(' for http')[0][:60]}"] += 1
        finally:
            if not seen:
                opening.release()
            records.append((sent, first, time.monotonic(), done and seen == chunks))

    # A fresh connection per stream: reusing one that finished races the server's keep-alive
    # timeout (5 s in uvicorn) and ends in a reset, which is the client's fault, not the gateway's.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        await asyncio.gather(*(one(http, i) for i in range(count)))
    return json.dumps({"records": records, "gaps": gaps, "errors": errors})


@dataclass(frozen=True)
class Sample:
    t: float
    cpu_s: float
    rss_kib: int
    hwm_kib: int
    fds: int
    idle_s: dict[int, float]  # idle seconds of each core so far


def sample(pid: int) -> Sample:
    rss, hwm = memory_kib(pid)
    idle = {c: core_times(c)["idle"] for c in (LOAD_CPU, GATEWAY_CPU)}
    fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    return Sample(time.monotonic(), cpu_seconds(pid), rss, hwm, fds, idle)


def open_over_time(records: list[list[float]]) -> list[tuple[float, int]]:
    """(time, streams open from then on): a stream is open from its first chunk to its end."""
    events = sorted(
        [(r[1], 1) for r in records if not math.isnan(r[1])]
        + [(r[2], -1) for r in records if not math.isnan(r[1])]
    )
    steps, now_open = [], 0
    for t, change in events:
        now_open += change
        steps.append((t, now_open))
    return steps


def hold_window(steps: list[tuple[float, int]], peak: int) -> tuple[float, float]:
    """The longest stretch with at least HOLD_SHARE of the peak open."""
    best, since = (0.0, 0.0), None
    for t, now_open in steps:
        if now_open >= HOLD_SHARE * peak and since is None:
            since = t
        elif now_open < HOLD_SHARE * peak and since is not None:
            best, since = max(best, (since, t), key=lambda w: w[1] - w[0]), None
    return best


def part1(args: argparse.Namespace, tmp: Path) -> None:
    replicas = args.replicas or math.ceil(args.streams / SLOTS)
    base = free_port_run(replicas)
    engine_log = tmp / "engine.log"
    cmd = [sys.executable, __file__, "_engine", str(args.gap_ms), str(base), str(replicas)]
    with contextlib.ExitStack() as procs:
        engine = launch(cmd, LOAD_CPU, engine_log, args.nofile)
        procs.callback(stop, engine)
        wait_http(f"http://127.0.0.1:{base + replicas - 1}/health")
        gateway, url, gateway_log = start_gateway(tmp, base, replicas, args.nofile)
        procs.callback(stop, gateway)
        nofile = nofile_of(gateway.pid)
        result, samples = drive_streams(args, url, gateway, tmp, procs)
        report1(args, replicas, result, samples, nofile)
        if result[2] or gateway.poll() is not None:
            print(f"--- last lines of the gateway's log ({gateway_log}):\n{tail(gateway_log)}")
            print(f"--- last lines of the engine's log:\n{tail(engine_log)}")


def drive_streams(
    args: argparse.Namespace,
    url: str,
    gateway: subprocess.Popen[bytes],
    tmp: Path,
    procs: contextlib.ExitStack,
) -> tuple[tuple[list[list[float]], list[float], Counter[str]], list[Sample]]:
    """Run the client processes to the end, sampling the gateway meanwhile; merge what they saw."""
    start_at = time.monotonic() + 3.0  # the clients' imports are done by then
    clients = []
    for i in range(args.clients):
        share = args.streams // args.clients + (i < args.streams % args.clients)
        out, log = tmp / f"client{i}.json", tmp / f"client{i}.log"
        cmd = [sys.executable, __file__, "_client", url, str(share), str(args.chunks)]
        client = launch([*cmd, repr(start_at), str(out)], LOAD_CPU, log, args.nofile)
        procs.callback(stop, client)
        clients.append((client, out, log))
    samples = [sample(gateway.pid)]
    deadline = start_at + args.streams / 200 + args.chunks * args.gap_ms / 1000 * 3 + 60
    while any(c.poll() is None for c, _, _ in clients) and time.monotonic() < deadline:
        time.sleep(0.25)
        if gateway.poll() is None:
            samples.append(sample(gateway.pid))
    records: list[list[float]] = []
    gaps: list[float] = []
    errors: Counter[str] = Counter()
    for client, out, log in clients:
        if client.poll() is None or not out.exists():
            print(f"--- a client did not finish; its log:\n{tail(log)}", file=sys.stderr)
            continue
        seen = json.loads(out.read_text())
        records += seen["records"]
        gaps += seen["gaps"]
        errors.update(seen["errors"])
    if len(records) < args.streams:
        errors["client did not finish"] += args.streams - len(records)
    return (records, gaps, errors), samples


def _at(samples: list[Sample], t: float) -> Sample:
    return min(samples, key=lambda s: abs(s.t - t))


def report1(
    args: argparse.Namespace,
    replicas: int,
    result: tuple[list[list[float]], list[float], Counter[str]],
    samples: list[Sample],
    nofile: tuple[int, int],
) -> None:
    records, gaps, errors = result
    complete = sum(1 for r in records if r[3])
    opened = [r for r in records if not math.isnan(r[1])]
    steps = open_over_time(records)
    peak, t_peak = max(((n, t) for t, n in steps), default=(0, 0.0))
    w0, w1 = hold_window(steps, peak)
    inside = [s for s in samples if w0 <= s.t <= w1]
    if len(inside) < 3:  # too short a window to sample: take the whole run
        inside = samples[1:]
    a, b = inside[0], inside[-1]
    span = max(b.t - a.t, 1e-9)
    gateway = (b.cpu_s - a.cpu_s) / span * 100
    quiet = [s for s in samples if records and s.t <= min(r[0] for r in records)]
    scraping = (quiet[-1].cpu_s - quiet[0].cpu_s) / max(quiet[-1].t - quiet[0].t, 1e-9) * 100
    if opened:
        o0, o1 = _at(samples, min(r[0] for r in records)), _at(samples, max(r[1] for r in opened))
        opening = (o1.cpu_s - o0.cpu_s) / max(o1.t - o0.t, 1e-9) * 100
    else:
        opening = math.nan
    busy = {c: (1 - (b.idle_s[c] - a.idle_s[c]) / span) * 100 for c in a.idle_s}
    idle, top = samples[0], _at(samples, t_peak)
    budget = (nofile[0] - idle.fds) // 2
    to_open = max(r[1] for r in opened) - min(r[0] for r in records) if opened else math.nan
    first = [(r[1] - r[0]) * 1000 for r in opened] or [math.nan]
    gap = [g * 1000 for g in gaps] or [math.nan]
    rows = [
        ["streams asked for", f"{args.streams:,} from {args.clients} client processes"],
        ["replicas × slots each", f"{replicas} × {SLOTS} = {replicas * SLOTS:,} admitted at once"],
        ["each stream", f"{args.chunks} chunks {args.gap_ms:g} ms apart"],
        ["gateway fd limit", f"{nofile[0]:,} soft / {nofile[1]:,} hard"],
        ["fd budget: (limit − idle) / 2", f"({nofile[0]:,} − {idle.fds}) / 2 = {budget:,} streams"],
        ["completed with all chunks", f"{complete:,}"],
        ["failed", f"{args.streams - complete:,}"],
        ["peak open at once", f"{peak:,}"],
        ["time to open them all", f"{to_open:.1f} s"],
        ["first chunk p50 / p99", f"{pct(first, 50):,.0f} / {pct(first, 99):,.0f} ms"],
        ["held ≥ 95 % of peak for", f"{w1 - w0:.1f} s"],
        ["gateway RSS idle → peak", f"{idle.rss_kib / 1024:.0f} → {top.rss_kib / 1024:.0f} MiB"],
        ["gateway RSS per stream", f"{(top.rss_kib - idle.rss_kib) / max(peak, 1):.0f} KiB"],
        ["gateway VmHWM", f"{samples[-1].hwm_kib / 1024:.0f} MiB"],
        ["gateway fds at peak", f"{top.fds:,} (most sampled {max(s.fds for s in samples):,})"],
        ["gateway CPU before the clients", f"{scraping:.0f} % (scraping {replicas} replicas)"],
        ["gateway CPU while opening", f"{opening:.0f} % of core {GATEWAY_CPU}"],
        ["gateway CPU while holding", f"{gateway:.0f} % of core {GATEWAY_CPU}"],
        [f"core {GATEWAY_CPU}: others + irqs", f"{max(0.0, busy[GATEWAY_CPU] - gateway):.0f} %"],
        [f"core {LOAD_CPU} busy (engine, clients)", f"{busy[LOAD_CPU]:.0f} %"],
        [
            "chunk gap p50 / p99 / max",
            f"{pct(gap, 50):.0f} / {pct(gap, 99):.0f} / {max(gap):.0f} ms",
        ],
    ]
    rows += [[f"failure: {why}", f"{n:,}"] for why, n in errors.most_common(6)]
    print(f"\nPart 1 — streams held by the gateway on one core (engine gap {args.gap_ms:g} ms)\n")
    print(table(["", "value"], rows))
    verdict = "met" if peak >= STREAM_GOAL and complete == args.streams else "not met"
    why = f"; the fd limit allows ≈ {budget:,}" if budget < max(args.streams, STREAM_GOAL) else ""
    print(
        f"\nGoal: {STREAM_GOAL:,} concurrent streams held on one core — {verdict}: {peak:,} open "
        f"at once, {complete:,} of {args.streams:,} complete{why}; chunk gap p99 "
        f"{pct(gap, 99) - args.gap_ms:+.0f} ms over the engine's."
    )


# --- part 2: memory over many requests -------------------------------------------------------

LUA = """-- one slice of the soak: rotate the bodies, count answers, exit wrk at the slice's share
local bodies = {%(bodies)s}
local limit, n, bad, i = %(limit)d, 0, 0, 0
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer %(key)s"
request = function()
  i = i %% #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
response = function(status, headers, body)
  n = n + 1
  if status ~= 200 then bad = bad + 1 end
  if n >= limit then
    io.write(string.format("soak: %%d answers, %%d not 200\\n", n, bad))
    io.flush()
    os.exit(0)
  end
end
"""
SOAK_LINE = re.compile(r"soak: (\d+) answers, (\d+) not 200")


def part2_bodies() -> list[str]:
    bodies = [_body(p, n) for p, n in zip(PROMPTS, (1, 16, 64, 128), strict=True)]
    return [*bodies, _body(PROMPTS[1], 8, stream=True)]  # one in five streams


@dataclass(frozen=True)
class Slice:
    requests: int  # answered so far
    errors: int
    seconds: float
    rss_kib: int
    rows: int | None


def run_slice(url: str, script: Path, connections: int) -> tuple[int, int, float]:
    cmd = ["taskset", "-c", str(LOAD_CPU), "wrk", "-t1", f"-c{connections}", "-d3600s"]
    started = time.perf_counter()
    out = subprocess.run(
        [*cmd, "--timeout", "10s", "-s", str(script), url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    seconds = time.perf_counter() - started
    found = SOAK_LINE.search(out)
    if found is None:
        raise RuntimeError(f"wrk ended before its share was answered:\n{out}")
    return int(found.group(1)), int(found.group(2)), seconds


def part2(args: argparse.Namespace, tmp: Path) -> None:
    port, engine_log = free_port(), tmp / "engine2.log"
    with contextlib.ExitStack() as procs:
        cmd = [sys.executable, "bench/null_engine.py", str(port)]
        engine = launch(cmd, LOAD_CPU, engine_log, args.nofile)
        procs.callback(stop, engine)
        wait_http(f"http://127.0.0.1:{port}/health")
        gateway, url, gateway_log = start_gateway(tmp, port, 1, args.nofile)
        procs.callback(stop, gateway)
        per = args.requests // 10
        bodies = ", ".join(f"[[{b}]]" for b in part2_bodies())
        script = tmp / "soak.lua"
        script.write_text(LUA % {"bodies": bodies, "limit": per, "key": BENCH_KEY})
        cpu0 = cpu_seconds(gateway.pid)
        slices, done, errors, seconds = [], 0, 0, 0.0
        for _ in range(10):
            try:
                n, bad, took = run_slice(url, script, args.connections)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                print(f"--- part 2 stopped: {exc}\n--- gateway log:\n{tail(gateway_log)}")
                break
            done, errors, seconds = done + n, errors + bad, seconds + took
            slices.append(
                Slice(done, errors, took, memory_kib(gateway.pid)[0], ledger_rows(gateway.pid))
            )
        cpu = cpu_seconds(gateway.pid) - cpu0
        hwm = memory_kib(gateway.pid)[1]
        rows_end = settled_rows(gateway.pid, done)
        report2(args, slices, seconds, cpu, hwm, rows_end)
        if errors or gateway.poll() is not None:
            print(f"--- last lines of the gateway's log ({gateway_log}):\n{tail(gateway_log)}")


def settled_rows(pid: int, expected: int) -> int | None:
    """Ledger rows once the gateway has written what it holds (it flushes every 0.5 s)."""
    rows = ledger_rows(pid)
    deadline = time.monotonic() + 10
    while rows is not None and rows < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = ledger_rows(pid)
    return rows


def report2(
    args: argparse.Namespace,
    slices: list[Slice],
    seconds: float,
    cpu: float,
    hwm_kib: int,
    rows_end: int | None,
) -> None:
    if not slices:
        return
    mib = 1024
    table_rows = []
    for k, s in enumerate(slices, 1):
        rps = (s.requests - (slices[k - 2].requests if k > 1 else 0)) / s.seconds
        ledger = "-" if s.rows is None else f"{s.rows:,}"
        table_rows.append(
            [
                f"{k * 10} %",
                f"{s.requests:,}",
                f"{rps:,.0f}",
                f"{s.errors:,}",
                f"{s.rss_kib / mib:.1f}",
                ledger,
            ]
        )
    print(f"\nPart 2 — gateway memory over {args.requests:,} requests (keys, quotas, ledger on)\n")
    print(table(["done", "requests", "req/s", "errors", "RSS MiB", "ledger rows"], table_rows))
    first, last = slices[0], slices[-1]
    growth = (last.rss_kib - first.rss_kib) / first.rss_kib * 100
    print(
        f"\nRSS {first.rss_kib / mib:.1f} MiB at 10 % → {last.rss_kib / mib:.1f} MiB at "
        f"{len(slices) * 10} %: {growth:+.1f} % (VmHWM {hwm_kib / mib:.1f} MiB); "
        f"{last.requests / seconds:,.0f} requests/s, {cpu / last.requests * 1e6:.0f} µs of gateway CPU each "
        f"(wrk, {args.connections} connections); ledger rows at the end: "
        + ("not readable" if rows_end is None else f"{rows_end:,} of {last.requests:,} answered")
    )
    verdict = "met" if abs(growth) <= FLAT else "not met"
    scale = "" if last.requests >= REQUEST_GOAL else f" (this run: {last.requests:,} requests)"
    print(
        f"Goal: memory flat (±{FLAT:g} %) over {REQUEST_GOAL:,} requests — {growth:+.1f} %, {verdict}{scale}."
    )


# --- entry points ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["1", "2", "both"], default="both")
    parser.add_argument("--streams", type=int, default=STREAM_GOAL)
    parser.add_argument("--gap-ms", type=float, default=500.0)
    parser.add_argument("--chunks", type=int, default=40, help="content chunks per stream")
    parser.add_argument("--clients", type=int, default=2, help="client processes (part 1)")
    parser.add_argument("--replicas", type=int, default=0, help="default: streams / 64, rounded up")
    parser.add_argument("--requests", type=int, default=REQUEST_GOAL)
    parser.add_argument("--connections", type=int, default=50, help="wrk's (part 2)")
    parser.add_argument("--nofile", type=int, default=65_536, help="RLIMIT_NOFILE of the children")
    args = parser.parse_args()
    os.sched_setaffinity(0, {LOAD_CPU})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"ulimit -n here: {soft:,} soft / {hard:,} hard; children asked for {args.nofile:,}")
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp:
        if args.part in ("1", "both"):
            part1(args, Path(tmp))
        if args.part in ("2", "both"):
            part2(args, Path(tmp))


if __name__ == "__main__":
    import uvloop

    if sys.argv[1:2] == ["_engine"]:  # argv[2] is the gap, where null_engine looks for it
        gap, base, count = sys.argv[2:5]
        uvloop.run(serve_engine(float(gap), int(base), int(count)))
    elif sys.argv[1:2] == ["_client"]:
        url, count, chunks, start_at, out = sys.argv[2:7]
        result = uvloop.run(hold_streams(url, int(count), int(chunks), float(start_at)))
        Path(out).write_text(result)
    else:
        main()
