"""``kind: GpuJob``: GPU work that is not serving — a fine-tune, an analytics run — placed on what
serving leaves free, preempted with a grace period when serving needs the GPUs back, and resumed
from its checkpoint.

The kind is ``GpuJob``, not ``Job``: Kubernetes' own ``batch/v1`` Job would share its name in
``kubectl get jobs`` and in the operator, which runs each attempt of a GpuJob as such a Job. The
resource reuses the Model's pieces (metadata, resources, schedule windows, durations) so that a
job reads like a model, and its errors are worded the same way (``gpufleet.spec.io.validate``).

Choices the fields rest on:

* A job runs *below* serving: ``batch`` (the Batch API's class; the planner orders batch models
  and jobs by their tenants' fair share) or ``best-effort`` under it. Nothing higher: a job that
  could preempt an interactive model would undo what the night-work scheduler is for.
* A job is a gang: ``resources.gpus`` in all, on one node, or ``gpusPerNode`` on each of
  ``gpus / gpusPerNode`` nodes — all placed at once or none (a half-placed data-parallel job
  holds GPUs and does no work). One per-node count, because torchrun's ``nproc_per_node`` and
  ``WORLD_SIZE = nodes × nproc_per_node`` assume it.
* ``maxRuntime`` bounds the job's running time over all its attempts (preemptions and retries
  included), so GPUs × maxRuntime × price is a true bound on its cost: what a tenant's budget is
  checked against before the job starts.
* ``retries`` defaults to 2: night jobs run unattended, and a GPU job's common failures (a lost
  node, an NCCL timeout, an out-of-memory on a neighbour's leftovers) are transient; an attempt
  resumes from the checkpoint, and ``maxRuntime`` still bounds what a job that keeps crashing
  can spend. Preemptions are not failures and never count against it.
* Environment variables gpufleet sets itself (the rendezvous torchrun expects, the GPUs it
  placed the job on, ``GPUFLEET_*``) cannot be set in ``env``: a job that overrode them would
  run on GPUs it was not given or lose its checkpoint directory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, StringConstraints, model_validator
from pydantic_core import PydanticCustomError

from gpufleet.errors import SpecError
from gpufleet.spec.io import read_documents, validate
from gpufleet.spec.resources import (
    DnsName,
    Metadata,
    Resources,
    ScheduleSpec,
    Seconds,
    _Resource,
)

__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "DEFAULT_RETRIES",
    "JOB_PRIORITIES",
    "MAX_GPUS_PER_NODE",
    "RESERVED_ENV",
    "RESERVED_ENV_PREFIX",
    "CheckpointSpec",
    "GpuJob",
    "GpuJobSpec",
    "JobPriorityName",
    "JobResources",
    "Verbatim",
    "load_jobs_file",
    "load_jobs_text",
    "parse_job",
]

#: Priority classes a job may have, highest first: both below serving (``interactive``).
JOB_PRIORITIES: tuple[str, ...] = ("batch", "best-effort")
#: Seconds between SIGTERM and SIGKILL when a job gives none (Kubernetes' own default).
DEFAULT_GRACE_SECONDS = 30
DEFAULT_RETRIES = 2
#: The most GPUs one node holds (a model replica's bound, ``Resources.gpus``).
MAX_GPUS_PER_NODE = 64
#: Variables gpufleet sets in a job's environment: torchrun's rendezvous and the placed GPUs ...
RESERVED_ENV: tuple[str, ...] = (
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"
)  # fmt: skip
#: ... and its own (GPUFLEET_CHECKPOINT_DIR, GPUFLEET_RESUMED, and any it adds later).
RESERVED_ENV_PREFIX = "GPUFLEET_"
#: A name a shell and every language's getenv read: letters, digits, '_', not a digit first.
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ENV_NAME = re.compile(ENV_NAME)


def _text(value: Any) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        written = str(value).lower() if isinstance(value, bool) else str(value)
        raise PydanticCustomError(
            "gpufleet_value",
            "must be text: quote it ({quoted}); YAML reads numbers and true/false unquoted as "
            "other types, and Kubernetes refuses them here",
            {"quoted": f'"{written}"'},
        )
    raise PydanticCustomError("gpufleet_value", "must be text (a string)")


#: An argument or a value kept exactly as written: the spec strips other strings' whitespace,
#: but ``[python, -c, " x"]`` must reach the process unchanged; and a number is not turned into
#: text (``1e-5`` would come back as ``1e-05``): it is refused with the fix.
Verbatim = Annotated[str, StringConstraints(strip_whitespace=False), BeforeValidator(_text)]


def _job_priority(value: Any) -> Any:
    name = value.strip() if isinstance(value, str) else value
    if name in JOB_PRIORITIES:
        return name
    if name == "interactive":
        raise PydanticCustomError(
            "gpufleet_value",
            "'interactive' is serving's class, and jobs run below serving, on the GPUs it "
            "leaves free; use 'batch' (the default) or 'best-effort'",
        )
    raise PydanticCustomError(
        "gpufleet_value",
        "must be 'batch' (the default) or 'best-effort' (got {value}): jobs run below serving",
        {"value": repr(value)},
    )


#: ``batch`` or ``best-effort``; anything else, serving's ``interactive`` above all, is refused
#: with the reason (the CRD's schema carries the enum).
JobPriorityName = Annotated[Literal["batch", "best-effort"], BeforeValidator(_job_priority)]


class JobResources(Resources):
    """What the job holds: whole GPUs, all at once or none (a gang), of the accepted
    ``gpuTypes``; ``memory`` is what it needs across them, split evenly (as a model's)."""

    #: GPUs the job holds in all, placed all at once or not at all.
    gpus: int = Field(default=1, ge=1, le=1024)
    #: A gang across nodes: this many GPUs on each of ``gpus / gpusPerNode`` nodes (each node
    #: one torchrun ``--nproc-per-node``). Absent: all of ``gpus`` on one node.
    gpus_per_node: int | None = Field(default=None, ge=1, le=MAX_GPUS_PER_NODE)

    @model_validator(mode="after")
    def _gang(self) -> JobResources:
        if self.gpus_per_node is None and self.gpus > MAX_GPUS_PER_NODE:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.gpus: {gpus} GPUs do not fit one node (at most {most}); for a gang "
                "across nodes set {path}.gpusPerNode to the GPUs each node gives it (e.g. 8, "
                "with {path}.gpus a multiple of it)",
                {"gpus": self.gpus, "most": MAX_GPUS_PER_NODE},
            )
        if self.gpus_per_node is not None and self.gpus % self.gpus_per_node:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.gpusPerNode: {gpus} GPUs in all do not make whole nodes of {per}; set "
                "{path}.gpus to a multiple of {path}.gpusPerNode (e.g. {up}) or "
                "{path}.gpusPerNode to a divisor of {path}.gpus",
                {
                    "gpus": self.gpus,
                    "per": self.gpus_per_node,
                    "up": -(-self.gpus // self.gpus_per_node) * self.gpus_per_node,
                },
            )
        return self

    @property
    def per_node(self) -> int:
        """GPUs on each node of the gang."""
        return self.gpus_per_node or self.gpus

    @property
    def nodes(self) -> int:
        """Nodes the gang spans (``WORLD_SIZE`` is ``gpus``; one rank per GPU)."""
        return self.gpus // self.per_node


