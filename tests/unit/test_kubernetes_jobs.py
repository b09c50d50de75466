"""GPU job attempts as ``batch/v1`` Jobs (``runtime/kubernetes/jobs.py``): the objects against
the official schemas of a pinned Kubernetes version (kubernetes-validate, strict) for one-node
and two-node gangs, and the runner's outcomes against ``FakeKube``, where the test writes what
the Job controller and the kubelet would (the Job's status, its pods). The real controller runs
in ``tests/kube/test_jobs.py``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from gpufleet.runtime.jobs import JobAttempt, Outcome
from gpufleet.runtime.kubernetes import FakeKube, RenderError, RenderSettings
from gpufleet.runtime.kubernetes.api import KubeError
from gpufleet.runtime.kubernetes.jobs import (
    INDEX_ANNOTATION,
    LABEL_ATTEMPT,
    LABEL_JOB,
    CheckpointVolume,
    KubernetesJobRunner,
    attempt_job,
    attempt_name,
    attempt_service,
    attempt_verdict,
    checkpoint_claim,
    service_name,
)
from gpufleet.spec import GpuJob, parse_job
from tests.conftest import eventually

KUBERNETES = "1.34.0"
NS = "gpufleet"
SETTINGS = RenderSettings(namespace=NS)
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
T0 = "2026-03-01T02:00:00Z"


def gpujob(name: str = "finetune", **spec: Any) -> GpuJob:
    doc: dict[str, Any] = {
        "command": ["torchrun", "train.py"],
        "image": "ghcr.io/acme/trainer:1.4",
        "resources": {"gpus": 4},
        **spec,
    }
    return parse_job(
        {"apiVersion": "gpufleet.io/v1alpha1", "kind": "GpuJob", "metadata": {"name": name},
         "spec": {k: v for k, v in doc.items() if v is not None}}
    )  # fmt: skip


def attempt_of(job: GpuJob, number: int = 1, **kw: Any) -> JobAttempt:
    fields: dict[str, Any] = {
        "job": job.name,
        "attempt": number,
        "command": list(job.spec.command),
        "checkpoint_dir": Path("/var/lib/gpufleet/jobs") / job.name,
        "env": dict(job.spec.env),
        "grace_s": float(job.spec.grace_seconds),
        "image": job.spec.image,
        **kw,
    }
    return JobAttempt(**fields)


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def env_of(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# -- the objects ----------------------------------------------------------------------------------


def test_one_node_attempt_is_a_suspended_indexed_job_pinned_to_its_node() -> None:
    job = gpujob(
        env={"LR": "3e-4"}, maxRuntime="2h", checkpoint={"path": "/ckpt", "graceSeconds": 90}
    )
    attempt = attempt_of(job, node="gpu-7", gpus=[0, 1, 2, 3], max_runtime_s=5400.5)
    manifest = attempt_job(attempt, job, SETTINGS)
    service = attempt_service(attempt, job, SETTINGS)
    claim = checkpoint_claim(job, SETTINGS)
    for obj in (manifest, service, claim):
        validate(obj)
        assert obj["metadata"]["namespace"] == NS
    assert manifest["metadata"]["name"] == "finetune-a1"
    labels = manifest["metadata"]["labels"]
    assert labels[LABEL_JOB] == "finetune" and labels[LABEL_ATTEMPT] == "1"
    assert labels["app.kubernetes.io/managed-by"] == "gpufleet"
    assert labels["app.kubernetes.io/component"] == "job"
    spec = manifest["spec"]
    assert spec["suspend"] is True and spec["backoffLimit"] == 0
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 1
    assert spec["activeDeadlineSeconds"] == 5401  # what is left of maxRuntime, rounded up
    assert spec["ttlSecondsAfterFinished"] == 86_400
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"][LABEL_ATTEMPT] == "1"
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] == 90
    assert pod["priorityClassName"] == "gpufleet-batch"
    assert pod["subdomain"] == service["metadata"]["name"] == "gpufleet-finetune-a1"
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/acme/trainer:1.4"
    assert container["command"] == ["torchrun", "train.py"]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 4}}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["checkpoint"] == "/ckpt"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "checkpoint"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                               "values": ["gpu-7"]}]}
    ]  # fmt: skip
    assert "podAntiAffinity" not in pod["affinity"]  # one pod: nothing to keep apart
    # The engine pods' security: the restricted profile.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"] == {"requests": {"storage": "10Gi"}}
    assert claim["metadata"]["name"] == "gpufleet-job-finetune-checkpoint"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {LABEL_JOB: "finetune", LABEL_ATTEMPT: "1"}


def test_the_environment_is_the_jobs_then_gpufleets_and_torchruns_rendezvous() -> None:
    job = gpujob(env={"LR": "3e-4", "DATA": "s3://bucket/x"})
    fresh = env_of(attempt_job(attempt_of(job, node="gpu-1"), job, SETTINGS))
    index = {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}
    assert fresh == {
        "HOME": "/tmp",
        "LR": "3e-4",
        "DATA": "s3://bucket/x",
        "GPUFLEET_JOB": "finetune",
        "GPUFLEET_ATTEMPT": "1",
        "GPUFLEET_CHECKPOINT_DIR": "/checkpoint",
        "WORLD_SIZE": "1",
        "RANK": index,
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "finetune-a1-0.gpufleet-finetune-a1",
        "MASTER_PORT": "29500",
        "PET_NNODES": "1",
        "PET_NODE_RANK": index,
        "PET_NPROC_PER_NODE": "4",
        "PET_MASTER_ADDR": "finetune-a1-0.gpufleet-finetune-a1",
        "PET_MASTER_PORT": "29500",
    }
    assert "CUDA_VISIBLE_DEVICES" not in fresh  # the device plugin's to set
    resumed = env_of(attempt_job(attempt_of(job, 3, resumed=True), job, SETTINGS))
    assert resumed["GPUFLEET_RESUMED"] == "1" and resumed["GPUFLEET_ATTEMPT"] == "3"
    own_home = gpujob(env={"HOME": "/work"})
    assert env_of(attempt_job(attempt_of(own_home), own_home, SETTINGS))["HOME"] == "/work"


def test_a_two_node_gang_is_one_pod_per_planned_node_on_a_shared_claim() -> None:
    job = gpujob("pretrain", resources={"gpus": 16, "gpusPerNode": 8}, priorityClass="best-effort")
    attempt = attempt_of(job, 2, node="gpu-3", workers=("gpu-1",))
    manifest = attempt_job(attempt, job, SETTINGS)
    claim = checkpoint_claim(job, SETTINGS, CheckpointVolume(size="200Gi", storage_class="nfs"))
    validate(manifest)
    validate(claim)
    spec = manifest["spec"]
    assert spec["completions"] == spec["parallelism"] == 2
    assert "activeDeadlineSeconds" not in spec  # no maxRuntime
    pod = spec["template"]["spec"]
    assert pod["priorityClassName"] == "gpufleet-best-effort"
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    node_terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (expr,) = node_terms["nodeSelectorTerms"][0]["matchExpressions"]
    assert expr["values"] == ["gpu-1", "gpu-3"]
    (apart,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert apart["topologyKey"] == "kubernetes.io/hostname"
    assert apart["labelSelector"]["matchLabels"] == {LABEL_JOB: "pretrain", LABEL_ATTEMPT: "2"}
    env = env_of(manifest)
    assert env["WORLD_SIZE"] == env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "8"
    assert env["MASTER_ADDR"] == "pretrain-a2-0.gpufleet-pretrain-a2"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # mounted on both nodes
    assert claim["spec"]["storageClassName"] == "nfs"
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    # Placed on fewer nodes than the gang spans: the pods could never all be scheduled.
    with pytest.raises(RenderError, match="placed on 1 node"):
        attempt_job(attempt_of(job, node="gpu-3"), job, SETTINGS)


def test_long_or_dotted_names_fit_dns_labels_and_stay_distinct() -> None:
    long = "x" * 63
    names = {attempt_name(long, n, nodes=16) for n in (1, 2)}
    assert len(names) == 2
    for n in (1, 2):
        name = attempt_name(long, n, nodes=16)
        assert len(f"{name}-15") <= 63  # the last pod's hostname
        assert attempt_name(long, n, nodes=16) == name  # the same every time
        assert DNS_LABEL.match(service_name(long, n, nodes=16))
    dotted = attempt_name("llama.ft", 1)  # a hostname holds no dot ...
    assert dotted.startswith("llama-ft-") and dotted.endswith("-a1") and "." not in dotted
    assert dotted != attempt_name("llama-ft", 1) == "llama-ft-a1"  # ... nor shares a Job
    assert DNS_LABEL.match(service_name("7b.tune", 1))  # a Service begins with a letter
    job = gpujob("7b.tune")
    validate(attempt_job(attempt_of(job), job, SETTINGS))
    validate(attempt_service(attempt_of(job), job, SETTINGS))


def test_a_job_without_an_image_is_refused_naming_spec_image() -> None:
    job = gpujob(image=None)
    with pytest.raises(RenderError) as refused:
        attempt_job(attempt_of(job), job, SETTINGS)
    assert "spec.image is required on Kubernetes" in str(refused.value)


def test_the_checkpoint_is_mounted_where_the_spec_says() -> None:
    def mount(job: GpuJob) -> str:
        (container,) = attempt_job(attempt_of(job), job, SETTINGS)["spec"]["template"]["spec"][
            "containers"
        ]
        return str(env_of({"spec": {"template": {"spec": {"containers": [container]}}}})[
            "GPUFLEET_CHECKPOINT_DIR"
        ])  # fmt: skip

    assert mount(gpujob()) == "/checkpoint"
    assert mount(gpujob(checkpoint={"path": "/data/ckpt/"})) == "/data/ckpt"
    assert mount(gpujob(workingDir="/work", checkpoint={"path": "ckpt"})) == "/work/ckpt"
    with pytest.raises(RenderError, match=r"spec\.checkpoint\.path 'ckpt' is relative"):
        mount(gpujob(checkpoint={"path": "ckpt"}))


# -- the verdict ----------------------------------------------------------------------------------


def job_status(
    *conditions: tuple[str, str], suspend: bool = False, **status: Any
) -> dict[str, Any]:
    conds = [
        {"type": t, "status": "True", "reason": r, "message": f"{r} happened"}
        for t, r in conditions
    ]
    return {"spec": {"suspend": suspend}, "status": {"conditions": conds, **status}}  # fmt: skip


def test_the_verdict_waits_for_pods_and_lets_a_stop_that_landed_decide() -> None:
    running = {"metadata": {"name": "p"}, "status": {"phase": "Running"}}
    failed = job_status(("Failed", "BackoffLimitExceeded"))
    stop = (Outcome.PREEMPTED, "demand")
    assert attempt_verdict(failed, [running], None, False) is None  # its GPUs are still held
    assert attempt_verdict(failed, [], stop, True) == stop  # whatever it shows after the stop
    assert attempt_verdict(job_status(("Complete", "")), [], stop, True) == stop
    # A stop that came too late (the Job had completed): its own outcome stands.
    assert attempt_verdict(job_status(("Complete", "")), [], stop, False) == (Outcome.SUCCEEDED, "")
    deadline = job_status(("Failed", "DeadlineExceeded"))
    assert attempt_verdict(deadline, [], None, False, max_runtime_s=60) == (
        Outcome.TIMED_OUT, "ran past its maxRuntime of 60 s",
    )  # fmt: skip
    # Resumed but not yet acknowledged by the controller (its Suspended condition is stale).
    resuming = job_status(("Suspended", "JobSuspended"), suspend=False)
    assert attempt_verdict(resuming, [], None, False) is None
    suspended = job_status(("Suspended", "JobSuspended"), suspend=True)
    assert attempt_verdict(suspended, [], stop, True) == stop
    outcome, why = attempt_verdict(suspended, [], None, False)  # type: ignore[misc]
    assert outcome is Outcome.PREEMPTED and "manageJobsWithoutQueueName" in why
    assert attempt_verdict(None, [], None, False) == (Outcome.FAILED, "its Job was deleted")


# -- the runner -----------------------------------------------------------------------------------


class Fake(FakeKube):
    """The fake API, counting the runner's reads of Jobs: a read begun after a change the test
    made, and one more after it, show that the runner looked at that change and went on."""

    def __init__(self) -> None:
        super().__init__()
        self.job_reads = 0

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        if kind == "Job":
            self.job_reads += 1
        return await super().get(kind, namespace, name)

    async def looked(self) -> None:
        """Wait until the runner has judged the state as it is now, and not ended."""
        seen = self.job_reads
        await eventually(lambda: self.job_reads >= seen + 2, "the runner looks again")


@pytest.fixture
def fake() -> Fake:
    return Fake()


@pytest.fixture
async def runner(fake: Fake) -> AsyncIterator[KubernetesJobRunner]:
    r = KubernetesJobRunner(fake, SETTINGS, poll_s=0.02)
    yield r
    await r.close()


async def add_pod(
    fake: Fake, job: str, name: str, index: int, phase: str = "Running", **status: Any
) -> str:
    """A pod of the attempt's Job, as the Job controller makes it (and the kubelet reports)."""
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{name}-{index}-abcde",
            "namespace": NS,
            "labels": {LABEL_JOB: job, LABEL_ATTEMPT: name.rsplit("-a", 1)[1]},
            "annotations": {INDEX_ANNOTATION: str(index)},
        },
        "spec": {"nodeName": f"gpu-{index}"},
        "status": {"phase": phase, **status},
    }
    created = await fake.create(pod)
    return str(created["metadata"]["name"])


