"""TensorRT-LLM and Triton on Kubernetes: ``render``'s objects and the operator's pods, against
the official schemas (kubernetes-validate, strict) as the other render tests; the image per
backend, the container's command, probes and key; what ``check`` refuses; and what ``gpufleet
plan`` says of a TensorRT engine and of a Triton repository. The real API server takes the same
objects in tests/kube/test_render.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate

from gpufleet.runtime import ReplicaRequest
from gpufleet.runtime.kubernetes import (
    DEFAULT_IMAGES,
    FakeKube,
    KubernetesRuntime,
    RenderSettings,
    render,
)
from gpufleet.runtime.kubernetes.checks import check
from gpufleet.spec import load_file, load_file_resources, load_text

ROOT = Path(__file__).resolve().parents[2]
NVIDIA = ROOT / "tests" / "data" / "k8s" / "nvidia.yaml"
KUBERNETES = "1.34.0"  # as tests/unit/test_kubernetes_render.py

IMAGES = {
    "qwen-trt": "nvcr.io/nvidia/tensorrt-llm/release:1.3.0rc24",
    "llama-trt-engine": "nvcr.io/nvidia/tensorrt-llm/release:1.2.0",
    "llama-triton": "nvcr.io/nvidia/tritonserver:26.07-vllm-python-py3",
    "mistral-triton": "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3",
}


def engines(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each model's engine container, by model."""
    out = {}
    for o in objects:
        if o["kind"] == "Deployment":
            name = o["metadata"]["name"].removeprefix("engine-")
            out[name] = o["spec"]["template"]["spec"]["containers"][0]
    return out


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_rendered_objects_are_valid_and_run_the_official_image_of_each_backend() -> None:
    models, tenants = load_file_resources(NVIDIA)
    objects = render(models, tenants)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    containers = engines(objects)
    assert {name: c["image"] for name, c in containers.items()} == IMAGES
    trt = containers["qwen-trt"]
    assert trt["command"][:2] == ["sh", "-c"] and trt["command"][3] == "trtllm-serve"
    assert "$(" not in trt["command"][2]  # the kubelet would expand it
    assert trt["args"][0] == "/models/hf/Qwen/Qwen2.5-7B-Instruct"
    assert trt["args"][trt["args"].index("--max_batch_size") + 1] == "64"
    assert trt["readinessProbe"]["httpGet"]["path"] == "/health"
    engine = containers["llama-trt-engine"]
    assert engine["args"][engine["args"].index("--backend") + 1] == "tensorrt"
    assert engine["args"][engine["args"].index("--tp_size") + 1] == "2"
    assert "--max_seq_len" not in engine["args"]  # the engine's own, from its build
    assert engine["resources"]["limits"] == {"nvidia.com/gpu": 2}
    for name in ("llama-triton", "mistral-triton"):
        triton = containers[name]
        assert triton["command"] == [
            "python3", "/opt/tritonserver/python/openai/openai_frontend/main.py"
        ]  # fmt: skip
        args = triton["args"]
        assert args[args.index("--openai-port") + 1] == "8000"
        # The key from the Secret, expanded by the kubelet; never in the pod spec.
        assert args[-1] == "Bearer $(GPUFLEET_ENGINE_KEY)"
        assert env(triton)["GPUFLEET_ENGINE_KEY"]["secretKeyRef"]["name"] == "gpufleet-engine-key"
        for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
            assert triton[probe]["httpGet"]["path"] == "/health/ready"
    assert env(containers["mistral-triton"])["TRTLLM_ORCHESTRATOR"] == "1"
    assert "TRTLLM_ORCHESTRATOR" not in env(containers["llama-triton"])
    for container in containers.values():
        # The device plugin shows a pod its GPUs; the adapters' local variable stays out.
        assert "CUDA_VISIBLE_DEVICES" not in env(container)


async def test_the_operator_starts_valid_pods_for_both_engines() -> None:
    kube = FakeKube()
    runtime = KubernetesRuntime(kube)
    try:
        for model in load_file(NVIDIA):
            await runtime.start(ReplicaRequest(model.name, 1, model.spec))
    finally:
        await runtime.close()
    pods = {
        o["metadata"]["labels"]["gpufleet.io/model"]: o
        for (kind, _, _), o in kube.objects.items()
        if kind == "Pod"
    }
    assert {name: p["spec"]["containers"][0]["image"] for name, p in pods.items()} == IMAGES
    for pod in pods.values():
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)
        init = pod["spec"]["initContainers"][0]  # waits for the loader with the engine's image
        assert init["image"] == pod["spec"]["containers"][0]["image"]


def one(text: str) -> Any:
    (model,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n" + text
    )
    return model


def test_check_refuses_a_cpu_replica_and_a_missing_image() -> None:
    cpu = one("spec: {source: 'hf://a/b', engine: trtllm}\n")
    (problem,) = check(cpu, RenderSettings())
    assert "resources.gpus is 0; trtllm needs GPUs" in problem
    triton = one("spec: {source: 's3://repos/x/', engine: triton, triton: {backend: tensorrtllm}, "
                 "resources: {gpus: 1}}\n")  # fmt: skip
    assert check(triton, RenderSettings()) == []
    images = {k: v for k, v in DEFAULT_IMAGES.items() if k != "triton-tensorrtllm"}
    (problem,) = check(triton, RenderSettings(images=images))
    assert "has no image ('triton-tensorrtllm')" in problem


def test_plan_says_a_tensorrt_engine_runs_only_as_built_and_triton_as_its_repository(
    tmp_path: Path,
) -> None:
    config = ROOT / "tests" / "data" / "configs" / "llama-3-8b.json"
    models = tmp_path / "models.yaml"
    models.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: built}\nspec:\n"
        f"  source: file:{config}\n  engine: trtllm\n  trtllm: {{backend: tensorrt}}\n"
        "  resources: {gpus: 2, gpuTypes: [H100]}\n---\n"
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: repo}\nspec:\n"
        f"  source: file:{config}\n  engine: triton\n  resources: {{gpus: 1}}\n---\n"
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: hf}\nspec:\n"
        f"  source: file:{config}\n  engine: trtllm\n  resources: {{gpus: 1}}\n"
    )
    inventory = str(ROOT / "examples" / "inventory.yaml")

    def plan(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpufleet", "plan", "-f", str(models), "-i", inventory, *extra],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip

    data = json.loads(plan("-o", "json").stdout)
    placed = {p["replica"]["deployment"]: p for p in data["placements"]}
    assert (len(placed["built"]["gpus"]), placed["built"]["gpu_type"]) == (2, "H100")
    built, repo = data["notes"]  # the PyTorch backend needs no note
    assert built.startswith("built: trtllm backend tensorrt runs an engine built for TP 2 on H100")
    assert repo.startswith("repo: triton (vllm) takes its TP degree, memory share and batch size")
    table = " ".join(plan().stdout.split())
    assert "note built: trtllm backend tensorrt runs an engine built for TP 2 on H100" in table
