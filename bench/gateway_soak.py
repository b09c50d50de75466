"""Soak: many streams held at once on one core, and `gpufleet up`'s memory over many requests.

Both parts run ``gpufleet up`` as users run it (``peers.start_gpufleet``): a process of its own
with a temporary data dir, API keys on (requests carry a user key of tenant ``bench``, made
through ``/admin/v1/keys``), quotas on (limits checked on every request, too high to refuse),
the SQLite usage ledger, its controller and engine scraper. Its engine is
``bench/null_engine.py``, which gpufleet launches and supervises as the replica of an
``engine: emulator`` model through ``GPUFLEET_EMULATOR_COMMAND``. The gpufleet process alone
(all its threads) is pinned to core 1; its engine, the clients, wrk and this script to core 0.
Its CPU, RSS and open files are the gpufleet process's own, never its engine's.

**Part 1 — concurrent streams held on one core** (goal: 10,000, every one complete, chunk-gap
p99 ≤ 2× the engine's gap). ``--streams`` streaming chat completions are opened as fast as the
gateway takes them and held while the engine writes ``--chunks`` content chunks (the request's
``max_tokens``) ``--gap-ms`` apart (null_engine's ``GAP_MS``), as an engine's decode steps are.
What it rests on:

- A stream needs a slot. The gateway sends a replica at most ``routing.maxInFlightPerReplica``
  requests at once (unset: ``GatewaySettings.slots_per_replica``, 64), lets 1,000 more wait in
  the model's fair queue for up to 30 s (``queue_max_length``, ``queue_max_wait_s``) and
  refuses the rest. With the default, 10,000 streams would need 157 replicas, 157 engine
  processes that gpufleet picks the ports of. An engine that batches thousands of sequences is
  what a user declares with a high ``maxInFlightPerReplica``, and one null engine serves any
  number (a sleep and a write a chunk), so the model is ``--replicas`` (1) replicas with
  ``routing: {maxInFlightPerReplica: ceil(streams / replicas)}`` — YAML a user could write.
  The null engine runs with ``--backlog 4096 --uvloop``: a listen queue that hundreds of
  connections at once do not overflow, and a loop that keeps its chunks on time on core 0.
- Each stream holds two sockets in gpufleet (the client's, the engine's) and one in the engine.
  ``gpufleet up`` lifts its soft RLIMIT_NOFILE to the hard one at start, and its engine inherits
  it; the bench asks for ``--nofile`` (soft and hard) before the process starts, which raises
  the hard limit only with CAP_SYS_RESOURCE. The table prints the limits gpufleet and its engine
  got and how many streams gpufleet's leaves room for.
- ``--clients`` processes of aiohttp (``limit=0``, a connection per stream) on uvloop open the
  streams, each with at most 256 waiting for their first chunk, so the gateway's listen backlog
  (2,048) does not overflow into SYN retries. A stream not sent within ``--open-s`` is given up
  and counted as failed, which bounds the run when the gateway opens streams slowly.
- "Open" is counted from the clients' own timestamps, not sampled: a stream is open from its
  first content chunk to its end, and the peak is a sweep over those events (CLOCK_MONOTONIC is
  one clock for all processes). A stream must last longer than opening them all takes, or the
  first end before the last begin. gpufleet's RSS, fds and CPU time (and its engine's CPU) are
  sampled every 0.25 s; CPU % is taken over the hold window, while ≥ 95 % of the peak were open,
  and the per-chunk cost is gpufleet's CPU in that window over the content chunks the clients
  received in it. Chunk gaps are between consecutive content chunks as the client read them,
  over the whole run and within the hold window: the engine's gap plus what the gateway's core
  (or core 0, whose busy share is printed) added.

**Part 2 — memory flat over many requests** (goal: ±5 % over 1 M after warm-up, and a ledger row
for every answered request). ``--requests`` requests go through gpufleet with wrk, in ten slices
of a tenth each; wrk's ``-d`` cannot stop at a count, so the slice's Lua script counts answers
and exits wrk at its share. gpufleet's RSS (VmRSS of its own pid) is read after every slice; the
first slice is the warm-up, and growth is from 10 % to 100 %. The bodies rotate over a few
prompts and output lengths, one in five streaming. Every answered request is one ledger row,
written to SQLite (``gpufleet.db`` in the data dir) in batches behind the hot path; rows are
counted there read-only, less those before the soak (the start's smoke request). At the end
the bench waits, within 60 s, until ``gpufleet_ledger_rows_pending`` on ``/metrics`` is 0 and
the count has not moved over a flush (0.5 s), so a ledger falling behind or losing rows shows.
``--postgres ADMIN_URL`` puts gpufleet's store, ledger included, in a scratch database on that
PostgreSQL server instead (``gpufleet up --store``; dropped afterwards): the same soak without
SQLite's page caches in gpufleet's memory.

Run (the lead's full runs, on a quiet machine):
     python bench/gateway_soak.py --part 1 --streams 10000 --gap-ms 500 --chunks 60
     python bench/gateway_soak.py --part 1 --streams 10000 --gap-ms 2000 --chunks 25 --open-s 50
     python bench/gateway_soak.py --part 2 --requests 1000000
     python bench/gateway_soak.py --part 2 --requests 1000000 --postgres postgresql+psycopg://postgres@127.0.0.1:5432/postgres
Options: [--part 1|2|both] [--streams 10000] [--gap-ms 500] [--chunks 60] [--open-s 60]
     [--clients 2] [--replicas 1] [--requests 1000000] [--connections 50] [--nofile 65536]
     [--no-auth] [--postgres ADMIN_URL]
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
from dataclasses import dataclass
from pathlib import Path

import peers
from common import AUTH, ROOT, pct, postgres_database, stop, table
from peers import Fleet, Peer, Unavailable, core_times, cpu_seconds, open_files, process_tree

GATEWAY_CPU, LOAD_CPU = 1, 0
MODEL = "null-model"
OPENING = 256  # streams per client waiting for their first chunk
HOLD_SHARE = 0.95
STREAM_GOAL, REQUEST_GOAL, FLAT, GAP_FACTOR = 10_000, 1_000_000, 5.0, 2.0
SETTLE_S = 60.0  # the longest the ledger is waited for after the load
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


def launch(cmd: list[str], cpu: int, log: Path, nofile: int) -> subprocess.Popen[bytes]:
    """``cmd`` pinned to ``cpu`` with its output in ``log``; taskset execs, so the pid is cmd's."""
    with log.open("wb") as out:
        return subprocess.Popen(
            ["taskset", "-c", str(cpu), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=open_files(nofile),
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


def engines(peer: Peer) -> list[int]:
    """The pids of the engines gpufleet launched (its descendants)."""
    assert peer.proc is not None
    return process_tree(peer.proc.pid)[1:]


#: gpufleet's store when it is not SQLite in its data dir (``--postgres``).
STORE_URL: str | None = None


def ledger_rows(peer: Peer) -> int:
    """Rows in gpufleet's usage ledger, read from its database without a write lock."""
    if STORE_URL is not None:
        import sqlalchemy as sa  # only a PostgreSQL run pays for the import

        engine = sa.create_engine(STORE_URL, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("SELECT count(*) FROM usage")).scalar_one())
        finally:
            engine.dispose()
    assert peer.data_dir is not None
    uri = f"file:{peer.data_dir / 'gpufleet.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
        count: int = db.execute("SELECT count(*) FROM usage").fetchone()[0]
        return count


def base_url(peer: Peer) -> str:
    return peer.url.removesuffix("/v1/chat/completions")


def scrape(peer: Peer) -> str:
    """gpufleet's ``/metrics``, read with its admin key."""
    request = urllib.request.Request(f"{base_url(peer)}/metrics", headers=AUTH)
    with urllib.request.urlopen(request, timeout=10) as resp:
        text: str = resp.read().decode()
        return text


def tail(log: Path | None, lines: int = 15) -> str:
    text = log.read_text(errors="replace").splitlines() if log and log.exists() else []
    return "\n".join(text[-lines:]) or "(empty)"


def logs(peer: Peer) -> str:
    """The end of gpufleet's output and of its engines' logs, for a run that went wrong."""
    parts = [f"--- last lines of gpufleet's output:\n{tail(peer.log)}"]
    assert peer.data_dir is not None
    for log in sorted((peer.data_dir / "logs").glob("*/*.log")):
        parts.append(f"--- last lines of {log.name}:\n{tail(log)}")
    return "\n".join(parts)


READY = re.compile(r'^gpufleet_replicas\{[^}]*phase="ready"[^}]*\} ([\d.]+)', re.M | re.I)


def start_fleet(tmp: Path, fleet: Fleet, engine_args: list[str], args: argparse.Namespace) -> Peer:
    """``gpufleet up`` serving ``fleet`` with every replica ready, pinned to GATEWAY_CPU; its
    engines (null_engine with ``engine_args`` after the port) pinned to LOAD_CPU."""
    peers.ENGINE_CPU = LOAD_CPU
    peers.ENGINE_ARGS[:] = engine_args
    peers.GPUFLEET_ARGS[:] = ["--no-auth"] if args.no_auth else []
    if STORE_URL is not None:
        peers.GPUFLEET_ARGS += ["--store", STORE_URL]
    peer = peers.start_gpufleet(tmp, fleet=fleet)
    if isinstance(peer, Unavailable):
        raise SystemExit(f"gpufleet up did not start: {peer.reason}")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # ready means one replica; the bench wants all
            found = READY.search(scrape(peer))
            if found and int(float(found.group(1))) >= fleet.replicas:
                peer.pin(GATEWAY_CPU)
                return peer
            time.sleep(0.2)
        raise TimeoutError(f"gpufleet has not {fleet.replicas} ready replicas\n{logs(peer)}")
    except BaseException:
        peer.close()
        raise


# --- part 1: streams held ---------------------------------------------------------------------


async def hold_streams(
    url: str, headers: dict[str, str], count: int, chunks: int, start_at: float, open_s: float
) -> str:
    """Open ``count`` streams and read them to the end: what each saw, as JSON."""
    import aiohttp

    bodies = [_body(p, chunks, stream=True).encode() for p in PROMPTS]
    headers = {"content-type": "application/json", **headers}
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
    cpu_s: float  # gpufleet's own
    engine_cpu_s: float  # its engines'
    rss_kib: int
    hwm_kib: int
    fds: int
    idle_s: dict[int, float]  # idle seconds of each core so far


def sample(pid: int) -> Sample:
    """gpufleet ``pid`` now: its own CPU, memory and fds, its engines' CPU, the cores' idle."""
    rss, hwm = memory_kib(pid)
    idle = {c: core_times(c)["idle"] for c in (LOAD_CPU, GATEWAY_CPU)}
    fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    engine = sum(cpu_seconds(p, family=False) for p in process_tree(pid)[1:])
    return Sample(time.monotonic(), cpu_seconds(pid, family=False), engine, rss, hwm, fds, idle)


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


@dataclass(frozen=True)
class Usage:
    """CPU between two samples: gpufleet's and its engines' % of a core, each core's busy %."""

    t0: float
    t1: float
    gateway_s: float  # CPU seconds
    gateway: float
    engine: float
    busy: dict[int, float]


def usage(samples: list[Sample], t0: float, t1: float) -> Usage:
    """CPU use between the samples nearest ``t0`` and ``t1``."""
    a, b = _at(samples, t0), _at(samples, t1)
    span = max(b.t - a.t, 1e-9)
    busy = {c: (1 - (b.idle_s[c] - a.idle_s[c]) / span) * 100 for c in a.idle_s}
    gateway_s = b.cpu_s - a.cpu_s
    engine = (b.engine_cpu_s - a.engine_cpu_s) / span * 100
    return Usage(a.t, b.t, gateway_s, gateway_s / span * 100, engine, busy)


def part1(args: argparse.Namespace, tmp: Path) -> None:
    per_replica = math.ceil(args.streams / args.replicas)
    fleet = Fleet(args.replicas, per_replica, args.nofile)
    engine_args = [f"{args.gap_ms:g}", "--backlog", "4096", "--uvloop"]
    peer = start_fleet(tmp, fleet, engine_args, args)
    with contextlib.ExitStack() as procs:
        procs.callback(peer.close)
        assert peer.proc is not None
        limits = [nofile_of(peer.proc.pid), *(nofile_of(p) for p in engines(peer))]
        result, samples = drive_streams(args, peer, tmp, procs)
        report1(args, fleet, result, samples, limits)
        if result[2] or peer.proc.poll() is not None:
            print(logs(peer))


def drive_streams(
    args: argparse.Namespace, peer: Peer, tmp: Path, procs: contextlib.ExitStack
) -> tuple[Seen, list[Sample]]:
    """Run the client processes to the end, sampling gpufleet meanwhile; merge what they saw."""
    assert peer.proc is not None
    gateway = peer.proc
    start_at = time.monotonic() + 3.0  # the clients' imports are done by then
    clients = []
    for i in range(args.clients):
        share = args.streams // args.clients + (i < args.streams % args.clients)
        out, log = tmp / f"client{i}.json", tmp / f"client{i}.log"
        cmd = [sys.executable, __file__, "_client", peer.url, json.dumps(peer.headers)]
        cmd += [str(share), str(args.chunks), repr(start_at), str(args.open_s), str(out)]
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
    fleet: Fleet,
    seen: Seen,
    samples: list[Sample],
    limits: list[tuple[int, int]],
) -> None:
    """The table of part 1 and its goal's verdict; ``limits``: RLIMIT_NOFILE of gpufleet, then
    of each of its engines."""
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
    background = usage(samples, samples[0].t, start).gateway
    opening = usage(samples, start, all_open).gateway if opened else math.nan
    holding = usage(samples, w0, w1)
    arrivals = [t for t, _ in gaps] + [s.first for s in opened]
    relayed = sum(1 for t in arrivals if holding.t0 <= t <= holding.t1)
    idle, top = samples[0], _at(samples, t_peak)
    (soft, hard), engine_limits = limits[0], limits[1:]
    budget = (soft - idle.fds) // 2
    first = [(s.first - s.sent) * 1000 for s in opened] or [math.nan]
    gap = [g * 1000 for _, g in gaps] or [math.nan]
    gap_held = [g * 1000 for t, g in gaps if w0 <= t <= w1] or [math.nan]
    slots = fleet.replicas * (fleet.max_in_flight_per_replica or 0)
    engine_nofile = ", ".join(f"{s:,} soft / {h:,} hard" for s, h in sorted(set(engine_limits)))
    engine_nofile = f"{engine_nofile or '-'} ({len(engine_limits)} engine process(es))"
    rows = [
        ["streams asked for", f"{args.streams:,} from {args.clients} client processes"],
        [
            "replicas × maxInFlightPerReplica",
            f"{fleet.replicas} × {fleet.max_in_flight_per_replica:,} = {slots:,} at once",
        ],
        ["each stream", f"{args.chunks} chunks {args.gap_ms:g} ms apart"],
        ["gpufleet fd limit", f"{soft:,} soft / {hard:,} hard"],
        ["its engine's fd limit", engine_nofile],
        ["fd budget: (limit − idle) / 2", f"({soft:,} − {idle.fds}) / 2 = {budget:,} streams"],
        ["completed with all chunks", f"{complete:,}"],
        ["failed", f"{args.streams - complete:,}"],
        ["peak open at once", f"{peak:,}"],
        [f"time to open {len(opened):,}", f"{all_open - start:.1f} s"],
        ["first chunk p50 / p99", f"{pct(first, 50):,.0f} / {pct(first, 99):,.0f} ms"],
        ["held ≥ 95 % of peak for", f"{held:.1f} s"],
        ["gpufleet RSS idle → peak", f"{idle.rss_kib / 1024:.0f} → {top.rss_kib / 1024:.0f} MiB"],
        ["gpufleet RSS per stream", f"{(top.rss_kib - idle.rss_kib) / max(peak, 1):.0f} KiB"],
        ["gpufleet VmHWM", f"{samples[-1].hwm_kib / 1024:.0f} MiB"],
        ["gpufleet fds at peak", f"{top.fds:,} (most sampled {max(s.fds for s in samples):,})"],
        [
            "gpufleet CPU idle / opening",
            f"{background:.0f} % / {opening:.0f} % of core {GATEWAY_CPU}",
        ],
        ["gpufleet CPU while holding", f"{holding.gateway:.0f} % of core {GATEWAY_CPU}"],
        [
            "gpufleet CPU a chunk while holding",
            f"{holding.gateway_s / max(relayed, 1) * 1e6:.0f} µs ({relayed:,} chunks relayed)",
        ],
        [
            f"core {GATEWAY_CPU}: others + irqs",
            f"{max(0.0, holding.busy[GATEWAY_CPU] - holding.gateway):.0f} %",
        ],
        [
            f"core {LOAD_CPU} busy: engine + clients",
            f"{holding.busy[LOAD_CPU]:.0f} % (engine {holding.engine:.0f} %)",
        ],
        ["chunk gap p50 / p99 / max", f"{_ms(gap, 50)} / {_ms(gap, 99)} / {max(gap):.0f} ms"],
        [
            "  the same while holding",
            f"{_ms(gap_held, 50)} / {_ms(gap_held, 99)} / {max(gap_held):.0f} ms",
        ],
    ]
    rows += [[f"failure: {why}", f"{n:,}"] for why, n in errors.most_common(6)]
    print(f"\nPart 1 — streams held by gpufleet on one core (engine gap {args.gap_ms:g} ms)\n")
    print(table(["", "value"], rows))
    p99 = pct(gap, 99)
    met = peak >= STREAM_GOAL and complete == args.streams and p99 <= GAP_FACTOR * args.gap_ms
    if args.streams < STREAM_GOAL:
        verdict = f"not tried (this run asked for {args.streams:,})"
    else:
        verdict = "met" if met else "not met"
    why = f"; the fd limit leaves room for {budget:,}" if budget < STREAM_GOAL else ""
    print(
        f"\nGoal: {STREAM_GOAL:,} concurrent streams held on one core, every one complete, chunk "
        f"gap p99 ≤ {GAP_FACTOR:g}× the engine's — {verdict}: {peak:,} open at once, "
        f"{complete:,} of {args.streams:,} complete{why}; chunk gap p99 {p99:.0f} ms = "
        f"{p99 / args.gap_ms:.2f}× the engine's {args.gap_ms:g} ms "
        f"({pct(gap_held, 99) / args.gap_ms:.2f}× while holding)."
    )


