"""``gpufleet render`` output on a real API server: every object accepted (Pod Security
``restricted`` on the pods the Deployments and Jobs make included), the model-cache claim among
them — without it the real scheduler leaves every engine Pending — and engines reached on the
configured port; with an inventory, each engine pod bound by the real scheduler to the node
and the GPUs the planner chose, whole GPUs being one pod's each."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.conftest import Nodes
from tests.kube.controlplane import ROOT
from tests.readme import kubernetes_commands

Kubectl = Callable[..., subprocess.CompletedProcess[str]]
DATA = ROOT / "tests" / "data" / "k8s"


def render(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "gpufleet", "render", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def wait_for(
    what: str,
    probe: Callable[[], Any],
    timeout_s: float = 180.0,
    explain: Callable[[], str] = lambda: "",
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}{explain()}")


def scene(kubectl: Kubectl, namespace: str) -> str:
    """What the namespace holds and what happened there (for a failure's message)."""
    pods = kubectl("get", "pods,rs,jobs,pvc", "-o", "wide", "-n", namespace, check=False)
    events = kubectl("get", "events", "-n", namespace, check=False)
    return f"\n{pods.stdout}\n{events.stdout}"


def get_json(kubectl: Kubectl, *args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def remove_pods(kubectl: Kubectl, namespace: str) -> None:
    """What a kubelet would finish: the deletion of the namespace's pods (grace 0)."""
    kubectl(
        "delete", "pods", "--all", "-n", namespace, "--grace-period=0", "--force", "--wait=false"
    )


@pytest.fixture
def cleanup(kubectl: Kubectl, namespace: str) -> Iterator[None]:
    """Objects a test applies: the cluster-scoped ones it created (tenant namespaces,
    PriorityClasses, a PersistentVolume) are deleted after it, and the test namespace's pods,
    which no kubelet finishes deleting, are removed at once."""
    before = set(kubectl("get", "priorityclass,namespace,pv", "-o", "name").stdout.split())
    try:
        yield
    finally:
        kubectl("delete", "deploy,job,pvc", "--all", "-n", namespace, "--wait=false")
        remove_pods(kubectl, namespace)
        after = set(kubectl("get", "priorityclass,namespace,pv", "-o", "name").stdout.split())
        made = sorted(after - before - {f"namespace/{namespace}"})
        for name in made:
            if name.startswith("namespace/"):
                remove_pods(kubectl, name.split("/")[1])
            # A tenant's namespace is gone before the next test may make it again.
            wait = "--wait=true" if name.startswith("namespace/") else "--wait=false"
            kubectl("delete", "--ignore-not-found", wait, "--timeout=120s", name)


def apply(kubectl: Kubectl, docs: list[dict[str, Any]]) -> None:
    done = kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
    assert [line for line in done.stderr.splitlines() if line.lower().startswith("warning")] == []
    there = kubectl("get", "-f", "-", "-o", "name", input=yaml.safe_dump_all(docs))
    assert len(there.stdout.split()) == len(docs)


def a_volume_for_the_cache(kubectl: Kubectl, name: str) -> None:
    """What a provisioner would do: a volume the cache claim binds to (no StorageClass here)."""
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "500Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "",
            "hostPath": {"path": "/srv/models"},
        },
    }
    kubectl("apply", "-f", "-", input=yaml.safe_dump(volume))


