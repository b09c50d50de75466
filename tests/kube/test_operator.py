"""The operator against the real API server: Models applied with kubectl become pods the real
scheduler binds to fake GPU nodes; status, Services, budgets and loader Jobs follow; a steady
fleet writes nothing; one leader acts."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.operator import Operator, OperatorConfig, run_operator
from gpufleet.operator.process import acting
from gpufleet.runtime.kubernetes import RenderSettings
from gpufleet.runtime.kubernetes.client import ClientKube
from gpufleet.store import Store, sqlite_url
from tests.kube.conftest import Nodes
from tests.kube.kubelet import Kubelet

ENGINE = {"app.kubernetes.io/managed-by": "gpufleet", "app.kubernetes.io/component": "engine"}


def model(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name},
        "spec": {
            "source": "hf://meta-llama/Meta-Llama-3-8B-Instruct",
            "engine": "vllm",
            "resources": {"gpus": 1, "gpuTypes": ["H100"], "memory": "20Gi"},
            **spec,
        },
    }


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 60.0) -> Any:
    """Wait until ``check()`` returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition not met in {timeout} s (last: {last!r})")


def apply(kubectl: Callable[..., Any], namespace: str, *docs: dict[str, Any]) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))


async def engine_pods(kube: ClientKube, namespace: str) -> list[dict[str, Any]]:
    return [
        p
        for p in await kube.list("Pod", namespace, ENGINE)
        if not p["metadata"].get("deletionTimestamp")
    ]


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == kind)


@contextlib.asynccontextmanager
async def operating(kube: ClientKube, namespace: str, tmp_path: Path) -> AsyncIterator[Operator]:
    """The leader's parts as ``gpufleet operator`` assembles them (``acting``), passes run by
    the test."""
    store = Store.open(sqlite_url(tmp_path))
    cfg = OperatorConfig(namespace=namespace, store_url="", settings=RenderSettings(namespace))
    try:
        async with acting(cfg, kube, store) as operator:
            yield operator
    finally:
        store.close()


async def pass_until(
    operator: Operator, check: Callable[[], Awaitable[Any]], timeout: float = 60.0
) -> Any:
    async def step() -> Any:
        await operator.sync()
        return await check()

    try:
        return await eventually(step, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await describe(operator.api, operator.namespace)}") from None


async def describe(kube: Any, namespace: str) -> str:
    """What a person would look at: pods, models and their status."""
    lines = []
    for pod in await kube.list("Pod", namespace):
        st = pod.get("status", {})
        lines.append(
            f"pod {pod['metadata']['name']} node={pod['spec'].get('nodeName')} "
            f"phase={st.get('phase')} conditions={st.get('conditions')}"
        )
    for obj in await kube.list("Model", namespace):
        lines.append(f"model {obj['metadata']['name']} status={obj.get('status')}")
    return "\n".join(lines)


async def test_models_become_scheduled_pods_and_a_steady_fleet_writes_nothing(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
    kubectl: Callable[..., Any],
    tmp_path: Path,
) -> None:
    await nodes.add(f"{namespace}-gpu-a", gpus=4)
    apply(kubectl, namespace, model("llama", replicas={"min": 2, "max": 3}))
    async with operating(kube, namespace, tmp_path) as operator:

        async def ready() -> Any:
            obj = await kube.get("Model", namespace, "llama")
            return obj if (obj or {}).get("status", {}).get("readyReplicas") == 2 else None

        obj = await pass_until(operator, ready)
        pods = await engine_pods(kube, namespace)
        assert len(pods) == 2
        # Bound by the real scheduler to the GPU node, asking for one GPU each.
        assert {p["spec"]["nodeName"] for p in pods} == {f"{namespace}-gpu-a"}
        limits = pods[0]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] in (1, "1")
        # A whole GPU is the pod's: vLLM is not told the planner's memory share.
        container = pods[0]["spec"]["containers"][0]
        argv = [*container.get("command", []), *container.get("args", [])]
        assert "--tensor-parallel-size" in argv or "vllm" in " ".join(argv)
        assert "--gpu-memory-utilization" not in argv
        assert condition(obj, "Ready")["status"] == "True"
        service = await kube.get("Service", namespace, "engine-llama")
        assert service is not None and service["spec"]["clusterIP"]
        assert await kube.get("PodDisruptionBudget", namespace, "engine-llama") is not None
        # The cost report's placed time: a span per pod, one GPU each, at the catalog's price.
        store = operator.controller.store
        spans = store.spans_between(
            dt.datetime.now(dt.UTC) - dt.timedelta(hours=1), dt.datetime.now(dt.UTC)
        )
        assert sorted(s.replica for s in spans) == sorted(store.open_spans())
        assert len(spans) == 2 and {s.gpus for s in spans} == {1.0}
        # ...and the nodes' inventory, for gateways that may not list nodes (fleet idle).
        shared = store.get_inventory(namespace)
        assert shared is not None
        node = next(n for n in shared.nodes if n.name == f"{namespace}-gpu-a")
        assert node.gpu_count == 4

        # Steady: several passes write nothing (resource versions of everything it owns and
        # of the Model stay the same).
        async def versions() -> dict[str, str]:
            seen = {}
            for kind in ("Service", "PodDisruptionBudget", "Model", "Pod", "Job"):
                for o in await kube.list(kind, namespace):
                    seen[f"{kind}/{o['metadata']['name']}"] = o["metadata"]["resourceVersion"]
            return seen

        await operator.sync()
        before = await versions()
        for _ in range(3):
            await operator.sync()
            assert operator.writes == 0
        assert await versions() == before
        # kubectl delete: pods, Service, budget and the loader Job go.
        kubectl("delete", "-n", namespace, "model", "llama")

        async def gone() -> bool:
            left = [
                # Engines, and the loader Job's pods (the Job is deleted with propagation).
                *(await kube.list("Pod", namespace)),
                *(await kube.list("Service", namespace)),
                *(await kube.list("PodDisruptionBudget", namespace)),
                *[
                    j
                    for j in await kube.list("Job", namespace)
                    if not j["metadata"].get("deletionTimestamp")
                ],
            ]
            return not left

        await pass_until(operator, gone)

        async def spans_ended() -> bool:
            return not store.open_spans()

        await pass_until(operator, spans_ended)


