"""Upstream client: the gateway's own (``gpufleet.gateway.upstream_http``) against aiohttp, CPU a
request (issue 17).

Profiled under load, aiohttp's client was a quarter to a third of the ~580 µs of CPU that
``gpufleet up`` spent on a request, so the gateway's upstream calls now go through its own
client (``asyncio.Protocol`` + httptools' response parser). This measures, in one process, what
those calls cost with it and with aiohttp configured exactly as ``Upstream`` configured it
before (``aiohttp``; ``aiohttp-tuned``: without its cookie jar, the engine's URL parsed once),
so the saving stays known.

The client process runs under uvloop, as the gateway does, its heap settled as the gateway's
is (``gpufleet.heap.settle``), pinned to core 1; its upstream is ``bench/null_engine.py``
(``PORT 0 8``: an 8-token answer at once), pinned to core 0, as ``bench/gateway_process.py``
pins them. Each request is what ``Upstream.forward`` sends — a chat completion (~200 bytes of
JSON) with ``content-type``, ``x-request-id`` and an ``authorization`` header — and each answer
is read as the proxy reads it: status, ``content-type``, the whole body (plain), or the body
chunk by chunk as it arrives (streamed, ``stream_options.include_usage``: 11 SSE events,
chunked). Cells: plain and streamed, 1 and 32 concurrent tasks. In a cell each client gets a
fresh session (or pool), a warm-up, then ``--requests`` (``--streams``) measured requests: the
process's CPU (``time.process_time``, all threads) per request, requests/s, and how busy each
core was. The clients run back to back in every cell, their order rotating between cells and
rounds, so the shared machine's drift hits all; the table gives medians over ``--rounds``, and
the ratio is the median of each round's ratio to the first client's.

Every answer must be as long as the first the gateway's client read (else the bench stops).
That the two clients read and fail alike — the same answers, the same request as the engine
sees it, every failure the proxy tells apart — is tests/unit/test_upstream_http.py.

Run: python bench/upstream_client.py [--rounds 5] [--requests 4000] [--streams 1500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import uvloop
import yarl

from common import AUTH, ROOT, free_port, stop, table, wait_http
from gpufleet.gateway.proxy import IDLE_CONNECTION_S
from gpufleet.gateway.upstream_http import UpstreamClient
from gpufleet.heap import settle
from peers import cpu_seconds

CLIENT_CPU, ENGINE_CPU = 1, 0
TOKENS = 8
ROUTE = "/v1/chat/completions"
_CHAT = {
    "model": "null",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer in one word."},
        {"role": "user", "content": "Is the sky blue on a clear day? Say yes or no."},
    ],
    "max_tokens": TOKENS,
    "temperature": 0,
}
PLAIN = json.dumps(_CHAT, separators=(",", ":")).encode()
STREAM = json.dumps(
    {**_CHAT, "stream": True, "stream_options": {"include_usage": True}}, separators=(",", ":")
).encode()
#: What ``Upstream.forward`` sends: its own headers and the replica's key.
BASE = {"content-type": "application/json", **AUTH}
IDS = [str(uuid.uuid4()) for _ in range(1024)]
CELLS = [("plain", 1), ("plain", 32), ("stream", 1), ("stream", 32)]


# The two clients, each doing what the proxy does with an answer.


def aiohttp_session(*, cookies: bool = True) -> aiohttp.ClientSession:
    """As ``Upstream`` made it before its own client (``cookies=False``: the tuned variant's)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=IDLE_CONNECTION_S),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        cookie_jar=None if cookies else aiohttp.DummyCookieJar(),
    )