def spec_of(fake: Fake, name: str) -> dict[str, Any]:
    job = fake.peek("Job", NS, name)
    assert job is not None, f"no Job {name}"
    spec: dict[str, Any] = job["spec"]
    return spec


def terminated(code: int) -> dict[str, Any]:
    return {"containerStatuses": [{"name": "job", "state": {"terminated": {"exitCode": code}}}]}


def conditions(*kinds: tuple[str, str], at: str = "2026-03-01T02:10:00Z") -> list[dict[str, Any]]:
    return [
        {"type": t, "status": "True", "reason": r, "message": "", "lastTransitionTime": at}
        for t, r in kinds
    ]


async def test_start_makes_the_claim_job_and_service_then_unsuspends_the_job(
    fake: Fake, runner: KubernetesJobRunner
) -> None:
    job = gpujob()
    running = await runner.start(attempt_of(job, node="gpu-0"), job)
    assert [(w[0], w[1]) for w in fake.writes] == [
        ("create", "PersistentVolumeClaim"),
        ("create", "Job"),  # suspended: created, not admitted
        ("create", "Service"),
        ("replace", "Job"),  # the admission: suspend false
    ]
    created = fake.peek("Job", NS, "finetune-a1")
    assert created is not None and created["spec"]["suspend"] is False
    service = fake.peek("Service", NS, "gpufleet-finetune-a1")
    assert service is not None
    (owner,) = service["metadata"]["ownerReferences"]  # goes with the Job
    assert owner["kind"] == "Job" and owner["uid"] == created["metadata"]["uid"]
    assert runner.running("finetune") is running
    with pytest.raises(RuntimeError, match="already runs attempt 1"):
        await runner.start(attempt_of(job, 2), job)
    # The Job controller's part: the pod ran and succeeded; the Job completed.
    name = await add_pod(fake, "finetune", "finetune-a1", 0, "Succeeded", **terminated(0))
    fake.set_status(
        "Job", NS, "finetune-a1", startTime=T0, completionTime="2026-03-01T02:30:00Z",
        conditions=conditions(("Complete", "")), succeeded=1,
    )  # fmt: skip
    result = await running.wait()
    assert result.outcome is Outcome.SUCCEEDED and result.exit_code == 0
    assert result.duration_s == 1800.0  # the Job's startTime to its completionTime
    assert fake.peek("Job", NS, "finetune-a1") is not None  # kept (with its TTL) for its logs
    fake.pod_logs[(NS, name)] = "step 1\nstep 2\n"
    assert await runner.logs("finetune", 1) == ["step 1", "step 2"]
    assert runner.running("finetune") is None