class CheckpointSpec(_Resource):
    """Where the job saves its progress, and how long it has to save before it is killed."""

    #: A directory the job writes its checkpoints to, handed to it as ``GPUFLEET_CHECKPOINT_DIR``
    #: (on every attempt: a resumed one gets ``GPUFLEET_RESUMED=1`` and finds them there).
    #: Under ``gpufleet up``, a relative path is read from ``workingDir``; on Kubernetes it is
    #: where the job's PersistentVolumeClaim is mounted in the container.
    path: str = Field(min_length=1, max_length=4096)
    #: Seconds from SIGTERM (the pod's termination on Kubernetes:
    #: ``terminationGracePeriodSeconds``) to SIGKILL, for the job to write its checkpoint.
    grace_seconds: int = Field(default=DEFAULT_GRACE_SECONDS, ge=1, le=3600)


class GpuJobSpec(_Resource):
    #: The program and its arguments, run as they are (no shell). On Kubernetes it replaces the
    #: image's entrypoint.
    command: list[Verbatim] = Field(min_length=1, max_length=1024)
    #: The container image the command runs in on Kubernetes (required there); ``gpufleet up``
    #: runs the command on its own machine.
    image: str | None = Field(default=None, min_length=1, max_length=1024)
    #: Environment variables added to the job's (not those gpufleet sets: ``RESERVED_ENV``).
    env: dict[str, Verbatim] = Field(default_factory=dict, max_length=128)
    #: The command's working directory; absent: under ``gpufleet up``, the spec file's folder;
    #: on Kubernetes, the image's.
    working_dir: str | None = Field(default=None, min_length=1, max_length=4096)
    #: (The CRD defaults it to ``{}``, so that the API server fills in ``gpus: 1`` and
    #: ``kubectl get gpujobs`` shows it.)
    resources: JobResources = Field(default_factory=JobResources, json_schema_extra={"default": {}})
    #: ``batch`` (the default) or ``best-effort``: below serving, placed on what it leaves free.
    priority_class: JobPriorityName = "batch"
    #: Time windows the job may run in (as a model's); one ending mid-run preempts it as
    #: serving's demand would. Absent: whenever GPUs are free.
    schedule: ScheduleSpec | None = None
    #: Absent: ``GPUFLEET_CHECKPOINT_DIR`` is a directory the runtime picks for the job (under
    #: ``gpufleet up``, in its own state folder), and the grace period is
    #: ``DEFAULT_GRACE_SECONDS``.
    checkpoint: CheckpointSpec | None = None
    #: Running time over all attempts after which the job is stopped and failed; what its cost
    #: is estimated by (GPUs × maxRuntime × price), and required when its tenant has a budget.
    max_runtime: Seconds | None = Field(default=None, gt=0, le=7 * 86_400)
    #: Attempts after a failure (a non-zero exit not caused by gpufleet) before the job fails;
    #: preemptions are not failures.
    retries: int = Field(default=DEFAULT_RETRIES, ge=0, le=100)
    #: The tenant whose budget, fair share and ledger the job's GPU time goes to; absent: the
    #: submitter's (on Kubernetes, the namespace's).
    tenant: DnsName | None = None

    @model_validator(mode="after")
    def _env(self) -> GpuJobSpec:
        malformed = [name for name in self.env if not _ENV_NAME.match(name)]
        if malformed:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.env: {names}: not an environment variable name (letters, digits and "
                "'_', not starting with a digit); rename it",
                {"names": ", ".join(map(repr, malformed))},
            )
        reserved = [
            name
            for name in self.env
            if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIX)
        ]
        if reserved:
            raise PydanticCustomError(
                "gpufleet_path",
                "{path}.env: gpufleet sets {names} itself (the gang's rendezvous, the GPUs it "
                "placed the job on, its checkpoint directory); remove them from {path}.env",
                {"names": ", ".join(reserved)},
            )
        return self

    @property
    def grace_seconds(self) -> int:
        """Seconds from SIGTERM to SIGKILL when the job is preempted."""
        return self.checkpoint.grace_seconds if self.checkpoint else DEFAULT_GRACE_SECONDS