class Aiohttp:
    def __init__(self, port: int, *, cookies: bool = True) -> None:
        self.session = aiohttp_session(cookies=cookies)
        self.url = f"http://127.0.0.1:{port}"
        self.reads = 0  # chunks a stream came in, all streams

    def _target(self) -> str | yarl.URL:
        return f"{self.url}{ROUTE}"  # as the proxy builds it, every request

    async def plain(self, request_id: str) -> int:
        resp = await self.session.post(
            self._target(), data=PLAIN, headers={**BASE, "x-request-id": request_id}
        )
        if resp.status != 200 or resp.headers.get("content-type") is None:
            raise SystemExit(f"aiohttp: answered {resp.status}")
        payload = await resp.read()
        resp.release()
        return len(payload)

    async def stream(self, request_id: str) -> int:
        resp = await self.session.post(
            self._target(), data=STREAM, headers={**BASE, "x-request-id": request_id}
        )
        if resp.status != 200 or resp.headers.get("content-type") is None:
            raise SystemExit(f"aiohttp: answered {resp.status}")
        size = reads = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            reads += 1
        self.reads += reads
        resp.release()
        return size

    async def close(self) -> None:
        await self.session.close()


class AiohttpTuned(Aiohttp):
    """aiohttp as cheap as its options make it: no cookie jar, the engine's URL parsed once."""

    def __init__(self, port: int) -> None:
        super().__init__(port, cookies=False)
        self.target = yarl.URL(f"http://127.0.0.1:{port}{ROUTE}", encoded=True)

    def _target(self) -> str | yarl.URL:
        return self.target


class GatewayClient:
    """The gateway's client, as ``Upstream`` makes and calls it."""

    def __init__(self, port: int) -> None:
        self.client = UpstreamClient(connect_timeout_s=5.0, keepalive_s=IDLE_CONNECTION_S)
        self.url = f"http://127.0.0.1:{port}"
        self.reads = 0

    async def plain(self, request_id: str) -> int:
        reply = await self.client.request(
            "POST", self.url, ROUTE, PLAIN, {**BASE, "x-request-id": request_id}
        )
        if reply.status != 200 or reply.header("content-type") is None:
            raise SystemExit(f"upstream_http: answered {reply.status}")
        payload = await reply.read()
        reply.close()
        return len(payload)

    async def stream(self, request_id: str) -> int:
        reply = await self.client.request(
            "POST", self.url, ROUTE, STREAM, {**BASE, "x-request-id": request_id}
        )
        if reply.status != 200 or reply.header("content-type") is None:
            raise SystemExit(f"upstream_http: answered {reply.status}")
        size = reads = 0
        async for chunk in reply.iter_chunks():
            size += len(chunk)
            reads += 1
        self.reads += reads
        reply.close()
        return size

    async def close(self) -> None:
        await self.client.close()


CLIENTS: dict[str, Callable[[int], Aiohttp | GatewayClient]] = {
    "aiohttp": Aiohttp,
    "aiohttp-tuned": AiohttpTuned,
    "upstream_http": GatewayClient,
}


# The benchmark.


@dataclass(frozen=True, slots=True)
class Sample:
    cpu_us: float  # the client process's CPU a request
    rps: float
    busy: float  # the client's core, share of the wall time
    engine_us: float  # the null engine's CPU a request
    reads: float  # chunks a stream came in (0: plain)


async def drive(call: Callable[[str], Awaitable[int]], n: int, tasks: int, size: int) -> None:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            got = await call(IDS[left % len(IDS)])
            if got != size:
                raise SystemExit(f"a body of {got} bytes, not {size}")

    await asyncio.gather(*(worker() for _ in range(tasks)))


async def cell(kind: str, mode: str, tasks: int, n: int, port: int, engine: int) -> Sample:
    client = CLIENTS[kind](port)
    call = client.plain if mode == "plain" else client.stream
    size = SIZES[mode]
    await drive(call, max(300, 20 * tasks), tasks, size)
    cpu0, engine0, wall0 = (
        time.process_time(),
        cpu_seconds(engine, family=False),
        time.perf_counter(),
    )
    reads0 = client.reads
    await drive(call, n, tasks, size)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    engine_cpu = cpu_seconds(engine, family=False) - engine0
    await client.close()
    reads = (client.reads - reads0) / n
    return Sample(cpu / n * 1e6, n / wall, cpu / wall, engine_cpu / n * 1e6, reads)


SIZES: dict[str, int] = {}