async def test_a_failed_job_fails_with_its_pods_exit_code_and_log(
    fake: Fake, runner: KubernetesJobRunner
) -> None:
    job = gpujob("pretrain", resources={"gpus": 16, "gpusPerNode": 8})
    running = await runner.start(attempt_of(job, node="gpu-0", workers=("gpu-1",)), job)
    await add_pod(fake, "pretrain", "pretrain-a1", 0)
    crashed = await add_pod(fake, "pretrain", "pretrain-a1", 1, "Failed", **terminated(3))
    fake.pod_logs[(NS, crashed)] = "".join(f"line {i}\n" for i in range(50))
    fake.set_status(
        "Job",
        NS,
        "pretrain-a1",
        startTime=T0,
        conditions=conditions(("Failed", "BackoffLimitExceeded")),
    )
    await fake.looked()
    assert not running.done  # rank 0 still holds its GPUs
    fake.set_status("Pod", NS, "pretrain-a1-0-abcde", phase="Failed", **terminated(137))
    result = await running.wait()
    assert result.outcome is Outcome.FAILED
    assert result.reason == "exited with code 137 (rank 0, pod pretrain-a1-0-abcde)"
    assert result.exit_code == 137
    assert result.duration_s == 600.0  # to the Failed condition's time
    # Rank 0's log is empty; the whole gang's is read rank by rank.
    assert result.last_log_lines == []
    lines = await runner.logs("pretrain", 1, tail=2)
    assert lines == [
        "--- gpufleet: pod pretrain-a1-0-abcde (rank 0, gpu-0)",
        "--- gpufleet: pod pretrain-a1-1-abcde (rank 1, gpu-1)",
        "line 48",
        "line 49",
    ]