async def test_an_unschedulable_model_is_not_ready_and_does_not_evict_a_running_one(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
    kubectl: Callable[..., Any],
    tmp_path: Path,
) -> None:
    await nodes.add(f"{namespace}-gpu-a", gpus=2)
    apply(kubectl, namespace, model("first", replicas={"min": 2, "max": 2}))
    async with operating(kube, namespace, tmp_path) as operator:

        async def first_ready() -> Any:
            obj = await kube.get("Model", namespace, "first")
            return (obj or {}).get("status", {}).get("readyReplicas") == 2

        await pass_until(operator, first_ready)
        # Same priority, no room: it waits, it does not take the running model's GPUs.
        apply(kubectl, namespace, model("second", replicas={"min": 1, "max": 1}))

        async def second_reported() -> Any:
            obj = await kube.get("Model", namespace, "second")
            conditions = {c["type"]: c for c in (obj or {}).get("status", {}).get("conditions", [])}
            return obj if conditions.get("Unschedulable", {}).get("status") == "True" else None

        second = await pass_until(operator, second_reported)
        ready = condition(second, "Ready")
        assert ready["status"] == "False" and ready["reason"] == "Unschedulable"
        assert "scaled to zero" not in ready["message"]
        # The reason counts the rule that a whole GPU is one engine's, instead of offering the
        # memory free on a GPU another engine holds.
        reason = condition(second, "Unschedulable")["message"]
        assert "one engine per GPU" in reason, reason
        for _ in range(3):
            await operator.sync()
        first = await kube.get("Model", namespace, "first")
        assert first is not None and first["status"]["readyReplicas"] == 2
        pods = await engine_pods(kube, namespace)
        assert sorted(p["metadata"]["labels"]["gpufleet.io/model"] for p in pods) == [
            "first",
            "first",
        ]


async def test_kubectl_scale_keeps_the_model_valid_and_its_service(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
    kubectl: Callable[..., Any],
    tmp_path: Path,
) -> None:
    await nodes.add(f"{namespace}-gpu-a", gpus=4)
    apply(kubectl, namespace, model("llama", replicas={"min": 1, "max": 3}))
    async with operating(kube, namespace, tmp_path) as operator:

        async def ready(n: int) -> Any:
            obj = await kube.get("Model", namespace, "llama")
            return (obj or {}).get("status", {}).get("readyReplicas") == n

        await pass_until(operator, lambda: ready(1))
        service = await kube.get("Service", namespace, "engine-llama")
        assert service is not None
        kubectl("scale", "-n", namespace, "model/llama", "--replicas=2")
        await pass_until(operator, lambda: ready(2))
        refused = kubectl("scale", "-n", namespace, "model/llama", "--replicas=7", check=False)
        assert refused.returncode != 0
        for _ in range(3):
            await operator.sync()
        obj = await kube.get("Model", namespace, "llama")
        assert obj is not None and obj["spec"]["replicas"] == {"min": 2, "max": 3}
        assert condition(obj, "Ready")["status"] == "True"
        after = await kube.get("Service", namespace, "engine-llama")
        assert after is not None
        assert after["metadata"]["uid"] == service["metadata"]["uid"]
        assert after["spec"]["clusterIP"] == service["spec"]["clusterIP"]


