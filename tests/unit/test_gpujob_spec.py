"""``kind: GpuJob`` (issue 22): what the spec accepts and its defaults, every refusal naming the
field and the fix, reading files all-or-nothing, and the ``gpujobs.gpufleet.io`` CRD standing
for the same spec — every cross-field validator with a CEL twin, every CEL rule with a document
here that gpufleet rejects too (``JOB_REJECTED``: what the Kubernetes tier hands the real API
server), the schema accepting what gpufleet accepts and refusing what it can say alone."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

import gpufleet.spec as spec_package
from gpufleet.errors import SpecError
from gpufleet.spec import (
    GpuJob,
    load_jobs_file,
    load_jobs_text,
    parse_job,
)
from gpufleet.spec.cel import FORMATS, RULES, format_of, walk
from gpufleet.spec.crd import crds
from gpufleet.spec.gpujob import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_RETRIES,
    RESERVED_ENV,
    CheckpointSpec,
    GpuJobSpec,
    JobResources,
)
from tests.crd_cases import DURATION, ROOT, Rejected
from tests.unit.test_kubernetes_render import KUBERNETES, as_json_schema

API_VERSION = "gpufleet.io/v1alpha1"
EXAMPLE = ROOT / "examples" / "gpujob-sgd.yaml"
SHIPPED_CRD = ROOT / "deploy" / "helm" / "gpufleet" / "crds" / "gpujobs.gpufleet.io.yaml"


def job(name: str = "train", **spec: Any) -> dict[str, Any]:
    """A GpuJob document: ``command`` given unless ``spec`` says otherwise (None: left out)."""
    body = {"command": ["python", "train.py"], **spec}
    return {
        "apiVersion": API_VERSION,
        "kind": "GpuJob",
        "metadata": {"name": name},
        "spec": {k: v for k, v in body.items() if v is not None},
    }


def problems_of(doc: Any) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_jobs_text(yaml.safe_dump(doc), filename="job.yaml")
    return caught.value.problems


def _crd() -> dict[str, Any]:
    return next(c for c in crds() if c["metadata"]["name"] == "gpujobs.gpufleet.io")


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = _crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def crd_accepts(doc: dict[str, Any]) -> bool:
    """Whether the CRD's schema (not its CEL rules, which only an API server runs) takes it."""
    try:
        jsonschema.validate(doc, as_json_schema(_schema()))
    except jsonschema.ValidationError:
        return False
    return True


# -- what the spec accepts ----------------------------------------------------------------------

#: Documents at the edges that gpufleet and the CRD both accept (a rule too strict is a bug too).
JOB_ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("only-a-command", job()),
    (
        "everything",
        job(
            "fine-tune",
            image="registry.internal/train:v3",
            command=["torchrun", "--nproc-per-node", "8", "train.py", "--lr=2e-5"],
            env={"HF_HOME": "/cache", "_x": "", "MY_RANK": "3", "GPUFLEETX": "1"},
            workingDir="/workspace",
            resources={"gpus": 16, "gpusPerNode": 8, "gpuTypes": ["H100"], "memory": "1280Gi"},
            priorityClass="best-effort",
            schedule={"windows": ["20:00-06:00"], "days": ["mon", "fri"], "timezone": "UTC"},
            checkpoint={"path": "/ckpt", "graceSeconds": 3600},
            maxRuntime="168h",
            retries=0,
            tenant="research",
        ),
    ),
    ("sixty-four-gpus-on-one-node", job(resources={"gpus": 64})),
    ("a-node-of-the-whole-gang", job(resources={"gpus": 4, "gpusPerNode": 4})),
    ("a-gang-of-1024", job(resources={"gpus": 1024, "gpusPerNode": 8})),
    ("grace-of-one-second", job(checkpoint={"path": "ckpt", "graceSeconds": 1})),
    ("max-runtime-in-seconds", job(maxRuntime=1)),
    ("max-runtime-in-milliseconds", job(maxRuntime="1500ms")),
    ("memory-in-bytes", job(resources={"memory": 17179869184})),
    ("a-hundred-retries", job(retries=100)),
    ("name-63", job("a" * 63)),
]


@pytest.mark.parametrize("name,doc", JOB_ACCEPTED, ids=[n for n, _ in JOB_ACCEPTED])
def test_valid_jobs_round_trip_and_the_crd_takes_them(name: str, doc: dict[str, Any]) -> None:
    (loaded,) = load_jobs_text(yaml.safe_dump(doc))
    written = loaded.document()
    assert load_jobs_text(yaml.safe_dump(written)) == [loaded]
    assert parse_job(written) == loaded
    assert crd_accepts(doc) and crd_accepts(written), name


