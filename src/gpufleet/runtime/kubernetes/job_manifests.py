"""The objects of one GPU job attempt on Kubernetes: a ``batch/v1`` Job created suspended, the
headless Service its gang's pods find each other through, and the job's checkpoint claim —
plain dicts, made from the attempt and the job's spec with no call to the cluster (the runner,
``jobs.KubernetesJobRunner``, creates them and toggles ``spec.suspend``).

* A Job named ``<job>-a<attempt>`` (dots made dashes, and cut, with a hash of the name that
  tells it apart: its pods' hostnames ``<name>-<index>`` must be DNS labels), created with
  ``suspend: true`` and then unsuspended: creating is not admitting, and the Job controller
  makes no pod until gpufleet says so. ``backoffLimit: 0`` and ``restartPolicy: Never``: a
  crash ends the attempt, and gpufleet retries it as a new attempt from the checkpoint
  (``spec.retries``).
* A gang across nodes: ``completionMode: Indexed`` with ``completions = parallelism = nodes``,
  one pod per node, each holding ``resources.per_node`` GPUs (``nvidia.com/gpu``). The pods are
  pinned where the planner put the gang — required node affinity on ``kubernetes.io/hostname``
  in its nodes — and kept one to a node by anti-affinity on the attempt's label. The rendezvous
  torchrun expects is in the environment: ``WORLD_SIZE`` (nodes), ``RANK`` (the pod's completion
  index, from its ``batch.kubernetes.io/job-completion-index`` annotation), ``LOCAL_RANK`` 0,
  ``MASTER_ADDR`` (index 0's hostname under the attempt's headless Service, which Indexed Jobs'
  stable hostnames resolve through: ``<name>-0.<service>``) and ``MASTER_PORT`` 29500. That is
  one process per node; ``torchrun --nproc-per-node`` spawns the per-GPU ranks and hands them
  their own ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``. torchrun's own variables are set too
  (``PET_NNODES``, ``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR``,
  ``PET_MASTER_PORT``), so a bare ``torchrun train.py`` joins the gang with no arguments.
* ``GPUFLEET_JOB``, ``GPUFLEET_ATTEMPT``, ``GPUFLEET_CHECKPOINT_DIR`` and, on a resumed attempt
  only, ``GPUFLEET_RESUMED=1``, after the job's own ``env`` (which may not set them). No
  ``CUDA_VISIBLE_DEVICES``: the device plugin gives the container its GPUs.
* The checkpoint on a PersistentVolumeClaim per job (``gpufleet-job-<job>-checkpoint``, kept
  across attempts: a resumed attempt finds it there), mounted at ``spec.checkpoint.path`` (a
  relative one under ``spec.workingDir``), ``/checkpoint`` when the job names none.
  ``ReadWriteMany`` for a gang across nodes, ``ReadWriteOnce`` for one node; 10 GiB by default
  (``CheckpointVolume``: a checkpoint of a fine-tune's adapter or optimizer state of a small
  model fits; set the size for full-model checkpoints).
* ``terminationGracePeriodSeconds`` is the job's grace period: preempting suspends the Job, and
  the Job controller deletes its pods, each with that grace — SIGTERM, then SIGKILL — the local
  runner's contract. ``activeDeadlineSeconds`` is what is left of ``maxRuntime``: a Job failed
  with ``DeadlineExceeded`` is a time-out.
* The engine pods' security (the ``restricted`` Pod Security profile: non-root, no privilege
  escalation, no capabilities, seccomp, read-only root filesystem with a writable ``/tmp`` as
  ``HOME``, no service-account token), their GPU toleration, and the priority class of the
  job's (``gpufleet-batch``, ``gpufleet-best-effort``).

No CPU or memory request: ``resources.memory`` is GPU memory (the planner's), and a job has no
field for host resources yet.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpufleet.runtime.jobs import JobAttempt
from gpufleet.runtime.kubernetes.common import (
    CONTAINER_SECURITY,
    LABEL_COMPONENT,
    MANAGED,
    POD_SECURITY,
    RenderError,
    RenderSettings,
    meta,
)
from gpufleet.spec import GpuJob

__all__ = [
    "CHECKPOINT_MOUNT",
    "CONTAINER",
    "DEFAULT_CHECKPOINT_SIZE",
    "FINISHED_TTL_S",
    "INDEX_ANNOTATION",
    "LABEL_ATTEMPT",
    "LABEL_JOB",
    "MASTER_PORT",
    "CheckpointVolume",
    "attempt_job",
    "attempt_name",
    "attempt_selector",
    "attempt_service",
    "checkpoint_claim",
    "checkpoint_claim_name",
    "checkpoint_mount",
    "pod_index",
    "service_name",
]

LABEL_JOB = "gpufleet.io/job"
LABEL_ATTEMPT = "gpufleet.io/attempt"
#: Where the Job controller writes a pod's index (its rank in the gang).
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
#: The job's container in its pods (what ``logs`` reads).
CONTAINER = "job"
#: torchrun's default rendezvous port.
MASTER_PORT = 29500
CHECKPOINT_MOUNT = "/checkpoint"
DEFAULT_CHECKPOINT_SIZE = "10Gi"
#: How long a Job that completed or failed stays for its pods' logs.
FINISHED_TTL_S = 86_400
_DNS_LABEL = 63


@dataclass(frozen=True)
class CheckpointVolume:
    """How a job's checkpoint claim is made: its size, and its StorageClass (None: the
    cluster's default). A gang across nodes needs a class that offers ``ReadWriteMany``."""

    size: str = DEFAULT_CHECKPOINT_SIZE
    storage_class: str | None = None