async def test_a_deleted_tenant_leaves_the_store_and_the_cluster(
    kube: ClientKube,
    namespace: str,
    kubectl: Callable[..., Any],
    tmp_path: Path,
) -> None:
    name = f"acme-{namespace[2:]}"
    tenant = {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {"priority": "interactive", "limits": {"requestsPerMinute": 60}},
    }
    kubectl("apply", "-f", "-", input=yaml.safe_dump(tenant))
    try:
        async with operating(kube, namespace, tmp_path) as operator:
            store = operator.controller.store

            async def mirrored() -> Any:
                obj = await kube.get("Tenant", "", name)
                return obj if (obj or {}).get("status", {}).get("namespace") else None

            obj = await pass_until(operator, mirrored)
            assert obj["status"]["namespace"] == f"tenant-{name}"
            assert condition(obj, "Ready")["status"] == "True"
            assert await kube.get("Namespace", "", f"tenant-{name}") is not None
            assert name in {t.tenant.name for t in store.list_tenants()}
            # Steady: the namespace (with the server's own label) is not rewritten.
            await operator.sync()
            before = (await kube.get("Namespace", "", f"tenant-{name}"))["metadata"]  # type: ignore[index]
            for _ in range(2):
                await operator.sync()
                assert operator.writes == 0
            after = (await kube.get("Namespace", "", f"tenant-{name}"))["metadata"]  # type: ignore[index]
            assert after["resourceVersion"] == before["resourceVersion"]
            kubectl("delete", "tenant", name)

            async def forgotten() -> bool:
                return name not in {t.tenant.name for t in store.list_tenants()}

            await pass_until(operator, forgotten)

            async def namespace_going() -> bool:
                ns = await kube.get("Namespace", "", f"tenant-{name}")
                return ns is None or bool(ns["metadata"].get("deletionTimestamp"))

            await pass_until(operator, namespace_going)
    finally:
        kubectl("delete", "tenant", name, "--ignore-not-found")


@pytest.mark.postgres
async def test_one_leader_acts_and_a_stand_by_takes_over_without_duplicating_pods(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    model_cache: str,
    priority_classes: None,
    kubectl: Callable[..., Any],
    control_plane: Any,
    postgres_url: str,
) -> None:
    """Two operators on one store; the leader is killed (its lease left to expire)."""
    await nodes.add(f"{namespace}-gpu-a", gpus=4)
    apply(kubectl, namespace, model("llama", replicas={"min": 2, "max": 2}))
    Store.open(postgres_url).close()  # migrate once, before two processes race to
    config = str(control_plane.kubeconfig("admin"))
    clients = [ClientKube.from_environment(config) for _ in range(2)]
    stops = [asyncio.Event(), asyncio.Event()]
    tasks = [
        asyncio.create_task(
            run_operator(
                OperatorConfig(
                    namespace=namespace,
                    store_url=postgres_url,
                    identity=f"op-{i}",
                    interval_s=0.3,
                    lease_s=4.0,
                ),
                clients[i],
                stop=stops[i],
                release_on_stop=False,
            ),
            name=f"test:operator-{i}",
        )
        for i in range(2)
    ]
    created: list[str] = []

    async def record() -> None:
        async for event in kube.watch("Pod", namespace, ENGINE):
            if event.type == "ADDED" and event.object["metadata"]["name"] not in created:
                created.append(event.object["metadata"]["name"])

    recorder = asyncio.create_task(record(), name="test:record-pods")
    try:

        async def holder() -> str:
            lease = await kube.get("Lease", namespace, "gpufleet-operator")
            return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")

        async def two_ready() -> bool:
            obj = await kube.get("Model", namespace, "llama")
            return (obj or {}).get("status", {}).get("readyReplicas") == 2

        await eventually(two_ready)
        leader = await holder()
        assert leader in ("op-0", "op-1")
        # Several passes later nothing churns: the stand-by creates nothing.
        await asyncio.sleep(0)  # let the recorder see the first pods
        await eventually(lambda: _true(len(created) >= 2))
        first = list(created)
        # Kill the leader: no clean release, its lease must expire.
        index = int(leader[-1])
        tasks[index].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[index]
        other = f"op-{1 - index}"
        await eventually(lambda: _check(holder(), other), timeout=30)
        # The new leader adopts the two pods and keeps them: no new pods, none deleted.
        for _ in range(5):
            await operator_pass_happened(kube, namespace)
        pods = await engine_pods(kube, namespace)
        assert sorted(p["metadata"]["name"] for p in pods) == sorted(first)
        assert created == first
    finally:
        recorder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await recorder
        for stop in stops:
            stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in clients:
            await client.close()


async def _true(value: bool) -> bool:
    return value


async def _check(value: Awaitable[str], want: str) -> bool:
    return await value == want


async def operator_pass_happened(kube: ClientKube, namespace: str) -> None:
    """Wait for the leader to renew its lease once more (it renews between passes)."""
    lease = await kube.get("Lease", namespace, "gpufleet-operator")
    assert lease is not None
    before = lease["spec"]["renewTime"]

    async def renewed() -> bool:
        now = await kube.get("Lease", namespace, "gpufleet-operator")
        return now is not None and now["spec"]["renewTime"] != before

    await eventually(renewed, timeout=30)
