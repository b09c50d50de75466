"""``gpufleet emulate`` / ``python -m gpufleet.emulator``: run emulated replicas of one model.

Replica ``i`` listens on ``port + i``. A single replica exits with status 70 when an injected
crash fires, so a supervising runtime sees a dead process and restarts it; in a multi-replica
process only the crashed replica stops answering. ``--api-key`` (default: the
``GPUFLEET_ENGINE_KEY`` environment variable, which ``ps`` does not show) makes every replica
refuse its ``/v1`` routes to anyone without the key, as vLLM's ``--api-key`` does.

Disaggregated serving (``kvtransfer``): ``--kv-role`` is vLLM's ``kv_role`` (default
``kv_both``); ``--kv-link`` the link a decode call pulls its prompt's KV over (default
``infiniband``: prefill and decode replicas on different nodes), ``--kv-link-gbytes-per-s`` and
``--kv-transfer-latency-ms`` override its bandwidth (per link: per GPU, or per host for ``tcp``)
and its per-transfer latency.

KV-cache events: ``--kv-events-config JSON`` is vLLM's flag with vLLM's fields
(``enable_kv_cache_events``, ``publisher`` ``zmq``, ``endpoint`` default ``tcp://*:5557``,
``replay_endpoint``, ``buffer_steps``, ``hwm``, ``max_queue_size``, ``topic``); replica ``i``
publishes on the endpoint's port + ``i`` (``kv_publisher``), and ``GET /kv_event_sources`` says
where.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from gpufleet.emulator.engine import EmulatedEngine, Faults
from gpufleet.emulator.kv_publisher import KvEventsConfig, parse_kv_events_config
from gpufleet.emulator.kvcache import kv_capacity_tokens
from gpufleet.emulator.kvtransfer import DEFAULT_KV_LINK, KV_LINKS, KV_ROLES, KVRole, kv_link
from gpufleet.emulator.server import ReplicaServer
from gpufleet.engines.base import ENGINE_KEY_ENV
from gpufleet.errors import GpufleetError
from gpufleet.hardware import accelerator
from gpufleet.sizing import ModelArch, load_architecture
from gpufleet.sizing.performance import PerfModel

__all__ = ["EmulatorOptions", "build_replicas", "main", "parse_args"]


@dataclass(frozen=True)
class EmulatorOptions:
    arch: ModelArch
    name: str
    gpu: str = "H100"
    tp: int = 1
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8100
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: vLLM's default for the GPU
    kv_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    time_scale: float = 1.0
    default_max_tokens: int = 64
    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    api_key: str | None = field(default=None, repr=False)
    kv_role: KVRole = "kv_both"
    kv_link: str = DEFAULT_KV_LINK
    kv_link_gbytes_per_s: float | None = None  # None: the link's own
    kv_transfer_latency_ms: float | None = None  # None: the link's own
    kv_events: KvEventsConfig | None = None  # None: no KV-cache events


def build_replicas(opts: EmulatorOptions, *, exit_on_crash: bool = False) -> list[ReplicaServer]:
    gpu = accelerator(opts.gpu)
    perf = PerfModel(opts.arch, gpu, opts.tp)
    kv_tokens = opts.kv_tokens
    if kv_tokens is None:
        budget = int(gpu.memory_bytes * opts.gpu_memory_utilization)
        kv_tokens = kv_capacity_tokens(perf, budget, "emulator")
    if kv_tokens < 16:
        raise GpufleetError(
            f"{opts.name} does not fit {opts.tp}× {gpu.name}: no memory left for KV cache "
            "(raise --tp, pick a larger GPU, or set --kv-tokens)"
        )
    on_crash = (lambda: os._exit(70)) if exit_on_crash and opts.replicas == 1 else None
    link = kv_link(opts.kv_link, opts.kv_link_gbytes_per_s, opts.kv_transfer_latency_ms)
    servers = []
    for i in range(opts.replicas):
        faults = Faults(**opts.faults.__dict__)
        engine = EmulatedEngine(
            perf,
            kv_tokens,
            opts.max_num_seqs,
            opts.time_scale,
            faults,
            seed=opts.seed + i,
            kv_link=link,
            max_num_batched_tokens=opts.max_num_batched_tokens,
        )
        servers.append(
            ReplicaServer(
                engine,
                opts.name,
                default_max_tokens=opts.default_max_tokens,
                on_crash=on_crash,
                api_key=opts.api_key,
                kv_role=opts.kv_role,
                kv_events=opts.kv_events.for_replica(i) if opts.kv_events is not None else None,
            )
        )
    return servers


def parse_args(argv: list[str]) -> EmulatorOptions:
    p = argparse.ArgumentParser(
        prog="gpufleet emulate",
        description="Serve emulated replicas of a model on a GPU (for tests and benchmarks; no real inference).",
    )
    p.add_argument("--arch", required=True, help="config.json, its folder, or a .gguf file")
    p.add_argument("--name", help="model name served (default: from the architecture)")
    p.add_argument("--gpu", default="H100")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="token budget per step, decodes and prompt chunks (default: vLLM's for the GPU)",
    )
    p.add_argument(
        "--kv-tokens", type=int, help="KV cache size in tokens (default: from GPU memory)"
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply every delay (0.1: 10× faster)"
    )
    p.add_argument("--default-max-tokens", type=int, default=64)
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--stall-rate", type=float, default=0.0)
    p.add_argument("--stall-s", type=float, default=0.0)
    p.add_argument("--slow-start-s", type=float, default=0.0)
    p.add_argument("--crash-after", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--api-key",
        default=os.environ.get(ENGINE_KEY_ENV) or None,
        help=f"refuse /v1 requests without this bearer key (default: ${ENGINE_KEY_ENV})",
    )
    p.add_argument(
        "--kv-role",
        choices=KV_ROLES,
        default="kv_both",
        help="vLLM's kv_role: kv_producer refuses decode calls, kv_consumer prefill calls",
    )
    p.add_argument(
        "--kv-link",
        choices=sorted(KV_LINKS),
        default=DEFAULT_KV_LINK,
        help=f"link a decode call pulls the prompt's KV over (default: {DEFAULT_KV_LINK})",
    )
    p.add_argument(
        "--kv-link-gbytes-per-s",
        type=float,
        help="override the link's bandwidth, GB/s per link (per GPU; per host for tcp)",
    )
    p.add_argument(
        "--kv-transfer-latency-ms", type=float, help="override the link's per-transfer latency"
    )
    p.add_argument(
        "--kv-events-config",
        metavar="JSON",
        help="publish KV-cache events as vLLM does, with vLLM's config: "
        "enable_kv_cache_events, publisher (zmq), endpoint (default tcp://*:5557; "
        "replica i on port + i), replay_endpoint, topic",
    )
    a = p.parse_args(argv)
    try:
        arch = load_architecture(a.arch)
    except GpufleetError as exc:
        p.error(str(exc))
    if a.replicas < 1 or a.tp < 1:
        p.error("--replicas and --tp must be ≥ 1")
    if a.time_scale <= 0:
        p.error("--time-scale must be > 0")
    if a.max_num_batched_tokens is not None and a.max_num_batched_tokens < a.max_num_seqs:
        p.error("--max-num-batched-tokens must be ≥ --max-num-seqs (as vLLM requires)")
    if a.kv_link_gbytes_per_s is not None and a.kv_link_gbytes_per_s <= 0:
        p.error("--kv-link-gbytes-per-s must be > 0")
    if a.kv_transfer_latency_ms is not None and a.kv_transfer_latency_ms < 0:
        p.error("--kv-transfer-latency-ms must be ≥ 0")
    kv_events = None
    if a.kv_events_config is not None:
        try:
            kv_events = parse_kv_events_config(a.kv_events_config)
        except ValueError as exc:
            p.error(str(exc))
    return EmulatorOptions(
        arch=arch,
        name=a.name or arch.name or "emulated",
        gpu=a.gpu,
        tp=a.tp,
        replicas=a.replicas,
        host=a.host,
        port=a.port,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        kv_tokens=a.kv_tokens,
        gpu_memory_utilization=a.gpu_memory_utilization,
        time_scale=a.time_scale,
        default_max_tokens=a.default_max_tokens,
        faults=Faults(a.fail_rate, a.stall_rate, a.stall_s, a.slow_start_s, a.crash_after),
        seed=a.seed,
        api_key=a.api_key,
        kv_role=a.kv_role,
        kv_link=a.kv_link,
        kv_link_gbytes_per_s=a.kv_link_gbytes_per_s,
        kv_transfer_latency_ms=a.kv_transfer_latency_ms,
        kv_events=kv_events,
    )


async def serve(opts: EmulatorOptions) -> None:
    servers = build_replicas(opts, exit_on_crash=True)
    for i, server in enumerate(servers):
        await server.start(opts.host, opts.port + i)
    print(
        f"gpufleet emulator: {opts.replicas} replica(s) of {opts.name} on {opts.tp}× {opts.gpu} "
        f"at http://{opts.host}:{opts.port}..{opts.port + opts.replicas - 1}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        await server.stop()


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        asyncio.run(coro)
        return
    uvloop.run(coro)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _run(serve(opts))
    except (GpufleetError, KeyError, OSError) as exc:
        sys.stderr.write(f"gpufleet emulate: {exc}\n")
        raise SystemExit(1) from exc
    with contextlib.suppress(Exception):
        sys.stdout.flush()
