"""A model bigger than a node on the real API server: planned tensor parallel within a node ×
pipeline parallel across nodes, run as a LeaderWorkerSet pinned where the planner put it.

No LeaderWorkerSet controller runs on the test control plane: ``LwsController`` plays it (a
group's pods from the leader and worker templates, with the labels the real one sets), and the
kubelet's part for those pods (Ready, the leader and the workers at different IPs, so a test
can tell whose address a Model publishes). The real scheduler binds them — so the pinning and
the anti-affinity the runtime writes are what decides where they land.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import yaml

from gpufleet.runtime.kubernetes import KubernetesRuntime
from gpufleet.runtime.kubernetes.client import ClientKube
from gpufleet.runtime.kubernetes.loader import loader_name
from gpufleet.runtime.kubernetes.runtime import LABEL_PLACEMENT
from gpufleet.spec import load_text
from tests.kube.chart import lws_crd
from tests.kube.conftest import Nodes
from tests.kube.kubelet import Kubelet
from tests.kube.test_operator import apply, condition, engine_pods, model, operating, pass_until

log = logging.getLogger("tests.lws")

LWS_NAME = "leaderworkerset.sigs.k8s.io/name"
LWS_GROUP = "leaderworkerset.sigs.k8s.io/group-index"
LWS_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_KEY = "leaderworkerset.sigs.k8s.io/group-key"
LEADER_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
#: 16 GPUs: more than one 8-GPU node, exactly two of them.
BIG = {
    "source": "hf://meta-llama/Llama-3.1-405B-Instruct",
    "resources": {"gpus": 16, "gpuTypes": ["H100"], "memory": "40Gi"},
}


class LwsController:
    """What the LeaderWorkerSet controller does with each group of a LeaderWorkerSet: the
    leader pod ``<name>-<group>`` from ``leaderTemplate``, workers ``<name>-<group>-<i>`` from
    ``workerTemplate`` (owned by the LeaderWorkerSet, so they go with it), labelled name,
    group-index, worker-index and group-key; and, once bound, the kubelet's Ready."""

    def __init__(self, kube: ClientKube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self.leader = Kubelet(kube, namespace)
        self.leader.ip = LEADER_IP
        self.worker = Kubelet(kube, namespace)
        self.worker.ip = WORKER_IP

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the CRD going at the test's end, a conflict: again
                log.info("lws controller: %s", exc)
            await asyncio.sleep(0.1)

    async def step(self) -> None:
        pods = {p["metadata"]["name"]: p for p in await self.kube.list("Pod", self.namespace)}
        for lws in await self.kube.list("LeaderWorkerSet", self.namespace):
            if lws["metadata"].get("deletionTimestamp"):
                continue
            for pod in self.group_pods(lws):
                have = pods.get(pod["metadata"]["name"])
                if have is None:
                    with contextlib.suppress(FileExistsError):
                        await self.kube.create(pod)
                elif have["spec"].get("nodeName") and have["status"].get("phase") != "Running":
                    leader = have["metadata"]["labels"][LWS_INDEX] == "0"
                    await (self.leader if leader else self.worker).settle(have)

    def group_pods(self, lws: dict[str, Any]) -> list[dict[str, Any]]:
        name = lws["metadata"]["name"]
        template = lws["spec"]["leaderWorkerTemplate"]
        size = int(template.get("size", 1))
        owner = {
            "apiVersion": lws["apiVersion"],
            "kind": "LeaderWorkerSet",
            "name": name,
            "uid": lws["metadata"]["uid"],
            "controller": True,
        }
        pods = []
        for group in range(int(lws["spec"].get("replicas", 1))):
            leader = f"{name}-{group}"
            key = hashlib.sha1(f"{self.namespace}/{leader}".encode()).hexdigest()
            for index in range(size):
                role = "leaderTemplate" if index == 0 else "workerTemplate"
                spec = copy.deepcopy(template[role]["spec"])
                env = [
                    {"name": "LWS_LEADER_ADDRESS", "value": f"{leader}.{name}.{self.namespace}"},
                    {"name": "LWS_GROUP_SIZE", "value": str(size)},
                    {"name": "LWS_WORKER_INDEX", "value": str(index)},
                ]
                for container in spec["containers"]:
                    container["env"] = [*container.get("env", []), *env]
                labels = {
                    **(template[role].get("metadata", {}).get("labels") or {}),
                    LWS_NAME: name,
                    LWS_GROUP: str(group),
                    LWS_INDEX: str(index),
                    LWS_KEY: key,
                }
                pods.append(
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {
                            "name": leader if index == 0 else f"{leader}-{index}",
                            "namespace": self.namespace,
                            "labels": labels,
                            "ownerReferences": [owner],
                        },
                        "spec": spec,
                    }
                )
        return pods