async def test_a_failure_whose_log_is_gone_says_so(fake: Fake, runner: KubernetesJobRunner) -> None:
    job = gpujob()
    running = await runner.start(attempt_of(job), job)
    name = await add_pod(fake, "finetune", "finetune-a1", 0, "Failed", **terminated(1))

    async def no_log(namespace: str, pod: str, **_: Any) -> str:
        raise KubeError(f"logs of pod {pod}: HTTP 502: no kubelet", 502)

    fake.logs = no_log  # type: ignore[method-assign]
    fake.set_status(
        "Job",
        NS,
        "finetune-a1",
        startTime=T0,
        conditions=conditions(("Failed", "BackoffLimitExceeded")),
    )
    result = await running.wait()
    assert (result.outcome, result.exit_code) == (Outcome.FAILED, 1)
    assert result.reason == "exited with code 1"
    note = f"--- gpufleet: the log of pod {name} is not available: logs of pod {name}: HTTP 502"
    assert result.last_log_lines == [note + ": no kubelet"]
    assert (await runner.logs("finetune", 1))[0].startswith(f"--- gpufleet: the log of pod {name}")


async def test_a_deadline_exceeded_is_a_time_out(fake: Fake, runner: KubernetesJobRunner) -> None:
    job = gpujob(maxRuntime="1h")
    running = await runner.start(attempt_of(job, max_runtime_s=3600.0), job)
    assert spec_of(fake, "finetune-a1")["activeDeadlineSeconds"] == 3600
    fake.set_status(
        "Job",
        NS,
        "finetune-a1",
        startTime=T0,
        conditions=conditions(("Failed", "DeadlineExceeded")),
    )
    result = await running.wait()
    assert (result.outcome, result.reason) == (
        Outcome.TIMED_OUT,
        "ran past its maxRuntime of 3600 s",
    )