def test_the_defaults_and_what_they_mean() -> None:
    (loaded,) = load_jobs_text(yaml.safe_dump(job()))
    spec = loaded.spec
    assert loaded.kind == "GpuJob" and loaded.name == "train"
    assert spec.priority_class == "batch"
    assert spec.retries == DEFAULT_RETRIES == 2
    assert spec.resources.gpus == 1 and spec.resources.nodes == 1
    assert spec.checkpoint is None and spec.grace_seconds == DEFAULT_GRACE_SECONDS == 30
    assert spec.max_runtime is None and spec.schedule is None and spec.tenant is None
    assert spec.image is None and spec.working_dir is None and spec.env == {}
    with_grace = job(checkpoint={"path": "ckpt", "graceSeconds": 90})
    (loaded,) = load_jobs_text(yaml.safe_dump(with_grace))
    assert loaded.spec.grace_seconds == 90
    (loaded,) = load_jobs_text(yaml.safe_dump(job(checkpoint={"path": "ckpt"})))
    assert loaded.spec.checkpoint == CheckpointSpec(path="ckpt", grace_seconds=30)


def test_a_gang_across_nodes() -> None:
    gang = parse_job(job(resources={"gpus": 16, "gpusPerNode": 8}))
    assert (gang.spec.resources.nodes, gang.spec.resources.per_node) == (2, 8)
    one_node = parse_job(job(resources={"gpus": 8}))
    assert (one_node.spec.resources.nodes, one_node.spec.resources.per_node) == (1, 8)


def test_durations_and_quantities_are_read_as_a_models_are() -> None:
    loaded = parse_job(job(maxRuntime="30m", resources={"memory": "80Gi"}))
    assert loaded.spec.max_runtime == 1800.0
    assert loaded.spec.resources.memory == 80 * 2**30
    assert loaded.document()["spec"]["maxRuntime"] == 1800  # an int-or-string the CRD takes


def test_arguments_and_values_reach_the_process_as_written() -> None:
    """The spec strips its strings' whitespace; a command's arguments and env values are not
    its to change."""
    loaded = parse_job(job(command=["python", "-c", " print(1) "], env={"SEP": " "}))
    assert loaded.spec.command == ["python", "-c", " print(1) "]
    assert loaded.spec.env == {"SEP": " "}


# -- what the spec refuses, and how it says so --------------------------------------------------


@dataclass(frozen=True)
class BadJob:
    name: str
    doc: dict[str, Any]
    #: The field gpufleet's message and the API server's name ...
    field: str
    #: ... words of gpufleet's message (the fix) ...
    says: str
    #: ... and of the API server's: a CEL rule's message, or the schema's own words.
    server_says: str
    #: Whether the CRD's schema alone refuses it (else a CEL rule does).
    by_schema: bool = True


_RESERVED_WORDS = "gpufleet sets WORLD_SIZE, RANK"

