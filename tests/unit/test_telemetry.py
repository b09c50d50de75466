"""GPU telemetry: NVML (a fake one) and the DCGM exporter (recorded pages) read into readings
attributed to replicas; idle GPUs counted; the Prometheus metrics; the history in the store
(SQLite and PostgreSQL); the sampling loop; the wiring under ``gpufleet up``, in the operator's
leader and on a cluster's gateways; the admin API.

The fake NVML proves the sampler's logic, not a claim about a real GPU (that is the device
check's); the DCGM pages are written after the exporter's documented output
(tests/data/dcgm/README.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import gpufleet.telemetry as telemetry_api
from gpufleet.controller import Directory
from gpufleet.errors import StoreError, TemporaryError
from gpufleet.gateway import GatewayStack, assemble
from gpufleet.runtime import Phase, Replica
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.store import GpuPoint, Store, sqlite_url
from gpufleet.store.tables import gpu_devices, gpu_samples
from gpufleet.telemetry import (
    DcgmReader,
    GpuReading,
    NvmlSampler,
    StoredReadings,
    Telemetry,
    idle,
    leaves,
)
from gpufleet.telemetry.attribution import ProcessOwners, proc_parent, replica_of_pod
from gpufleet.telemetry.dcgm import (
    PROMETHEUS_QUERY,
    readings_from_series,
    series_from_exposition,
    series_from_prometheus,
)
from gpufleet.telemetry.fake_nvml import FakeGpu, FakeMig, FakeNvml, FakeProcess, NVMLError
from tests import sites
from tests.conftest import eventually, serving

DATA = Path(__file__).parents[1] / "data" / "dcgm"
GIB = 1024**3
MIB = 1024**2
#: A whole minute (unix seconds): history's 1-minute rows start at such times.
T0 = 1_800_000_000.0


def replica(rid: str, model: str, pid: int | None = None) -> Replica:
    return Replica(rid, model, 1, Phase.READY, url="http://127.0.0.1:1", pid=pid)


# -- NVML ------------------------------------------------------------------------------------

#: The engines' processes and their children: pid → parent pid (what /proc says).
PARENTS = {
    1001: 1000,  # llama's engine (1000) runs its model in a child
    1000: 1,
    2002: 2001,  # smol's: a worker under an EngineCore under the engine (2000)
    2001: 2000,
    2000: 1,
    3001: 3000,
    3000: 1,
    4001: 4000,
    4000: 1,
    9999: 500,  # somebody else's program
    500: 1,
}
REPLICAS = [
    replica("llama-g1-aaaaaa", "llama", pid=1000),
    replica("smol-g1-bbbbbb", "smol", pid=2000),
    replica("chat-g1-cccccc", "chat", pid=3000),
    replica("chat-g1-dddddd", "chat", pid=4000),
    replica("cold-g1-eeeeee", "cold"),  # not started yet: no pid
]


def fleet() -> FakeNvml:
    """Five GPUs: one held by an engine's child; one with nothing on it; one in MIG mode with
    an instance held and one not; one time-sliced by two replicas; one used by a process that
    is none of ours (and a GPU that cannot be asked about MIG)."""
    return FakeNvml(
        [
            FakeGpu(
                "GPU-0",
                memory_used=70 * GIB,
                util=87,
                power_mw=650_000,
                temp=61,
                processes=[FakeProcess(1001, 69 * GIB)],
            ),
            FakeGpu("GPU-1"),
            FakeGpu(
                "GPU-2",
                name="NVIDIA A100-SXM4-80GB",
                power_mw=187_000,
                mig={
                    0: FakeMig(
                        "3g.40gb",
                        1,
                        "MIG-2-1",
                        40 * GIB,
                        memory_used=30 * GIB,
                        processes=[FakeProcess(2002, None)],  # the driver cannot tell
                    ),
                    3: FakeMig("1g.10gb", 13, "MIG-2-13", 10 * GIB, memory_used=13 * MIB),
                },
            ),
            FakeGpu(
                "GPU-3",
                memory_used=50 * GIB,
                util=40,
                processes=[FakeProcess(3001, 20 * GIB), FakeProcess(4001, 30 * GIB)],
            ),
            FakeGpu(
                "GPU-4",
                memory_used=2 * GIB,
                util=5,
                processes=[FakeProcess(9999, 2 * GIB)],
                mig_capable=False,
            ),
        ]
    )


def sampler(nvml: FakeNvml | None = None, node: str = "ws-1") -> NvmlSampler:
    return NvmlSampler(nvml or fleet(), node, parent_of=PARENTS.get)


def by_device(readings: Sequence[GpuReading]) -> dict[str, GpuReading]:
    return {r.device: r for r in readings}


def test_nvml_readings_are_attributed_to_the_replicas_whose_engines_hold_the_gpus() -> None:
    readings = sampler().read_now(REPLICAS, T0)
    assert [(r.device, r.index) for r in readings] == [
        ("GPU-0", "0"),
        ("GPU-1", "1"),
        ("GPU-2", "2"),
        ("MIG-2-1", "2/mig-3g.40gb/1"),
        ("MIG-2-13", "2/mig-1g.10gb/13"),
        ("GPU-3", "3"),
        ("GPU-4", "4"),
    ]
    gpus = by_device(readings)
    held = gpus["GPU-0"]
    assert (held.replica, held.model) == ("llama-g1-aaaaaa", "llama")  # through the child
    assert (held.memory_used, held.memory_total) == (70 * GIB, 80 * GIB)
    assert (held.util, held.power_w, held.temp_c, held.sm_active) == (0.87, 650.0, 61.0, None)
    assert (held.node, held.name, held.parent, held.at) == (
        "ws-1",
        "NVIDIA H100 80GB HBM3",
        None,
        T0,
    )
    # The MIG instance is a device of its own, held by the grandchild of smol's engine; it
    # has no utilisation, power or temperature of its own (NVML: NotSupported).
    mig = gpus["MIG-2-1"]
    assert (mig.replica, mig.model, mig.parent) == ("smol-g1-bbbbbb", "smol", "GPU-2")
    assert mig.name == "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    assert (mig.memory_used, mig.memory_total) == (30 * GIB, 40 * GIB)
    assert (mig.util, mig.power_w, mig.temp_c) == (None, None, None)
    # The GPU cut into instances keeps what only it has, and holds nothing itself.
    parent = gpus["GPU-2"]
    assert (parent.replica, parent.util, parent.power_w) == (None, None, 187.0)
    assert parent.memory_used == 30 * GIB + 13 * MIB
    # Time-sliced by two replicas: the one with the most memory on it.
    assert gpus["GPU-3"].replica == "chat-g1-dddddd"
    # Nothing of ours on GPU-1, MIG-2-13 and GPU-4 (a stranger's process).
    assert [r.device for r in idle(readings)] == ["GPU-1", "MIG-2-13", "GPU-4"]
    assert "GPU-2" not in [r.device for r in leaves(readings)]


def test_a_time_sliced_gpu_follows_its_replicas_memory() -> None:
    nvml = fleet()
    nvml.gpus[3].processes = [FakeProcess(3001, 40 * GIB), FakeProcess(4001, 10 * GIB)]
    assert by_device(sampler(nvml).read_now(REPLICAS, T0))["GPU-3"].replica == "chat-g1-cccccc"
    nvml.gpus[3].processes = [FakeProcess(4001, 10 * GIB)]  # cccccc went away
    assert by_device(sampler(nvml).read_now(REPLICAS, T0))["GPU-3"].replica == "chat-g1-dddddd"


def test_a_figure_nvml_refuses_is_left_out_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    class HotSensor(FakeNvml):
        def nvmlDeviceGetTemperature(self, handle: tuple[int, ...], sensor: int) -> int:
            raise NVMLError("Unknown Error")

    source = sampler(HotSensor(fleet().gpus))
    with caplog.at_level(logging.WARNING, "gpufleet.telemetry"):
        for _ in range(3):
            readings = source.read_now(REPLICAS, T0)
    assert {r.temp_c for r in readings} == {None}
    assert by_device(readings)["GPU-0"].memory_used == 70 * GIB  # the rest is read
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "nvmlDeviceGetTemperature" in said[0]


def test_nvml_failing_as_a_whole_is_a_temporary_error() -> None:
    class Lost(FakeNvml):
        def nvmlDeviceGetMemoryInfo(self, handle: tuple[int, ...]) -> Any:
            raise NVMLError("GPU is lost")

    with pytest.raises(TemporaryError, match="GPU is lost"):
        sampler(Lost(fleet().gpus)).read_now(REPLICAS, T0)


def test_process_ancestry_from_proc_and_its_owner_remembered() -> None:
    assert proc_parent(os.getpid()) == os.getppid()
    assert proc_parent(2**22 + 12345) is None  # beyond pid_max: no such process
    asked: list[int] = []

    def parent_of(pid: int) -> int | None:
        asked.append(pid)
        return PARENTS.get(pid)

    owners = ProcessOwners(REPLICAS, parent_of)
    engine = owners.owner(2002)
    assert engine is not None and engine.id == "smol-g1-bbbbbb"
    assert owners.owner(2002) is engine and owners.owner(2001) is engine
    assert owners.owner(9999) is None
    assert asked == [2002, 2001, 9999, 500]  # each process looked up once
    assert ProcessOwners([replica("x", "x")]).owner(os.getpid()) is None  # no engine pids


def test_pods_of_a_replica_and_of_its_leader_worker_set() -> None:
    replicas = [replica("qwen-72b-g2-a0b1c2", "qwen-72b"), replica("llama-g1-123456", "llama")]
    for pod in ("qwen-72b-g2-a0b1c2", "qwen-72b-g2-a0b1c2-0", "qwen-72b-g2-a0b1c2-0-3"):
        found = replica_of_pod(pod, replicas)
        assert found is not None and found.id == "qwen-72b-g2-a0b1c2", pod
    found = replica_of_pod("llama-g1-123456", replicas)  # an all-digit suffix is still its id
    assert found is not None and found.model == "llama"
    for pod in ("qwen-72b-g2", "notebook-0", "qwen-72b-g2-a0b1c2-x", "llama-g1"):
        assert replica_of_pod(pod, replicas) is None, pod


# -- the DCGM exporter ------------------------------------------------------------------------

DCGM_REPLICAS = [
    replica("llama-8b-g1-3f9a1c", "llama-8b"),
    replica("qwen-72b-g2-a0b1c2", "qwen-72b"),  # a LeaderWorkerSet: its leader pod is "…-0"
    replica("smollm-g1-77aa01", "smollm"),
]
NODE_A = "GPU-5f1c8a3e-2b7d-4e0a-9c61-3d8f2a7b9e10"
A100 = "GPU-7b2e4c1a-58d3-4f96-8e07-c3a9d1f05b28"


def exporter_pages() -> list[str]:
    return [(DATA / f"exporter-gpu-node-{n}.txt").read_text() for n in ("a", "b")]


def dcgm_readings(pages: Sequence[str] | None = None) -> list[GpuReading]:
    series = [s for page in pages or exporter_pages() for s in series_from_exposition(page)]
    return readings_from_series(series, DCGM_REPLICAS, T0, namespace="gpufleet")


def test_dcgm_exporter_pages_are_read_into_attributed_readings() -> None:
    readings = dcgm_readings()
    assert [(r.node, r.index, r.replica) for r in readings] == [
        ("gpu-node-a", "0", "llama-8b-g1-3f9a1c"),
        ("gpu-node-a", "1", "qwen-72b-g2-a0b1c2"),  # the LeaderWorkerSet's leader pod
        ("gpu-node-a", "2", "qwen-72b-g2-a0b1c2"),
        ("gpu-node-a", "3", None),
        ("gpu-node-b", "0", None),  # the A100 cut into instances holds nothing itself
        ("gpu-node-b", "0/mig-3g.40gb/1", "smollm-g1-77aa01"),
        ("gpu-node-b", "0/mig-2g.20gb/5", None),  # another namespace's notebook: not ours
        ("gpu-node-b", "0/mig-1g.10gb/13", None),
    ]
    gpus = by_device(readings)
    h100 = gpus[NODE_A]
    assert h100.model == "llama-8b" and h100.name == "NVIDIA H100 80GB HBM3"
    assert h100.memory_used == 71234 * MIB
    assert h100.memory_total == (71234 + 9791 + 534) * MIB  # used + free + reserved
    assert (h100.util, h100.sm_active, h100.power_w, h100.temp_c) == (
        0.87,
        0.712344,
        521.337,
        61.0,
    )
    parent = gpus[A100]
    assert (parent.power_w, parent.temp_c, parent.memory_used) == (187.452, 47.0, None)
    instance = gpus[f"{A100}/1"]
    assert (instance.parent, instance.name) == (A100, "NVIDIA A100-SXM4-80GB MIG 3g.40gb")
    assert instance.memory_used == 30712 * MIB
    assert instance.util == 0.402771  # the engine's activity stands for the missing GPU_UTIL
    assert instance.power_w is None
    # Idle: node-a's GPU 3 and the two instances no replica holds; the A100 is not counted.
    assert [r.index for r in idle(readings)] == ["3", "0/mig-2g.20gb/5", "0/mig-1g.10gb/13"]


def test_a_pod_of_another_namespace_is_not_ours_even_with_a_replicas_name() -> None:
    a, b = exporter_pages()
    a = a.replace(
        'namespace="gpufleet",pod="llama-8b-g1-3f9a1c"',
        'namespace="research",pod="llama-8b-g1-3f9a1c"',
    )
    gpus = by_device(dcgm_readings([a, b]))
    assert gpus[NODE_A].replica is None
    assert gpus["GPU-a42d91f7-6c3e-4b85-8f20-71e5c9d0b3a4"].replica == "qwen-72b-g2-a0b1c2"


def test_the_same_readings_through_prometheus_exported_labels() -> None:
    answer = json.loads((DATA / "prometheus-query.json").read_text())
    series = series_from_prometheus(answer)
    # Scraped, the workload's labels are exported_*: pod is the exporter's own.
    assert {s.labels["pod"] for s in series} == {
        "nvidia-dcgm-exporter-7xk2p",
        "nvidia-dcgm-exporter-q9m4d",
    }
    assert readings_from_series(series, DCGM_REPLICAS, T0, namespace="gpufleet") == (
        dcgm_readings()
    )
    with pytest.raises(ValueError, match="bad_data"):
        series_from_prometheus({"status": "error", "error": "bad_data"})  # type: ignore[typeddict-item]


@pytest.fixture
async def exporters() -> AsyncIterator[str]:
    """The recorded pages served over HTTP as the exporters (/a, /b) and Prometheus serve
    them; /broken answers 500."""
    a, b = exporter_pages()
    answer = (DATA / "prometheus-query.json").read_text()

    async def prometheus(request: Request) -> Response:
        if request.query_params.get("query") != PROMETHEUS_QUERY:
            return JSONResponse({"status": "error", "error": "unexpected query"}, 400)
        return Response(answer, media_type="application/json")

    async def broken(_: Request) -> Response:
        return PlainTextResponse("exporter restarting", 500)

    app = Starlette(
        routes=[
            Route("/a/metrics", lambda _: PlainTextResponse(a)),
            Route("/b/metrics", lambda _: PlainTextResponse(b)),
            Route("/api/v1/query", prometheus),
            Route("/broken", broken),
        ]
    )
    async with serving(app) as url:
        yield url


async def test_the_dcgm_reader_asks_each_exporter_or_prometheus(exporters: str) -> None:
    expected = dcgm_readings()
    for url in (f"{exporters}/a/metrics, {exporters}/b/metrics", f"{exporters}/api/v1/query"):
        reader = DcgmReader(url, namespace="gpufleet")
        try:
            assert await reader.read(DCGM_REPLICAS, T0) == expected
        finally:
            await reader.close()
    for url, error in (
        (f"{exporters}/broken", "HTTP 500"),
        ("http://127.0.0.1:9/metrics", "127.0.0.1:9"),
    ):
        reader = DcgmReader(url)
        try:
            with pytest.raises(TemporaryError, match=error):
                await reader.read(DCGM_REPLICAS, T0)
        finally:
            await reader.close()
    with pytest.raises(ValueError, match="no DCGM exporter"):
        DcgmReader(" , ")


# -- metrics ----------------------------------------------------------------------------------


def scrape(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The registry's exposition, parsed back: family → [(labels, value)]."""
    text = generate_latest(registry).decode()
    return {
        f.name: [(s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text)
    }


async def test_metrics_per_gpu_replica_and_model_and_idle_gpus() -> None:
    registry = CollectorRegistry(auto_describe=True)
    t = Telemetry(sampler(), replicas=lambda: REPLICAS, registry=registry)
    await t.sample_once(T0)
    got = scrape(registry)
    memory = {s[0]["gpu"]: s[1] for s in got["gpufleet_gpu_memory_used_bytes"]}
    assert memory["MIG-2-1"] == 30 * GIB and memory["GPU-1"] == 0
    util = {labels["gpu"]: (labels, v) for labels, v in got["gpufleet_gpu_utilization_ratio"]}
    assert util["GPU-0"] == (
        {
            "node": "ws-1",
            "gpu": "GPU-0",
            "index": "0",
            "name": "NVIDIA H100 80GB HBM3",
            "replica": "llama-g1-aaaaaa",
            "model": "llama",
        },
        0.87,
    )
    assert "MIG-2-1" not in util  # a figure the device does not give is left out, not 0
    assert got["gpufleet_gpu_sm_active_ratio"] == []
    assert got["gpufleet_gpus_idle"] == [({}, 3.0)]  # GPU-1, MIG-2-13, GPU-4; not GPU-2
    assert {s[0]["replica"]: s[1] for s in got["gpufleet_replica_gpus"]} == {
        "llama-g1-aaaaaa": 1.0,
        "smol-g1-bbbbbb": 1.0,
        "chat-g1-dddddd": 1.0,
    }
    assert {s[0]["model"]: s[1] for s in got["gpufleet_model_gpu_memory_used_bytes"]} == {
        "llama": 70 * GIB,
        "smol": 30 * GIB,
        "chat": 50 * GIB,
    }
    # A replica gone from the next reading is gone from the next scrape.
    nvml = t.source.nvml  # type: ignore[attr-defined]
    nvml.gpus[0].processes = []
    await t.sample_once(T0 + 2)
    got = scrape(registry)
    assert "llama" not in {s[0]["model"] for s in got["gpufleet_model_gpus"]}
    assert got["gpufleet_gpus_idle"] == [({}, 4.0)]
    await t.close()
    assert "gpufleet_gpus_idle" not in scrape(registry)  # unregistered


# -- history in the store ---------------------------------------------------------------------


def reading(
    device: str,
    *,
    memory: int | None = 10 * GIB,
    util: float | None = 0.5,
    replica: str | None = None,
    model: str | None = None,
    node: str = "node-a",
    name: str = "NVIDIA H100 80GB HBM3",
    total: int = 80 * GIB,
) -> GpuReading:
    return GpuReading(
        node=node,
        device=device,
        index=device[-1],
        name=name,
        parent=None,
        memory_used=memory,
        memory_total=total,
        util=util,
        sm_active=None,
        power_w=300.0,
        temp_c=50.0,
        replica=replica,
        model=model,
        at=0.0,
    )


def two_minutes(store: Store) -> None:
    """Two devices sampled every 2 s for two minutes from T0: GPU-A held by r1 (memory rising,
    utilisation 0.2/0.6 alternating, then 1.0), GPU-B idle for its first 30 s, then r2's."""
    for i in range(60):
        second = 2 * i
        a = reading(
            "GPU-A",
            memory=(10 + i) * GIB,
            util=(0.2 if i % 2 else 0.6) if second < 60 else 1.0,
            replica="r1",
            model="m1",
        )
        held = second >= 30
        b = reading(
            "GPU-B",
            memory=GIB if held else 0,
            util=None if not held else 0.3,
            replica="r2" if held else None,
            model="m2" if held else None,
            node="node-b",
        )
        assert store.put_gpu_samples([a, b], T0 + second) == 2


def count(store: Store, table: sa.Table) -> int:
    with store._engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_history_rolls_into_minutes_filters_and_prunes(store: Store) -> None:
    two_minutes(store)
    raw = store.gpu_history(T0, T0 + 120)
    assert len(raw) == 120 and {p.at for p in raw} == {T0 + s for s in range(0, 120, 2)}
    first = raw[0]
    assert first == GpuPoint(
        node="node-a",
        device="GPU-A",
        index="A",
        name="NVIDIA H100 80GB HBM3",
        parent=None,
        memory_used=10 * GIB,
        memory_total=80 * GIB,
        util=0.6,
        sm_active=None,
        power_w=300.0,
        temp_c=50.0,
        replica="r1",
        model="m1",
        at=T0,
    )
    assert count(store, gpu_devices) == 2  # each device written once, not per sample
    # The same slot again (a restart within it, a new leader) writes nothing twice.
    store.put_gpu_samples([reading("GPU-A", replica="r1", model="m1")], T0)
    assert len(store.gpu_history(T0, T0 + 120)) == 120
    # Filters: one device, one model, one node; a window.
    assert {p.device for p in store.gpu_history(T0, T0 + 120, device="GPU-B")} == {"GPU-B"}
    assert len(store.gpu_history(T0, T0 + 120, model="m2")) == 45  # held from second 30
    assert {p.node for p in store.gpu_history(T0, T0 + 120, node="node-b")} == {"node-b"}
    assert len(store.gpu_history(T0 + 10, T0 + 20)) == 10
    assert len(store.gpu_history(T0, T0 + 120, limit=7)) == 7

    # Minutes roll once they have ended: the second minute is still running at T0 + 119.
    assert store.roll_gpu_samples(T0 + 119) == 2
    assert store.roll_gpu_samples(T0 + 119) == 0
    assert store.roll_gpu_samples(T0 + 120) == 2
    assert store.roll_gpu_samples(T0 + 150) == 0
    minutes = {(p.device, p.at): p for p in store.gpu_history(T0, T0 + 120, resolution=60)}
    assert sorted(minutes) == [
        ("GPU-A", T0),
        ("GPU-A", T0 + 60),
        ("GPU-B", T0),
        ("GPU-B", T0 + 60),
    ]
    a0 = minutes[("GPU-A", T0)]
    assert a0.util == pytest.approx(0.4)  # the average of 0.6 and 0.2
    assert a0.memory_used == (10 + 29) * GIB  # the minute's peak, not its average
    assert (a0.power_w, a0.temp_c, a0.replica, a0.model) == (300.0, 50.0, "r1", "m1")
    assert minutes[("GPU-A", T0 + 60)].util == pytest.approx(1.0)
    b0 = minutes[("GPU-B", T0)]
    assert b0.util == pytest.approx(0.3)  # samples without a figure are not zeros
    assert (b0.replica, b0.model) == ("r2", "m2")  # held for part of the minute
    assert store.gpu_history(T0, T0 + 120, resolution=60, model="m1")[0].device == "GPU-A"

    # An hour on, the first minute's samples go; the minutes stay for the week.
    dropped = store.prune_gpu_samples(T0 + 3600 + 60)
    assert dropped == 60
    assert min(p.at for p in store.gpu_history(T0, T0 + 120)) == T0 + 60
    assert len(store.gpu_history(T0, T0 + 120, resolution=60)) == 4
    # A week on, everything is gone, and so are the devices without rows.
    store.prune_gpu_samples(T0 + 7 * 86400 + 120)
    assert count(store, gpu_samples) == 0 and count(store, gpu_devices) == 0
    # A device seen again is written again (the remembered ids were of rows now gone).
    later = T0 + 8 * 86400
    store.put_gpu_samples([reading("GPU-A", name="NVIDIA H200")], later)
    (point,) = store.gpu_history(later, later + 1)
    assert (point.device, point.name, point.replica) == ("GPU-A", "NVIDIA H200", None)


def test_a_device_whose_place_or_size_changes_is_updated(store: Store) -> None:
    store.put_gpu_samples([reading("GPU-A")], T0)
    store.put_gpu_samples([reading("GPU-A", node="node-z", total=141 * GIB)], T0 + 2)
    points = store.gpu_history(T0, T0 + 4)
    assert [(p.node, p.memory_total) for p in points] == [("node-z", 141 * GIB)] * 2
    assert count(store, gpu_devices) == 1


def test_the_newest_sample_of_each_device_within_a_window(store: Store) -> None:
    two_minutes(store)
    store.put_gpu_samples([reading("GPU-C", node="node-c")], T0 + 40)  # seen once, long ago
    latest = store.latest_gpu_samples(30, now=T0 + 119)
    assert [(p.device, p.at) for p in latest] == [("GPU-A", T0 + 118), ("GPU-B", T0 + 118)]
    assert latest[0].memory_used == 69 * GIB and latest[1].replica == "r2"
    assert store.latest_gpu_samples(30, now=T0 + 1000) == []


def test_the_migration_adds_the_history_to_an_older_store(tmp_path: Path) -> None:
    """A 0006 store opened by this gpufleet runs 0007 (test_store.py checks the scripts
    against tables.py)."""
    from alembic import command
    from alembic.config import Config

    from gpufleet.store import db

    url = sqlite_url(tmp_path)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0006")
        assert "gpu_samples" not in sa.inspect(conn).get_table_names()
    engine.dispose()
    store = Store.open(url)
    try:
        store.put_gpu_samples([reading("GPU-A")], T0)
        assert len(store.gpu_history(T0, T0 + 1)) == 1
    finally:
        store.close()


@pytest.mark.postgres
def test_the_migration_builds_the_declared_history_tables_on_postgresql(
    postgres_url: str,
) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    from gpufleet.store import db
    from gpufleet.store.tables import metadata

    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert [d for d in diff if "gpu_" in repr(d)] == []


# -- the loop ---------------------------------------------------------------------------------


class Steps:
    """The loop's clock and sleep: a sleep moves the clock on and waits until the test lets
    the next tick run, so ``sleeps`` counts the ticks done."""

    def __init__(self) -> None:
        self.now = T0
        self.sleeps = 0
        self._gate = asyncio.Semaphore(0)

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1
        await self._gate.acquire()

    async def ticks(self, n: int) -> None:
        target = self.sleeps + n
        for _ in range(n):
            self._gate.release()
        await eventually(lambda: self.sleeps >= target, f"{n} ticks")


class Flaky:
    """NVML's readings, or the error of a GPU that fell off the bus while ``failing``."""

    kind = "nvml"

    def __init__(self) -> None:
        self.inner = sampler()
        self.failing = False

    async def read(self, replicas: Sequence[Replica], now: float) -> list[GpuReading]:
        if self.failing:
            raise TemporaryError("NVML: GPU is lost")
        return await self.inner.read(replicas, now)

    async def close(self) -> None:
        pass


def said(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "gpufleet.telemetry"]


async def test_the_loop_samples_records_and_says_a_failure_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    steps, source = Steps(), Flaky()
    t = Telemetry(
        source, replicas=lambda: REPLICAS, store=store, clock=steps.clock, sleep=steps.sleep
    )
    assert t.kind == "nvml" and t.latest() == []
    caplog.set_level(logging.INFO, "gpufleet.telemetry")
    await t.start()
    try:
        await eventually(lambda: steps.sleeps == 1, "the first tick")
        first = t.latest()
        assert len(first) == 7 and {r.at for r in first} == {T0}
        source.failing = True
        await steps.ticks(3)
        assert t.latest() == first  # the last readings stay, their time says how old
        source.failing = False
        await steps.ticks(2)
    finally:
        await t.close()
    assert said(caplog) == [
        (
            logging.WARNING,
            "GPU telemetry: reading GPUs failed (TemporaryError: NVML: GPU is lost); "
            "trying again every 2 s",
        ),
        (logging.INFO, "GPU telemetry: reading GPUs works again"),
    ]
    # Ticks 1, 5 and 6 were written (2 s apart: one 2-second slot each).
    written = sorted({p.at for p in store.gpu_history(T0, T0 + 60)})
    assert written == [T0, T0 + 8, T0 + 10]
    assert {p.device for p in store.gpu_history(T0, T0 + 60)} == {r.device for r in first}


class BrokenStore:
    """A store whose writes fail while ``down``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down = True
        self.writes = 0

    def put_gpu_samples(self, readings: Sequence[GpuReading], at: float) -> int:
        if self.down:
            raise StoreError("store sqlite:///x: OperationalError: disk I/O error\n[SQL: …]")
        self.writes += 1
        return self.store.put_gpu_samples(readings, at)

    def roll_gpu_samples(self, until: float) -> int:
        return self.store.roll_gpu_samples(until)

    def prune_gpu_samples(self, now: float, **keep: float) -> int:
        return self.store.prune_gpu_samples(now, **keep)


async def test_a_failing_store_is_said_once_and_the_readings_stay_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store.open(sqlite_url(tmp_path))
    broken = BrokenStore(store)
    steps = Steps()
    t = Telemetry(
        sampler(),
        replicas=lambda: REPLICAS,
        store=broken,  # type: ignore[arg-type]
        clock=steps.clock,
        sleep=steps.sleep,
    )
    caplog.set_level(logging.INFO, "gpufleet.telemetry")
    await t.start()
    try:
        await eventually(lambda: steps.sleeps == 1, "the first tick")
        await steps.ticks(2)
        assert {r.at for r in t.latest()} == {T0 + 4}  # readings go on without the store
        broken.down = False
        await steps.ticks(1)
    finally:
        await t.close()
        store.close()
    assert [level for level, _ in said(caplog)] == [logging.WARNING, logging.INFO]
    assert "OperationalError: disk I/O error" in said(caplog)[0][1]
    assert broken.writes == 1


async def test_the_loop_rolls_minutes_and_prunes_as_time_passes(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    t = Telemetry(sampler(), replicas=lambda: REPLICAS, store=store, keep_raw_s=120)
    try:
        for second in range(0, 300, 2):  # five minutes of ticks, driven at explicit times
            await t.sample_once(T0 + second)
        minutes = store.gpu_history(T0, T0 + 300, resolution=60)
        assert sorted({p.at for p in minutes}) == [T0 + m * 60 for m in range(4)]
        assert min(p.at for p in store.gpu_history(T0, T0 + 300)) >= T0 + 240 - 120
        # A tick within the slot already written adds nothing.
        await t.sample_once(T0 + 299)
        assert len(store.gpu_history(T0 + 298, T0 + 300)) == 7
    finally:
        await t.close()
        store.close()


# -- the gateway on a cluster: the leader's readings, from the store ---------------------------


class CountingStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads = 0

    def latest_gpu_samples(self, within_s: float, now: float | None = None) -> list[GpuPoint]:
        self.reads += 1
        return self.store.latest_gpu_samples(within_s, now)


async def test_a_gateway_shows_the_leaders_readings_from_the_store(store: Store) -> None:
    leader = Telemetry(sampler(node="gpu-node-a"), replicas=lambda: REPLICAS, store=store)
    await leader.sample_once(T0)
    now = [T0 + 1]
    counting = CountingStore(store)
    registry = CollectorRegistry(auto_describe=True)
    gpus = StoredReadings(
        counting,  # type: ignore[arg-type]
        registry=registry,
        refresh_s=3600,  # on the injected clock: the loop reads again only when woken
        within_s=7200,
        clock=lambda: now[0],
    )
    await gpus.start()
    try:
        await eventually(lambda: counting.reads == 1 and gpus.latest(), "the read at start")
        assert gpus.latest() == leader.latest()  # the same readings, in the same order
        assert gpus.kind == "store"
        assert scrape(registry)["gpufleet_gpus_idle"] == [({}, 3.0)]
        for _ in range(5):  # asking never queries: it answers from what was read
            gpus.latest()
        assert counting.reads == 1
        # The leader reads again; once ours are older than refresh_s, the next ask gets them
        # (their time says how old) and wakes the loop, which reads the newer ones.
        nvml = leader.source.nvml  # type: ignore[attr-defined]
        nvml.gpus[1].processes = [FakeProcess(1001, GIB)]
        await leader.sample_once(T0 + 100)
        now[0] = T0 + 1 + 3600
        assert {r.at for r in gpus.latest()} == {T0}
        fresh = await eventually(
            lambda: (g := gpus.latest()) and g[0].at == T0 + 100 and g, "the newer samples"
        )
        assert counting.reads == 2
        assert by_device(fresh)["GPU-1"].replica == "llama-g1-aaaaaa"
    finally:
        await gpus.close()
    assert "gpufleet_gpus_idle" not in scrape(registry)


# -- wiring -----------------------------------------------------------------------------------


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[GatewayStack]:
    store = Store.open(sqlite_url(tmp_path))
    plane = sites.FakePlane(Directory(), store=store, runtime=FakeRuntime())
    stack = assemble(plane, auth=False)
    try:
        yield stack
    finally:
        await stack.close()
        store.close()


async def test_gpufleet_up_samples_the_gpus_nvml_finds(stack: GatewayStack) -> None:
    from gpufleet.embedded import UpConfig, gpu_telemetry

    cfg = UpConfig(data_dir=Path("/nonexistent"), gpu_sample_s=0.5)
    store = stack.gateway.plane.store
    t = await gpu_telemetry(cfg, FakeRuntime(), store, stack, load=fleet)
    assert isinstance(t, Telemetry) and stack.app.state.telemetry is t
    assert (t.kind, t.interval_s, t.store) == ("nvml", 0.5, store)
    await t.sample_once(T0)
    metrics = scrape(stack.gateway.metrics.registry)
    assert metrics["gpufleet_gpus_idle"] == [({}, 6.0)]  # the fake runtime has no engines
    assert len(store.gpu_history(T0, T0 + 1)) == 7
    await t.close()


async def test_gpufleet_up_without_gpus_says_so_once_and_changes_nothing(
    stack: GatewayStack, caplog: pytest.LogCaptureFixture
) -> None:
    from gpufleet.embedded import UpConfig, gpu_telemetry

    before = scrape(stack.gateway.metrics.registry).keys()
    caplog.set_level(logging.INFO, "gpufleet.telemetry")
    cfg = UpConfig(data_dir=Path("/nonexistent"))
    runtime = FakeRuntime()
    assert (
        await gpu_telemetry(cfg, runtime, stack.gateway.plane.store, stack, load=lambda: None)
        is None
    )
    assert stack.app.state.telemetry is None
    assert scrape(stack.gateway.metrics.registry).keys() == before
    assert said(caplog) == [
        (logging.INFO, "no NVIDIA GPU found (NVML did not load): GPU telemetry is off")
    ]


def test_nvml_does_not_load_on_this_machine_without_a_driver() -> None:
    """This test machine has no NVIDIA driver: the real loader says no GPU, not an error."""
    if Path("/dev/nvidiactl").exists():
        pytest.skip("an NVIDIA driver is here")
    assert telemetry_api.load_nvml() is None


async def test_the_operators_leader_reads_the_dcgm_exporter_into_the_store(
    tmp_path: Path,
) -> None:
    from gpufleet.operator.process import OperatorConfig, acting
    from gpufleet.runtime.kubernetes import FakeKube
    from gpufleet.spec import parse_document

    kube = FakeKube()
    await kube.create(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": "gpu-node-a",
                "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            },
            "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "4"}},
        }
    )
    page = exporter_pages()[0]

    def engine_pods() -> list[str]:
        return sorted(
            name for (kind, ns, name) in kube.objects if kind == "Pod" and ns == "gpufleet"
        )

    async def exporter(_: Request) -> Response:
        # The exporter names the pod on GPU 0: the replica the operator started.
        pods = engine_pods()
        return PlainTextResponse(page.replace("llama-8b-g1-3f9a1c", pods[0] if pods else "-"))

    store = Store.open(sqlite_url(tmp_path))
    try:
        async with serving(Starlette(routes=[Route("/metrics", exporter)])) as url:
            cfg = OperatorConfig(
                namespace="gpufleet",
                store_url="unused",
                dcgm_url=f"{url}/metrics",
                gpu_sample_s=0.05,
            )
            async with acting(cfg, kube, store) as operator:
                model = {
                    "apiVersion": "gpufleet.io/v1alpha1",
                    "kind": "Model",
                    "metadata": {"name": "llama"},
                    "spec": {
                        "source": "hf://meta-llama/Meta-Llama-3-8B-Instruct",
                        "engine": "vllm",
                        "resources": {"gpus": 1, "gpuTypes": ["H100"], "memory": "30Gi"},
                    },
                }
                await operator.controller.apply([parse_document(model)])
                await eventually(engine_pods, "the engine pod")

                def held() -> list[GpuPoint]:
                    return [
                        p
                        for p in store.latest_gpu_samples(60)
                        if p.device == NODE_A and p.model == "llama"
                    ]

                (point,) = await eventually(held, "GPU 0 attributed to llama's replica")
                assert point.replica == engine_pods()[0]
                assert len(store.latest_gpu_samples(60)) == 4
    finally:
        store.close()


# -- the admin API ----------------------------------------------------------------------------


@pytest.fixture
async def admin_site(tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:
    """A gateway with keys (an operator's, a user's), and a GET as one of them."""
    keys: dict[str, str] = {}

    def prepare(stack: GatewayStack) -> None:
        keyring = stack.keyring
        keyring.bootstrap_admin(None)
        keyring.load()
        keys["operator"] = keyring.create_key("default", name="ops", role="operator")[0]
        keys["user"] = keyring.create_key("default", name="app", role="user")[0]
        keyring.load()

    store = Store.open(sqlite_url(tmp_path))
    plane = sites.FakePlane(Directory(), store=store, runtime=FakeRuntime())
    try:
        async with (
            sites.gateway(plane, auth=True, prepare=prepare) as served,
            aiohttp.ClientSession() as http,
        ):

            async def get(path: str, who: str = "operator") -> tuple[int, Any]:
                headers = {"authorization": f"Bearer {keys[who]}"}
                async with http.get(served.url + path, headers=headers) as r:
                    return r.status, await r.json()

            yield served, get
    finally:
        store.close()


async def test_the_admin_api_shows_the_gpus_now(admin_site: Any) -> None:
    served, get = admin_site
    status, body = await get("/admin/v1/gpus")
    assert status == 200
    assert body["source"] is None and body["gpus"] == [] and body["idle"] == 0
    assert "no GPUs" in body["note"]

    t = Telemetry(sampler(), replicas=lambda: REPLICAS)
    served.app.state.telemetry = t
    status, body = await get("/admin/v1/gpus")
    assert (status, body["source"], body["gpus"]) == (200, "nvml", [])
    assert "no GPU readings yet" in body["note"]

    await t.sample_once(T0)
    status, body = await get("/admin/v1/gpus")
    assert status == 200 and "note" not in body
    assert body["idle"] == 3
    gpus = {g["device"]: g for g in body["gpus"]}
    assert [g["device"] for g in body["gpus"]] == [r.device for r in t.latest()]
    assert gpus["GPU-0"] == {
        "node": "ws-1",
        "device": "GPU-0",
        "index": "0",
        "name": "NVIDIA H100 80GB HBM3",
        "parent": None,
        "memory_used": 70 * GIB,
        "memory_total": 80 * GIB,
        "util": 0.87,
        "sm_active": None,
        "power_w": 650.0,
        "temp_c": 61.0,
        "replica": "llama-g1-aaaaaa",
        "model": "llama",
        "at": T0,
        "idle": False,
    }
    assert {d for d, g in gpus.items() if g["idle"]} == {"GPU-1", "MIG-2-13", "GPU-4"}
    assert gpus["GPU-2"]["idle"] is False  # cut into instances: not counted
    assert (await get("/admin/v1/gpus", "user"))[0] == 403
    await t.close()


async def test_the_admin_api_serves_gpu_history_for_charts(admin_site: Any) -> None:
    served, get = admin_site
    store = served.stack.gateway.plane.store
    now = time.time()
    t = Telemetry(sampler(), replicas=lambda: REPLICAS, store=store)
    start = int(now) - 600
    for second in range(start - start % 60, int(now), 20):
        await t.sample_once(second)
    store.roll_gpu_samples(now)
    samples = len(range(start - start % 60, int(now), 20))

    status, body = await get("/admin/v1/gpus/history")  # the last hour, its 2 s samples
    assert status == 200, body
    assert body["resolution"] == 2 and body["truncated"] is False
    assert len(body["points"]) == 7 * samples
    assert set(body["points"][0]) == {f for f in GpuPoint.__dataclass_fields__}

    status, day = await get("/admin/v1/gpus/history?since=24h")  # beyond the hour: minutes
    assert status == 200 and day["resolution"] == 60
    minutes = {p["at"] for p in day["points"]}
    assert minutes and all(at % 60 == 0 for at in minutes)
    assert (await get("/admin/v1/gpus/history?since=1h&resolution=1m"))[1]["points"] == (
        day["points"]
    )

    status, one = await get("/admin/v1/gpus/history?since=30m&device=MIG-2-1")
    assert {p["device"] for p in one["points"]} == {"MIG-2-1"} and len(one["points"]) == samples
    status, chat = await get("/admin/v1/gpus/history?model=chat&resolution=2s")
    assert {p["replica"] for p in chat["points"]} == {"chat-g1-dddddd"}
    status, node = await get("/admin/v1/gpus/history?node=elsewhere")
    assert node["points"] == []

    for query, param in (
        ("resolution=5m", "resolution"),
        ("since=yesterday-ish", "since"),
        ("since=1h&until=2h", "since"),
    ):
        status, error = await get(f"/admin/v1/gpus/history?{query}")
        assert status == 400 and error["error"]["param"] == param, query
    assert (await get("/admin/v1/gpus/history", "user"))[0] == 403
    await t.close()


def test_the_telemetry_package_exports_what_it_names() -> None:
    assert telemetry_api.__all__
    assert [n for n in telemetry_api.__all__ if not hasattr(telemetry_api, n)] == []
