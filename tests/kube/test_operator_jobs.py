"""The operator runs a GpuJob on the real API server: the resource is submitted to the job
scheduler, planned on the nodes' GPUs (read from the Node objects as for models), its attempt a
``batch/v1`` Job created suspended and admitted, pinned to the planned node; the test, playing
the kubelet, ends the pod with exit code 0, and the GpuJob's status says Succeeded — written by
the operator's pass, with its attempt, node and GPU time. Its checkpoint's claim goes with it."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from gpufleet.operator import OperatorConfig
from gpufleet.operator.process import acting
from gpufleet.runtime.kubernetes import RenderSettings
from gpufleet.runtime.kubernetes.client import ClientKube
from gpufleet.runtime.kubernetes.jobs import CheckpointVolume
from gpufleet.store import Store, sqlite_url
from tests.kube.conftest import Nodes
from tests.kube.kubelet import Kubelet
from tests.kube.test_jobs import exited, finished_stay_finished, pods_of, volumes
from tests.kube.test_operator import pass_until

__all__ = ["volumes"]  # the fixture, shared with tests/kube/test_jobs.py


async def test_the_operator_runs_a_gpujob_as_a_batch_job_and_reports_it(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    priority_classes: None,
    volumes: Callable[[str], None],
    kubectl: Callable[..., Any],
    tmp_path: Path,
) -> None:
    await nodes.add(f"{namespace}-gpu", gpus=2)
    kubelet.policy = finished_stay_finished
    tenant = f"lab-{secrets.token_hex(3)}"
    kubectl("apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": tenant}}
    ))  # fmt: skip
    volumes("tune")
    job = {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "GpuJob",
        "metadata": {"name": "tune", "namespace": namespace},
        "spec": {
            "image": "ghcr.io/acme/trainer:1.4",
            "command": ["python", "train.py"],
            "resources": {"gpus": 2},
            "tenant": tenant,
            "checkpoint": {"path": "/checkpoint", "graceSeconds": 20},
        },
    }
    store = Store.open(sqlite_url(tmp_path))
    # The test's volumes are of class "manual" (no provisioner here): the chart's
    # jobs.checkpointStorageClass.
    cfg = OperatorConfig(
        namespace=namespace,
        store_url="",
        settings=RenderSettings(namespace),
        job_checkpoint=CheckpointVolume(storage_class="manual"),
    )
    try:
        async with acting(cfg, kube, store) as operator:
            await kube.create(job)

            async def running_pod() -> Any:
                pods = await pods_of(kube, namespace, "tune")
                up = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
                return up[0] if up else None

            pod = await pass_until(operator, running_pod)
            assert pod["spec"]["nodeName"] == f"{namespace}-gpu"
            assert pod["spec"]["terminationGracePeriodSeconds"] == 20
            env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
            assert env["GPUFLEET_ATTEMPT"] == "1" and "GPUFLEET_RESUMED" not in env

            async def status_running() -> Any:
                obj = await kube.get("GpuJob", namespace, "tune")
                status = (obj or {}).get("status") or {}
                return status if status.get("phase") == "Running" else None

            status = await pass_until(operator, status_running)
            assert (status["attempts"], status["nodes"]) == (1, [f"{namespace}-gpu"])
            await kube.patch_status("Pod", namespace, pod["metadata"]["name"], exited(0))

            async def succeeded() -> Any:
                obj = await kube.get("GpuJob", namespace, "tune")
                status = (obj or {}).get("status") or {}
                return status if status.get("phase") == "Succeeded" else None

            status = await pass_until(operator, succeeded, timeout=90)
            assert status["gpuSeconds"] >= 0 and status["completionTime"]
            claim = await kube.get(
                "PersistentVolumeClaim", namespace, "gpufleet-job-tune-checkpoint"
            )
            assert claim is None or claim["metadata"].get("deletionTimestamp")
    finally:
        store.close()
        with contextlib.suppress(Exception):
            kubectl("delete", "tenant", tenant, "--wait=false")
