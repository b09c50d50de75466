"""Helpers shared by the benchmarks: child processes, waiting, percentiles, tables."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The key benchmarks authenticate with: bench/gateway_only.py installs it as a user key, and
#: gpufleet up takes it as its admin key (GPUFLEET_ADMIN_KEY) when a bench starts one.
BENCH_KEY = "gpf_benchmark-key-not-a-secret-0000000"
AUTH = {"authorization": f"Bearer {BENCH_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn(*args: str, stdout: Any = subprocess.DEVNULL) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=stdout,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "GPUFLEET_ADMIN_KEY": BENCH_KEY},
    )


def wait_http(url: str, timeout: float = 120.0) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=AUTH), timeout=2
            ) as resp:
                if resp.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.01)
    raise TimeoutError(url)


def get_json(url: str, timeout: float = 10.0) -> Any:
    request = urllib.request.Request(url, headers=AUTH)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def start_up(data: Path, spec: Path, port: int) -> subprocess.Popen[str]:
    """``gpufleet up`` on ``port`` serving ``spec`` (the bench key its admin key), once it
    prints its ready line; its stderr goes to ``up-<port>.log`` beside ``data``."""
    log = data.parent / f"up-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpufleet", "up", "--port", str(port), "--data-dir", str(data),
         "-f", str(spec)],
        stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "GPUFLEET_ADMIN_KEY": BENCH_KEY},
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("gpufleet ready: "):
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(
        f"gpufleet up never became ready:\n{log.read_text(errors='replace')[-3000:]}"
    )


def wait_ready(server: str, model: str, replicas: int, timeout: float = 120.0) -> None:
    """Until ``replicas`` of ``model`` are Ready on the ``gpufleet up`` at ``server``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = get_json(server + "/admin/v1/replicas", 30.0)["replicas"]
            if sum(r["model"] == model and r["phase"] == "Ready" for r in rows) >= replicas:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{replicas} replicas of {model} not ready within {timeout:.0f} s")


def emulated_prompt(index: int, tokens: int) -> str:
    """Exactly ``tokens`` tokens under the emulator's stand-in tokenizer
    (``emulator.kvcache.tokenize``): a unique first piece (a 4-digit base-36 id, so no request
    reuses another's KV blocks) and then ``" tok"`` pieces."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    head = "".join(digits[(index // 36**k) % 36] for k in range(4))
    return head + " tok" * (tokens - 1)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "p50": pct(ms, 50),
        "p90": pct(ms, 90),
        "p99": pct(ms, 99),
        "mean": statistics.fmean(ms),
    }


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, sep, *body])


def stop(proc: subprocess.Popen[str], sig: int = 2) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def postgres_database(admin_url: str) -> tuple[str, Callable[[], None]]:
    """A scratch database on the server; its URL and how to drop it."""
    import secrets

    import sqlalchemy as sa  # only the benches that use PostgreSQL pay for the import

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"gpufleet_bench_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()

    return admin_url.rsplit("/", 1)[0] + f"/{name}", drop
