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
  Its engine (llama.cpp) has no metrics path, so the gateway scrapes nothing.
- Each stream holds two sockets in the gateway (to the client, to the engine), so 10,000 need
  20,000 fds and more. Every child's RLIMIT_NOFILE is raised to ``--nofile`` where the hard
  limit (or CAP_SYS_RESOURCE) allows; the table prints what the gateway got and how many
  streams that leaves room for.
- ``--clients`` processes of aiohttp (``limit=0``, a connection per stream) on uvloop open the
  streams, each with at most 256 waiting for their first chunk, so the gateway's listen backlog
  (2,048) does not overflow into SYN retries. A stream not sent within ``--open-s`` is given up
  and counted as failed, which bounds the run when the gateway opens streams slowly.
- "Open" is counted from the clients' own timestamps, not sampled: a stream is open from its
  first content chunk to its end, and the peak is a sweep over those events (CLOCK_MONOTONIC is
  one clock for all processes). A stream must last longer than opening them all takes, or the
  first end before the last begin. The gateway's RSS, fds and CPU time are sampled every
  0.25 s; its CPU % is taken over the hold window, while ≥ 95 % of the peak were open. Chunk
  gaps are between consecutive content chunks as the client read them, over the whole run and
  within the hold window: the engine's gap plus what the gateway's core (or core 0, whose busy
  share is printed) added.

**Part 2 — memory flat over many requests** (goal: ±5 % over 1 M). ``--requests`` requests go
through the gateway with wrk, in ten slices of a tenth each; wrk's ``-d`` cannot stop at a
count, so the slice's Lua script counts answers and exits wrk at its share. The gateway's RSS is
read after every slice; the first slice is the warm-up, and growth is from 10 % to 100 %. The
bodies rotate over a few prompts and output lengths, one in five streaming. Every request is one
ledger row, written to SQLite in batches behind the hot path; rows are counted in the database
the gateway holds open (found through ``/proc/PID/fd``), so a ledger falling behind shows.

Run: python bench/gateway_soak.py [--part 1|2|both] [--streams 10000] [--gap-ms 500]
     [--chunks 60] [--open-s 60] [--requests 1000000] [--connections 50]
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
import socket
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
        except (ValueError, OSError):  # no CAP_SYS_RESOURCE (as here): the hard limit is the cap
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


def halt(proc: subprocess.Popen[bytes]) -> None:
    stop(proc)  # type: ignore[arg-type]  # common.stop only signals and waits: any Popen will do


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
        try:
            target = fd.readlink()
        except OSError:  # closed between listing and reading: not the database, still open
            continue
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
    tmp: Path, upstream_port: int, replicas: int, args: argparse.Namespace
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port, log = free_port(), tmp / "gateway.log"
    cmd = [sys.executable, "bench/gateway_only.py", str(port), f"http://127.0.0.1:{upstream_port}"]
    cmd += [MODEL, str(replicas), *(["--no-auth"] if args.no_auth else [])]
    proc = launch(cmd, GATEWAY_CPU, log, args.nofile)
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
        halt(proc)
        raise


# --- part 1: streams held ---------------------------------------------------------------------


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free ports, below the ephemeral range so that the
    clients' 10,000 outgoing connections cannot take one."""
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


async def hold_streams(url: str, count: int, chunks: int, start_at: float, open_s: float) -> str:
    """Open ``count`` streams and read them to the end: what each saw, as JSON."""
    import aiohttp

    bodies = [_body(p, chunks, stream=True).encode() for p in PROMPTS]
    headers = {"content-type": "application/json", **AUTH}
    records: list[tuple[float, float, float, bool]] = []  # sent, first chunk, end, complete
    gaps: list[tuple[float, float]] = []  # when, how long
    errors: Counter[str] = Counter()
    opening = asyncio.Semaphore(OPENING)

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        await opening.acquire()
        sent, first, last, seen, done = time.monotonic(), math.nan, math.nan, 0, False
        try:
            if sent > start_at + open_s:
                errors[f"not sent within --open-s {open_s:g} s"] += 1
                return
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
                                gaps.append((now, now - last))
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