def engine_pods(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    selector = "app.kubernetes.io/component=engine"
    items: list[dict[str, Any]] = get_json(kubectl, "pods", "-n", namespace, "-l", selector)[
        "items"
    ]
    return items


async def test_every_rendered_object_is_accepted_and_engines_get_scheduled(
    kubectl: Kubectl, namespace: str, nodes: Nodes, cleanup: None
) -> None:
    docs = render(
        "-f", str(DATA / "models.yaml"), "--namespace", namespace, "--engine-port", "9000"
    )  # fmt: skip
    kinds = {d["kind"] for d in docs}
    assert {"PersistentVolumeClaim", "Deployment", "Job", "Service", "NetworkPolicy"} <= kinds
    await nodes.add("gpu-1", gpus=8)
    a_volume_for_the_cache(kubectl, f"cache-{namespace}")
    apply(kubectl, docs)
    # The namespace now enforces restricted (render's Namespace object says so) ...
    labels = get_json(kubectl, "namespace", namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    claim = wait_for(
        "the cache claim to bind",
        lambda: (
            (c := get_json(kubectl, "pvc", "gpufleet-model-cache", "-n", namespace))
            and c["status"].get("phase") == "Bound"
            and c
        ),
    )
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # ... every engine replica got a pod (admitted under restricted) the scheduler bound: the
    # claim they mount exists. Without it they all stay Pending ("persistentvolumeclaim not
    # found").
    wanted = sum(d["spec"]["replicas"] for d in docs if d["kind"] == "Deployment")

    def bound() -> list[dict[str, Any]]:
        pods = engine_pods(kubectl, namespace)
        ok = len(pods) == wanted and all(p["spec"].get("nodeName") == "gpu-1" for p in pods)
        return pods if ok else []

    pods = wait_for(
        f"{wanted} engine pods bound to gpu-1", bound, explain=lambda: scene(kubectl, namespace)
    )
    loaders = get_json(kubectl, "pods", "-n", namespace, "-l", "app.kubernetes.io/component=loader")
    assert len(loaders["items"]) == len([d for d in docs if d["kind"] == "Job"])
    # The engines listen on the port asked for; their probes and Services follow it.
    for pod in pods:
        engine = pod["spec"]["containers"][0]
        assert engine["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
        assert engine["args"][engine["args"].index("--port") + 1] == "9000"
        for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
            assert engine[probe]["httpGet"]["port"] == "http"
    services = get_json(kubectl, "services", "-n", namespace)["items"]
    assert {s["metadata"]["name"] for s in services} == {"engine-llama-3-8b", "engine-smol"}
    for service in services:
        (port,) = service["spec"]["ports"]
        assert (port["port"], port["targetPort"]) == (9000, "http")
    policy = get_json(kubectl, "networkpolicy", "gateway-to-engines", "-n", "tenant-acme")
    # The engine port, then the KV-event ports (tests/unit/test_kubernetes_kv_events.py).
    assert policy["spec"]["ingress"][0]["ports"][0] == {"protocol": "TCP", "port": 9000}


async def test_nvidia_engines_are_accepted_and_scheduled_under_the_restricted_profile(
    kubectl: Kubectl, namespace: str, nodes: Nodes, cleanup: None
) -> None:
    """TensorRT-LLM (PyTorch backend and a TensorRT engine) and Triton (vLLM and TensorRT-LLM
    backends): their Deployments, with NVIDIA's images, ``sh -c`` command and Triton's probe
    path, admitted by a real API server and each pod bound by the real scheduler."""
    docs = render("-f", str(DATA / "nvidia.yaml"), "--namespace", namespace)
    await nodes.add("gpu-1", gpus=8)
    a_volume_for_the_cache(kubectl, f"cache-{namespace}")
    apply(kubectl, docs)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 4

    def bound() -> list[dict[str, Any]]:
        pods = engine_pods(kubectl, namespace)
        ok = len(pods) == 4 and all(p["spec"].get("nodeName") == "gpu-1" for p in pods)
        return pods if ok else []

    pods = wait_for(
        "4 engine pods bound to gpu-1", bound, explain=lambda: scene(kubectl, namespace)
    )
    images = {
        p["metadata"]["labels"]["gpufleet.io/model"]: p["spec"]["containers"][0]["image"]
        for p in pods
    }
    assert images["qwen-trt"].startswith("nvcr.io/nvidia/tensorrt-llm/release:")
    assert images["mistral-triton"].endswith("-trtllm-python-py3")
    probes = {
        p["metadata"]["labels"]["gpufleet.io/model"]: p["spec"]["containers"][0]["readinessProbe"]
        for p in pods
    }
    assert probes["llama-triton"]["httpGet"]["path"] == "/health/ready"
    assert probes["qwen-trt"]["httpGet"]["path"] == "/health"


async def test_with_an_inventory_each_engine_lands_where_the_planner_put_it(
    kubectl: Kubectl, namespace: str, nodes: Nodes, cleanup: None, tmp_path: Path
) -> None:
    """The example inventory (eight H100s; three A100s and one split into two 3g.40gb MIG
    instances), as GPU Feature Discovery and the device plugin (MIG "mixed") would show it."""
    docs = render(
        "-f", str(DATA / "placed.yaml"), "--inventory", str(ROOT / "examples" / "inventory.yaml"),
        "--namespace", namespace, "--no-model-cache-pvc",
    )  # fmt: skip
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    await nodes.add("node-1", gpus=8, labels={"zone": "a"})
    await nodes.add("node-2", gpus=3, product="NVIDIA-A100-SXM4-80GB")
    capacity = {
        "cpu": "64", "memory": "512Gi", "pods": "110",
        "nvidia.com/gpu": "3", "nvidia.com/mig-3g.40gb": "2",
    }  # fmt: skip
    kubectl(
        "patch", "node", "node-2", "--subresource=status", "--type=merge", "-p",
        json.dumps({"status": {"capacity": capacity, "allocatable": capacity}}),
    )  # fmt: skip
    # The claim exists already (--no-model-cache-pvc): made here, as by the Helm chart.
    a_volume_for_the_cache(kubectl, f"cache-{namespace}")
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "gpufleet-model-cache", "namespace": namespace},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "500Gi"}},
        },
    }
    apply(kubectl, docs)
    kubectl("apply", "-f", "-", input=yaml.safe_dump(claim))
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    wanted = sum(d["spec"]["replicas"] for d in deployments)
    planned: dict[tuple[str, str], str] = {}  # (model, placement group) → node
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (hosts,) = [
            t["values"]
            for t in terms["nodeSelectorTerms"][0]["matchExpressions"]
            if t["key"] == "kubernetes.io/hostname"
        ]
        labels = d["spec"]["template"]["metadata"]["labels"]
        planned[labels["gpufleet.io/model"], labels["gpufleet.io/placement"]] = hosts[0]
        # Whole GPUs or a MIG instance of its own: no share of memory given to the engine.
        args = pod["containers"][0]["args"]
        assert "--gpu-memory-utilization" not in args and "--mem-fraction-static" not in args

    def bound() -> list[dict[str, Any]]:
        pods = engine_pods(kubectl, namespace)
        ok = len(pods) == wanted and all(p["spec"].get("nodeName") for p in pods)
        return pods if ok else []

    pods = wait_for(f"{wanted} engine pods bound", bound, explain=lambda: scene(kubectl, namespace))
    for pod in pods:
        labels = pod["metadata"]["labels"]
        where = planned[labels["gpufleet.io/model"], labels["gpufleet.io/placement"]]
        assert pod["spec"]["nodeName"] == where
    by_model: dict[str, list[str]] = {}
    for pod in pods:
        by_model.setdefault(pod["metadata"]["labels"]["gpufleet.io/model"], []).append(
            pod["spec"]["nodeName"]
        )
    assert sorted(by_model["llama-3-8b"]) == ["node-1"] * 3
    assert by_model["qwen-small"] == ["node-2"]  # its own MIG instance


