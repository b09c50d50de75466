"""How many emulated replicas, and requests/s, one core sustains with its latency model intact.

The emulator runs pinned to core 0, the load generator to core 1. Each replica gets its own
closed-loop client (one request at a time), so every request's modelled latency is exact:
``ttft(prompt) + (max_tokens − 1) × decode_step(batch=1)``. For growing replica counts the bench
reports the throughput reached and the observed/modelled latency ratio; the emulator "holds"
while the p50 and p90 ratios stay within 5 % of 1.

Anchor (from the issue): 32 emulated replicas must run on this 2-core machine.
Run: python bench/emulator_capacity.py [--seconds 8] [--replicas 1,8,32,64,128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from common import ROOT, free_port, pct, table, wait_http
from gpufleet.emulator.kvcache import tokenize
from gpufleet.emulator.server import render_chat
from gpufleet.hardware import CATALOG
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel

CONFIG = ROOT / "tests" / "data" / "configs" / "llama-3-8b.json"
MAX_TOKENS = 16
MESSAGES = [
    {"role": "user", "content": "Summarise the plot of a short novel about a lighthouse. " * 6}
]


def modelled_latency() -> float:
    perf = PerfModel(load_architecture(CONFIG), CATALOG["H100"])
    prompt = len(tokenize(render_chat(MESSAGES)))
    steps = sum(perf.decode_step_s(1, prompt + i) for i in range(1, MAX_TOKENS))
    return perf.ttft_s(prompt) + steps


async def drive(base_port: int, replicas: int, seconds: float) -> list[float]:
    body = json.dumps({"model": "llama", "messages": MESSAGES, "max_tokens": MAX_TOKENS}).encode()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(port: int, http: aiohttp.ClientSession) -> None:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            async with http.post(url, data=body, headers={"content-type": "application/json"}) as r:
                await r.read()
                assert r.status == 200
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(base_port + i, http) for i in range(replicas)))
    return latencies


def run(replicas: int, seconds: float) -> list[str]:
    port = free_port() if replicas == 1 else 20000
    emulator = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "gpufleet.emulator", "--arch", str(CONFIG),
         "--name", "llama", "--replicas", str(replicas), "--port", str(port)],
        stdout=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    try:
        for i in range(replicas):
            wait_http(f"http://127.0.0.1:{port + i}/v1/models", timeout=30)
        os.sched_setaffinity(0, {1})
        latencies = asyncio.run(drive(port, replicas, seconds))
    finally:
        emulator.terminate()
        emulator.wait()
    target = modelled_latency()
    p50, p90 = pct(latencies, 50) / target, pct(latencies, 90) / target
    holds = "yes" if abs(p50 - 1) <= 0.05 and abs(p90 - 1) <= 0.05 else "no"
    return [
        str(replicas),
        f"{len(latencies) / seconds:.0f}",
        f"{target * 1000:.1f}",
        f"{p50:.3f}",
        f"{p90:.3f}",
        holds,
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--replicas", default="1,8,32,64,128,256")
    args = parser.parse_args()
    rows = [run(int(n), args.seconds) for n in args.replicas.split(",")]
    print(
        table(
            [
                "replicas",
                "requests/s",
                "modelled ms",
                "p50 observed/modelled",
                "p90 observed/modelled",
                "within 5 %",
            ],
            rows,
        )
    )
    print(
        f"\nmodel: Llama-3-8B on 1× H100, {MAX_TOKENS} output tokens, one request per replica at a time;"
    )
    print("emulator pinned to one core (taskset -c 0), load generator on the other.")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