@dataclass(frozen=True)
class Stream:
    """One stream as its client saw it (monotonic seconds; ``first`` is NaN if none came)."""

    sent: float
    first: float
    end: float
    complete: bool

    @property
    def opened(self) -> bool:
        return not math.isnan(self.first)


#: What the clients saw: each stream, every gap between chunks (when, seconds), failures.
Seen = tuple[list[Stream], list[tuple[float, float]], Counter[str]]


def open_over_time(streams: list[Stream]) -> list[tuple[float, int]]:
    """(time, streams open from then on): a stream is open from its first chunk to its end."""
    opened = [s for s in streams if s.opened]
    events = sorted([(s.first, 1) for s in opened] + [(s.end, -1) for s in opened])
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


def _at(samples: list[Sample], t: float) -> Sample:
    return min(samples, key=lambda s: abs(s.t - t))


def usage(samples: list[Sample], t0: float, t1: float) -> tuple[float, dict[int, float]]:
    """The gateway's CPU % and each core's busy % between the samples nearest t0 and t1."""
    a, b = _at(samples, t0), _at(samples, t1)
    span = max(b.t - a.t, 1e-9)
    busy = {c: (1 - (b.idle_s[c] - a.idle_s[c]) / span) * 100 for c in a.idle_s}
    return (b.cpu_s - a.cpu_s) / span * 100, busy


def part1(args: argparse.Namespace, tmp: Path) -> None:
    replicas = args.replicas or math.ceil(args.streams / SLOTS)
    base = free_port_run(replicas)
    engine_log = tmp / "engine.log"
    cmd = [sys.executable, __file__, "_engine", str(args.gap_ms), str(base), str(replicas)]
    with contextlib.ExitStack() as procs:
        engine = launch(cmd, LOAD_CPU, engine_log, args.nofile)
        procs.callback(halt, engine)
        wait_http(f"http://127.0.0.1:{base + replicas - 1}/health")
        gateway, url, gateway_log = start_gateway(tmp, base, replicas, args)
        procs.callback(halt, gateway)
        nofile = nofile_of(gateway.pid)
        result, samples = drive_streams(args, url, gateway, tmp, procs)
        report1(args, replicas, result, samples, nofile)
        if result[2] or gateway.poll() is not None:
            print(f"--- last lines of the gateway's output:\n{tail(gateway_log)}")
            print(f"--- last lines of the engine's output:\n{tail(engine_log)}")


def drive_streams(
    args: argparse.Namespace,
    url: str,
    gateway: subprocess.Popen[bytes],
    tmp: Path,
    procs: contextlib.ExitStack,
) -> tuple[Seen, list[Sample]]:
    """Run the client processes to the end, sampling the gateway meanwhile; merge what they saw."""
    start_at = time.monotonic() + 3.0  # the clients' imports are done by then
    clients = []
    for i in range(args.clients):
        share = args.streams // args.clients + (i < args.streams % args.clients)
        out, log = tmp / f"client{i}.json", tmp / f"client{i}.log"
        cmd = [sys.executable, __file__, "_client", url, str(share), str(args.chunks)]
        cmd += [repr(start_at), str(args.open_s), str(out)]
        client = launch(cmd, LOAD_CPU, log, args.nofile)
        procs.callback(halt, client)
        clients.append((client, out, log))
    samples = [sample(gateway.pid)]
    deadline = start_at + args.open_s + args.chunks * args.gap_ms / 1000 * 2 + 30
    while any(c.poll() is None for c, _, _ in clients) and time.monotonic() < deadline:
        time.sleep(0.25)
        if gateway.poll() is None:
            samples.append(sample(gateway.pid))
    streams: list[Stream] = []
    gaps: list[tuple[float, float]] = []
    errors: Counter[str] = Counter()
    for client, out, log in clients:
        if client.poll() is None or not out.exists():
            print(f"--- a client did not finish; its log:\n{tail(log)}", file=sys.stderr)
            continue
        seen = json.loads(out.read_text())
        streams += [Stream(*r) for r in seen["records"]]
        gaps += [(t, g) for t, g in seen["gaps"]]
        errors.update(seen["errors"])
    if len(streams) < args.streams:
        errors["client did not finish"] += args.streams - len(streams)
    return (streams, gaps, errors), samples