JOB_BAD: list[BadJob] = [
    BadJob("no-command", job(command=None), "spec.command", "is required", "Required value"),
    BadJob(
        "an-empty-command", job(command=[]), "spec.command", "at least 1 item", "at least 1 item"
    ),
    BadJob(
        "a-number-for-an-argument",
        job(command=["python", "train.py", "--steps", 20000]),
        "spec.command[3]",
        'must be text: quote it ("20000")',
        "must be of type string",
    ),
    BadJob(
        "a-number-for-a-value",
        job(env={"PYTHONUNBUFFERED": 1}),
        "spec.env.PYTHONUNBUFFERED",
        'must be text: quote it ("1")',
        "must be of type string",
    ),
    BadJob(
        "interactive",
        job(priorityClass="interactive"),
        "spec.priorityClass",
        "jobs run below serving",
        'Unsupported value: "interactive"',
    ),
    BadJob(
        "a-priority-no-one-knows",
        job(priorityClass="urgent"),
        "spec.priorityClass",
        "must be 'batch' (the default) or 'best-effort' (got 'urgent'): jobs run below serving",
        'Unsupported value: "urgent"',
    ),
    BadJob(
        "no-gpu",
        job(resources={"gpus": 0}),
        "spec.resources.gpus",
        "greater than or equal to 1",
        "should be greater than or equal to 1",
    ),
    BadJob(
        "more-than-a-node-without-gpus-per-node",
        job(resources={"gpus": 65}),
        "spec.resources.gpus",
        "for a gang across nodes set spec.resources.gpusPerNode",
        "for a gang across nodes set resources.gpusPerNode",
        by_schema=False,
    ),
    BadJob(
        "a-gang-of-part-nodes",
        job(resources={"gpus": 12, "gpusPerNode": 8}),
        "spec.resources.gpusPerNode",
        "set spec.resources.gpus to a multiple of spec.resources.gpusPerNode (e.g. 16)",
        "must divide resources.gpus",
        by_schema=False,
    ),
    BadJob(
        "more-gpus-per-node-than-in-all",
        job(resources={"gpus": 4, "gpusPerNode": 8}),
        "spec.resources.gpusPerNode",
        "4 GPUs in all do not make whole nodes of 8",
        "must divide resources.gpus",
        by_schema=False,
    ),
    BadJob(
        "an-env-name-a-shell-cannot-read",
        job(env={"1ST": "x"}),
        "spec.env",
        "'1ST': not an environment variable name",
        "names must be environment variable names",
        by_schema=False,
    ),
    *(
        BadJob(
            f"env-{name.lower().replace('_', '-')}",
            job(env={name: "0"}),
            "spec.env",
            f"gpufleet sets {name} itself",
            _RESERVED_WORDS,
            by_schema=False,
        )
        for name in (*RESERVED_ENV, "GPUFLEET_CHECKPOINT_DIR", "GPUFLEET_RESUMED")
    ),
    BadJob(
        "checkpoint-without-a-path",
        job(checkpoint={"graceSeconds": 60}),
        "spec.checkpoint.path",
        "is required",
        "Required value",
    ),
    BadJob(
        "no-grace",
        job(checkpoint={"path": "ckpt", "graceSeconds": 0}),
        "spec.checkpoint.graceSeconds",
        "greater than or equal to 1",
        "should be greater than or equal to 1",
    ),
    BadJob(
        "max-runtime-soon",
        job(maxRuntime="soon"),
        "spec.maxRuntime",
        "is not a duration; write e.g. '30s', '10m' or '1h'",
        DURATION,
        by_schema=False,
    ),
    BadJob(
        "max-runtime-zero",
        job(maxRuntime=0),
        "spec.maxRuntime",
        "greater than 0",
        "must be more than 0 s and at most 604800 s",
        by_schema=False,
    ),
    BadJob(
        "max-runtime-over-a-week",
        job(maxRuntime="169h"),
        "spec.maxRuntime",
        "less than or equal to 604800",
        "must be more than 0 s and at most 604800 s",
        by_schema=False,
    ),
    BadJob(
        "negative-retries",
        job(retries=-1),
        "spec.retries",
        "greater than or equal to 0",
        "should be greater than or equal to 0",
    ),
    BadJob(
        "a-tenant-that-is-no-name",
        job(tenant="Research_Team"),
        "spec.tenant",
        "must be lower-case letters",
        "should match",
    ),
    BadJob(
        "schedule-in-an-unknown-zone",
        job(schedule={"windows": ["20:00-06:00"], "timezone": "Mars/Olympus"}),
        "spec.schedule.timezone",
        "is not a known time zone",
        "is not a known time zone",
        by_schema=False,
    ),
    BadJob(
        "memory-lots",
        job(resources={"memory": "lots"}),
        "spec.resources.memory",
        "is not a quantity",
        "must be a quantity",
        by_schema=False,
    ),
    BadJob("name-too-long", job("a" * 64), "metadata.name", "at most 63", "Too long"),
]


@pytest.mark.parametrize("case", JOB_BAD, ids=lambda c: c.name)
def test_every_refusal_names_the_field_and_the_fix(case: BadJob) -> None:
    problems = problems_of(case.doc)
    assert len(problems) == 1, problems
    (problem,) = problems
    assert problem.startswith(f"job.yaml, document 1: {case.field}"), problem
    assert case.says in problem, problem


@pytest.mark.parametrize("case", JOB_BAD, ids=lambda c: c.name)
def test_the_crds_schema_refuses_what_it_can_say_alone(case: BadJob) -> None:
    """The rest is CEL's, which an API server runs: JOB_REJECTED hands those to the
    Kubernetes tier."""
    assert crd_accepts(case.doc) is not case.by_schema, case.name