@contextlib.asynccontextmanager
async def lws_controller(kube: ClientKube, namespace: str) -> AsyncIterator[LwsController]:
    player = LwsController(kube, namespace)
    task = asyncio.create_task(player.run(), name="test:lws-controller")
    try:
        yield player
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _lws_pod(pod: dict[str, Any]) -> bool:
    return LWS_NAME in (pod["metadata"].get("labels") or {})


async def test_a_model_bigger_than_a_node_runs_tp_within_and_pp_across_two_nodes(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
    kubectl: Callable[..., Any],
    tmp_path: Path,
) -> None:
    node_a, node_b = f"{namespace}-gpu-a", f"{namespace}-gpu-b"
    await nodes.add(node_a, gpus=8)
    await nodes.add(node_b, gpus=8)
    # The group's pods are the LWS controller's (and their kubelet's, at their own IPs).
    kubelet.policy = lambda pod: "pending" if _lws_pod(pod) else "ready"
    with lws_crd(kubectl):
        apply(kubectl, namespace, model("big", replicas={"min": 1, "max": 1}, **BIG))
        async with lws_controller(kube, namespace), operating(kube, namespace, tmp_path) as op:

            async def ready() -> Any:
                obj = await kube.get("Model", namespace, "big")
                return obj if (obj or {}).get("status", {}).get("readyReplicas") == 1 else None

            obj = await pass_until(op, ready)
            assert condition(obj, "Ready")["status"] == "True"
            # Served by the leader alone: its address, not a worker's.
            assert obj["status"]["endpoints"] == [f"http://{LEADER_IP}:8000"]
            (lws,) = await kube.list("LeaderWorkerSet", namespace)
            name = lws["metadata"]["name"]
            template = lws["spec"]["leaderWorkerTemplate"]
            assert (lws["spec"]["replicas"], template["size"]) == (1, 2)
            leader = template["leaderTemplate"]["spec"]["containers"][0]
            script = leader["command"][2]
            assert "--tensor-parallel-size 8" in script and "--pipeline-parallel-size 2" in script
            assert leader["resources"]["limits"] == {"nvidia.com/gpu": 8}
            worker = template["workerTemplate"]["spec"]["containers"][0]
            assert worker["resources"]["limits"] == {"nvidia.com/gpu": 8}
            # The planner's placement is kept on the LeaderWorkerSet, and the runtime knows it.
            placement = json.loads(lws["metadata"]["annotations"][LABEL_PLACEMENT])
            assert {placement["node"], *(n for n, _ in placement["workers"])} == {node_a, node_b}
            runtime = op.controller.runtime
            assert isinstance(runtime, KubernetesRuntime)
            assert runtime.placements()[name] == lws["metadata"]["annotations"][LABEL_PLACEMENT]
            # Bound by the real scheduler where the plan says: the leader on its node, the
            # worker on the other.
            pods = {
                p["metadata"]["labels"][LWS_INDEX]: p for p in await engine_pods(kube, namespace)
            }
            assert sorted(pods) == ["0", "1"]
            assert pods["0"]["spec"]["nodeName"] == placement["node"]
            assert pods["1"]["spec"]["nodeName"] == placement["workers"][0][0]

            # A second one, first by name (the planner's order) but no two nodes are free:
            # Unschedulable with the planner's reason, nothing made for it; the first runs on.
            apply(kubectl, namespace, model("arctic", replicas={"min": 1, "max": 1}, **BIG))

            async def refused() -> Any:
                other = await kube.get("Model", namespace, "arctic")
                conditions = {
                    c["type"]: c for c in (other or {}).get("status", {}).get("conditions", [])
                }
                return (
                    other if conditions.get("Unschedulable", {}).get("status") == "True" else None
                )

            other = await pass_until(op, refused)
            ready_c = condition(other, "Ready")
            assert (ready_c["status"], ready_c["reason"]) == ("False", "Unschedulable")
            reason = condition(other, "Unschedulable")["message"]
            assert "TP 8 × PP 2 needs 2 nodes with 8 free H100 each" in reason, reason
            for _ in range(3):
                await op.sync()
            assert [
                g["metadata"]["uid"] for g in await kube.list("LeaderWorkerSet", namespace)
            ] == [lws["metadata"]["uid"]]
            first = await kube.get("Model", namespace, "big")
            assert first is not None and first["status"]["readyReplicas"] == 1
            assert {
                p["metadata"]["labels"]["gpufleet.io/model"]
                for p in await engine_pods(kube, namespace)
            } == {"big"}

        # A new operator (a restart, a new leader) adopts the group with its placement: it
        # creates nothing, and the second model stays out.
        async with lws_controller(kube, namespace), operating(kube, namespace, tmp_path) as op:
            runtime = op.controller.runtime
            assert isinstance(runtime, KubernetesRuntime)
            assert json.loads(runtime.placements()[name]) == placement

            async def still_refused() -> Any:
                return (await refused()) and (await ready())

            await pass_until(op, still_refused)
            for _ in range(3):
                await op.sync()
            (again,) = await kube.list("LeaderWorkerSet", namespace)
            assert again["metadata"]["uid"] == lws["metadata"]["uid"]
            assert again["metadata"]["resourceVersion"] == lws["metadata"]["resourceVersion"]
            assert len(await engine_pods(kube, namespace)) == 2


