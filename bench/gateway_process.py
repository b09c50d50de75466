"""`gpufleet up` as users run it, beside its peers: serial and loaded latency, req/s, CPU/request.

The baseline the gateway-speed work is judged on (issues 14 and 17). The gateway is the process
users run, ``python -m gpufleet up`` with a temporary data dir: API keys on (the requests carry
a user key of tenant ``bench``), quotas on (the tenant's and the key's limits are checked on
every request, set high enough never to refuse), the SQLite usage ledger, its controller and
engine scraper running. Its upstream is ``bench/null_engine.py`` answering an 8-token chat
completion at once, a separate process that gpufleet launches and supervises itself as the
replica of an ``engine: emulator`` model, through the ``GPUFLEET_EMULATOR_COMMAND`` hook
(``engines/emulator.py``). The peers, run as ``peers.py`` says: direct to a null engine of the
bench's own, vllm-router with ``--policy round_robin`` (the Rust floor) and LiteLLM proxy; one
that is missing, fails to start or breaks gets a "not available" row and the run goes on.

Pinning, as in issue 17: each proxy on core 1; the engines, the load generator and this process
on core 0. A proxy's CPU is its own process's, all threads: gpufleet's without its engine.

1. serial: ``--requests`` non-streaming requests per path, one at a time over one kept-alive
   connection per path (a raw-socket client: half the per-request cost of ``http.client``, so
   the direct path's figures are the engine's, not the client's), one per path per round, the
   order rotated every round so that drift on this shared machine hits all paths alike:
   p50/p90/p99/p99.9, the latency added to the direct path's, and the proxy's CPU per request.
   LiteLLM goes on working after it has answered (logging callbacks), which slows whatever comes
   next, so it runs in rounds of its own with the direct path and is compared with that;
2. loaded: ``--connections`` at once for ``--seconds`` after 2 s of warm-up, one path at a time
   (wrk, Debian's ``wrk``; ``loadgen.py``'s Python generator without it): requests/s,
   p50/p90/p99/p99.9 from wrk's histogram, the proxy's CPU per request. Before each run the
   bench waits until the previous proxy has drained (under 10 % of a core), so left-over work
   does not land on the next one's core. ``--passes N`` repeats the runs N times, the order
   rotated, and reports the median of each figure.

Comparing revisions in one sitting: ``--compare LABEL=SRC,...`` runs a ``gpufleet:LABEL`` row
for each source tree (SRC goes first on the gpufleet process's ``PYTHONPATH``; the bench, the
peers and the null engine stay this checkout's). Every revision compared needs the hook; for
one older than it, cherry-pick the commit that added it::

    git worktree add /tmp/gpufleet-before BASE
    git -C /tmp/gpufleet-before cherry-pick HOOK   # the commit adding GPUFLEET_EMULATOR_COMMAND
    python bench/gateway_process.py --passes 2 --compare before=/tmp/gpufleet-before/src,after=src

A revision without the hook starts the real emulator, and the smoke request says so: a "not
available" row, never figures measured against the wrong upstream. Numbers on this 2-core
machine move by 10–20 % from run to run: compare revisions within one run, never across runs.
Run: python bench/gateway_process.py [--requests 2000] [--seconds 8] [--connections 32]
     [--peers direct,gpufleet,vllm-router-rr,litellm] [--compare LABEL=SRC,...] [--passes 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import loadgen
import peers
from common import ROOT, free_port, pct, stop, table, wait_http
from loadgen import PERCENTILES, Load, run_load, tool
from peers import Peer, Unavailable, drop_broken

TOKENS = 8
CHAT = {"messages": [{"role": "user", "content": "Say yes."}], "max_tokens": TOKENS}
DEFAULT = ["direct", "gpufleet", "vllm-router-rr", "litellm"]
KNOWN = ["direct", "gpufleet", "vllm-router", "vllm-router-rr", "litellm"]
SOLO = {"litellm"}  # serial rounds of their own with the direct path: see the docstring
PROXY_CPU, LOAD_CPU = 1, 0
DRAINED = 0.1  # share of a core under which a proxy has finished its left-over work


class Client:
    """One kept-alive HTTP/1.1 connection posting one fixed request, blocking.

    Parses no more of the answer than it must: the status, and where the body ends
    (``content-length``, or the last chunk of a chunked body). A closed connection is opened
    again before the next request.
    """

    def __init__(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        head = [f"POST {parts.path} HTTP/1.1", f"host: {parts.netloc}"]
        fields = {"content-type": "application/json", **headers, "content-length": len(body)}
        head += [f"{k}: {v}" for k, v in fields.items()]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        self.sock: socket.socket | None = None

    def post(self) -> float:
        """Send the request, read the whole answer; seconds taken. Raises unless 200."""
        if self.sock is None:
            self.sock = socket.create_connection(self.address)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        self.sock.sendall(self.request)
        answer, close = self._read(self.sock)
        took = time.perf_counter() - start
        if close:
            self.close()
        if not answer.startswith(b"HTTP/1.1 200"):
            raise AssertionError(f"answered {answer[:200]!r}")
        return took

    @staticmethod
    def _read(sock: socket.socket) -> tuple[bytes, bool]:
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += _recv(sock)
        head = buf[:end].lower()
        close = b"\r\nconnection: close" in head
        if b"\r\ncontent-length:" in head:
            start = head.index(b"\r\ncontent-length:") + 17
            length = int(head[start:].split(b"\r\n", 1)[0])
            while len(buf) < end + 4 + length:
                buf += _recv(sock)
        else:  # chunked: JSON escapes CR and LF, so only the last chunk ends like this
            while not buf.endswith(b"\r\n0\r\n\r\n"):
                buf += _recv(sock)
        return buf, close

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("connection closed mid-answer")
    return data


def body(peer: Peer) -> bytes:
    return json.dumps({**CHAT, "model": peer.model}).encode()


@dataclass
class Row:
    """What one path measured."""

    serial: list[float] = field(default_factory=list)  # seconds per request
    serial_cpu_us: float | None = None
    #: The direct path measured in the same rounds, for paths measured apart (SOLO).
    baseline: list[float] | None = None
    loads: list[Load] = field(default_factory=list)
    load_cpu_us: list[float] = field(default_factory=list)


def serial(
    paths: list[Peer], rows: dict[str, Row], n: int, warmup: int, broken: dict[str, str]
) -> None:
    """``n`` counted rounds after ``warmup``, one request per path each, order rotated."""
    clients = {p.name: Client(p.url, body(p), p.headers) for p in paths}
    cpu0: dict[str, float] = {}
    try:
        for i in range(n + warmup):
            if i == warmup:
                cpu0 = {p.name: p.cpu_seconds() for p in paths if p.proc is not None}
            live = [p for p in paths if p.name not in broken]
            k = i % max(1, len(live))
            for peer in live[k:] + live[:k]:
                try:
                    took = clients[peer.name].post()
                except (OSError, AssertionError, ValueError) as exc:
                    broken[peer.name] = f"serial: {type(exc).__name__}: {exc}"[:200]
                    continue
                if i >= warmup:
                    rows[peer.name].serial.append(took)
    finally:
        for c in clients.values():
            c.close()
    for p in paths:
        if p.proc is not None and p.name in cpu0 and p.name not in broken:
            rows[p.name].serial_cpu_us = (p.cpu_seconds() - cpu0[p.name]) / max(1, n) * 1e6


def drain(peer: Peer, timeout_s: float = 30.0) -> None:
    """Wait until the proxy's own CPU use falls under ``DRAINED`` of a core."""
    if peer.proc is None:
        return
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        cpu0, wall0 = peer.cpu_seconds(), time.perf_counter()
        time.sleep(0.25)
        if (peer.cpu_seconds() - cpu0) / (time.perf_counter() - wall0) < DRAINED:
            return
    print(f"{peer.name} still busy after {timeout_s:.0f} s; measuring anyway", file=sys.stderr)