# -- names ----------------------------------------------------------------------------------------


def _digest(name: str, n: int) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:n]


def _fit(name: str, limit: int) -> str:
    """``name`` if it fits ``limit`` characters, else its head and a hash of the whole (the same
    long name always gives the same short one; two long names sharing a head do not collide)."""
    if len(name) <= limit:
        return name
    digest = _digest(name, 10)
    return f"{name[: limit - len(digest) - 1].rstrip('-')}-{digest}"


def attempt_name(job: str, attempt: int, nodes: int = 1) -> str:
    """The Job of an attempt: ``<job>-a<attempt>``, short enough that its pods' hostnames
    (``<name>-<index>``) are DNS labels. A hostname holds no dot: a job named with dots gets
    dashes and a hash of its name (``a.b`` and ``a-b`` must not share a Job)."""
    label = job.replace(".", "-")
    if label != job:
        label = f"{label}-{_digest(job, 6)}"
    return _fit(f"{label}-a{attempt}", _DNS_LABEL - len(f"-{max(nodes - 1, 0)}"))


def service_name(job: str, attempt: int, nodes: int = 1) -> str:
    """The attempt's headless Service (a Service's name must begin with a letter)."""
    return _fit(f"gpufleet-{attempt_name(job, attempt, nodes)}", _DNS_LABEL)


def checkpoint_claim_name(job: str) -> str:
    return f"gpufleet-job-{job}-checkpoint"


def checkpoint_mount(job: GpuJob) -> str:
    """Where the checkpoint claim is mounted in the job's container."""
    checkpoint = job.spec.checkpoint
    if checkpoint is None:
        return CHECKPOINT_MOUNT
    path = checkpoint.path
    if not posixpath.isabs(path):
        workdir = job.spec.working_dir
        if workdir is None or not posixpath.isabs(workdir):
            raise RenderError(
                [
                    f"{job.name}: spec.checkpoint.path {path!r} is relative, and on Kubernetes "
                    "it is read from spec.workingDir, which is not an absolute path here; give "
                    "an absolute spec.checkpoint.path (e.g. /checkpoint)"
                ]
            )
        path = posixpath.join(workdir, path)
    path = posixpath.normpath(path)
    if path == "/":
        raise RenderError(
            [f"{job.name}: spec.checkpoint.path cannot be '/': name a directory for the claim"]
        )
    return path


def _labels(attempt: JobAttempt) -> dict[str, str]:
    return {LABEL_JOB: attempt.job, LABEL_ATTEMPT: str(attempt.attempt), LABEL_COMPONENT: "job"}


def attempt_selector(job: str, attempt: int) -> dict[str, str]:
    return {LABEL_JOB: job, LABEL_ATTEMPT: str(attempt)}


# -- objects --------------------------------------------------------------------------------------


def checkpoint_claim(
    job: GpuJob, settings: RenderSettings, volume: CheckpointVolume | None = None
) -> dict[str, Any]:
    """The job's checkpoint claim: every attempt mounts it, on whichever nodes it runs."""
    volume = volume or CheckpointVolume()
    mode = "ReadWriteMany" if job.spec.resources.nodes > 1 else "ReadWriteOnce"
    spec: dict[str, Any] = {"accessModes": [mode]}
    if volume.storage_class is not None:
        spec["storageClassName"] = volume.storage_class
    spec["resources"] = {"requests": {"storage": volume.size}}
    labels = {LABEL_JOB: job.name, LABEL_COMPONENT: "job-checkpoint"}
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta(checkpoint_claim_name(job.name), settings.namespace, labels),
        "spec": spec,
    }


