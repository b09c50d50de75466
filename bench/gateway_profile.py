"""Where `gpufleet up` spends its core under load: a sampling profile of the process users run.

The setup of ``gateway_process.py`` (``gpufleet up`` with keys, quotas and the SQLite ledger on,
``null_engine.py`` launched as its engine; the gateway pinned to core 1, the engine and wrk to
core 0), loaded by wrk with ``--connections`` for ``--seconds`` while py-spy samples every thread
of the gateway (``--rate`` Hz; py-spy from PyPI, which ``scripts/setup-bench-peers`` installs in
the peers' environment; one on ``PATH`` is used first). Printed:

1. where the samples fall by area — each sample's innermost frame that belongs to a named area
   (gpufleet's modules by name, uvicorn, Starlette, prometheus_client, SQLAlchemy, json, …):
   the self cost of each layer, which is what a rewrite of that layer can win at most;
2. the functions with the most samples on their own (leaf) and with them on the stack
   (inclusive), gpufleet's first.

Samples of threads that wait (the loop in ``epoll``, parked workers) are left out by py-spy
itself (it reads each thread's state from the OS); the share of the main thread's samples that
remain says how saturated the loop was. The raw folded stacks
stay in the run directory printed at the end (``profile.txt``), for a flame graph
(``flamegraph.pl profile.txt``, or speedscope).

Run: python bench/gateway_profile.py [--seconds 15] [--connections 32] [--rate 200] [--top 25]
     [--src SRC]   # another tree's ``src`` (compare two revisions by running it twice)
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import peers
from common import table
from gateway_process import LOAD_CPU, PROXY_CPU, body, drain
from loadgen import run_load

#: Areas by the file a frame runs in (py-spy names it from its package: ``uvicorn/main.py``),
#: first match wins; a frame of none is "other".
AREAS = [
    ("gpufleet.gateway.upstream_http", r"gpufleet/gateway/upstream_http\.py"),
    ("gpufleet.gateway.proxy", r"gpufleet/gateway/(proxy|engine_errors)\.py"),
    ("gpufleet.gateway.routes/service", r"gpufleet/gateway/(routes|assembly|service|resolve)\.py"),
    ("gpufleet.gateway.asgi/linger", r"gpufleet/gateway/(asgi|linger|client_timeouts)\.py"),
    ("gpufleet.gateway.validate", r"gpufleet/gateway/(validate|known_fields|request)\.py"),
    ("gpufleet.gateway.auth", r"gpufleet/gateway/auth\.py"),
    ("gpufleet quotas", r"gpufleet/(gateway/quota\w*|gateway/settle\w*|policies/quota\w*)\.py"),
    ("gpufleet ledger (hot path)", r"gpufleet/gateway/(accounting|ledger|spool|pricing)\.py"),
    ("gpufleet ledger (writer: store)", r"gpufleet/store/"),
    ("gpufleet.gateway.dispatch/queue", r"gpufleet/gateway/(dispatch|fairqueue|admission)\.py"),
    ("gpufleet.gateway.metrics", r"gpufleet/gateway/metrics\.py"),
    ("gpufleet.gateway (other)", r"gpufleet/gateway/"),
    ("gpufleet.routing", r"gpufleet/routing/"),
    ("gpufleet (other)", r"gpufleet/"),
    ("uvicorn (HTTP server)", r"uvicorn/"),
    ("uvloop (event loop, C)", r"asyncio/runners\.py|uvloop/"),
    ("starlette", r"starlette/"),
    ("prometheus_client", r"prometheus_client/"),
    ("sqlalchemy", r"sqlalchemy/"),
    ("sqlite3", r"sqlite3/"),
    ("json", r"json/"),
    ("logging", r"logging/"),
    ("asyncio", r"asyncio/"),
    ("threads (stdlib)", r"threading\.py|concurrent/|queue\.py"),
    ("pydantic", r"pydantic"),
]
_AREAS = [(name, re.compile(rx)) for name, rx in AREAS]


def area(frame: str) -> str | None:
    file = frame.rpartition(" (")[2]
    for name, rx in _AREAS:
        if rx.match(file):
            return name
    return None


Counts = collections.Counter[str]


def fold(path: Path) -> tuple[Counts, Counts, Counts, Counts]:
    """From py-spy's raw (folded) output: samples by area, by leaf function, by function on the
    stack, by thread."""
    areas: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: Counts = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")[1:]  # the first is the thread
        threads[stack.split(";", 1)[0]] += n
        leaf = frames[-1] if frames else "?"
        leaves[_short(leaf)] += n
        for frame in set(frames):
            inclusive[_short(frame)] += n
        for frame in reversed(frames):
            if (name := area(frame)) is not None:
                areas[name] += n
                break
        else:
            areas["other (C, interpreter)"] += n
    return areas, leaves, inclusive, threads


def _short(frame: str) -> str:
    """``function (…/site-packages/pkg/mod.py:12)`` → ``function (pkg/mod.py)``."""
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    function, file = m.groups()
    parts = file.split("/")
    for anchor in ("site-packages", "src", "lib"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + 1 :]
            break
    if parts and re.fullmatch(r"python3\.\d+", parts[0]):
        parts = parts[1:]
    return f"{function} ({'/'.join(parts[-3:])})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--src", type=Path, default=None)
    args = parser.parse_args()
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(peers.VENV / "bin"))
    if spy is None:
        sys.exit("py-spy not found: scripts/setup-bench-peers (or pip install py-spy)")
    run = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    peer = peers.start_gpufleet(run, src=args.src)
    if isinstance(peer, peers.Unavailable):
        sys.exit(f"gpufleet did not start: {peer.reason}")
    try:
        peer.pin(PROXY_CPU)
        data = body(peer)
        run_load(peer.url, data, peer.headers, 3, args.connections, LOAD_CPU)  # warm-up
        drain(peer)
        assert peer.proc is not None
        out = run / "profile.txt"
        record = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(peer.proc.pid),
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--output",
                str(out),
                "--duration",
                str(int(args.seconds)),
                "--threads",
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # py-spy attaching; the load runs longer than the recording
        cpu0 = peer.cpu_seconds()
        load = run_load(peer.url, data, peer.headers, args.seconds + 1, args.connections, LOAD_CPU)
        cpu = (peer.cpu_seconds() - cpu0) / max(1, load.requests) * 1e6
        _, err = record.communicate(timeout=60)
        if not out.exists():
            sys.exit(f"py-spy wrote nothing: {err.decode()[-2000:]}")
    finally:
        peer.close()
    areas, leaves, inclusive, threads = fold(out)
    busy = sum(threads.values())
    print(
        f"gpufleet up under {args.connections} connections for {args.seconds:g} s: "
        f"{load.rps:.0f} req/s, {cpu:.0f} µs CPU a request; "
        f"{busy} samples of working threads at {args.rate} Hz"
    )
    for thread, n in threads.most_common():
        print(f"  {thread}: {n} ({n / (args.rate * args.seconds):.0%} of the time)")
    print()
    rows = [
        [name, str(n), f"{n / busy:.1%}", f"{n / busy * cpu:.0f}"]
        for name, n in areas.most_common()
    ]
    print(table(["area (innermost frame)", "samples", "share of busy", "≈ µs a request"], rows))
    print()
    rows = [[f, str(n), f"{n / busy:.1%}"] for f, n in leaves.most_common(args.top)]
    print(table(["function (self)", "samples", "share"], rows))
    print()
    ours = [(f, n) for f, n in inclusive.most_common() if "gpufleet/" in f]
    rows = [[f, str(n), f"{n / busy:.1%}"] for f, n in ours[: args.top]]
    print(table(["gpufleet function (inclusive)", "samples", "share"], rows))
    print(f"\nfolded stacks: {out}")


if __name__ == "__main__":
    main()
