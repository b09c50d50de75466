"""The operator against the stateful fake API: Model resources in, pods and status out, one
leader at a time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from gpufleet.controller import Autoscaler, Controller, ModelEntry, PlannerCapacity
from gpufleet.operator import ClusterPlacer, LeaderElection, Operator, model_status
from gpufleet.runtime import Phase, Replica
from gpufleet.runtime.kubernetes import FakeKube, KubernetesRuntime
from gpufleet.runtime.kubernetes.client import ClientKube
from gpufleet.spec import ModelSpec
from gpufleet.store import Store, sqlite_url
from tests import kube_server
from tests.conftest import passes

NS = "gpufleet"


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def resource(name: str = "llama", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": "hf://meta-llama/Meta-Llama-3-8B-Instruct",
            "engine": "vllm",
            "resources": {"gpus": 1, "gpuTypes": ["H100"]},
            **spec,
        },
    }


async def settle(check: Callable[[], Any], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


class Operating(NamedTuple):
    store: Store
    controller: Controller
    operator: Operator
    clock: Clock


@contextlib.asynccontextmanager
async def operating(
    tmp_path: Path,
    api: Any,
    *,
    capacity: PlannerCapacity | None = None,
    source: Any = None,
) -> AsyncIterator[Operating]:
    """An operator's parts over ``api`` (the fake, or ClientKube); with ``capacity`` the
    planner bounds and places replicas."""
    clock = Clock()
    store = Store.open(sqlite_url(tmp_path))
    runtime = KubernetesRuntime(api)
    await runtime.start_watching()
    autoscaler = Autoscaler(store, source, capacity=capacity, clock=clock, interval_s=3600)
    controller = Controller(store, runtime, autoscaler=autoscaler, resync_s=3600)
    if capacity is not None:
        bound = capacity  # read at each placement: the inventory may change
        runtime.set_placer(ClusterPlacer(lambda: bound.inventory, controller.directory, runtime))
    await controller.start()
    operator = Operator(api, controller, NS, LeaderElection(api, NS, "op-a", clock=clock))
    try:
        yield Operating(store, controller, operator, clock)
    finally:
        await controller.stop()
        await runtime.close()
        store.close()


def pods(kube: FakeKube) -> list[str]:
    return sorted(name for (kind, _, name) in kube.objects if kind == "Pod")


@pytest.mark.parametrize("over", ["fake", "http"])
async def test_models_in_pods_and_status_out(tmp_path: Path, over: str) -> None:
    """Directly on the fake, and through ClientKube over HTTP (the real adapter's REST calls,
    watches included, against a server backed by the same fake)."""
    kube = FakeKube()
    async with contextlib.AsyncExitStack() as stack:
        api: Any = kube
        if over == "http":
            url = await stack.enter_async_context(kube_server.serving(kube))
            api = ClientKube(url, ssl_context=False)
            stack.push_async_callback(api.close)
        await _lifecycle(tmp_path, kube, api)


async def _lifecycle(tmp_path: Path, kube: FakeKube, api: Any) -> None:
    async with operating(tmp_path, api) as (_store, controller, operator, clock):
        await kube.create(resource(replicas={"min": 2, "max": 2}))
        await operator.step()
        assert operator.leading
        await settle(lambda: len(pods(kube)) == 2)
        service = kube.peek("Service", NS, "engine-llama")
        assert service is not None and service["spec"]["selector"] == {"gpufleet.io/model": "llama"}
        assert kube.peek("PodDisruptionBudget", NS, "engine-llama") is not None
        for i, name in enumerate(pods(kube)):
            kube.pod_ready(NS, name, f"10.0.0.{i + 1}")
        await settle(lambda: len(controller.directory.get("llama").endpoints) == 2)  # type: ignore[union-attr]
        await operator.step()
        status = kube.peek("Model", NS, "llama")["status"]  # type: ignore[index]
        assert (status["readyReplicas"], status["desiredReplicas"]) == (2, 2)
        assert status["endpoints"] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True" and ready["message"] == "2 of 2 replicas ready"
        writes = list(kube.writes)
        clock.t += 5
        await operator.step()  # nothing changed: no write but the lease renewal
        assert [w for w in kube.writes[len(writes) :] if w[1] != "Lease"] == []
        # kubectl apply of a changed spec: a new generation rolls the engines.
        kube.update_spec(
            "Model",
            NS,
            "llama",
            resource(contextLength=4096, replicas={"min": 2, "max": 2})["spec"],
        )
        await operator.step()
        await settle(lambda: len(pods(kube)) == 4)
        await operator.step()  # the new engines are starting beside the old ones
        status = kube.peek("Model", NS, "llama")["status"]  # type: ignore[index]
        assert status["observedGeneration"] == 2
        progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
        assert progressing["status"] == "True"
        # kubectl delete: the pods go.
        await kube.delete("Model", NS, "llama")
        await operator.step()
        await settle(lambda: pods(kube) == [])
        assert kube.peek("Service", NS, "engine-llama") is None
        assert kube.peek("PodDisruptionBudget", NS, "engine-llama") is None


async def test_a_stored_spec_gpufleet_refuses_is_reported(tmp_path: Path) -> None:
    kube = FakeKube()
    async with operating(tmp_path, kube) as (_store, _controller, operator, _clock):
        await kube.create(resource("bad", replicas={"min": 3, "max": 1}))
        await operator.step()
        conditions = kube.peek("Model", NS, "bad")["status"]["conditions"]  # type: ignore[index]
        condition = next(c for c in conditions if c["type"] == "Ready")
        assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
        assert "spec.replicas.max must be ≥ spec.replicas.min" in condition["message"]
        assert pods(kube) == []


async def test_an_edit_gpufleet_refuses_keeps_the_last_good_generation_and_a_stable_status(
    tmp_path: Path,
) -> None:
    """Objects stored before the CRD's rules (or edited around them): the model keeps running
    its last good spec, its Service and budget stay, and the status says InvalidSpec once —
    it does not flip back every pass."""
    kube = FakeKube()
    async with operating(tmp_path, kube) as (_store, _controller, operator, clock):
        await kube.create(resource(replicas={"min": 2, "max": 2}))
        await operator.step()
        await settle(lambda: len(pods(kube)) == 2)
        service = kube.peek("Service", NS, "engine-llama")
        assert service is not None
        kube.update_spec("Model", NS, "llama", resource(replicas={"min": 3, "max": 1})["spec"])
        await operator.step()
        status = kube.peek("Model", NS, "llama")["status"]  # type: ignore[index]
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
        writes = len(kube.writes)
        for _ in range(3):
            clock.t += 2
            await operator.step()
        assert [w for w in kube.writes[writes:] if w[1] != "Lease"] == []
        assert len(pods(kube)) == 2
        assert kube.peek("Service", NS, "engine-llama") is not None
        assert kube.peek("PodDisruptionBudget", NS, "engine-llama") is not None


async def test_one_leader_at_a_time_and_a_takeover_when_it_stops_renewing() -> None:
    kube, clock = FakeKube(), Clock()
    a = LeaderElection(kube, NS, "op-a", lease_s=15, clock=clock)
    b = LeaderElection(kube, NS, "op-b", lease_s=15, clock=clock)
    assert await a.try_acquire()
    assert not await b.try_acquire()
    clock.t += 10
    assert await a.try_acquire()  # renewed
    clock.t += 10
    assert not await b.try_acquire()  # 10 s since the renewal: still a's
    clock.t += 6
    assert await b.try_acquire()  # 16 s: a is gone, b takes over
    assert not await a.try_acquire()
    lease = kube.peek("Lease", NS, "gpufleet-operator")
    assert lease is not None and lease["spec"]["holderIdentity"] == "op-b"


def test_status_conditions_keep_their_transition_time_while_unchanged() -> None:
    spec = ModelSpec.model_validate({"source": "hf://org/name"})
    ready = Replica("r1", "m", 1, Phase.READY, url="http://10.0.0.1:8000")
    crashing = Replica("r2", "m", 1, Phase.BACKOFF, message="exited with code 1")
    entry = ModelEntry("m", 1, spec, 0, (ready, crashing), desired=2)
    first = model_status(entry, observed_generation=1, unschedulable="", previous=None, now=100.0)
    by_type = {c["type"]: c for c in first["conditions"]}
    assert by_type["Ready"]["status"] == "True"
    assert by_type["Degraded"]["status"] == "True"
    assert by_type["Degraded"]["message"] == "exited with code 1"
    assert by_type["Unschedulable"]["status"] == "False"
    assert "canary" not in first
    canary = ModelEntry("m", 2, spec, 0, (ready,), desired=1, canary=(2, 10))
    with_canary = model_status(
        canary, observed_generation=2, unschedulable="", previous=None, now=100.0
    )
    assert with_canary["canary"] == {"generation": 2, "percent": 10}
    later = model_status(
        entry,
        observed_generation=1,
        unschedulable="needs 30.0 GiB per GPU at TP 1; largest free is 7.1 GiB",
        previous=first,
        now=200.0,
    )
    after = {c["type"]: c for c in later["conditions"]}
    assert after["Ready"]["lastTransitionTime"] == by_type["Ready"]["lastTransitionTime"]
    assert after["Unschedulable"]["status"] == "True"
    assert (
        after["Unschedulable"]["lastTransitionTime"]
        != by_type["Unschedulable"]["lastTransitionTime"]
    )
    zero = model_status(
        ModelEntry("m", 1, spec, 0, (), desired=0),
        observed_generation=1,
        unschedulable="",
        previous=None,
        now=0.0,
    )
    assert zero["conditions"][0]["status"] == "True"
    assert "scaled to zero" in zero["conditions"][0]["message"]


async def test_the_operator_command_runs_against_an_api_server(tmp_path: Path) -> None:
    """`gpufleet operator` as a process, configured by a kubeconfig, against the HTTP fake."""
    import os
    import signal
    import sys

    kube = FakeKube()
    async with kube_server.serving(kube) as url:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: '{url}'}}}}]\n"
            "users: [{name: fake, user: {token: not-a-secret}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n"
            "current-context: fake\n"
        )
        await kube.create(resource())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gpufleet", "operator", "--namespace", NS,
            "--store", f"sqlite:///{tmp_path / 'operator.db'}", "--identity", "op-test",
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await settle(lambda: len(pods(kube)) == 1, timeout=30)
            kube.pod_ready(NS, pods(kube)[0], "10.0.0.7")
            await settle(
                lambda: (
                    (kube.peek("Model", NS, "llama") or {}).get("status", {}).get("readyReplicas")
                    == 1
                ),
                timeout=30,
            )
            lease = kube.peek("Lease", NS, "gpufleet-operator")
            assert lease is not None and lease["spec"]["holderIdentity"] == "op-test"
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        assert "Traceback" not in stderr.decode()
        assert len(pods(kube)) == 1  # the engines outlive the operator


async def test_tenants_get_their_namespace_quota_policies_and_rbac(tmp_path: Path) -> None:
    kube = FakeKube()
    tenant = {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": "acme", "labels": {"gpufleet.io/gpus": "4"}},
        "spec": {"priority": "batch", "limits": {"requestsPerMinute": 600}},
    }
    async with operating(tmp_path, kube) as (store, _controller, operator, _clock):
        await kube.create(tenant)
        await operator.step()
        owned = sorted(
            (k, ns, n) for (k, ns, n) in kube.objects if ns == "tenant-acme" or n == "tenant-acme"
        )
        assert owned == [
            ("Namespace", "", "tenant-acme"),
            ("NetworkPolicy", "tenant-acme", "default-deny"),
            ("NetworkPolicy", "tenant-acme", "gateway-to-engines"),
            ("ResourceQuota", "tenant-acme", "gpus"),
            ("Role", "tenant-acme", "gpufleet-tenant"),
            ("RoleBinding", "tenant-acme", "gpufleet-tenant"),
        ]
        quota = kube.peek("ResourceQuota", "tenant-acme", "gpus")
        assert quota is not None and quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "4"}
        stored = {t.tenant.name: t.tenant for t in store.list_tenants()}
        assert stored["acme"].spec.priority == "batch"
        assert stored["acme"].spec.limits.requests_per_minute == 600
        # A second pass writes nothing; someone editing the quota by hand is corrected.
        writes = len([w for w in kube.writes if w[1] != "Lease"])
        await operator.step()
        assert len([w for w in kube.writes if w[1] != "Lease"]) == writes
        kube.objects[("ResourceQuota", "tenant-acme", "gpus")]["spec"]["hard"] = {
            "requests.nvidia.com/gpu": "64"
        }
        await operator.step()
        quota = kube.peek("ResourceQuota", "tenant-acme", "gpus")
        assert quota is not None and quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "4"}
        # The tenant goes: so does everything it owned.
        await kube.delete("Tenant", "", "acme")
        await operator.step()
        assert not [
            key for key in kube.objects if key[1] == "tenant-acme" or key[2] == "tenant-acme"
        ]


async def test_a_wake_stamp_from_a_gateway_starts_a_model_at_zero(tmp_path: Path) -> None:
    from gpufleet.operator import WAKE_ANNOTATION

    kube = FakeKube()
    async with operating(tmp_path, kube) as (store, controller, operator, _clock):
        await kube.create(resource(replicas={"min": 0, "max": 2}))
        await operator.step()
        await passes(controller, "llama")
        assert pods(kube) == []  # at zero: nothing runs
        obj = await kube.get("Model", NS, "llama")
        assert obj is not None
        obj["metadata"]["annotations"] = {WAKE_ANNOTATION: "2026-11-26T09:00:00+00:00"}
        await kube.replace(obj)
        await operator.step()
        await settle(lambda: len(pods(kube)) == 1)
        assert "Woken" in [e.reason for e in store.events("llama")]
        await operator.step()  # the same stamp again wakes nothing twice
        assert [e.reason for e in store.events("llama")].count("Woken") == 1


async def test_replicas_are_pinned_where_the_planner_puts_them(tmp_path: Path) -> None:
    """Two nodes of one H100 each, no time-slicing: one engine per GPU, so the replicas land on
    different nodes, and a third is reported unschedulable instead of sharing a GPU."""
    from gpufleet.controller import PlannerCapacity
    from gpufleet.operator import CLUSTER_PLANNING
    from gpufleet.runtime.kubernetes import inventory_from_nodes

    nodes = [
        {
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                    "nvidia.com/gpu.count": "1",
                },
            },
            "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "1"}},
        }
        for name in ("gpu-a", "gpu-b")
    ]
    kube, demand = FakeKube(), Demand3()
    capacity = PlannerCapacity(inventory_from_nodes(nodes), settings=CLUSTER_PLANNING)
    async with operating(tmp_path, kube, capacity=capacity, source=demand) as (
        store,
        controller,
        _operator,
        clock,
    ):
        spec = resource(replicas={"min": 2, "max": 3})["spec"]
        spec["resources"]["memory"] = "30Gi"  # two would fit one GPU by memory
        from gpufleet.spec import parse_document

        await controller.apply(
            [parse_document({"apiVersion": "gpufleet.io/v1alpha1", "kind": "Model",
                             "metadata": {"name": "llama"}, "spec": spec})]
        )  # fmt: skip
        await settle(lambda: len(pods(kube)) == 2)
        hosts = []
        for name in pods(kube):
            pod = kube.peek("Pod", NS, name)
            assert pod is not None
            terms = pod["spec"]["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            expressions = terms["nodeSelectorTerms"][0]["matchExpressions"]
            hosts += [e["values"][0] for e in expressions if e["key"] == "kubernetes.io/hostname"]
            assert "gpufleet.io/placement" in pod["metadata"]["annotations"]
        assert sorted(hosts) == ["gpu-a", "gpu-b"]
        # Demand for three: the third has no GPU of its own, and is not put on a busy one.
        demand.load = 24.0
        for _ in range(10):
            clock.t += 1
            await controller.autoscale_once()
        await passes(controller, "llama")
        assert len(pods(kube)) == 2
        assert "Unschedulable" in [e.reason for e in store.events("llama")]


class Demand3:
    def __init__(self) -> None:
        self.load = 0.0

    def sample(self, model: str, now: float) -> Any:
        from gpufleet.autoscale import Sample

        return Sample(now, self.load)


async def test_a_node_joining_lifts_the_bound_and_the_replica_starts(tmp_path: Path) -> None:
    from gpufleet.controller import PlannerCapacity
    from gpufleet.operator import CLUSTER_PLANNING
    from gpufleet.runtime.kubernetes import inventory_from_nodes
    from gpufleet.spec import parse_document

    def gpu_node(name: str) -> dict[str, Any]:
        return {
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            },
            "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "1"}},
        }

    kube = FakeKube()
    capacity = PlannerCapacity(inventory_from_nodes([gpu_node("gpu-a")]), settings=CLUSTER_PLANNING)
    async with operating(tmp_path, kube, capacity=capacity, source=Demand3()) as (
        store,
        controller,
        _operator,
        clock,
    ):
        spec = resource(replicas={"min": 2, "max": 2})["spec"]
        spec["resources"]["memory"] = "30Gi"
        doc = {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Model", "metadata": {"name": "llama"}}
        await controller.apply([parse_document({**doc, "spec": spec})])
        await controller.autoscale_once()
        await settle(lambda: len(pods(kube)) == 1)  # one GPU: one replica, the other reported
        assert "Unschedulable" in [e.reason for e in store.events("llama")]
        # The operator reads the nodes again: a second GPU node has joined.
        capacity.set_inventory(inventory_from_nodes([gpu_node("gpu-a"), gpu_node("gpu-b")]))
        clock.t += 1
        await controller.autoscale_once()
        await settle(lambda: len(pods(kube)) == 2)