# --- part 2: memory over many requests -------------------------------------------------------

LUA = """-- one slice of the soak: rotate the bodies, count answers, exit wrk at the slice's share
local bodies = {%(bodies)s}
local limit, n, bad, i = %(limit)d, 0, 0, 0
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
%(headers)s
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
PENDING = re.compile(r"^gpufleet_ledger_rows_pending ([\d.e+]+)$", re.M)


def part2_bodies() -> list[str]:
    bodies = [_body(p, n) for p, n in zip(PROMPTS, (1, 16, 64, 128), strict=True)]
    return [*bodies, _body(PROMPTS[1], 8, stream=True)]  # one in five streams


@dataclass(frozen=True)
class Slice:
    answered: int  # by the end of this slice, all slices together
    errors: int  # in this slice
    seconds: float
    rss_kib: int
    rows: int  # in the ledger, written by then (the soak's alone)


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
    peer = start_fleet(tmp, Fleet(nofile=args.nofile), [], args)
    assert peer.proc is not None
    gateway = peer.proc
    with contextlib.ExitStack() as procs:
        procs.callback(peer.close)
        before, _ = settled_rows(peer)  # the start's smoke request
        bodies = ", ".join(f"[[{b}]]" for b in part2_bodies())
        headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in peer.headers.items())
        script = tmp / "soak.lua"
        script.write_text(
            LUA % {"bodies": bodies, "limit": args.requests // 10, "headers": headers}
        )
        cpu0, slices, answered = peer.cpu_seconds(), [], 0
        for _ in range(10):
            try:
                n, bad, took = run_slice(peer.url, script, args.connections)
            except (RuntimeError, subprocess.CalledProcessError) as exc:
                print(f"--- part 2 stopped: {exc}")
                break
            answered += n
            rss = memory_kib(gateway.pid)[0]
            slices.append(Slice(answered, bad, took, rss, ledger_rows(peer) - before))
        cpu = peer.cpu_seconds() - cpu0
        hwm = memory_kib(gateway.pid)[1]
        rows, settled = settled_rows(peer)
        report2(args, slices, cpu, hwm, (rows - before, settled))
        if any(s.errors for s in slices) or len(slices) < 10 or gateway.poll() is not None:
            print(logs(peer))


def settled_rows(peer: Peer) -> tuple[int, str]:
    """Ledger rows once gpufleet has written all it holds — ``gpufleet_ledger_rows_pending``
    0 and the count unchanged over a flush (0.5 s) — within SETTLE_S; and how long it took,
    or that it did not settle."""
    started, rows = time.monotonic(), -1
    while True:
        found = PENDING.search(scrape(peer))
        pending = 0.0 if found is None else float(found.group(1))  # a revision without it
        now = ledger_rows(peer)
        waited = time.monotonic() - started
        if pending == 0 and now == rows:
            return now, f"settled in {waited:.1f} s"
        if waited > SETTLE_S:
            return now, f"NOT settled after {waited:.0f} s: {pending:,.0f} pending"
        rows = now
        time.sleep(0.5)


def report2(
    args: argparse.Namespace,
    slices: list[Slice],
    cpu: float,
    hwm_kib: int,
    ledger: tuple[int, str],
) -> None:
    """The table of part 2 and its goals' verdicts; ``ledger``: the soak's rows at the end and
    how the wait for them went."""
    if not slices:
        return
    lines, before = [], 0
    for k, s in enumerate(slices, 1):
        rps = (s.answered - before) / s.seconds
        lines.append([f"{k * 10} %", f"{s.answered:,}", f"{rps:,.0f}", f"{s.errors:,}"])
        lines[-1] += [f"{s.rss_kib / 1024:.1f}", f"{s.rows:,}"]
        before = s.answered
    on = "off" if args.no_auth else "on"
    store = "SQLite" if STORE_URL is None else "PostgreSQL"
    print(
        f"\nPart 2 — gpufleet's memory over {args.requests:,} requests (keys and quotas {on}, "
        f"ledger on, store on {store})\n"
    )
    print(table(["done", "answered", "req/s", "not 200", "RSS MiB", "ledger rows"], lines))
    first, last = slices[0], slices[-1]
    growth = (last.rss_kib - first.rss_kib) / first.rss_kib * 100
    seconds = sum(s.seconds for s in slices)
    print(
        f"\nRSS {first.rss_kib / 1024:.1f} MiB at 10 % → {last.rss_kib / 1024:.1f} MiB at "
        f"{len(slices) * 10} %: {growth:+.1f} % (VmHWM {hwm_kib / 1024:.1f} MiB). "
        f"{last.answered / seconds:,.0f} requests/s with wrk's {args.connections} connections, "
        f"{cpu / last.answered * 1e6:.0f} µs of gpufleet CPU each."
    )
    # wrk exits at its count with requests still in flight; gpufleet serves and logs them
    rows, wait = ledger
    extra = rows - last.answered
    cap = len(slices) * args.connections
    fate = f"all, and {extra:,} wrk left in flight" if 0 <= extra <= cap else "MISMATCH"
    print(f"Ledger rows at the end ({wait}): {rows:,} for {last.answered:,} answered ({fate}).")
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
    parser.add_argument("--replicas", type=int, default=1, help="of the model (part 1)")
    parser.add_argument("--requests", type=int, default=REQUEST_GOAL)
    parser.add_argument("--connections", type=int, default=50, help="wrk's (part 2)")
    parser.add_argument("--nofile", type=int, default=65_536, help="RLIMIT_NOFILE asked for")
    parser.add_argument(
        "--no-auth", action="store_true", help="gpufleet up --no-auth: keys and quotas off"
    )
    parser.add_argument(
        "--postgres", metavar="ADMIN_URL", help="gpufleet's store in a scratch database there"
    )
    args = parser.parse_args()
    global STORE_URL
    drop = None
    if args.postgres:
        STORE_URL, drop = postgres_database(args.postgres)
    os.sched_setaffinity(0, {LOAD_CPU})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"ulimit -n here: {soft:,} soft / {hard:,} hard; children asked for {args.nofile:,}")
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp:
            for part, run in (("1", part1), ("2", part2)):
                if args.part in (part, "both"):
                    (Path(tmp) / f"part{part}").mkdir()
                    run(args, Path(tmp) / f"part{part}")
    finally:
        if drop is not None:
            drop()


if __name__ == "__main__":
    import uvloop

    if sys.argv[1:2] == ["_client"]:
        url, headers, count, chunks, start_at, open_s, out = sys.argv[2:9]
        streams = hold_streams(
            url, json.loads(headers), int(count), int(chunks), float(start_at), float(open_s)
        )
        result = uvloop.run(streams)
        Path(out).write_text(result)
    else:
        main()