async def test_preempting_suspends_the_job_and_ends_once_its_pods_are_gone(
    fake: Fake, runner: KubernetesJobRunner
) -> None:
    job = gpujob()
    running = await runner.start(attempt_of(job), job)
    pod = await add_pod(fake, "finetune", "finetune-a1", 0)
    fake.set_status("Job", NS, "finetune-a1", startTime=T0, active=1)
    running.preempt("interactive demand needs gpu-0")
    await eventually(
        lambda: spec_of(fake, "finetune-a1")["suspend"] is True,
        "the Job is suspended",
    )
    # The controller deletes the pod (its grace period running), and says the Job is suspended.
    fake.set_status(
        "Job",
        NS,
        "finetune-a1",
        active=0,
        terminating=1,
        conditions=conditions(("Suspended", "JobSuspended")),
    )
    await fake.looked()
    assert not running.done  # the pod is still terminating: its GPUs are not free yet
    await fake.delete("Pod", NS, pod)
    result = await running.wait()
    assert (result.outcome, result.reason) == (Outcome.PREEMPTED, "interactive demand needs gpu-0")
    assert result.killed is False and result.exit_code is None
    assert fake.peek("Job", NS, "finetune-a1") is None  # nothing left to read: deleted
    assert fake.peek("PersistentVolumeClaim", NS, "gpufleet-job-finetune-checkpoint") is not None


async def test_cancel_overrides_a_preemption_and_a_finish_before_the_stop_stands(
    fake: Fake, runner: KubernetesJobRunner
) -> None:
    job = gpujob()
    running = await runner.start(attempt_of(job), job)
    running.preempt("window closed")
    running.cancel()
    await eventually(
        lambda: spec_of(fake, "finetune-a1")["suspend"] is True,
        "the Job is suspended",
    )
    fake.set_status("Job", NS, "finetune-a1", conditions=conditions(("Suspended", "JobSuspended")))
    result = await running.wait()
    assert (result.outcome, result.reason) == (Outcome.CANCELLED, "cancelled")

    # The next attempt completes before the stop reaches it: it keeps its own outcome.
    assert fake.peek("Job", NS, "finetune-a1") is None
    done = await runner.start(attempt_of(job, 2), job)
    fake.set_status("Job", NS, "finetune-a2", startTime=T0, conditions=conditions(("Complete", "")))
    done.preempt("too late")
    assert (await done.wait()).outcome is Outcome.SUCCEEDED
    assert spec_of(fake, "finetune-a2")["suspend"] is False