def loaded(peer: Peer, seconds: float, connections: int) -> tuple[Load, float | None]:
    """Requests/s and latency at ``connections`` at once; the proxy's CPU µs per request."""
    data = body(peer)
    run_load(peer.url, data, peer.headers, 2, connections, LOAD_CPU)  # warm-up
    drain(peer)
    cpu0 = peer.cpu_seconds() if peer.proc is not None else 0.0
    load = run_load(peer.url, data, peer.headers, seconds, connections, LOAD_CPU)
    if peer.proc is None:
        return load, None
    return load, (peer.cpu_seconds() - cpu0) / max(1, load.requests) * 1e6


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def load_ms(row: Row, q: float) -> float | None:
    return median([x.latency_ms[q] for x in row.loads if q in x.latency_ms])


def serial_added(name: str, row: Row, direct: Row | None, q: float) -> float | None:
    """ms the path adds to the direct path at percentile ``q``, serially."""
    base = row.baseline if row.baseline is not None else direct.serial if direct else None
    if name == "direct" or not base or not row.serial:
        return None
    return (pct(row.serial, q) - pct(base, q)) * 1000


def report(rows: dict[str, Row], missing: list[Unavailable], args: argparse.Namespace) -> None:
    direct = rows.get("direct")
    absent = [[u.name, f"not available: {u.reason}"] for u in missing]
    print(f"\nserial: {args.requests} requests a path, one at a time (ms)")
    lines = []
    for name, row in rows.items():
        ms = [fmt(pct(row.serial, q) * 1000) if row.serial else "" for q in PERCENTILES]
        added = [serial_added(name, row, direct, q) for q in (50, 99)]
        cpu = fmt(row.serial_cpu_us, ".0f")
        lines.append([name, *ms, *(fmt(a, "+.3f") for a in added), cpu])
    lines += [[*a, *[""] * 6] for a in absent]
    heads = ["path", "p50", "p90", "p99", "p99.9", "added p50", "added p99", "CPU µs/req"]
    print(table(heads, lines))

    passes = f", median of {args.passes} passes" if args.passes > 1 else ""
    print(
        f"\nloaded: {args.connections} connections, {args.seconds:g} s, {tool()} on core"
        f" {LOAD_CPU}, proxy on core {PROXY_CPU}{passes} (ms)"
    )
    direct_p99 = load_ms(direct, 99.0) if direct else None
    lines = []
    for name, row in rows.items():
        p99 = load_ms(row, 99.0)
        add = None if name == "direct" or p99 is None or direct_p99 is None else p99 - direct_p99
        ms = [fmt(load_ms(row, q)) for q in PERCENTILES]
        rps = fmt(median([x.rps for x in row.loads]), ".0f")
        per_request = fmt(median(row.load_cpu_us), ".0f")
        errors = str(sum(x.errors for x in row.loads))
        lines.append([name, rps, *ms, fmt(add, "+.3f"), per_request, errors])
    lines += [[*a, *[""] * 7] for a in absent]
    heads = ["path", "req/s", "p50", "p90", "p99", "p99.9", "added p99", "CPU µs/req", "errors"]
    print(table(heads, lines))
    goals(rows)