@contextlib.contextmanager
def keda_crd(kubectl: Kubectl) -> Iterator[None]:
    """KEDA's ScaledObject CRD (``tests/data/k8s/keda-crd.yaml``) for the block, removed after
    it unless it was there before."""
    name = "crd/scaledobjects.keda.sh"
    there = kubectl("get", name, "--ignore-not-found", "-o", "name").stdout.strip() != ""
    kubectl("apply", "--server-side", "-f", str(DATA / "keda-crd.yaml"))
    kubectl("wait", "--for=condition=Established", name, "--timeout=60s")
    try:
        yield
    finally:
        if not there:
            kubectl("delete", name, "--wait=true", "--timeout=120s")


def in_namespace(words: Sequence[str], namespace: str) -> list[str]:
    """A README ``gpufleet render`` line's arguments, in the test's namespace, printing to
    stdout (its ``> FILE`` dropped)."""
    args = list(words[2:])
    if ">" in args:
        del args[args.index(">") :]
    if "--namespace" in args:
        args[args.index("--namespace") + 1] = namespace
    else:
        args += ["--namespace", namespace]
    return args


async def test_the_readme_render_lines_apply_as_written(
    kubectl: Kubectl, namespace: str, nodes: Nodes, cleanup: None
) -> None:
    """The README's Kubernetes block, from the repository root, on the files it names: each
    output — alternatives, so each in a namespace of its own — applied server-side (strict
    field validation, Pod Security ``restricted``); the loader Job's pod admitted; the pinned
    output's engine bound by the real scheduler to the CPU node the planner chose."""
    lines = kubernetes_commands("gpufleet")
    assert len(lines) == 3 and all(words[1] == "render" for words in lines)
    await nodes.add("cpu-1", gpus=0)  # the example inventory's CPU node ...
    await nodes.add(f"{namespace}-elsewhere", gpus=0)  # ... and one the planner did not pick
    extra = [f"{namespace}-{i}" for i in range(1, len(lines))]
    with keda_crd(kubectl), contextlib.ExitStack() as stack:
        # No kubelet finishes what the controllers delete: orphan the pods, then remove them,
        # before the namespaces go (``cleanup`` waits for that).
        for where in extra:
            stack.callback(remove_pods, kubectl, where)
            stack.callback(
                kubectl, "delete", "deploy,rs,job", "--all", "-n", where, "--cascade=orphan"
            )
        for i, words in enumerate(lines):
            where = namespace if i == 0 else extra[i - 1]
            a_volume_for_the_cache(kubectl, f"cache-{where}")
            docs = render(*in_namespace(words, where))
            apply(kubectl, docs)
            assert get_json(kubectl, "job", "-n", where)["items"]

            def loading(where: str = where) -> Any:
                selector = "app.kubernetes.io/component=loader"
                return get_json(kubectl, "pods", "-n", where, "-l", selector)["items"]

            wait_for(
                f"the loader's pod in {where}", loading, explain=lambda w=where: scene(kubectl, w)
            )
            if "--keda" in words:
                scaled = get_json(kubectl, "scaledobject", "engine-smollm2", "-n", where)
                assert scaled["spec"]["scaleTargetRef"]["name"] == "engine-smollm2"
            if "--inventory" in words:

                def bound(where: str = where) -> list[dict[str, Any]]:
                    return [p for p in engine_pods(kubectl, where) if p["spec"].get("nodeName")]

                (pod,) = wait_for(
                    "the pinned engine pod bound", bound, explain=lambda w=where: scene(kubectl, w)
                )
                assert pod["spec"]["nodeName"] == "cpu-1"
