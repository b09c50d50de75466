"""A disaggregated model on the real API server: the operator runs its prefill and decode pools
as pods of their own, labelled with their role, with each pool's resources, engine arguments
and RDMA device, bound by the real scheduler to nodes that have them; the gateway's view sorts
them into decode endpoints and prefill endpoints; a restarted operator adopts both pools with
their roles and creates nothing; ``gpufleet render`` emits both pools, accepted server-side
(Pod Security ``restricted`` included), each bound where the planner put it."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gpufleet.cluster import ClusterPlane
from gpufleet.runtime.kubernetes.client import ClientKube
from gpufleet.store import Store, sqlite_url
from tests.kube.conftest import Nodes
from tests.kube.kubelet import Kubelet
from tests.kube.test_operator import apply as apply_models
from tests.kube.test_operator import engine_pods, eventually, model, operating, pass_until
from tests.kube.test_render import (
    DATA,
    a_volume_for_the_cache,
    cleanup,  # noqa: F401 - a fixture, used by name
    scene,
    wait_for,
)
from tests.kube.test_render import apply as apply_rendered
from tests.kube.test_render import engine_pods as rendered_pods
from tests.kube.test_render import render as render_command

ROLE = "gpufleet.io/role"
RDMA = "rdma/rdma_shared_device_a"


async def with_rdma(kube: ClientKube, node: str, devices: int = 64) -> None:
    """What the Network Operator's RDMA shared device plugin reports on a node: its resource
    beside the GPUs (a pod asking for it is placed only where it is)."""
    extra = {RDMA: str(devices)}
    await kube.patch_status("Node", "", node, {"capacity": extra, "allocatable": extra})


def argv(pod: dict[str, Any]) -> list[str]:
    container = pod["spec"]["containers"][0]
    return [*container.get("command", []), *container.get("args", [])]


async def test_the_operator_runs_each_pool_as_labelled_pods_and_a_restart_keeps_their_roles(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
    kubectl: Callable[..., Any],
    tmp_path: Path,
) -> None:
    node = f"{namespace}-gpu-a"
    await nodes.add(node, gpus=4)
    await nodes.add(f"{namespace}-no-rdma", gpus=4)  # GPUs, but no RDMA device
    await with_rdma(kube, node)
    pd = model(
        "llama",
        replicas={"min": 1, "max": 2},
        disaggregation={
            "prefill": {
                "replicas": 1,
                "resources": {"gpus": 2, "gpuTypes": ["H100"], "memory": "20Gi"},
                "engineArgs": ["--max-num-batched-tokens", "16384"],
                "rdma": RDMA,
            },
            "decode": {"rdma": RDMA},
        },
    )
    apply_models(kubectl, namespace, pd)
    (tmp_path / "gateway").mkdir()
    store = Store.open(sqlite_url(tmp_path / "gateway"))
    gateway = ClusterPlane(kube, store, namespace, gateway_id="gw-test")
    try:
        async with operating(kube, namespace, tmp_path) as operator:

            async def both_pools_ready() -> Any:
                obj = await kube.get("Model", namespace, "llama")
                pods = await engine_pods(kube, namespace)
                ready = (obj or {}).get("status", {}).get("readyReplicas") == 1
                return pods if ready and len(pods) == 2 else None

            await pass_until(operator, both_pools_ready)

            async def running() -> Any:
                pods = await engine_pods(kube, namespace)
                phases = [p.get("status", {}).get("phase") for p in pods]
                return pods if phases == ["Running", "Running"] else None

            pods = await eventually(running)
            by_role = {p["metadata"]["labels"][ROLE]: p for p in pods}
            assert sorted(by_role) == ["decode", "prefill"]
            prefill, decode = by_role["prefill"], by_role["decode"]
            assert prefill["metadata"]["name"].startswith("llama-prefill-g1-")
            assert "-prefill-" not in decode["metadata"]["name"]
            # Each pool its resources: bound by the real scheduler to the node with the RDMA
            # device, never to the one without.
            for pod in pods:
                assert pod["spec"]["nodeName"] == node
                resources = pod["spec"]["containers"][0]["resources"]
                assert str(resources["requests"][RDMA]) == str(resources["limits"][RDMA]) == "1"
            gpus = {
                role: str(p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                for role, p in by_role.items()
            }
            assert gpus == {"prefill": "2", "decode": "1"}
            # ... and its engine arguments: both vLLM's KV connector, the pool's own after the
            # model's.
            for pod in pods:
                args = argv(pod)
                config = json.loads(args[args.index("--kv-transfer-config") + 1])
                assert config == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
                # NIXL's side channel on the pod's own IP, as the API server stored it.
                env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
                side_channel = env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]
                assert side_channel["fieldPath"] == "status.podIP"
            assert argv(prefill)[-2:] == ["--max-num-batched-tokens", "16384"]
            assert "--max-num-batched-tokens" not in argv(decode)
            assert argv(prefill)[argv(prefill).index("--tensor-parallel-size") + 1] == "2"
            # The Model's scale status and the Service are the decode pool's.
            obj = await kube.get("Model", namespace, "llama")
            assert obj is not None
            assert obj["status"]["replicas"] == 1
            assert obj["status"]["selector"] == "gpufleet.io/model=llama,gpufleet.io/role=decode"
            service = await kube.get("Service", namespace, "engine-llama")
            assert service is not None
            assert service["spec"]["selector"] == {"gpufleet.io/model": "llama", ROLE: "decode"}
            # The gateway's view, read from the pods: decode endpoints, prefill endpoints.
            await gateway.start()

            def sorted_by_gateway() -> Any:
                entry = gateway.directory.get("llama")
                if entry is None or not entry.endpoints or not entry.prefill_endpoints:
                    return None
                return entry

            entry = await eventually(_sync(sorted_by_gateway))
            assert [r.id for r in entry.endpoints] == [decode["metadata"]["name"]]
            assert [r.id for r in entry.prefill_endpoints] == [prefill["metadata"]["name"]]
            assert {r.role for r in entry.replicas} == {"prefill", "decode"}
        names = sorted(p["metadata"]["name"] for p in pods)
        # A restarted operator adopts both pools with their roles: no pod made or removed.
        async with operating(kube, namespace, tmp_path) as operator:

            async def adopted() -> Any:
                roles = {r.id: r.role for r in operator.controller.runtime.replicas("llama")}
                return roles if len(roles) == 2 else None

            roles = await pass_until(operator, adopted)
            assert roles == {p["metadata"]["name"]: p["metadata"]["labels"][ROLE] for p in pods}
            for _ in range(3):
                await operator.sync()
            assert sorted(p["metadata"]["name"] for p in await engine_pods(kube, namespace)) == (
                names
            )
            entry = operator.controller.directory.get("llama")
            assert entry is not None
            assert [r.id for r in entry.prefill_endpoints] == [prefill["metadata"]["name"]]
    finally:
        await gateway.close()
        store.close()


def _sync(check: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def probe() -> Any:
        return check()

    return probe


@pytest.mark.usefixtures("cleanup")
async def test_render_emits_both_pools_and_each_lands_where_the_planner_put_it(
    kubectl: Callable[..., Any], namespace: str, nodes: Nodes, kube: ClientKube
) -> None:
    """tests/data/k8s/disaggregated.yaml on its inventory: the prefill pool on the H100 node,
    the decode pool on the H200 node, as GPU Feature Discovery and the device plugins (the
    NVIDIA GPU Operator's and the Network Operator's) would show them."""
    docs = render_command(
        "-f", str(DATA / "disaggregated.yaml"),
        "--inventory", str(DATA / "disaggregated-inventory.yaml"),
        "--namespace", namespace,
    )  # fmt: skip
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert sorted(deployments) == ["engine-llama-pd", "engine-llama-pd-prefill"]
    for name, gpus, product in (
        ("h100-1", 4, "NVIDIA-H100-80GB-HBM3"),
        ("h200-1", 4, "NVIDIA-H200"),
    ):
        await nodes.add(name, gpus=gpus, product=product)
        await with_rdma(kube, name)
    a_volume_for_the_cache(kubectl, f"cache-{namespace}")
    apply_rendered(kubectl, docs)  # server-side, no warning; restricted Pod Security
    wanted = sum(d["spec"]["replicas"] for d in deployments.values())
    assert wanted == 3

    def bound() -> list[dict[str, Any]]:
        pods = rendered_pods(kubectl, namespace)
        ok = len(pods) == wanted and all(p["spec"].get("nodeName") for p in pods)
        return pods if ok else []

    pods = wait_for(f"{wanted} engine pods bound", bound, explain=lambda: scene(kubectl, namespace))
    where = sorted((p["metadata"]["labels"][ROLE], p["spec"]["nodeName"]) for p in pods)
    assert where == [("decode", "h200-1"), ("decode", "h200-1"), ("prefill", "h100-1")]
    for pod in pods:
        assert "--kv-transfer-config" in pod["spec"]["containers"][0]["args"]
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["selector"] == {"gpufleet.io/model": "llama-pd", ROLE: "decode"}