async def test_without_the_lws_crd_a_multi_node_model_says_so_and_nothing_is_made(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
    kubectl: Callable[..., Any],
    tmp_path: Path,
) -> None:
    assert not await kube.served("LeaderWorkerSet"), "another test left the LWS CRD installed"
    await nodes.add(f"{namespace}-gpu-a", gpus=8)
    await nodes.add(f"{namespace}-gpu-b", gpus=8)
    apply(
        kubectl,
        namespace,
        model("big", replicas={"min": 1, "max": 1}, **BIG),
        model("small", replicas={"min": 1, "max": 1}),
    )
    async with operating(kube, namespace, tmp_path) as op:

        async def reported() -> Any:
            obj = await kube.get("Model", namespace, "big")
            conditions = {c["type"]: c for c in (obj or {}).get("status", {}).get("conditions", [])}
            degraded = conditions.get("Degraded", {})
            return (
                obj if "LeaderWorkerSet is not installed" in degraded.get("message", "") else None
            )

        obj = await pass_until(op, reported)
        ready = condition(obj, "Ready")
        assert ready["status"] == "False" and "LeaderWorkerSet is not installed" in ready["message"]
        assert (
            "kubectl apply --server-side -f https://github.com/kubernetes-sigs/lws"
            in (ready["message"])
        )
        assert condition(obj, "Degraded")["status"] == "True"
        assert condition(obj, "Unschedulable")["status"] == "False"  # there is room: it is LWS

        # The operator goes on: the rest runs, and nothing is made for the big one.
        async def small_ready() -> Any:
            small = await kube.get("Model", namespace, "small")
            return (small or {}).get("status", {}).get("readyReplicas") == 1

        await pass_until(op, small_ready)
        for _ in range(3):
            await op.sync()
        assert await kube.list("Pod", namespace, {"gpufleet.io/model": "big"}) == []
        (small,) = load_text(yaml.safe_dump(model("small")))
        jobs = [j["metadata"]["name"] for j in await kube.list("Job", namespace)]
        assert jobs == [loader_name(small)]  # the small one's weights only
