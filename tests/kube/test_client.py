"""``ClientKube`` against the real API server: token, client-certificate and in-cluster
credentials authenticate (never ``system:anonymous``); a service account is held to RBAC and a
refusal is a clear ``Forbidden``; a kind whose CRD is absent is ``NotServed`` (the server's
plain-text 404 is no crash); a watch yields its initial list, sees what is created between its
list and its watch, and after 410 Gone lists again and reports the deletions it missed; pod
logs are asked of the pods/log API, and without a kubelet that is a clear error."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gpufleet.runtime.kubernetes.api import Forbidden, KubeError, NotServed, WatchEvent
from gpufleet.runtime.kubernetes.client import ClientKube
from tests.kube.chart import lws_crd
from tests.kube.conftest import Nodes
from tests.kube.controlplane import RELEASE_NS, ControlPlane


def pod(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"test": "watch"}},
        "spec": {"containers": [{"name": "engine", "image": "engine:1"}]},
    }


async def create_pod(kube: ClientKube, name: str, namespace: str) -> None:
    """Create a pod; in a namespace just made, wait for its default service account first
    (the controller manager creates it; admission refuses pods until then)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            await kube.create(pod(name, namespace))
            return
        except Forbidden as exc:
            if "service account" not in str(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def next_event(stream: AsyncIterator[WatchEvent], timeout: float = 30.0) -> WatchEvent:
    return await asyncio.wait_for(anext(stream), timeout)


async def test_token_and_certificate_kubeconfigs_authenticate(
    control_plane: ControlPlane,
) -> None:
    cases = {
        control_plane.kubeconfig("admin"): "admin",
        control_plane.kubeconfig("cert-admin", cert=True): "cert-admin",
        control_plane.kubeconfig(
            "gateway", token=control_plane.sa_token("gf-gateway")
        ): f"system:serviceaccount:{RELEASE_NS}:gf-gateway",
    }
    for config, user in cases.items():
        client = ClientKube.from_environment(str(config))
        try:
            assert await client.whoami() == user
        finally:
            await client.close()


async def test_the_in_cluster_service_account_goes_through_the_same_token_reading(
    control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a pod has: KUBERNETES_SERVICE_HOST/PORT, a token file and the cluster's CA (the
    official in-cluster loader writes ``bearer <token>``, lowercase)."""
    (tmp_path / "token").write_text(control_plane.sa_token("gf-operator"))
    (tmp_path / "ca.crt").write_text(control_plane.ca_file.read_text())
    host, port = control_plane.url.removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    client = ClientKube.from_environment(service_account_dir=tmp_path)
    try:
        assert await client.whoami() == f"system:serviceaccount:{RELEASE_NS}:gf-operator"
    finally:
        await client.close()


async def test_a_service_account_is_held_to_rbac_and_a_refusal_says_so(
    control_plane: ControlPlane, namespace: str
) -> None:
    config = control_plane.kubeconfig("gateway", token=control_plane.sa_token("gf-gateway"))
    client = ClientKube.from_environment(str(config))
    try:
        with pytest.raises(Forbidden) as refused:
            await client.list("Pod", namespace)
        assert refused.value.status == 403
        message = str(refused.value)
        assert f"system:serviceaccount:{RELEASE_NS}:gf-gateway" in message
        assert 'cannot list resource "pods"' in message and namespace in message
        assert "anonymous" not in message
        with pytest.raises(Forbidden):
            await anext(client.watch("Pod", namespace))
    finally:
        await client.close()


async def test_a_kind_whose_crd_is_absent_is_not_served_and_no_crash(
    kube: ClientKube, kubectl: Any, namespace: str, control_plane: ControlPlane
) -> None:
    assert not await kube.served("LeaderWorkerSet")
    assert await kube.served("Pod") and await kube.served("Model")
    with pytest.raises(NotServed, match=r"LeaderWorkerSet .*not served.*404 page not found"):
        await kube.list("LeaderWorkerSet", namespace)
    group = {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": "big", "namespace": namespace},
        "spec": {"leaderWorkerTemplate": {"size": 2}},
    }
    with pytest.raises(NotServed):
        await kube.create(group)  # never None
    with pytest.raises(NotServed):
        await anext(kube.watch("LeaderWorkerSet", namespace))
    await kube.delete("LeaderWorkerSet", namespace, "big")  # nothing there to delete
    with lws_crd(kubectl):
        fresh = ClientKube.from_environment(str(control_plane.kubeconfig("admin")))
        try:
            assert await fresh.served("LeaderWorkerSet")
            assert await fresh.list("LeaderWorkerSet", namespace) == []
        finally:
            await fresh.close()


async def test_a_watch_sees_its_initial_list_and_what_comes_before_the_watch(
    kube: ClientKube, namespace: str
) -> None:
    for name in ("a", "b", "c"):
        await create_pod(kube, name, namespace)
    synced: list[bool] = []
    stream = kube.watch("Pod", namespace, {"test": "watch"}, synced=lambda: synced.append(True))
    first = await next_event(stream)
    # The watch has listed and not yet watched: what is created now must not be lost.
    await create_pod(kube, "d", namespace)
    initial = [first, await next_event(stream), await next_event(stream)]
    assert [(e.type, e.object["metadata"]["name"]) for e in initial] == [
        ("ADDED", "a"), ("ADDED", "b"), ("ADDED", "c"),
    ]  # fmt: skip
    assert initial[0].object["kind"] == "Pod" and initial[0].object["apiVersion"] == "v1"
    event = await next_event(stream)
    assert synced == [True]
    while event.object["metadata"]["name"] != "d":  # a, b, c may change meanwhile (scheduler)
        assert event.type == "MODIFIED"
        event = await next_event(stream)
    assert event.type == "ADDED"
    await stream.aclose()  # type: ignore[attr-defined]


def model(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "source": "hf://meta-llama/Meta-Llama-3-8B-Instruct",
            "engine": "vllm",
            "resources": {"gpus": 1},
        },
    }


async def test_after_410_gone_the_watch_lists_again_and_reports_what_it_missed(
    kube: ClientKube, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """On Models: their watch cache began when the CRD was installed, so a client resuming
    from a version before that gets the server's 410 (the cache of pods, made with the
    cluster, still has everything of a young test cluster)."""
    caplog.set_level(logging.INFO, logger="gpufleet.kubernetes.client")
    for name in ("a", "b", "c"):
        await kube.create(model(name, namespace))
    stream = kube.watch("Model", namespace)
    names = {(await next_event(stream)).object["metadata"]["name"] for _ in range(3)}
    assert names == {"a", "b", "c"}
    await kube.create(model("d", namespace))  # seen through the watch: it is connected
    event = await next_event(stream)
    assert (event.type, event.object["metadata"]["name"]) == ("ADDED", "d")
    # The connection drops; by the time the client is back, the server no longer has the
    # version it resumes from (410). Meanwhile a and b were deleted, c changed, e created.
    kube.expire_watches()
    await kube.delete("Model", namespace, "a")
    await kube.delete("Model", namespace, "b")
    await kube.patch_status("Model", namespace, "c", {"desiredReplicas": 2})
    await kube.create(model("e", namespace))
    seen: list[tuple[str, str]] = []
    want = {("DELETED", "a"), ("DELETED", "b"), ("MODIFIED", "c"), ("ADDED", "e")}
    deadline = time.monotonic() + 60
    while not want <= set(seen):
        assert time.monotonic() < deadline, f"missed changes; saw {seen}"
        event = await next_event(stream)
        seen.append((event.type, event.object["metadata"]["name"]))
    assert sorted(seen) == sorted(want)  # each once: derived from the new list, not replayed
    assert "is gone (410" in caplog.text  # the server's own answer
    # And it watches on from the new list.
    await kube.delete("Model", namespace, "c")
    event = await next_event(stream)
    assert (event.type, event.object["metadata"]["name"]) == ("DELETED", "c")
    await stream.aclose()  # type: ignore[attr-defined]


async def test_pod_logs_are_asked_of_the_pods_log_api(
    kube: ClientKube, namespace: str, nodes: Nodes
) -> None:
    """No kubelet serves logs here: the API server, which proxies the request to the pod's
    kubelet, answers with an error — the client says so; it does not invent text."""
    await nodes.add("gpu-logs", gpus=0)
    await create_pod(kube, "a", namespace)
    deadline = time.monotonic() + 60
    while not ((await kube.get("Pod", namespace, "a")) or {}).get("spec", {}).get("nodeName"):
        assert time.monotonic() < deadline, "the scheduler did not bind the pod"
        await asyncio.sleep(0.1)
    with pytest.raises(KubeError) as failed:
        await kube.logs(namespace, "a", container="engine", tail=10)
    message = str(failed.value)
    assert "logs of pod a" in message and "HTTP" in message
    assert "kubectl logs" not in message
    with pytest.raises(KubeError, match="HTTP 404"):
        await kube.logs(namespace, "no-such-pod", container="engine")