def test_unknown_fields_are_errors_with_a_suggestion() -> None:
    doc = job(maxRunTime="1h", resources={"gpu": 2})
    assert sorted(problems_of(doc)) == [
        "job.yaml, document 1: spec.maxRunTime: unknown field; did you mean 'maxRuntime'?",
        "job.yaml, document 1: spec.resources.gpu: unknown field; did you mean 'gpus'?",
    ]


def test_every_problem_of_every_document_is_said_at_once() -> None:
    text = yaml.safe_dump_all(
        [
            job("a", retries=-1, priorityClass="interactive"),
            job("b"),
            job("b"),
            job("c", resources={"gpus": 3, "gpusPerNode": 2}),
        ]
    )
    with pytest.raises(SpecError) as caught:
        load_jobs_text(text, filename="jobs.yaml")
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "jobs.yaml, document 1",
        "jobs.yaml, document 1",
        "jobs.yaml, document 3",
        "jobs.yaml, document 4",
    ]
    duplicate = "metadata.name 'b' is already used by document 2; give each job its own name"
    assert duplicate in problems[2]


@pytest.mark.parametrize(
    "doc,says",
    [
        ({**job(), "kind": "Job"}, "kind 'Job' is Kubernetes' batch/v1 Job; gpufleet's GPU work"),
        ({**job(), "kind": "Model"}, "kind must be 'GpuJob' (got 'Model')"),
        ({k: v for k, v in job().items() if k != "kind"}, "kind is required; add 'kind: GpuJob'"),
        ({**job(), "apiVersion": "batch/v1"}, "apiVersion must be 'gpufleet.io/v1alpha1'"),
        (["a", "list"], "must be a mapping with apiVersion, kind, metadata and spec"),
    ],
    ids=["kubernetes-job", "model", "no-kind", "api-version", "a-list"],
)
def test_documents_that_are_not_gpujobs(doc: Any, says: str) -> None:
    (problem,) = problems_of(doc)
    assert problem.startswith("job.yaml, document 1: ") and says in problem, problem


def test_a_file_without_jobs_or_yaml() -> None:
    with pytest.raises(SpecError, match="expected at least one 'kind: GpuJob'"):
        load_jobs_text("# nothing\n", filename="empty.yaml")
    with pytest.raises(SpecError, match=r"bad.yaml, line 1 column 13: not valid YAML"):
        load_jobs_text("spec: [a, {b", filename="bad.yaml")


# -- paths under gpufleet up ---------------------------------------------------------------------


def test_paths_are_read_from_the_spec_files_folder(tmp_path: Path) -> None:
    (relative,) = load_jobs_text(
        yaml.safe_dump(job(workingDir="work", checkpoint={"path": "ckpt"})), base_dir=tmp_path
    )
    assert relative.spec.working_dir == str(tmp_path / "work")
    assert relative.spec.checkpoint is not None
    assert relative.spec.checkpoint.path == str(tmp_path / "work" / "ckpt")
    (default,) = load_jobs_text(yaml.safe_dump(job(checkpoint={"path": "ckpt"})), base_dir=tmp_path)
    assert default.spec.working_dir == str(tmp_path)
    assert default.spec.checkpoint is not None
    assert default.spec.checkpoint.path == str(tmp_path / "ckpt")
    absolute = job(workingDir="/srv/train", checkpoint={"path": "/var/ckpt"})
    (kept,) = load_jobs_text(yaml.safe_dump(absolute), base_dir=tmp_path)
    assert kept.spec.working_dir == "/srv/train"
    assert kept.spec.checkpoint is not None and kept.spec.checkpoint.path == "/var/ckpt"
    # Without a folder (Kubernetes: paths inside the container) they stay as written.
    (as_written,) = load_jobs_text(yaml.safe_dump(job(checkpoint={"path": "ckpt"})))
    assert as_written.spec.working_dir is None
    assert as_written.spec.checkpoint is not None and as_written.spec.checkpoint.path == "ckpt"


def test_the_example_loads_from_its_folder_and_the_crd_takes_it() -> None:
    (example,) = load_jobs_file(EXAMPLE)
    assert example.name == "sgd"
    assert example.spec.working_dir == str(EXAMPLE.parent)
    assert example.spec.checkpoint is not None
    assert example.spec.checkpoint.path == str(EXAMPLE.parent / "checkpoints" / "sgd")
    assert example.spec.checkpoint.grace_seconds == 20
    assert example.spec.max_runtime == 1800 and example.spec.retries == 2
    script = example.spec.command[1]
    assert (EXAMPLE.parent / script).is_file()  # the command it runs ships beside it
    assert crd_accepts(yaml.safe_load(EXAMPLE.read_text()))


