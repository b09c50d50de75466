"""Start-up read off a pod's status as the real API server keeps it: the kubelet's part (played
here) writes the weights' init container, the engine container's start and the Ready condition
through the status subresource, with times relative to the creation time the server stamped;
the runtime gives the replica those figures, to the second."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from gpufleet.runtime import Phase, ReplicaRequest
from gpufleet.runtime.kubernetes import KubernetesRuntime, RenderSettings
from gpufleet.runtime.kubernetes.client import ClientKube
from gpufleet.spec import load_text
from tests.kube.conftest import Nodes
from tests.kube.kubelet import Kubelet


async def eventually(check: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def at(base: dt.datetime, seconds: int) -> str:
    return (base + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_a_pods_start_up_comes_from_its_status_on_the_real_api_server(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
    kubectl: Callable[..., Any],
) -> None:
    await nodes.add("gpu-1", gpus=8)

    async def default_account() -> bool:
        # Pods of a fresh namespace are refused until the controller-manager has made it.
        done = await asyncio.to_thread(
            kubectl, "get", "serviceaccount", "default", "-n", namespace, check=False
        )
        return bool(done.returncode == 0)

    deadline = time.monotonic() + 60
    while not await default_account():
        assert time.monotonic() < deadline, "no default service account within 60 s"
        await asyncio.sleep(0.1)
    kubelet.policy = lambda pod: "pending"  # this test writes the pod's status itself
    (model,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: llama}\n"
        "spec: {source: 'hf://meta-llama/Meta-Llama-3-8B-Instruct', engine: vllm, "
        "resources: {gpus: 1, gpuTypes: [H100]}}\n"
    )
    runtime = KubernetesRuntime(kube, RenderSettings(namespace=namespace))
    await runtime.start_watching()
    try:
        replica = await runtime.start(ReplicaRequest("llama", 1, model.spec))
        pod = await kube.get("Pod", namespace, replica.id)
        assert pod is not None
        created = dt.datetime.fromisoformat(
            pod["metadata"]["creationTimestamp"].replace("Z", "+00:00")
        )
        init = {
            "name": "wait-for-weights",
            "image": pod["spec"]["initContainers"][0]["image"],
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "state": {
                "terminated": {
                    "exitCode": 0,
                    "reason": "Completed",
                    "startedAt": at(created, 2),
                    "finishedAt": at(created, 9),
                }
            },
        }
        engine = {
            "name": "engine",
            "image": pod["spec"]["containers"][0]["image"],
            "imageID": "",
            "restartCount": 0,
            "state": {"running": {"startedAt": at(created, 10)}},
        }
        loading = {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": at(created, 1)},
                {"type": "Initialized", "status": "True", "lastTransitionTime": at(created, 9)},
                {"type": "Ready", "status": "False", "lastTransitionTime": at(created, 1)},
            ],
            "initContainerStatuses": [init],
            "containerStatuses": [engine | {"ready": False}],
        }
        await kube.patch_status("Pod", namespace, replica.id, loading)
        await eventually(lambda: runtime.replicas()[0].fetch_s == 7.0, "the fetch's figure")
        assert runtime.replicas()[0].load_s is None
        ready = loading | {
            "conditions": [
                *loading["conditions"][:2],
                {
                    "type": "ContainersReady",
                    "status": "True",
                    "lastTransitionTime": at(created, 75),
                },
                {"type": "Ready", "status": "True", "lastTransitionTime": at(created, 75)},
            ],
            "containerStatuses": [engine | {"ready": True}],
        }
        await kube.patch_status("Pod", namespace, replica.id, ready)
        await eventually(lambda: runtime.replicas()[0].phase is Phase.READY, "ready")
        (seen,) = runtime.replicas()
        assert (seen.fetch_s, seen.load_s, seen.ready_s, seen.startup_s) == (7.0, 65.0, None, 75.0)
        assert seen.ready_at == (created + dt.timedelta(seconds=75)).timestamp()
    finally:
        await runtime.close()
