"""GPU job attempts as ``batch/v1`` Jobs on the real API server, with the real scheduler and the
controller manager's Job controller; the test plays the kubelet (``tests.kube.kubelet``).

A Job is created suspended and then unsuspended (the admission); the Job controller makes one
pod per node of the gang and the scheduler binds each to a node the planner chose; pods the test
marks Succeeded complete the Job. Preempting suspends the Job: the controller deletes the pod
with the job's grace period (its ``deletionGracePeriodSeconds``), and the attempt ends preempted
once the pod is gone — its Job deleted, its Service with it, its checkpoint claim kept. A pod
that fails ends the attempt failed (its exit code; no kubelet here to give its log, which the
result says), and ``activeDeadlineSeconds`` a time-out. Everything waits on conditions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.runtime.jobs import JobAttempt, Outcome
from gpufleet.runtime.kubernetes import RenderSettings
from gpufleet.runtime.kubernetes.client import ClientKube
from gpufleet.runtime.kubernetes.jobs import (
    INDEX_ANNOTATION,
    LABEL_ATTEMPT,
    LABEL_JOB,
    CheckpointVolume,
    KubernetesJobRunner,
    checkpoint_claim_name,
)
from gpufleet.spec import GpuJob, parse_job
from tests.conftest import eventually
from tests.kube.conftest import Nodes
from tests.kube.kubelet import Kubelet, Verdict


def gpujob(name: str, gpus: int, per_node: int | None = None, **spec: Any) -> GpuJob:
    resources: dict[str, Any] = {"gpus": gpus}
    if per_node is not None:
        resources["gpusPerNode"] = per_node
    return parse_job(
        {
            "apiVersion": "gpufleet.io/v1alpha1",
            "kind": "GpuJob",
            "metadata": {"name": name},
            "spec": {
                "command": ["python", "train.py"],
                "image": "ghcr.io/acme/trainer:1.4",
                "resources": resources,
                **spec,
            },
        }
    )


def attempt_of(job: GpuJob, node: str, *workers: str, **kw: Any) -> JobAttempt:
    return JobAttempt(
        job=job.name,
        attempt=1,
        command=list(job.spec.command),
        checkpoint_dir=Path("/checkpoint"),
        grace_s=float(job.spec.grace_seconds),
        node=node,
        workers=workers,
        image=job.spec.image,
        **kw,
    )


def finished_stay_finished(pod: dict[str, Any]) -> Verdict:
    """The kubelet's part: bound pods run; a pod the test ended stays ended."""
    phase = (pod.get("status") or {}).get("phase")
    return "pending" if phase in ("Succeeded", "Failed") else "ready"


def exited(code: int) -> dict[str, Any]:
    state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}
    return {
        "phase": "Succeeded" if code == 0 else "Failed",
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [
            {
                "name": "job",
                "ready": False,
                "restartCount": 0,
                "image": "trainer",
                "imageID": "",
                "state": state,
            }
        ],
    }


@pytest.fixture
def volumes(kubectl: Any, namespace: str) -> Iterator[Callable[[str], None]]:
    """A PersistentVolume bound in advance to a job's checkpoint claim (there is no provisioner
    here, and the scheduler places no pod whose claim is unbound)."""
    made: list[str] = []

    def bind(job: str) -> None:
        name = f"ckpt-{namespace}-{job}"
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                "storageClassName": "manual",
                "hostPath": {"path": f"/tmp/{name}"},
                "claimRef": {"namespace": namespace, "name": checkpoint_claim_name(job)},
            },
        }
        kubectl("apply", "-f", "-", input=yaml.safe_dump(pv))
        made.append(name)

    yield bind
    for name in made:
        kubectl("delete", "pv", name, "--wait=false", check=False)


@pytest.fixture
async def runner(kube: ClientKube, namespace: str) -> AsyncIterator[KubernetesJobRunner]:
    r = make_runner(kube, namespace)
    yield r
    await r.close()


def make_runner(kube: ClientKube, namespace: str) -> KubernetesJobRunner:
    return KubernetesJobRunner(
        kube,
        RenderSettings(namespace=namespace),
        checkpoint=CheckpointVolume(storage_class="manual"),
        poll_s=1.0,
    )


async def pods_of(kube: ClientKube, namespace: str, job: str) -> list[dict[str, Any]]:
    pods = await kube.list("Pod", namespace, {LABEL_JOB: job, LABEL_ATTEMPT: "1"})
    return sorted(pods, key=lambda p: p["metadata"]["annotations"][INDEX_ANNOTATION])


async def running_pods(kube: ClientKube, namespace: str, job: str, n: int) -> list[dict[str, Any]]:
    async def check() -> list[dict[str, Any]]:
        pods = await pods_of(kube, namespace, job)
        up = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        return pods if len(up) == n else []

    return await eventually(check, f"{n} pod(s) of {job} running", timeout=60)