async def bench(args: argparse.Namespace, port: int, engine: int) -> None:
    kinds: list[str] = args.clients
    samples: dict[tuple[str, int, str], list[Sample]] = {}
    ratios: dict[tuple[str, int, str], list[float]] = {}
    for r in range(args.rounds):
        for i, (mode, tasks) in enumerate(CELLS):
            turn = (r + i) % len(kinds)
            order = kinds[turn:] + kinds[:turn]
            got: dict[str, Sample] = {}
            for kind in order:
                n = args.requests if mode == "plain" else args.streams
                got[kind] = await cell(kind, mode, tasks, n, port, engine)
                samples.setdefault((mode, tasks, kind), []).append(got[kind])
            for kind in kinds:
                ratio = got[kind].cpu_us / got[kinds[0]].cpu_us
                ratios.setdefault((mode, tasks, kind), []).append(ratio)
            print(
                f"round {r + 1} {mode:6} x{tasks:<2}: "
                + ", ".join(f"{k} {got[k].cpu_us:.0f} µs {got[k].rps:.0f}/s" for k in order),
                file=sys.stderr,
            )
    report(kinds, samples, ratios, args)


def report(
    kinds: list[str],
    samples: dict[tuple[str, int, str], list[Sample]],
    ratios: dict[tuple[str, int, str], list[float]],
    args: argparse.Namespace,
) -> None:
    rows = []
    for mode, tasks in CELLS:
        base = statistics.median(s.cpu_us for s in samples[(mode, tasks, kinds[0])])
        for kind in kinds:
            got = samples[(mode, tasks, kind)]
            cpu = statistics.median(s.cpu_us for s in got)
            spread = ratios[(mode, tasks, kind)]
            rows.append(
                [
                    mode,
                    str(tasks),
                    kind,
                    f"{cpu:.0f}",
                    f"{statistics.median(spread):.2f} ({min(spread):.2f}–{max(spread):.2f})",
                    f"{base - cpu:.0f}",
                    f"{statistics.median(s.rps for s in got):.0f}",
                    f"{statistics.median(s.busy for s in got):.0%}",
                    f"{statistics.median(s.engine_us for s in got):.0f}",
                    f"{statistics.median(s.reads for s in got):.1f}" if mode == "stream" else "",
                ]
            )
    headers = [
        "request",
        "tasks",
        "client",
        "CPU µs/req",
        f"× {kinds[0]} (range)",
        "saved µs/req",
        "req/s",
        "client core busy",
        "engine CPU µs/req",
        "reads/stream",
    ]
    print(
        f"\n{args.rounds} rounds; {args.requests} plain requests or {args.streams} streams a"
        f" client a cell; client on core {CLIENT_CPU}, null engine on core {ENGINE_CPU}; medians"
    )
    print(table(headers, rows))


async def run(args: argparse.Namespace, port: int, engine: int) -> None:
    ours = GatewayClient(port)
    SIZES["plain"] = await ours.plain(IDS[0])
    SIZES["stream"] = await ours.stream(IDS[0])
    await ours.close()
    await bench(args, port, engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=4000, help="plain, a client a cell")
    parser.add_argument("--streams", type=int, default=1500, help="streamed, a client a cell")
    parser.add_argument(
        "--clients",
        type=lambda v: v.split(","),
        default=list(CLIENTS),
        help=f"of {','.join(CLIENTS)}; ratios are to the first",
    )
    args = parser.parse_args()
    if not args.clients or set(args.clients) - set(CLIENTS):
        parser.error(f"--clients: of {','.join(CLIENTS)}")
    pinned = (os.cpu_count() or 1) >= 2
    taskset = ["taskset", "-c", str(ENGINE_CPU)] if pinned else []
    if pinned:
        os.sched_setaffinity(0, {CLIENT_CPU})
    else:
        print("one core only: nothing pinned", file=sys.stderr)
    port = free_port()
    engine = subprocess.Popen(
        [*taskset, sys.executable, "bench/null_engine.py", str(port), "0", str(TOKENS)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        settle()
        uvloop.run(run(args, port, engine.pid))
    finally:
        stop(engine)


if __name__ == "__main__":
    main()