def attempt_service(attempt: JobAttempt, job: GpuJob, settings: RenderSettings) -> dict[str, Any]:
    """The headless Service the attempt's pods are the subdomain of: ``<pod hostname>.<this>``
    resolves to a pod, ready or not (the gang's rendezvous starts before anything is ready)."""
    nodes = job.spec.resources.nodes
    name = service_name(attempt.job, attempt.attempt, nodes)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(name, settings.namespace, _labels(attempt)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": attempt_selector(attempt.job, attempt.attempt),
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def attempt_job(
    attempt: JobAttempt,
    job: GpuJob,
    settings: RenderSettings,
    *,
    ttl_s: int = FINISHED_TTL_S,
) -> dict[str, Any]:
    """The suspended ``batch/v1`` Job of one attempt (see the module's docstring)."""
    image = attempt.image or job.spec.image
    if not image:
        raise RenderError(
            [
                f"{job.name}: spec.image is required on Kubernetes: the container image the "
                "command runs in (e.g. 'image: ghcr.io/acme/trainer:1.4')"
            ]
        )
    resources = job.spec.resources
    nodes = resources.nodes
    hosts = sorted({attempt.node, *attempt.workers}) if attempt.node else []
    if hosts and len(hosts) != nodes:
        raise RenderError(
            [
                f"{job.name}: attempt {attempt.attempt} is placed on {len(hosts)} node(s) "
                f"({', '.join(hosts)}) but its gang spans {nodes}: one pod per node"
            ]
        )
    name = attempt_name(attempt.job, attempt.attempt, nodes)
    subdomain = service_name(attempt.job, attempt.attempt, nodes)
    labels = _labels(attempt)
    mount = checkpoint_mount(job)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": list(attempt.command),
    }
    if job.spec.working_dir:
        container["workingDir"] = job.spec.working_dir
    container |= {
        # Indexed Jobs' pods are named hosts <name>-<index> of their subdomain: rank 0 leads.
        "env": _env(attempt, job, mount, master=f"{name}-0.{subdomain}"),
        "resources": {"limits": {"nvidia.com/gpu": resources.per_node}},
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "checkpoint", "mountPath": mount},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": subdomain,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "priorityClassName": f"gpufleet-{job.spec.priority_class}",
        "terminationGracePeriodSeconds": math.ceil(attempt.grace_s),
        "securityContext": POD_SECURITY,
        "containers": [container],
        "volumes": [
            {
                "name": "checkpoint",
                "persistentVolumeClaim": {"claimName": checkpoint_claim_name(job.name)},
            },
            {"name": "tmp", "emptyDir": {}},
            # Data loaders' shared memory: the container runtime's 64 MiB default is too small
            # for PyTorch's; no limit of ours (the job's loaders size it).
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    affinity = _pinning(attempt, hosts, nodes)
    if affinity:
        pod["affinity"] = affinity
    spec: dict[str, Any] = {
        "suspend": True,
        "backoffLimit": 0,
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "ttlSecondsAfterFinished": ttl_s,
    }
    if attempt.max_runtime_s is not None:
        spec["activeDeadlineSeconds"] = max(1, math.ceil(attempt.max_runtime_s))
    spec["template"] = {"metadata": {"labels": {**MANAGED, **labels}}, "spec": pod}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta(name, settings.namespace, labels),
        "spec": spec,
    }


def _env(attempt: JobAttempt, job: GpuJob, mount: str, *, master: str) -> list[dict[str, Any]]:
    """The job's own variables, then gpufleet's (which the spec refuses in ``env``)."""
    index = {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}
    nodes = str(job.spec.resources.nodes)
    env: list[dict[str, Any]] = []
    if "HOME" not in attempt.env:  # the root filesystem is read-only
        env.append({"name": "HOME", "value": "/tmp"})
    env += [{"name": k, "value": v} for k, v in attempt.env.items()]
    env += [
        {"name": "GPUFLEET_JOB", "value": attempt.job},
        {"name": "GPUFLEET_ATTEMPT", "value": str(attempt.attempt)},
        {"name": "GPUFLEET_CHECKPOINT_DIR", "value": mount},
    ]
    if attempt.resumed:
        env.append({"name": "GPUFLEET_RESUMED", "value": "1"})
    env += [
        {"name": "WORLD_SIZE", "value": nodes},
        {"name": "RANK", "valueFrom": index},
        {"name": "LOCAL_RANK", "value": "0"},
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "PET_NNODES", "value": nodes},
        {"name": "PET_NODE_RANK", "valueFrom": index},
        {"name": "PET_NPROC_PER_NODE", "value": str(job.spec.resources.per_node)},
        {"name": "PET_MASTER_ADDR", "value": master},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
    ]
    return env


def _pinning(attempt: JobAttempt, hosts: Sequence[str], nodes: int) -> dict[str, Any]:
    """On the planner's nodes, one pod of the attempt per node."""
    affinity: dict[str, Any] = {}
    if hosts:
        term = {"key": "kubernetes.io/hostname", "operator": "In", "values": list(hosts)}
        affinity["nodeAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [term]}]
            }
        }
    if nodes > 1:
        affinity["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {
                        "matchLabels": attempt_selector(attempt.job, attempt.attempt)
                    },
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    return affinity


def pod_index(pod: Mapping[str, Any]) -> int:
    """A pod's completion index — its rank in the gang (pods without one sort last)."""
    value = (pod["metadata"].get("annotations") or {}).get(INDEX_ANNOTATION, "")
    return int(value) if value.isdigit() else 1 << 30