def goals(rows: dict[str, Row]) -> None:
    """Issue 17's goals, for every gpufleet row, against vllm-router with round robin."""
    print("\ngoals (issue 17), against vllm-router-rr in this run:")
    direct, router = rows.get("direct"), rows.get("vllm-router-rr")
    if direct is None or router is None:
        print("  vllm-router-rr or the direct path did not run: no verdicts")
        return

    def figures(name: str, row: Row) -> tuple[float, float, float] | None:
        """req/s, p99 added under load, p50 added serially."""
        rps, p99, base = (
            median([x.rps for x in row.loads]),
            load_ms(row, 99.0),
            load_ms(direct, 99.0),
        )
        p50 = serial_added(name, row, direct, 50)
        if rps is None or p99 is None or base is None or p50 is None:
            return None
        return rps, p99 - base, p50

    theirs = figures("vllm-router-rr", router)
    for name, row in rows.items():
        ours = figures(name, row) if name.startswith("gpufleet") else None
        if ours is None or theirs is None:
            if name.startswith("gpufleet"):
                print(f"  {name}: not all measured")
            continue
        (rps, p99, p50), (r_rps, r_p99, r_p50) = ours, theirs
        for text, ok in (
            (f"added p99 under load ≤ 2× its: {p99:+.2f} vs {r_p99:+.2f} ms", p99 <= 2 * r_p99),
            (f"req/s ≥ 50 % of its: {rps / r_rps:.0%}", rps >= 0.5 * r_rps),
            (f"added serial p50 ≤ 1.5× its: {p50:+.3f} vs {r_p50:+.3f} ms", p50 <= 1.5 * r_p50),
        ):
            print(f"  {name}: {text} — {'met' if ok else 'NOT met'}")


def serial_phase(
    running: list[Peer], rows: dict[str, Row], args: argparse.Namespace, broken: dict[str, str]
) -> None:
    """Every path in shared rounds, but SOLO paths in rounds of their own with the direct one."""
    direct = next((p for p in running if p.name == "direct"), None)
    apart = [p for p in running if p.name in SOLO and direct is not None]
    shared = [p for p in running if p not in apart]
    print(f"serial: {' '.join(p.name for p in shared)} ...", file=sys.stderr)
    serial(shared, rows, args.requests, args.warmup, broken)
    for peer in apart:
        assert direct is not None
        print(f"serial: {peer.name} with direct ...", file=sys.stderr)
        alongside = {"direct": Row(), peer.name: rows[peer.name]}
        serial([direct, peer], alongside, args.requests, args.warmup, broken)
        rows[peer.name].baseline = alongside["direct"].serial