async def test_a_job_suspended_by_someone_else_or_deleted_ends_the_attempt(
    fake: Fake, runner: KubernetesJobRunner
) -> None:
    job = gpujob()
    running = await runner.start(attempt_of(job), job)
    fake.update_spec("Job", NS, "finetune-a1", {**spec_of(fake, "finetune-a1"), "suspend": True})
    fake.set_status("Job", NS, "finetune-a1", conditions=conditions(("Suspended", "JobSuspended")))
    result = await running.wait()
    assert result.outcome is Outcome.PREEMPTED and "Kueue" in result.reason

    other = gpujob("other")
    gone = await runner.start(attempt_of(other), other)
    await fake.delete("Job", NS, "other-a1")
    result = await gone.wait()
    assert (result.outcome, result.reason) == (Outcome.FAILED, "its Job was deleted")


async def test_a_start_without_an_image_fails_the_attempt_and_makes_nothing(
    fake: Fake, runner: KubernetesJobRunner
) -> None:
    job = gpujob(image=None)
    result = await (await runner.start(attempt_of(job), job)).wait()
    assert result.outcome is Outcome.FAILED and result.exit_code is None
    assert "spec.image is required on Kubernetes" in result.reason
    assert fake.writes == []


async def test_an_earlier_attempt_still_running_is_preempted_before_the_next_starts(
    fake: Fake, runner: KubernetesJobRunner
) -> None:
    """A gpufleet that restarted finds attempt 1's Job running: attempt 2 must not run beside
    it (both would write the checkpoint)."""
    job = gpujob()
    manifest = attempt_job(attempt_of(job), job, SETTINGS)
    manifest["spec"]["suspend"] = False
    await fake.create(manifest)
    pod = await add_pod(fake, "finetune", "finetune-a1", 0)
    starting = asyncio.create_task(runner.start(attempt_of(job, 2, resumed=True), job))
    await eventually(
        lambda: spec_of(fake, "finetune-a1")["suspend"] is True,
        "attempt 1 is suspended",
    )
    fake.set_status("Job", NS, "finetune-a1", active=1)
    await fake.looked()
    assert fake.peek("Job", NS, "finetune-a2") is None  # not before attempt 1's pods are gone
    fake.set_status(
        "Job", NS, "finetune-a1", active=0, conditions=conditions(("Suspended", "JobSuspended"))
    )
    await fake.delete("Pod", NS, pod)
    second = await starting
    assert fake.peek("Job", NS, "finetune-a1") is None
    created = fake.peek("Job", NS, "finetune-a2")
    assert created is not None and created["spec"]["suspend"] is False
    assert env_of(created)["GPUFLEET_RESUMED"] == "1"
    second.cancel()


async def test_a_runner_that_takes_over_adopts_the_jobs_it_finds(fake: Fake) -> None:
    """Pods outlive the operator: the next one follows the attempt's Job again, without making
    anything, and sees it to its end."""
    job = gpujob(maxRuntime="1h")
    first = KubernetesJobRunner(fake, SETTINGS, poll_s=0.02)
    await first.start(attempt_of(job, 2, max_runtime_s=1800.0), job)
    await first.close()  # the Job runs on
    writes = len(fake.writes)
    successor = KubernetesJobRunner(fake, SETTINGS, poll_s=0.02)
    try:
        assert await successor.adopt("finetune", 1) is None
        handle = await successor.adopt("finetune", 2)
        assert handle is not None and successor.running("finetune") is handle
        assert await successor.adopt("finetune", 2) is handle
        assert len(fake.writes) == writes  # adopting makes nothing
        fake.set_status(
            "Job",
            NS,
            "finetune-a2",
            startTime=T0,
            conditions=conditions(("Failed", "DeadlineExceeded")),
        )
        result = await handle.wait()
        assert (result.outcome, result.attempt) == (Outcome.TIMED_OUT, 2)
        assert result.reason == "ran past its maxRuntime of 1800 s"  # read from its Job
    finally:
        await successor.close()
