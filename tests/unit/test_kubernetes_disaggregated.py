"""A disaggregated model on Kubernetes: its prefill and decode pools as pods of their own.

``render`` emits both pools (each valid against the Kubernetes schemas, each with its pool's
resources, engine arguments, role label and RDMA device), placed by the planner on the GPUs
that suit its phase; the pod runtime starts a pool's replicas with the same pod spec, labelled
with their role, and a restarted runtime reads the role back from the label; the operator plans
a prefill replica as its pool, counts the decode pool in a Model's scale status and keeps the
Service's selector exactly as written. The real API server's side: tests/kube/test_disaggregated.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from gpufleet.cli.sizing import size_pools_here
from gpufleet.controller import Autoscaler, Controller, Directory, ModelEntry
from gpufleet.errors import PermanentError
from gpufleet.hardware import load_inventory
from gpufleet.operator.objects import ensure
from gpufleet.operator.placement import ClusterPlacer, running_placements
from gpufleet.operator.status import model_status
from gpufleet.runtime import Phase, Replica, ReplicaRequest
from gpufleet.runtime.kubernetes import (
    FakeKube,
    KubernetesRuntime,
    RenderError,
    RenderSettings,
    inventory_from_nodes,
    render,
)
from gpufleet.runtime.kubernetes.checks import check
from gpufleet.spec import Model, load_file_resources, load_text
from gpufleet.store import Store, sqlite_url
from tests.conftest import eventually, passes

KUBERNETES = "1.34.0"
DATA = Path(__file__).parents[1] / "data" / "k8s"
NS = "gpufleet"
ROLE = "gpufleet.io/role"
RDMA = "rdma/rdma_shared_device_a"
SIDE_CHANNEL = {
    "name": "VLLM_NIXL_SIDE_CHANNEL_HOST",
    "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
}


def pd_model(**prefill: Any) -> Model:
    """tests/data/k8s/disaggregated.yaml, its prefill pool changed as ``prefill`` says."""
    (model,), _ = load_file_resources(DATA / "disaggregated.yaml")
    if not prefill:
        return model
    assert model.spec.disaggregation is not None
    pool = model.spec.disaggregation.prefill.model_copy(update=prefill)
    disaggregation = model.spec.disaggregation.model_copy(update={"prefill": pool})
    return model.model_copy(
        update={"spec": model.spec.model_copy(update={"disaggregation": disaggregation})}
    )


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def engine(workload: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = workload["spec"]["template"]["spec"]["containers"][0]
    return container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def kv_transfer(args: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(args[args.index("--kv-transfer-config") + 1])
    return config


# -- render -----------------------------------------------------------------------------------


def test_a_disaggregated_model_renders_as_two_pools_of_its_own() -> None:
    objects = render([pd_model()])
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    deployments = by_kind(objects, "Deployment")
    assert sorted(deployments) == ["engine-llama-pd", "engine-llama-pd-prefill"]
    decode, prefill = deployments["engine-llama-pd"], deployments["engine-llama-pd-prefill"]
    # Each pool its count and role, on the pods and on the workload.
    assert (decode["spec"]["replicas"], prefill["spec"]["replicas"]) == (2, 1)
    for workload, role in ((decode, "decode"), (prefill, "prefill")):
        assert workload["metadata"]["labels"][ROLE] == role
        assert workload["spec"]["template"]["metadata"]["labels"][ROLE] == role
    # Selectors apart: neither Deployment's ReplicaSets claim the other's pods.
    for one, other in ((decode, prefill), (prefill, decode)):
        selector = one["spec"]["selector"]["matchLabels"]
        assert selects(selector, one["spec"]["template"]["metadata"]["labels"])
        assert not selects(selector, other["spec"]["template"]["metadata"]["labels"])
    # Each pool its resources and engine arguments: the model's followed by the pool's; both
    # vLLM's KV connector, both sides of a transfer (the gateway's calls pick the side).
    decode_args, prefill_args = engine(decode)["args"], engine(prefill)["args"]
    assert engine(decode)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert engine(prefill)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert prefill_args[prefill_args.index("--tensor-parallel-size") + 1] == "2"
    assert "--tensor-parallel-size" not in decode_args
    assert prefill_args[-4:] == ["--max-num-seqs", "128", "--max-num-batched-tokens", "16384"]
    assert decode_args[-2:] == ["--max-num-seqs", "128"]
    for args in (decode_args, prefill_args):
        assert kv_transfer(args) == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
    # NIXL's side channel on the pod's IP: vLLM's default (localhost) reaches no other pod.
    for workload in (decode, prefill):
        assert SIDE_CHANNEL in engine(workload)["env"]
    # The RDMA device each pool asks for, requested and limited alike (an extended resource).
    for workload in (decode, prefill):
        resources = engine(workload)["resources"]
        assert resources["requests"][RDMA] == resources["limits"][RDMA] == 1
    # The Service reaches the decode pool; one budget covers both pools' pods.
    (service,) = by_kind(objects, "Service").values()
    assert service["spec"]["selector"] == {"gpufleet.io/model": "llama-pd", ROLE: "decode"}
    (budget,) = by_kind(objects, "PodDisruptionBudget").values()
    assert budget["spec"]["selector"] == {"matchLabels": {"gpufleet.io/model": "llama-pd"}}
    # One loader Job: both pools read the same weights.
    assert len(by_kind(objects, "Job")) == 1


def test_with_an_inventory_each_pool_goes_to_the_gpus_that_suit_its_phase() -> None:
    """Prefill is compute-bound (the H100s: the most FLOP/s per dollar), decode memory-bound
    (the H200s: the most bandwidth per dollar); each pool pinned where the planner put it."""
    model = pd_model()
    fleet = load_inventory(DATA / "disaggregated-inventory.yaml")
    deployments = {d.name: d for d in size_pools_here(model)}
    assert sorted(deployments) == ["llama-pd", "llama-pd:prefill"]
    objects = render([model], inventory=fleet, deployments=deployments)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    workloads = by_kind(objects, "Deployment")

    def pinned(workload: dict[str, Any]) -> dict[str, list[str]]:
        pod = workload["spec"]["template"]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        return {t["key"]: t["values"] for t in terms["nodeSelectorTerms"][0]["matchExpressions"]}

    decode, prefill = workloads["engine-llama-pd"], workloads["engine-llama-pd-prefill"]
    assert pinned(decode) == {
        "kubernetes.io/hostname": ["h200-1"],
        "nvidia.com/gpu.product": ["NVIDIA-H200"],
    }
    assert pinned(prefill) == {
        "kubernetes.io/hostname": ["h100-1"],
        "nvidia.com/gpu.product": ["NVIDIA-H100-80GB-HBM3"],
    }
    assert (decode["spec"]["replicas"], prefill["spec"]["replicas"]) == (2, 1)
    assert prefill["spec"]["template"]["metadata"]["labels"]["gpufleet.io/placement"] == (
        "prefill-h100-1-tp2"
    )


def test_keda_scales_the_decode_pool_and_the_prefill_pool_keeps_its_count() -> None:
    objects = render([pd_model()], settings=RenderSettings(keda_prometheus="http://prom:9090"))
    (scaled,) = by_kind(objects, "ScaledObject").values()
    assert scaled["spec"]["scaleTargetRef"]["name"] == "engine-llama-pd"
    deployments = by_kind(objects, "Deployment")
    assert "replicas" not in deployments["engine-llama-pd"]["spec"]
    assert deployments["engine-llama-pd-prefill"]["spec"]["replicas"] == 1


def test_only_the_nixl_connector_is_given_its_side_channel() -> None:
    model = pd_model()
    assert model.spec.disaggregation is not None
    lmcache = model.spec.disaggregation.model_copy(update={"connector": "lmcache"})
    model = model.model_copy(
        update={"spec": model.spec.model_copy(update={"disaggregation": lmcache})}
    )
    for workload in by_kind(render([model]), "Deployment").values():
        assert kv_transfer(engine(workload)["args"])["kv_connector"] == "LMCacheConnectorV1"
        assert SIDE_CHANNEL["name"] not in {e["name"] for e in engine(workload)["env"]}


def test_a_prefill_pool_of_none_renders_no_prefill_workload() -> None:
    """Until a prefill replica runs, the decode pool prefills where it decodes: its engines
    keep their KV connector, ready for the pool to grow (the operator scales it)."""
    objects = render([pd_model(replicas=0)])
    (decode,) = by_kind(objects, "Deployment").values()
    assert decode["metadata"]["name"] == "engine-llama-pd"
    assert kv_transfer(engine(decode)["args"])["kv_connector"] == "NixlConnector"
    assert decode["spec"]["replicas"] == 2  # one budget still: two pods
    assert by_kind(objects, "PodDisruptionBudget")


def test_a_prefill_pool_bigger_than_a_node_is_a_leader_worker_set_of_its_own() -> None:
    (model,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: big-pd}\n"
        "spec: {source: 'hf://meta-llama/Llama-3.1-405B-Instruct', engine: vllm, "
        "resources: {gpus: 8}, disaggregation: {prefill: {replicas: 2, resources: {gpus: 16}, "
        "rdma: rdma/ib}}}\n"
    )
    objects = render([model])
    (lws,) = by_kind(objects, "LeaderWorkerSet").values()
    assert lws["metadata"]["name"] == "engine-big-pd-prefill"
    assert lws["metadata"]["labels"][ROLE] == "prefill"
    assert lws["spec"]["replicas"] == 2
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    for part in ("leaderTemplate", "workerTemplate"):
        assert template[part]["metadata"]["labels"][ROLE] == "prefill"
        resources = template[part]["spec"]["containers"][0]["resources"]
        assert resources["limits"] == {"nvidia.com/gpu": 8, "rdma/ib": 1}
    serve = template["leaderTemplate"]["spec"]["containers"][0]["command"][2]
    assert "--pipeline-parallel-size 2" in serve and "--kv-transfer-config" in serve
    # The decode pool fits a node: a Deployment, which the Service selects (no leader key).
    (decode,) = by_kind(objects, "Deployment").values()
    assert decode["metadata"]["name"] == "engine-big-pd"
    assert decode["spec"]["template"]["metadata"]["labels"][ROLE] == "decode"
    (service,) = by_kind(objects, "Service").values()
    assert service["spec"]["selector"] == {"gpufleet.io/model": "big-pd", ROLE: "decode"}


def test_pools_kubernetes_cannot_run_are_refused_naming_the_field() -> None:
    (model,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: pd}\n"
        "spec: {source: 'hf://org/name', engine: vllm, resources: {gpus: 1}, "
        "disaggregation: {prefill: {resources: {gpus: 0}}, decode: {rdma: nvidia.com/gpu}}}\n"
    )
    problems = check(model, RenderSettings())
    assert any("pd: spec.disaggregation.prefill.resources.gpus is 0" in p for p in problems)
    assert any(
        "pd: spec.disaggregation.decode.rdma 'nvidia.com/gpu' is a GPU's resource" in p
        for p in problems
    )
    with pytest.raises(RenderError):
        render([model])
    (local_only,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: pd}\n"
        "spec: {source: 'hf://org/name', engine: vllm, resources: {gpus: 1}, disaggregation: "
        "{connector: shared-storage, sharedStoragePath: /srv/kv}}\n"
    )
    (problem,) = check(local_only, RenderSettings())
    assert "spec.disaggregation.connector shared-storage is vLLM's debug connector" in problem


# -- the pod runtime and the operator ---------------------------------------------------------


async def test_a_disaggregated_model_runs_its_pools_as_labelled_pods_and_a_restart_keeps_roles(
    tmp_path: Path,
) -> None:
    store = Store.open(sqlite_url(tmp_path))
    kube = FakeKube()

    async def operator() -> tuple[KubernetesRuntime, Controller]:
        runtime = KubernetesRuntime(kube)
        await runtime.start_watching()
        controller = Controller(store, runtime, autoscaler=Autoscaler(store), resync_s=3600)
        await controller.start()
        return runtime, controller

    def pods() -> list[dict[str, Any]]:
        return [o for (kind, _, _), o in sorted(kube.objects.items()) if kind == "Pod"]

    runtime, controller = await operator()
    try:
        await controller.apply([pd_model()])
        await eventually(lambda: len(pods()) == 3, "two decode pods and a prefill pod")
        roles = {p["metadata"]["name"]: p["metadata"]["labels"][ROLE] for p in pods()}
        (prefill,) = [name for name, role in roles.items() if role == "prefill"]
        assert prefill.startswith("llama-pd-prefill-g1-")
        assert sorted(roles.values()) == ["decode", "decode", "prefill"]
        spec = kube.peek("Pod", NS, prefill)
        assert spec is not None
        container = spec["spec"]["containers"][0]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": 2, RDMA: 1}
        assert container["args"][-2:] == ["--max-num-batched-tokens", "16384"]
        for i, name in enumerate(sorted(roles)):
            kube.pod_ready(NS, name, f"10.0.0.{i + 1}")

        def entry() -> ModelEntry | None:
            found = controller.directory.get("llama-pd")
            return (
                found if found and len(found.endpoints) == 2 and found.prefill_endpoints else None
            )

        ready = await eventually(entry, "both pools ready")
        assert [r.id for r in ready.prefill_endpoints] == [prefill]
        assert prefill not in {r.id for r in ready.endpoints}
    finally:
        await controller.stop()
        await runtime.close()
    writes = len(kube.writes)
    runtime, controller = await operator()
    try:
        # Adopted with their roles from the labels: nothing created, nothing stopped.
        assert {r.id: r.role for r in runtime.replicas("llama-pd")} == roles
        ready = await eventually(entry, "both pools ready again")
        assert [r.id for r in ready.prefill_endpoints] == [prefill]
        await passes(controller, "llama-pd")
        assert len(kube.writes) == writes
    finally:
        await controller.stop()
        await runtime.close()
        store.close()


async def test_a_role_for_a_model_without_pools_is_refused_before_anything_is_made() -> None:
    kube = FakeKube()
    runtime = KubernetesRuntime(kube)
    await runtime.start_watching()
    try:
        (plain,) = load_text(
            "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: plain}\n"
            "spec: {source: 'hf://org/name', engine: vllm, resources: {gpus: 1}}\n"
        )
        with pytest.raises(PermanentError, match="a prefill replica of a model without"):
            await runtime.start(ReplicaRequest("plain", 1, plain.spec, "prefill"))
        assert kube.writes == []
    finally:
        await runtime.close()


def gpu_node(name: str, product: str, gpus: int = 4) -> dict[str, Any]:
    return {
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"nvidia.com/gpu.product": product, "nvidia.com/gpu.count": str(gpus)},
        },
        "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": str(gpus)}},
    }


async def test_the_placer_plans_a_prefill_replica_as_its_pool() -> None:
    """On an H100 node and an H200 node: the prefill replica on the H100s, planned as
    ``llama-pd:prefill`` (kept so on its pod), the decode replica on the H200s."""
    model = pd_model()
    fleet = inventory_from_nodes(
        [gpu_node("h100-a", "NVIDIA-H100-80GB-HBM3"), gpu_node("h200-a", "NVIDIA-H200")]
    )
    kube = FakeKube()
    runtime = KubernetesRuntime(kube)
    await runtime.start_watching()
    directory = Directory()
    directory.put_spec("llama-pd", 1, model.spec, 0)
    runtime.set_placer(ClusterPlacer(lambda: fleet, directory, runtime))
    try:
        prefill = await runtime.start(
            ReplicaRequest("llama-pd", 1, model.spec.pool("prefill"), "prefill")
        )
        decode = await runtime.start(
            ReplicaRequest("llama-pd", 1, model.spec.pool("decode"), "decode")
        )
        planned = {p.replica.deployment: p for p in running_placements(runtime)}
        assert (planned["llama-pd:prefill"].node, planned["llama-pd:prefill"].tp) == ("h100-a", 2)
        assert planned["llama-pd"].node == "h200-a"
        for replica, node in ((prefill, "h100-a"), (decode, "h200-a")):
            pod = kube.peek("Pod", NS, replica.id)
            assert pod is not None
            terms = pod["spec"]["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]["nodeSelectorTerms"][0]["matchExpressions"]
            assert {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]} in terms
        # A second prefill replica is the pool's index 1, beside the first.
        await runtime.start(ReplicaRequest("llama-pd", 1, model.spec.pool("prefill"), "prefill"))
        indices = sorted(
            p.replica.index
            for p in running_placements(runtime)
            if p.replica.deployment == "llama-pd:prefill"
        )
        assert indices == [0, 1]
    finally:
        await runtime.close()


def test_the_scale_status_is_the_decode_pools() -> None:
    model = pd_model()
    replicas = (
        Replica("llama-pd-g1-a", "llama-pd", 1, Phase.READY, url="http://a", role="decode"),
        Replica(
            "llama-pd-prefill-g1-b", "llama-pd", 1, Phase.READY, url="http://b", role="prefill"
        ),
        Replica("llama-pd-prefill-g1-c", "llama-pd", 1, Phase.STARTING, role="prefill"),
    )
    entry = ModelEntry("llama-pd", 1, model.spec, 0, replicas, desired=1)
    status = model_status(entry, observed_generation=1, unschedulable="", previous=None, now=0.0)
    assert (status["replicas"], status["readyReplicas"]) == (1, 1)
    assert status["selector"] == "gpufleet.io/model=llama-pd,gpufleet.io/role=decode"
    assert status["endpoints"] == ["http://a"]
    assert status["prefill"] == {"replicas": 2, "readyReplicas": 1}  # beside, not in, the counts
    plain = ModelEntry("llama", 1, model.spec.model_copy(update={"disaggregation": None}), 0)
    assert "prefill" not in model_status(
        plain, observed_generation=1, unschedulable="", previous=None, now=0.0
    )
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "True" and "1 starting" in progressing["message"]


async def test_a_selector_is_written_whole_so_a_dropped_key_goes() -> None:
    """A model no longer disaggregated: its Service must select its pods again, which carry
    no role label; a merge that kept ``gpufleet.io/role: decode`` would select none."""
    kube = FakeKube()

    def service(selector: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "engine-x",
                "namespace": NS,
                "labels": {"app.kubernetes.io/managed-by": "gpufleet", "gpufleet.io/model": "x"},
            },
            "spec": {"selector": selector, "ports": [{"name": "http", "port": 8000}]},
        }

    key = ("Service", NS, "engine-x")
    pooled = service({"gpufleet.io/model": "x", ROLE: "decode"})
    assert await ensure(kube, {key: pooled}, ("Service",), NS, "gpufleet.io/model") == 1
    kube.objects[key]["spec"]["clusterIP"] = "10.96.0.7"  # the server's own field
    plain = service({"gpufleet.io/model": "x"})
    assert await ensure(kube, {key: plain}, ("Service",), NS, "gpufleet.io/model") == 1
    stored = kube.objects[key]["spec"]
    assert stored["selector"] == {"gpufleet.io/model": "x"}
    assert stored["clusterIP"] == "10.96.0.7"  # merged, not replaced
    assert await ensure(kube, {key: plain}, ("Service",), NS, "gpufleet.io/model") == 0