async def test_a_two_node_gang_is_admitted_pinned_to_its_nodes_and_succeeds(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    priority_classes: None,
    volumes: Callable[[str], None],
    runner: KubernetesJobRunner,
) -> None:
    for node in ("gpu-1", "gpu-2", "gpu-3"):
        await nodes.add(node, gpus=8)
    volumes("pretrain")
    kubelet.policy = finished_stay_finished
    suspends: list[bool] = []
    synced = asyncio.Event()

    async def follow() -> None:
        async for event in kube.watch("Job", namespace, synced=synced.set):
            suspends.append(event.object["spec"].get("suspend"))

    watcher = asyncio.create_task(follow(), name="test:jobs")
    try:
        await synced.wait()
        job = gpujob("pretrain", 16, 8)
        running = await runner.start(attempt_of(job, "gpu-3", "gpu-1"), job)
        pods = await running_pods(kube, namespace, "pretrain", 2)
        # Created suspended (nothing ran before the admission), then admitted.
        assert suspends[0] is True and False in suspends
        # One pod per planned node, none on gpu-2; hostnames under the attempt's Service.
        assert sorted(p["spec"]["nodeName"] for p in pods) == ["gpu-1", "gpu-3"]
        leader = pods[0]
        assert leader["spec"]["hostname"] == "pretrain-a1-0"
        assert leader["spec"]["subdomain"] == "gpufleet-pretrain-a1"
        assert await kube.get("Service", namespace, "gpufleet-pretrain-a1") is not None
        claim = await kube.get(
            "PersistentVolumeClaim", namespace, "gpufleet-job-pretrain-checkpoint"
        )
        assert claim is not None and claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert not running.done
        for pod in pods:  # the kubelet's part: both ranks exit 0
            await kube.patch_status("Pod", namespace, pod["metadata"]["name"], exited(0))
        result = await asyncio.wait_for(running.wait(), 60)
        assert (result.outcome, result.exit_code) == (Outcome.SUCCEEDED, 0)
        kept = await kube.get("Job", namespace, "pretrain-a1")  # kept for its pods' logs
        assert kept is not None and kept["spec"]["ttlSecondsAfterFinished"] == 86_400
        # No kubelet serves logs here: the answer says so, rank by rank, never made up.
        lines = await runner.logs("pretrain", 1)
        assert lines[0].startswith("--- gpufleet: pod pretrain-a1-0-")
        assert "is not available" in lines[1] and "HTTP" in lines[1]
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_an_adopted_attempt_preempted_suspends_its_job_and_the_pod_gets_its_grace(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    priority_classes: None,
    volumes: Callable[[str], None],
    runner: KubernetesJobRunner,
) -> None:
    await nodes.add("gpu-1", gpus=8)
    volumes("finetune")
    job = gpujob("finetune", 2, checkpoint={"path": "/ckpt", "graceSeconds": 45})
    await runner.start(attempt_of(job, "gpu-1"), job)
    (pod,) = await running_pods(kube, namespace, "finetune", 1)
    name = pod["metadata"]["name"]
    # The operator hands over its lead: the pod runs on, and the next one follows it again.
    await runner.close()
    successor = make_runner(kube, namespace)
    try:
        assert await successor.adopt("finetune", 2) is None  # no such attempt on the cluster
        running = await successor.adopt("finetune", 1)
        assert running is not None and not running.done
        (still,) = await pods_of(kube, namespace, "finetune")
        assert still["metadata"]["uid"] == pod["metadata"]["uid"]  # nothing started twice

        kubelet.finish_deletions = False  # the job is saving its checkpoint
        running.preempt("interactive demand needs gpu-1")

        async def terminating() -> dict[str, Any] | None:
            found = await kube.get("Pod", namespace, name)
            return (
                found if found is not None and found["metadata"].get("deletionTimestamp") else None
            )

        deleted = await eventually(terminating, "the Job controller deletes the pod", timeout=60)
        assert deleted["metadata"]["deletionGracePeriodSeconds"] == 45  # SIGKILL after 45 s
        suspended = await kube.get("Job", namespace, "finetune-a1")
        assert suspended is not None and suspended["spec"]["suspend"] is True
        assert not running.done  # its GPU is still held
        await kube.delete("Pod", namespace, name, grace_s=0)  # the kubelet: it stopped
        result = await asyncio.wait_for(running.wait(), 60)
        assert (result.outcome, result.reason) == (
            Outcome.PREEMPTED, "interactive demand needs gpu-1",
        )  # fmt: skip
    finally:
        await successor.close()

    async def gone(kind: str, obj: str) -> bool:
        return await kube.get(kind, namespace, obj) is None

    assert await gone("Job", "finetune-a1")  # nothing of it left to read
    await eventually(lambda: gone("Service", "gpufleet-finetune-a1"), "the Service goes too")
    claim = await kube.get("PersistentVolumeClaim", namespace, "gpufleet-job-finetune-checkpoint")
    assert claim is not None  # the next attempt resumes from it


async def test_a_crash_fails_the_attempt_and_a_deadline_times_it_out(
    kube: ClientKube,
    namespace: str,
    nodes: Nodes,
    kubelet: Kubelet,
    priority_classes: None,
    volumes: Callable[[str], None],
    runner: KubernetesJobRunner,
) -> None:
    await nodes.add("gpu-1", gpus=8)
    await nodes.add("gpu-2", gpus=8)
    volumes("crash")
    volumes("slow")
    kubelet.policy = finished_stay_finished
    crash, slow = gpujob("crash", 1), gpujob("slow", 1, maxRuntime="1s")
    crashing = await runner.start(attempt_of(crash, "gpu-1"), crash)
    timing_out = await runner.start(attempt_of(slow, "gpu-2", max_runtime_s=1.0), slow)
    (pod,) = await running_pods(kube, namespace, "crash", 1)
    await kube.patch_status("Pod", namespace, pod["metadata"]["name"], exited(3))
    failed = await asyncio.wait_for(crashing.wait(), 60)
    assert (failed.outcome, failed.reason, failed.exit_code) == (
        Outcome.FAILED, "exited with code 3", 3,
    )  # fmt: skip
    (note,) = failed.last_log_lines  # no kubelet to read it from: said, not made up
    assert note.startswith(f"--- gpufleet: the log of pod {pod['metadata']['name']} is not")
    late = await asyncio.wait_for(timing_out.wait(), 60)
    assert (late.outcome, late.reason) == (Outcome.TIMED_OUT, "ran past its maxRuntime of 1 s")