def loaded_phase(
    running: list[Peer], rows: dict[str, Row], args: argparse.Namespace, broken: dict[str, str]
) -> None:
    """``args.passes`` loaded runs of every live path, one path at a time, order rotated."""
    for k in range(args.passes):
        live = [p for p in running if p.name not in broken]
        turn = k % max(1, len(live))
        for peer in live[turn:] + live[:turn]:
            print(f"loaded: {peer.name} (pass {k + 1}) ...", file=sys.stderr)
            try:
                load, cpu_us = loaded(peer, args.seconds, args.connections)
            except (subprocess.CalledProcessError, RuntimeError) as exc:
                broken[peer.name] = f"loaded: {exc}"[:200]
                continue
            if peer.proc is not None and peer.proc.poll() is not None:
                broken[peer.name] = f"loaded: exited with {peer.proc.returncode}"
                continue
            rows[peer.name].loads.append(load)
            if cpu_us is not None:
                rows[peer.name].load_cpu_us.append(cpu_us)
            drain(peer)


def parse_compare(text: str) -> list[tuple[str, Path]]:
    pairs = []
    for item in filter(None, text.split(",")):
        label, sep, src = item.partition("=")
        if not sep or not label or not src:
            raise SystemExit(f"--compare wants LABEL=SRC[,LABEL=SRC...], got {item!r}")
        pairs.append((label, Path(src).expanduser().absolute()))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="serial, per path")
    parser.add_argument("--warmup", type=int, default=200, help="serial, uncounted, per path")
    parser.add_argument("--seconds", type=float, default=8, help="loaded run, per path and pass")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--passes", type=int, default=1, help="loaded runs of every path")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--peers", default=",".join(DEFAULT), help=f"of {','.join(KNOWN)}")
    parser.add_argument("--compare", default="", help="LABEL=SRC,...: a gpufleet row for each")
    parser.add_argument(
        "--gpufleet-arg", action="append", default=[], help="appended to 'gpufleet up'"
    )
    args = parser.parse_args()
    loadgen.PREFER = args.loadgen
    peers.GPUFLEET_ARGS.extend(args.gpufleet_arg)
    peers.ENGINE_ARGS[:] = ["0", str(TOKENS)]
    wanted = [n for n in KNOWN if n in args.peers.split(",")]
    sources: dict[str, Path | None] = {}
    for name in wanted:
        if name == "gpufleet" and args.compare:
            sources.update({f"gpufleet:{label}": src for label, src in parse_compare(args.compare)})
        else:
            sources[name] = None
    pinned = (os.cpu_count() or 1) >= 2
    if pinned:  # children start here too: the null engine, the load generator
        os.sched_setaffinity(0, {LOAD_CPU})
    else:
        print("one core only: nothing pinned, figures are not comparable", file=sys.stderr)
    logs = Path(tempfile.mkdtemp(prefix="gateway-process-"))

    engine_port = free_port()
    with (logs / "null-engine.log").open("wb") as out:
        engine = subprocess.Popen(
            [sys.executable, "bench/null_engine.py", str(engine_port), "0", str(TOKENS)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running: list[Peer] = []
    missing: list[Unavailable] = []
    broken: dict[str, str] = {}
    rows: dict[str, Row] = {}
    try:
        wait_http(f"http://127.0.0.1:{engine_port}/health")
        for name, src in sources.items():
            got = peers.start(name, engine_port, logs, gpufleet_src=src)
            if isinstance(got, Unavailable):
                missing.append(got)
                continue
            if pinned:
                got.pin(PROXY_CPU)
            running.append(got)
            rows[name] = Row()
            if got.proc is not None:
                print(f"{name} ready in {got.start_s:.1f} s", file=sys.stderr)
        serial_phase(running, rows, args, broken)
        loaded_phase(running, rows, args, broken)
    finally:
        for peer in running:
            peer.close()
        stop(engine)  # type: ignore[arg-type]
    drop_broken(broken, running, rows, missing)
    report(rows, missing, args)
    print(f"\nlogs: {logs}")


if __name__ == "__main__":
    main()