def test_a_file_that_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_jobs_file(tmp_path / "missing.yaml")


# -- the CRD -------------------------------------------------------------------------------------


def _job_classes() -> list[type[BaseModel]]:
    return list(walk(GpuJob))


def test_every_job_validator_has_a_cel_rule_and_every_job_rule_a_validator() -> None:
    validators = {
        (cls, name)
        for cls in _job_classes()
        for name in cls.__pydantic_decorators__.model_validators
    }
    assert (JobResources, "_gang") in validators and (GpuJobSpec, "_env") in validators
    assert validators <= set(RULES)
    job_only = set(_job_classes()) - {
        cls for cls in _job_classes() if cls.__module__ == "gpufleet.spec.resources"
    }
    assert {key for key in RULES if key[0] in job_only} <= validators


def test_every_job_field_validator_is_a_known_format() -> None:
    for cls in _job_classes():
        for name, field in cls.model_fields.items():
            groups = [field.metadata, *_metadata(field.annotation)]
            if any(hasattr(m, "func") for group in groups for m in group):
                found = format_of([m for group in groups for m in group])
                assert found in FORMATS, f"{cls.__name__}.{name}"


def _metadata(annotation: Any) -> list[Any]:
    out = [getattr(annotation, "__metadata__", ())]
    for arg in getattr(annotation, "__args__", ()):
        out += _metadata(arg)
    return out


def _rules(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, str]]]:
    found = [(path + r.get("fieldPath", ""), r) for r in node.get("x-kubernetes-validations", [])]
    for name, child in node.get("properties", {}).items():
        found += _rules(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _rules(node["items"], f"{path}[]")
    return found


def test_every_cel_rule_has_a_case_gpufleet_rejects_too() -> None:
    rules = _rules(_schema())
    assert rules
    for path, rule in rules:
        path = path.lstrip(".")
        assert any(
            case.field == path and case.server_says in rule["message"] for case in JOB_BAD
        ), f"no case in JOB_BAD for {path}: {rule['message']}"


def test_the_crd() -> None:
    crd = _crd()
    kubernetes_validate.validate(crd, KUBERNETES, strict=True)
    assert crd["spec"]["scope"] == "Namespaced"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("GpuJob", "gpujobs", ["gfj"])
    version = crd["spec"]["versions"][0]
    assert "scale" not in version["subresources"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Status"] == ".status.phase"
    assert columns["Tenant"] == ".spec.tenant"
    assert columns["GPUs"] == ".spec.resources.gpus"
    assert columns["Age"] == ".metadata.creationTimestamp"
    spec = _schema()["properties"]["spec"]
    assert spec["required"] == ["command"]
    # The API server fills in what gpufleet defaults, so `kubectl get gfj` shows a job's GPUs.
    assert spec["properties"]["resources"]["default"] == {}
    assert spec["properties"]["resources"]["properties"]["gpus"]["default"] == 1
    assert spec["properties"]["priorityClass"]["enum"] == ["batch", "best-effort"]
    assert spec["properties"]["env"]["maxProperties"] == 128  # bounds the env rules' cost
    assert {c["metadata"]["name"] for c in crds()} >= {"models.gpufleet.io", "gpujobs.gpufleet.io"}
    assert crds()[0]["spec"]["names"]["kind"] == "Model"  # the Model's stays first


def test_the_chart_ships_the_generated_crd() -> None:
    assert yaml.safe_load(SHIPPED_CRD.read_text()) == _crd(), "run scripts/generate-crds"


def test_the_spec_package_exports_the_job() -> None:
    for name in ("GpuJob", "GpuJobSpec", "JobResources", "CheckpointSpec", "parse_job",
                 "load_jobs_text", "load_jobs_file"):  # fmt: skip
        assert name in spec_package.__all__ and hasattr(spec_package, name), name


#: The refusals as ``tests.crd_cases.Rejected``, for the Kubernetes tier to hand the real API
#: server (``kubectl apply --dry-run=server`` refused, naming the field and the message).
JOB_REJECTED: list[Rejected] = [
    Rejected(f"gpujob-{c.name}", copy.deepcopy(c.doc), c.field, c.server_says) for c in JOB_BAD
]