def _ms(values: list[float], q: float) -> str:
    return f"{pct(values, q):.0f}"


def report1(
    args: argparse.Namespace,
    replicas: int,
    seen: Seen,
    samples: list[Sample],
    nofile: tuple[int, int],
) -> None:
    streams, gaps, errors = seen
    complete = sum(1 for s in streams if s.complete)
    opened = [s for s in streams if s.opened]
    steps = open_over_time(streams)
    peak, t_peak = max(((n, t) for t, n in steps), default=(0, 0.0))
    w0, w1 = hold_window(steps, peak)
    held = w1 - w0
    if held < 1.0:  # too short to sample: take the whole run
        w0, w1 = samples[0].t, samples[-1].t
    start = min((s.sent for s in streams), default=samples[0].t)
    all_open = max((s.first for s in opened), default=math.nan)
    background, _ = usage(samples, samples[0].t, start)
    opening, _ = usage(samples, start, all_open) if opened else (math.nan, {})
    holding, busy = usage(samples, w0, w1)
    idle, top = samples[0], _at(samples, t_peak)
    budget = (nofile[0] - idle.fds) // 2
    first = [(s.first - s.sent) * 1000 for s in opened] or [math.nan]
    gap = [g * 1000 for _, g in gaps] or [math.nan]
    gap_held = [g * 1000 for t, g in gaps if w0 <= t <= w1] or [math.nan]
    rows = [
        ["streams asked for", f"{args.streams:,} from {args.clients} client processes"],
        ["replicas × slots each", f"{replicas} × {SLOTS} = {replicas * SLOTS:,} admitted at once"],
        ["each stream", f"{args.chunks} chunks {args.gap_ms:g} ms apart"],
        ["gateway fd limit", f"{nofile[0]:,} soft / {nofile[1]:,} hard"],
        ["fd budget: (limit − idle) / 2", f"({nofile[0]:,} − {idle.fds}) / 2 = {budget:,} streams"],
        ["completed with all chunks", f"{complete:,}"],
        ["failed", f"{args.streams - complete:,}"],
        ["peak open at once", f"{peak:,}"],
        [f"time to open {len(opened):,}", f"{all_open - start:.1f} s"],
        ["first chunk p50 / p99", f"{pct(first, 50):,.0f} / {pct(first, 99):,.0f} ms"],
        ["held ≥ 95 % of peak for", f"{held:.1f} s"],
        ["gateway RSS idle → peak", f"{idle.rss_kib / 1024:.0f} → {top.rss_kib / 1024:.0f} MiB"],
        ["gateway RSS per stream", f"{(top.rss_kib - idle.rss_kib) / max(peak, 1):.0f} KiB"],
        ["gateway VmHWM", f"{samples[-1].hwm_kib / 1024:.0f} MiB"],
        ["gateway fds at peak", f"{top.fds:,} (most sampled {max(s.fds for s in samples):,})"],
        [
            "gateway CPU idle / opening",
            f"{background:.0f} % / {opening:.0f} % of core {GATEWAY_CPU}",
        ],
        ["gateway CPU while holding", f"{holding:.0f} % of core {GATEWAY_CPU}"],
        [f"core {GATEWAY_CPU}: others + irqs", f"{max(0.0, busy[GATEWAY_CPU] - holding):.0f} %"],
        [f"core {LOAD_CPU} busy (engine, clients)", f"{busy[LOAD_CPU]:.0f} %"],
        ["chunk gap p50 / p99 / max", f"{_ms(gap, 50)} / {_ms(gap, 99)} / {max(gap):.0f} ms"],
        [
            "  the same while holding",
            f"{_ms(gap_held, 50)} / {_ms(gap_held, 99)} / {max(gap_held):.0f} ms",
        ],
    ]
    rows += [[f"failure: {why}", f"{n:,}"] for why, n in errors.most_common(6)]
    print(f"\nPart 1 — streams held by the gateway on one core (engine gap {args.gap_ms:g} ms)\n")
    print(table(["", "value"], rows))
    if peak >= STREAM_GOAL and complete == args.streams:
        verdict = "met"
    elif args.streams < STREAM_GOAL:
        verdict = f"not tried (this run asked for {args.streams:,})"
    else:
        verdict = "not met"
    why = f"; the fd limit leaves room for {budget:,}" if budget < STREAM_GOAL else ""
    print(
        f"\nGoal: {STREAM_GOAL:,} concurrent streams held on one core — {verdict}: {peak:,} open "
        f"at once, {complete:,} of {args.streams:,} complete{why}; chunk gap p99 "
        f"{pct(gap, 99) - args.gap_ms:+.0f} ms over the engine's "
        f"({pct(gap_held, 99) - args.gap_ms:+.0f} ms while holding)."
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
    answered: int  # by the end of this slice, all slices together
    errors: int  # in this slice
    seconds: float
    rss_kib: int
    rows: int | None  # in the ledger


def run_slice(url: str, script: Path, connections: int) -> tuple[int, int, float]:
    """One wrk run to the script's count: (answered, not 200, seconds)."""
    cmd = ["taskset", "-c", str(LOAD_CPU), "wrk", "-t1", f"-c{connections}", "-d3600s"]
    cmd += ["--timeout", "10s", "-s", str(script), url]
    started = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    seconds = time.perf_counter() - started
    found = SOAK_LINE.search(out)
    if found is None:
        raise RuntimeError(f"wrk ended before its share was answered:\n{out}")
    return int(found.group(1)), int(found.group(2)), seconds


def part2(args: argparse.Namespace, tmp: Path) -> None:
    port, engine_log = free_port(), tmp / "engine.log"
    with contextlib.ExitStack() as procs:
        cmd = [sys.executable, "bench/null_engine.py", str(port)]
        procs.callback(halt, launch(cmd, LOAD_CPU, engine_log, args.nofile))
        wait_http(f"http://127.0.0.1:{port}/health")
        gateway, url, gateway_log = start_gateway(tmp, port, 1, args)
        procs.callback(halt, gateway)
        bodies = ", ".join(f"[[{b}]]" for b in part2_bodies())
        script = tmp / "soak.lua"
        script.write_text(LUA % {"bodies": bodies, "limit": args.requests // 10, "key": BENCH_KEY})
        cpu0, slices, answered = cpu_seconds(gateway.pid), [], 0
        for _ in range(10):
            try:
                n, bad, took = run_slice(url, script, args.connections)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                print(f"--- part 2 stopped: {exc}")
                break
            answered += n
            rss = memory_kib(gateway.pid)[0]
            rows = None if args.no_auth else ledger_rows(gateway.pid)
            slices.append(Slice(answered, bad, took, rss, rows))
        cpu = cpu_seconds(gateway.pid) - cpu0
        hwm = memory_kib(gateway.pid)[1]
        rows = None if args.no_auth else settled_rows(gateway.pid, answered)
        report2(args, slices, cpu, hwm, rows)
        if any(s.errors for s in slices) or len(slices) < 10 or gateway.poll() is not None:
            print(f"--- last lines of the gateway's output:\n{tail(gateway_log)}")


def settled_rows(pid: int, expected: int) -> int | None:
    """Ledger rows once the gateway has written what it holds (it flushes every 0.5 s)."""
    rows = ledger_rows(pid)
    deadline = time.monotonic() + 10
    while rows is not None and rows < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = ledger_rows(pid)
    return rows


def report2(
    args: argparse.Namespace, slices: list[Slice], cpu: float, hwm_kib: int, rows: int | None
) -> None:
    if not slices:
        return
    lines, before = [], 0
    for k, s in enumerate(slices, 1):
        rps = (s.answered - before) / s.seconds
        ledger = "-" if s.rows is None else f"{s.rows:,}"
        lines.append([f"{k * 10} %", f"{s.answered:,}", f"{rps:,.0f}", f"{s.errors:,}"])
        lines[-1] += [f"{s.rss_kib / 1024:.1f}", ledger]
        before = s.answered
    on = "off" if args.no_auth else "on"
    print(
        f"\nPart 2 — gateway memory over {args.requests:,} requests (keys, quotas, ledger {on})\n"
    )
    print(table(["done", "answered", "req/s", "not 200", "RSS MiB", "ledger rows"], lines))
    first, last = slices[0], slices[-1]
    growth = (last.rss_kib - first.rss_kib) / first.rss_kib * 100
    seconds = sum(s.seconds for s in slices)
    print(
        f"\nRSS {first.rss_kib / 1024:.1f} MiB at 10 % → {last.rss_kib / 1024:.1f} MiB at "
        f"{len(slices) * 10} %: {growth:+.1f} % (VmHWM {hwm_kib / 1024:.1f} MiB). "
        f"{last.answered / seconds:,.0f} requests/s with wrk's {args.connections} connections, "
        f"{cpu / last.answered * 1e6:.0f} µs of gateway CPU each."
    )
    if rows is not None:
        # wrk exits at its count with requests still in flight; the gateway serves and logs them
        extra = rows - last.answered
        cap = len(slices) * args.connections
        fate = f"all, and {extra:,} wrk left in flight" if 0 <= extra <= cap else "MISMATCH"
        print(f"Ledger rows at the end: {rows:,} for {last.answered:,} answered ({fate}).")
    flat = abs(growth) <= FLAT
    if last.answered >= REQUEST_GOAL:
        verdict = f"{'met' if flat else 'not met'}: {growth:+.1f} %"
    else:
        verdict = (
            f"not tried (this run: {last.answered:,}, over which RSS grew {growth:+.1f} %, "
            f"{'within' if flat else 'outside'} ±{FLAT:g} %)"
        )
        half = slices[len(slices) // 2 - 1]
        if last.answered > half.answered:
            # a straight line through the second half, where the warm-up is furthest behind
            per = (last.rss_kib - half.rss_kib) * 1024 / (last.answered - half.answered)
            at_goal = per * (REQUEST_GOAL - first.answered) / 1024 / first.rss_kib * 100
            verdict += (
                f"; at the slope of its second half ({per:,.0f} B a request) "
                f"{REQUEST_GOAL:,} would grow {at_goal:+.0f} %"
            )
    print(f"Goal: memory flat (±{FLAT:g} %) over {REQUEST_GOAL:,} requests — {verdict}.")


# --- entry points ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["1", "2", "both"], default="both")
    parser.add_argument("--streams", type=int, default=STREAM_GOAL)
    parser.add_argument("--gap-ms", type=float, default=500.0)
    parser.add_argument("--chunks", type=int, default=60, help="content chunks per stream")
    parser.add_argument("--open-s", type=float, default=60.0, help="give up opening after")
    parser.add_argument("--clients", type=int, default=2, help="client processes (part 1)")
    parser.add_argument("--replicas", type=int, default=0, help="default: streams / 64, rounded up")
    parser.add_argument("--requests", type=int, default=REQUEST_GOAL)
    parser.add_argument("--connections", type=int, default=50, help="wrk's (part 2)")
    parser.add_argument("--nofile", type=int, default=65_536, help="RLIMIT_NOFILE of the children")
    parser.add_argument(
        "--no-auth", action="store_true", help="keys, quotas and ledger off, to tell their cost"
    )
    args = parser.parse_args()
    os.sched_setaffinity(0, {LOAD_CPU})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"ulimit -n here: {soft:,} soft / {hard:,} hard; children asked for {args.nofile:,}")
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp:
        for part, run in (("1", part1), ("2", part2)):
            if args.part in (part, "both"):
                (Path(tmp) / f"part{part}").mkdir()
                run(args, Path(tmp) / f"part{part}")


if __name__ == "__main__":
    import uvloop

    if sys.argv[1:2] == ["_engine"]:  # argv[2] is the gap, where null_engine looks for it
        gap, base, count = sys.argv[2:5]
        uvloop.run(serve_engine(float(gap), int(base), int(count)))
    elif sys.argv[1:2] == ["_client"]:
        url, count, chunks, start_at, open_s, out = sys.argv[2:8]
        streams = hold_streams(url, int(count), int(chunks), float(start_at), float(open_s))
        result = uvloop.run(streams)
        Path(out).write_text(result)
    else:
        main()
