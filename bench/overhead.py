"""Latency a request gains by going through the gateway instead of straight to the engine.

Two pairs, each measured in one run with requests alternating between the two paths (so drift
on this noisy machine hits both alike), sequential, over kept-alive connections:

- null engine: an upstream that answers instantly, isolating the gateway's own cost;
- real engine: SmolLM2 on llama.cpp under ``gpufleet up``, one-token chat completions.

Anchors: the goal is ≤ 1 ms added at p50; LiteLLM publishes 2 ms median / 13 ms p99 overhead.
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


async def alternate(
    direct: str, gateway: str, model_direct: str, model_gw: str, n: int
) -> tuple[list[float], list[float]]:
    async with aiohttp.ClientSession() as http:
        bodies = {
            direct: json.dumps({**CHAT, "model": model_direct}).encode(),
            gateway: json.dumps({**CHAT, "model": model_gw}).encode(),
        }
        headers = {"content-type": "application/json", **AUTH}
        times: dict[str, list[float]] = {direct: [], gateway: []}
        for i in range(n + 50):
            for url in (direct, gateway) if i % 2 == 0 else (gateway, direct):
                start = time.perf_counter()
                async with http.post(url, data=bodies[url], headers=headers) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                if i >= 50:  # warm-up excluded
                    times[url].append(time.perf_counter() - start)
        return times[direct], times[gateway]


def rows_for(label: str, direct: list[float], gateway: list[float]) -> list[list[str]]:
    d, g = summary(direct), summary(gateway)
    return [
        [label, "engine direct", f"{d['p50']:.3f}", f"{d['p90']:.3f}", f"{d['p99']:.3f}", "", ""],
        [
            label,
            "through gateway",
            f"{g['p50']:.3f}",
            f"{g['p90']:.3f}",
            f"{g['p99']:.3f}",
            f"{g['p50'] - d['p50']:+.3f}",
            f"{g['p99'] - d['p99']:+.3f}",
        ],
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--real-requests", type=int, default=300)
    args = parser.parse_args()
    rows: list[list[str]] = []

    engine_port, gw_port = free_port(), free_port()
    engine = spawn("bench/null_engine.py", str(engine_port))
    gateway = spawn("bench/gateway_only.py", str(gw_port), f"http://127.0.0.1:{engine_port}")
    try:
        wait_http(f"http://127.0.0.1:{engine_port}/v1/models")
        wait_http(f"http://127.0.0.1:{gw_port}/readyz")
        d, g = uvloop.run(
            alternate(
                f"http://127.0.0.1:{engine_port}/v1/chat/completions",
                f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                "null",
                "null-model",
                args.requests,
            )
        )
        rows += rows_for(f"null engine (n={args.requests})", d, g)
    finally:
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
                d, g = asyncio.run(
                    alternate(
                        f"{replica['url']}/v1/chat/completions",
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        "smollm2",
                        "smollm2",
                        args.real_requests,
                    )
                )
                rows += rows_for(f"llama.cpp SmolLM2, 1 token (n={args.real_requests})", d, g)
            finally:
                stop(up)

    print(table(["upstream", "path", "p50 ms", "p90 ms", "p99 ms", "added p50", "added p99"], rows))
    print(
        "\nanchors: goal ≤ 1 ms added at p50; LiteLLM (published): 2 ms median, 13 ms p99 overhead"
    )


if __name__ == "__main__":
    main()
