"""Test sites: engine emulators on loopback ports, a controller over the fake runtime, and a
gateway assembled as ``gpufleet up`` assembles it (``gpufleet.gateway.assemble``).

Tests that run a whole gateway build it here, so they run what users run: keys (with
``auth=True``), quotas, the usage ledger, the engine scraper and the batch runner, started and
stopped in the assembly's order. Unit tests of one part of the gateway use ``directory`` and
``FakePlane`` instead: models and replicas in memory, no controller, no HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.controller import Controller, DemandSource, Directory
from gpufleet.emulator import EmulatedEngine, ReplicaServer
from gpufleet.gateway import GatewaySettings, GatewayStack, assemble
from gpufleet.gateway.auth import Keyring
from gpufleet.gateway.ledger import Ledger
from gpufleet.hardware import CATALOG
from gpufleet.runtime import Phase, Replica, ReplicaRequest
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel
from gpufleet.spec import Model, load_text
from gpufleet.store import Store, sqlite_url
from tests.conftest import free_port, serving

#: The model every emulated engine stands in for (its size and shape set the emulated speed).
CONFIG = Path(__file__).parent / "data" / "configs" / "llama-3-8b.json"

UrlFor = Callable[[ReplicaRequest, int], str]


def emulated(
    gpu: str = "H100", *, kv_tokens: int = 400_000, time_scale: float = 1.0
) -> EmulatedEngine:
    """An emulated engine serving ``CONFIG`` on one ``gpu`` (``time_scale`` < 1 runs faster)."""
    perf = PerfModel(load_architecture(CONFIG), CATALOG[gpu])
    return EmulatedEngine(perf, kv_tokens, time_scale=time_scale)


@contextlib.asynccontextmanager
async def replica_servers(
    engines: Sequence[tuple[str, EmulatedEngine]],
) -> AsyncIterator[list[str]]:
    """Each engine served under its model name on a free loopback port; yields their URLs."""
    servers = [ReplicaServer(engine, name) for name, engine in engines]
    urls: list[str] = []
    try:
        for server in servers:
            port = free_port()
            await server.start("127.0.0.1", port)
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for server in servers:
            await server.stop()


@dataclass
class Served:
    """An assembled gateway, started and served over HTTP at ``url``."""

    url: str
    stack: GatewayStack

    @property
    def app(self) -> Any:
        return self.stack.app

    @property
    def keyring(self) -> Keyring:
        return self.stack.keyring

    @property
    def ledger(self) -> Ledger | None:
        return self.stack.ledger


@contextlib.asynccontextmanager
async def gateway(
    plane: Any,
    settings: GatewaySettings | None = None,
    *,
    prepare: Callable[[GatewayStack], None] | None = None,
    **assembly: Any,
) -> AsyncIterator[Served]:
    """``assemble(plane, settings, **assembly)``, started (after ``prepare``: tenants, keys,
    intervals) and served; closed on the way out. The caller runs ``plane``."""
    stack = assemble(plane, settings, **assembly)
    try:
        if prepare is not None:
            prepare(stack)
        await stack.start()
        async with serving(stack.app) as url:
            yield Served(url, stack)
    finally:
        await stack.close()


def all_ready(directory: Directory) -> bool:
    return all(e.endpoints for e in directory.entries())


@dataclass
class Site(Served):
    """A whole site: the store, the fake runtime, the controller, and its gateway."""

    store: Store = field(kw_only=True)
    runtime: FakeRuntime = field(kw_only=True)
    controller: Controller = field(kw_only=True)


@contextlib.asynccontextmanager
async def site(
    tmp_path: Path,
    models: str | Sequence[Model],
    url_for: UrlFor,
    settings: GatewaySettings | None = None,
    *,
    auth: bool = False,
    resync_s: float = 15.0,
    ready: Callable[[Directory], bool] = all_ready,
    prepare: Callable[[GatewayStack], None] | None = None,
    **assembly: Any,
) -> AsyncIterator[Site]:
    """``models`` (YAML or parsed) on replicas at ``url_for(request, index)``, a gateway in
    front (without keys unless ``auth``), served once ``ready`` (every model has a replica)."""
    store = Store.open(sqlite_url(tmp_path))
    runtime = FakeRuntime(url_for)
    controller = Controller(store, runtime, resync_s=resync_s)
    try:
        await controller.start()
        await controller.apply(load_text(models) if isinstance(models, str) else list(models))
        async with gateway(controller, settings, auth=auth, prepare=prepare, **assembly) as g:
            # One process, one store, one report of its outages, as ``gpufleet up`` wires it.
            controller.failures.outages = g.stack.gateway.outages
            async with asyncio.timeout(10):
                while not ready(controller.directory):
                    await asyncio.sleep(0.01)
            yield Site(g.url, g.stack, store=store, runtime=runtime, controller=controller)
    finally:
        await controller.stop()
        await runtime.close()
        store.close()


# -- parts of a gateway, without a controller -------------------------------------------------

_ids = itertools.count(1)


def directory(models: str, ready: dict[str, int] | None = None) -> Directory:
    """The models of ``models`` (YAML), each with ``ready[name]`` ready replicas (default 1)."""
    d = Directory()
    for model in load_text(models):
        d.put_spec(model.name, 1, model.spec, 0)
        for _ in range((ready or {}).get(model.name, 1)):
            add_replica(d, model.name)
    return d


def add_replica(d: Directory, model: str, *, generation: int = 1) -> Replica:
    replica = Replica(
        f"{model}-{next(_ids)}", model, generation, Phase.READY, url="http://127.0.0.1:1"
    )
    d.observe(replica)
    return replica


@dataclass
class FakePlane:
    """A control plane that only holds a directory and records wake-ups."""

    directory: Directory
    woken: list[str] = field(default_factory=list)
    demand: list[DemandSource] = field(default_factory=list)
    runtime: Any = None
    store: Any = None

    async def wake(self, name: str) -> None:
        self.woken.append(name)

    def unhealthy(self) -> list[str]:
        return []

    def attach_demand(self, source: DemandSource) -> None:
        self.demand.append(source)