class GpuJob(_Resource):
    api_version: Literal["gpufleet.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["GpuJob"] = "GpuJob"
    metadata: Metadata
    spec: GpuJobSpec

    @property
    def name(self) -> str:
        return self.metadata.name

    def document(self) -> dict[str, Any]:
        """The resource as it would be written in YAML (camelCase, defaults included)."""
        return self.model_dump(by_alias=True, mode="json")


# -- reading --------------------------------------------------------------------------------------


def load_jobs_file(path: str | Path) -> list[GpuJob]:
    """Every GpuJob of a YAML file; relative paths in it are read from the file's folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SpecError([f"{p}: no such file"]) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([f"{p}: cannot be read ({exc})"]) from exc
    return load_jobs_text(text, filename=str(p), base_dir=p.resolve().parent)


def load_jobs_text(
    text: str, *, filename: str = "<input>", base_dir: Path | None = None
) -> list[GpuJob]:
    """The GpuJobs of a YAML text, all validated before any is returned (every problem of
    every document said at once, as ``FILE, document N: FIELD <problem and fix>``).

    With ``base_dir`` (``gpufleet up``: the spec file's folder) the job's paths are made
    absolute: ``workingDir`` from ``base_dir`` (absent: ``base_dir`` itself), a relative
    ``checkpoint.path`` from the working directory. Without it (Kubernetes: paths inside the
    container) they are left as written."""
    problems: list[str] = []
    jobs: list[GpuJob] = []
    first_seen: dict[tuple[str, str], int] = {}
    for index, raw in enumerate(read_documents(text, filename, expected="GpuJob"), start=1):
        prefix = f"{filename}, document {index}"
        try:
            job = parse_job(raw, base_dir=base_dir)
        except SpecError as exc:
            problems.extend(f"{prefix}: {p}" for p in exc.problems)
            continue
        key = (job.metadata.namespace, job.name)
        if key in first_seen:
            problems.append(
                f"{prefix}: metadata.name {job.name!r} is already used by document "
                f"{first_seen[key]}; give each job its own name"
            )
            continue
        first_seen[key] = index
        jobs.append(job)
    if problems:
        raise SpecError(problems)
    return jobs


def parse_job(raw: object, *, base_dir: Path | None = None) -> GpuJob:
    """Validate one ``kind: GpuJob`` document (already parsed from YAML or JSON)."""
    if isinstance(raw, Mapping):
        kind = raw.get("kind")
        if kind is None:
            raise SpecError(["kind is required; add 'kind: GpuJob'"])
        if kind == "Job":
            raise SpecError(
                ["kind 'Job' is Kubernetes' batch/v1 Job; gpufleet's GPU work is 'kind: GpuJob'"]
            )
        if kind != "GpuJob":
            raise SpecError([f"kind must be 'GpuJob' (got {kind!r})"])
    job = validate(GpuJob, raw)
    return job if base_dir is None else _resolve_paths(job, base_dir)


def _resolve_paths(job: GpuJob, base_dir: Path) -> GpuJob:
    spec = job.spec
    workdir = base_dir.resolve()
    if spec.working_dir is not None:
        workdir = _absolute(spec.working_dir, base_dir)
    update: dict[str, Any] = {"working_dir": str(workdir)}
    if spec.checkpoint is not None:
        path = str(_absolute(spec.checkpoint.path, workdir))
        update["checkpoint"] = spec.checkpoint.model_copy(update={"path": path})
    return job.model_copy(update={"spec": spec.model_copy(update=update)})


def _absolute(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
