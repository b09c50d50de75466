"""Latency a request gains by going through the gateway instead of straight to the engine.

Measured in one run with requests taking turns between the paths (so drift on this noisy
machine hits all alike), sequential, over kept-alive connections:

- null engine: an upstream that answers instantly, isolating the gateway's own cost, through
  the gateway as production runs it (API key checked, tenant and key quotas admitted and
  settled, a usage-ledger row written) and through one with ``--no-auth`` (none of that);
- real engine: SmolLM2 on llama.cpp under ``gpufleet up``, one-token chat completions.

Anchors: the goal is ≤ 0.5 ms added at p50 and ≤ 3 ms at p99 with keys, quotas and ledger on;
LiteLLM publishes 2 ms median / 13 ms p99 overhead.
Run: python bench/overhead.py [--requests 3000] [--real-requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time

import aiohttp
import uvloop

from common import AUTH, free_port, get_json, spawn, stop, summary, table, wait_http

CHAT = {"messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 1, "temperature": 0}


async def alternate(paths: list[tuple[str, str]], n: int) -> list[list[float]]:
    """Sequential requests over kept-alive connections, the paths taking turns (order rotated
    each round so none always goes first); the first 50 rounds warm up and are dropped."""
    async with aiohttp.ClientSession() as http:
        bodies = [json.dumps({**CHAT, "model": model}).encode() for _, model in paths]
        headers = {"content-type": "application/json", **AUTH}
        times: list[list[float]] = [[] for _ in paths]
        k = len(paths)
        for i in range(n + 50):
            for j in range(k):
                which = (i + j) % k
                start = time.perf_counter()
                async with http.post(paths[which][0], data=bodies[which], headers=headers) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                if i >= 50:
                    times[which].append(time.perf_counter() - start)
        return times


def rows_for(label: str, names: list[str], times: list[list[float]]) -> list[list[str]]:
    base = summary(times[0])
    out = []
    for name, t in zip(names, times, strict=True):
        s = summary(t)
        added = [f"{s['p50'] - base['p50']:+.3f}", f"{s['p99'] - base['p99']:+.3f}"]
        out.append(
            [label, name, f"{s['p50']:.3f}", f"{s['p90']:.3f}", f"{s['p99']:.3f}"]
            + (added if t is not times[0] else ["", ""])
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--real-requests", type=int, default=300)
    args = parser.parse_args()
    rows: list[list[str]] = []

    engine_port, gw_port, open_port = free_port(), free_port(), free_port()
    engine = spawn("bench/null_engine.py", str(engine_port))
    upstream = f"http://127.0.0.1:{engine_port}"
    gateway = spawn("bench/gateway_only.py", str(gw_port), upstream)
    open_gateway = spawn("bench/gateway_only.py", str(open_port), upstream, "--no-auth")
    try:
        wait_http(f"{upstream}/v1/models")
        wait_http(f"http://127.0.0.1:{gw_port}/readyz")
        wait_http(f"http://127.0.0.1:{open_port}/readyz")
        times = uvloop.run(
            alternate(
                [
                    (f"{upstream}/v1/chat/completions", "null"),
                    (f"http://127.0.0.1:{gw_port}/v1/chat/completions", "null-model"),
                    (f"http://127.0.0.1:{open_port}/v1/chat/completions", "null-model"),
                ],
                args.requests,
            )
        )
        rows += rows_for(
            f"null engine (n={args.requests})",
            ["engine direct", "gateway: keys, quotas, ledger", "gateway: --no-auth"],
            times,
        )
    finally:
        stop(open_gateway)
        stop(gateway)
        stop(engine)

    if args.real_requests:
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            up = spawn(
                "-m",
                "gpufleet",
                "up",
                "--port",
                str(port),
                "--data-dir",
                tmp,
                stdout=subprocess.PIPE,
            )
            try:
                assert up.stdout is not None
                while "gpufleet ready" not in up.stdout.readline():
                    pass
                (replica,) = get_json(f"http://127.0.0.1:{port}/admin/v1/replicas")["replicas"]
                times = asyncio.run(
                    alternate(
                        [
                            (f"{replica['url']}/v1/chat/completions", "smollm2"),
                            (f"http://127.0.0.1:{port}/v1/chat/completions", "smollm2"),
                        ],
                        args.real_requests,
                    )
                )
                rows += rows_for(
                    f"llama.cpp SmolLM2, 1 token (n={args.real_requests})",
                    ["engine direct", "gpufleet up (admin key)"],
                    times,
                )
            finally:
                stop(up)

    print(table(["upstream", "path", "p50 ms", "p90 ms", "p99 ms", "added p50", "added p99"], rows))
    print(
        "\nanchors: goal ≤ 0.5 ms added at p50, ≤ 3 ms at p99 (keys, quotas and ledger on); "
        "LiteLLM (published): 2 ms median, 13 ms p99 overhead"
    )


if __name__ == "__main__":
    main()
