"""``KubernetesRuntime`` and the gateway's view (``ClusterPlane``) against the real API server:
they start without the LeaderWorkerSet CRD and refuse only a multi-node replica, saying how to
install it; a terminating pod — still Ready, as it is until its kubelet stops it — is out of
routing as soon as its deletionTimestamp is set; logs are asked of the pods/log API; a Ready
pod of a ``routing.prefixIndex: precise`` model gives its KV-event endpoints at its pod IP."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpufleet.cluster import ClusterPlane
from gpufleet.runtime import Phase, Replica, ReplicaRequest
from gpufleet.runtime.kubernetes import KubernetesRuntime, RenderSettings
from gpufleet.runtime.kubernetes.api import KubeError, NotServed
from gpufleet.runtime.kubernetes.client import ClientKube
from gpufleet.runtime.kubernetes.common import KV_EVENTS_PORT, KV_REPLAY_PORT
from gpufleet.spec import load_text
from gpufleet.store import Store, sqlite_url
from tests.kube.chart import lws_crd
from tests.kube.conftest import Nodes
from tests.kube.kubelet import Kubelet


def spec(gpus: int, name: str = "llama") -> Any:
    (m,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {name}}}\n"
        "spec: {source: 'hf://meta-llama/Meta-Llama-3-8B-Instruct', engine: vllm, "
        f"resources: {{gpus: {gpus}, gpuTypes: [H100]}}, replicas: {{min: 1, max: 1}}}}\n"
    )
    return m


async def eventually(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


async def test_without_the_leader_worker_set_crd_only_multi_node_replicas_are_refused(
    kube: ClientKube, kubectl: Any, namespace: str
) -> None:
    runtime = KubernetesRuntime(kube, RenderSettings(namespace=namespace))
    await runtime.start_watching()  # no crash on the server's "404 page not found"
    try:
        assert runtime.lws_served is False
        big = spec(16, "big")
        with pytest.raises(NotServed) as refused:
            await runtime.start(ReplicaRequest("big", 1, big.spec))
        message = str(refused.value)
        assert "LeaderWorkerSet is not installed" in message and "16 GPUs" in message
        assert "kubectl apply --server-side -f https://github.com/kubernetes-sigs/lws" in message
        assert await kube.list("Job", namespace) == []  # nothing made for a replica refused
        with lws_crd(kubectl):  # installed later: the next start finds it
            replica = await runtime.start(ReplicaRequest("big", 1, big.spec))
            assert runtime.lws_served
            (group,) = await kube.list("LeaderWorkerSet", namespace)
            assert group["metadata"]["name"] == replica.id
            await runtime.stop(replica.id)
    finally:
        await runtime.close()


async def test_a_terminating_pod_is_out_of_routing_at_once(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
    tmp_path: Path,
) -> None:
    await nodes.add("gpu-1", gpus=8)
    settings = RenderSettings(namespace=namespace)
    operator = KubernetesRuntime(kube, settings)
    await operator.start_watching()
    store = Store.open(sqlite_url(tmp_path))
    gateway = ClusterPlane(kube, store, namespace, gateway_id="gw-test")
    try:
        llama = spec(1)
        await kube.create(
            {
                "apiVersion": "gpufleet.io/v1alpha1",
                "kind": "Model",
                "metadata": {"name": "llama", "namespace": namespace},
                "spec": {
                    "source": "hf://meta-llama/Meta-Llama-3-8B-Instruct",
                    "engine": "vllm",
                    "resources": {"gpus": 1, "gpuTypes": ["H100"]},
                },
            }
        )
        await gateway.start()
        replica = await operator.start(ReplicaRequest("llama", 1, llama.spec))

        def routable() -> list[str]:
            entry = gateway.directory.get("llama")
            return [r.id for r in entry.endpoints] if entry is not None else []

        await eventually(lambda: routable() == [replica.id], "the gateway routes to the pod")
        await eventually(
            lambda: [r.phase for r in operator.replicas()] == [Phase.READY], "the pod is ready"
        )
        kubelet.finish_deletions = False  # the pod stays terminating, and Ready
        await kube.delete("Pod", namespace, replica.id)  # default grace: 30 s
        terminating = await kube.get("Pod", namespace, replica.id)
        assert terminating is not None and terminating["metadata"].get("deletionTimestamp")
        assert any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in terminating["status"]["conditions"]
        )
        await eventually(lambda: routable() == [], "the gateway stops routing to it")
        (seen,) = operator.replicas()
        await eventually(
            lambda: operator.replicas()[0].phase is Phase.STOPPING, "the runtime says Stopping"
        )
        assert operator.replicas()[0].url is None and seen.id == replica.id
        assert gateway.unhealthy() == [] and operator.unhealthy() == []
        kubelet.finish_deletions = True
        await kube.delete("Pod", namespace, replica.id, grace_s=0)
        await eventually(lambda: operator.replicas() == [], "the deleted pod is forgotten")
    finally:
        await gateway.close()
        await operator.close()
        store.close()


async def test_logs_are_asked_of_the_pods_log_api_and_their_absence_is_an_error(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
) -> None:
    """The real API server proxies pods/log to the pod's kubelet; there is none here, so the
    answer is an error — reported as such, never as made-up text."""
    await nodes.add("gpu-1", gpus=8)
    runtime = KubernetesRuntime(kube, RenderSettings(namespace=namespace))
    await runtime.start_watching()
    try:
        replica = await runtime.start(ReplicaRequest("llama", 1, spec(1).spec))
        await eventually(
            lambda: [r.phase for r in runtime.replicas()] == [Phase.READY], "the pod is ready"
        )
        with pytest.raises(KubeError) as failed:
            await runtime.logs(replica.id, tail=20)
        message = str(failed.value)
        assert f"logs of pod {replica.id}" in message and "HTTP" in message
        assert "kubectl logs" not in message
    finally:
        await runtime.close()


def ready_in(runtime: KubernetesRuntime) -> list[Replica]:
    return [r for r in runtime.replicas() if r.phase is Phase.READY]


async def test_a_ready_pod_of_a_precise_model_gives_its_event_endpoints_at_its_pod_ip(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
) -> None:
    """The pod the API server admits (under Pod Security ``restricted``) keeps the named event
    ports; once the kubelet reports it Ready at its IP, the operator's runtime — and a view that
    knows no spec, as the gateway's — give the endpoints the gateway subscribes to there."""
    await nodes.add("gpu-1", gpus=8)
    kubelet.ip = "10.244.3.7"
    (precise,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: precise}\n"
        "spec: {source: 'hf://meta-llama/Meta-Llama-3-8B-Instruct', engine: vllm, "
        "resources: {gpus: 1, gpuTypes: [H100]}, routing: {prefixIndex: precise}}\n"
    )
    operator = KubernetesRuntime(kube, RenderSettings(namespace=namespace))
    await operator.start_watching()
    gateway = KubernetesRuntime(kube, RenderSettings(namespace=namespace), engine_key="k")
    try:
        replica = await operator.start(ReplicaRequest("precise", 1, precise.spec))
        pod = await kube.get("Pod", namespace, replica.id)
        assert pod is not None
        named = {p["name"]: p for p in pod["spec"]["containers"][0]["ports"]}
        assert named["kv-events"] == {
            "name": "kv-events", "containerPort": KV_EVENTS_PORT, "protocol": "TCP"
        }  # fmt: skip
        assert named["kv-replay"]["containerPort"] == KV_REPLAY_PORT
        expected = (
            "http://10.244.3.7:8000",
            f"tcp://10.244.3.7:{KV_EVENTS_PORT}",
            f"tcp://10.244.3.7:{KV_REPLAY_PORT}",
        )
        await gateway.start_watching()
        for view in (operator, gateway):
            (replica,) = await eventually(functools.partial(ready_in, view), "the pod is ready")
            assert (replica.url, replica.kv_events, replica.kv_replay) == expected
    finally:
        await gateway.close()
        await operator.close()
