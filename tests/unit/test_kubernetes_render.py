"""Kubernetes: CRDs from the pydantic spec and rendered manifests, against the official
schemas of a pinned Kubernetes version (kubernetes-validate, offline) and a golden file."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gpufleet.hardware import load_inventory
from gpufleet.planner import deployment_for
from gpufleet.runtime.kubernetes import RenderError, RenderSettings, render, to_yaml
from gpufleet.spec import load_file_resources, load_text
from gpufleet.spec.crd import crds

#: The Kubernetes version every object must be valid for.
KUBERNETES = "1.34.0"
DATA = Path(__file__).parents[1] / "data" / "k8s"
GOLDEN = DATA / "render.golden.yaml"


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def schema_nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    nodes = [(path, node)]
    for name, child in node.get("properties", {}).items():
        nodes += schema_nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        nodes += schema_nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        nodes += schema_nodes(node["additionalProperties"], f"{path}{{}}")
    return nodes


def as_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.0 (nullable, int-or-string) → JSON Schema, to validate documents here."""
    node = copy.deepcopy(node)
    if node.pop("nullable", False):
        if "type" in node:
            node["type"] = [node["type"], "null"]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    for key in ("properties",):
        if key in node:
            node[key] = {k: as_json_schema(v) for k, v in node[key].items()}
    if isinstance(node.get("items"), dict):
        node["items"] = as_json_schema(node["items"])
    if node.get("exclusiveMinimum") is True:
        node["exclusiveMinimum"] = node.pop("minimum")
    if node.get("exclusiveMaximum") is True:
        node["exclusiveMaximum"] = node.pop("maximum")
    return {k: v for k, v in node.items() if not k.startswith("x-kubernetes")}


def model_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crds()[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_crds_are_valid_and_structural() -> None:
    for crd in crds():
        validate(crd)
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in schema_nodes(schema):
            assert "$ref" not in node, path
            int_or_string = node.get("x-kubernetes-int-or-string")
            assert "type" in node or int_or_string, f"{path} has no type"
            assert not ("properties" in node and "additionalProperties" in node), path
            if "anyOf" in node:
                assert int_or_string, f"{path}: anyOf only for int-or-string"
    names = [c["metadata"]["name"] for c in crds()]
    assert names == ["models.gpufleet.io", "tenants.gpufleet.io", "gpujobs.gpufleet.io"]
    model = crds()[0]["spec"]
    assert model["scope"] == "Namespaced"
    version = model["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas.min"
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Engine", "Ready", "Desired", "Status", "Source", "Age",
    ]  # fmt: skip


def test_every_model_the_spec_accepts_the_crd_accepts_too() -> None:
    schema = as_json_schema(model_schema())
    docs = list(yaml.safe_load_all((DATA / "models.yaml").read_text()))
    docs += list(yaml.safe_load_all((DATA / "placed.yaml").read_text()))
    examples = [d for d in docs if d["kind"] == "Model"]
    examples.append(
        {
            "apiVersion": "gpufleet.io/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "everything"},
            "spec": {
                "source": "hf://org/name",
                "engine": "vllm",
                "resources": {"gpus": 2, "memory": "40Gi"},
                "replicas": {"min": 0, "max": 8},
                "autoscaling": {
                    "scaleToZeroAfter": "10m",
                    "ttftObjective": "1s",
                    "stableWindow": 30,
                },
                "rollout": {"strategy": "canary", "analysis": "2m"},
                "schedule": {"windows": ["20:00-06:00"], "timezone": "Europe/Berlin"},
                "routing": {"policy": "chwbl", "fallbacks": ["other"]},
                "drain": "45s",
            },
        }
    )
    for doc in examples:
        load_text(yaml.safe_dump(doc))  # the spec accepts it ...
        jsonschema.validate(doc, schema)  # ... and so does the CRD
    bad = copy.deepcopy(examples[-1])
    bad["spec"]["replicas"]["min"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(examples[-1])
    bad["spec"]["engine"] = "tensorrt"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def rendered() -> list[dict[str, Any]]:
    models, tenants = load_file_resources(DATA / "models.yaml")
    return render(models, tenants)


def test_every_rendered_object_is_valid_kubernetes() -> None:
    objects = rendered()
    for obj in objects:
        validate(obj)
    kinds = [o["kind"] for o in objects]
    assert kinds == sorted(kinds, key=lambda k: [
        "Namespace", "PriorityClass", "ResourceQuota", "NetworkPolicy", "Role", "RoleBinding",
        "PersistentVolumeClaim", "Service", "Job", "Deployment", "PodDisruptionBudget",
    ].index(k))  # fmt: skip
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= set(kinds)
    assert "PersistentVolumeClaim" in kinds


def test_rendering_is_deterministic_and_matches_the_golden_file() -> None:
    text = to_yaml(rendered())
    models, tenants = load_file_resources(DATA / "models.yaml")
    shuffled = list(models)
    random.Random(3).shuffle(shuffled)
    assert to_yaml(render(shuffled[::-1], tenants)) == text
    if os.environ.get("GPUFLEET_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "run with GPUFLEET_UPDATE_GOLDEN=1 and review the diff"


def pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"]


def test_every_pod_is_locked_down() -> None:
    for pod in pods(rendered()):
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts["/models"]["readOnly"] is True
    namespaces = [o for o in rendered() if o["kind"] == "Namespace"]
    assert all(
        n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        for n in namespaces
    )


def test_engines_get_their_plan_and_only_the_gateway_reaches_them() -> None:
    objects = rendered()
    by_name = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    vllm = by_name["engine-llama-3-8b"]
    container = vllm["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert container["args"][:2] == ["--model", "/models/hf/meta-llama/Meta-Llama-3-8B-Instruct"]
    assert "--enable-prefix-caching" in container["args"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert vllm["spec"]["replicas"] == 2
    terms = vllm["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"][0]["matchExpressions"]
    assert terms == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}
    ]
    llama_cpp = by_name["engine-smol"]["spec"]["template"]["spec"]["containers"][0]
    assert llama_cpp["image"].startswith("ghcr.io/ggml-org/llama.cpp:server")
    assert "resources" not in llama_cpp or "limits" not in llama_cpp["resources"]
    policies = {
        o["metadata"]["name"]: o
        for o in objects
        if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == "tenant-acme"
    }
    assert policies["default-deny"]["spec"]["policyTypes"] == ["Ingress", "Egress"]
    source = policies["gateway-to-engines"]["spec"]["ingress"][0]["from"][0]
    assert source["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "gpufleet-gateway"}}
    quota = next(o for o in objects if o["kind"] == "ResourceQuota")
    assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "4"}


def inventory(tmp_path: Path, h100: str) -> Any:
    """tests/data/k8s/inventory.yaml with gpu-node-1's H100 group as ``h100`` says."""
    text = (DATA / "inventory.yaml").read_text()
    text = text.replace("gpus: [{type: H100, count: 2}]", f"gpus: [{h100}]")
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return load_inventory(path)


def render_placed(fleet: Any) -> list[dict[str, Any]]:
    models, _ = load_file_resources(DATA / "placed.yaml")
    deployments = {m.name: deployment_for(m, None) for m in models}
    return render(models, inventory=fleet, deployments=deployments)


def engine_args(deployment: dict[str, Any]) -> list[str]:
    args: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def test_with_an_inventory_replicas_are_pinned_where_the_planner_put_them(tmp_path: Path) -> None:
    objects = render_placed(inventory(tmp_path, "{type: H100, count: 3}"))
    for obj in objects:
        validate(obj)
    engines = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    llama = [o for name, o in engines.items() if name.startswith("engine-llama-3-8b")]
    assert sum(o["spec"]["replicas"] for o in llama) == 3
    for o in llama:
        pod = o["spec"]["template"]["spec"]
        hosts = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][0]["matchExpressions"][0]
        assert hosts == {
            "key": "kubernetes.io/hostname",
            "operator": "In",
            "values": ["gpu-node-1"],
        }
        # A whole GPU of its own: vLLM's default share (0.9), not the plan's estimate (0.4).
        assert "--gpu-memory-utilization" not in engine_args(o)
    (small,) = [o for name, o in engines.items() if name.startswith("engine-qwen-small")]
    limits = small["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert list(limits) == ["nvidia.com/mig-3g.40gb"]  # its own MIG instance ...
    assert "--mem-fraction-static" not in engine_args(small)  # ... all of it


def test_only_engines_on_a_time_sliced_gpu_are_given_a_share_of_it(tmp_path: Path) -> None:
    objects = render_placed(inventory(tmp_path, "{type: H100, count: 2, timeSlicing: 2}"))
    for obj in objects:
        validate(obj)
    llama = [
        o
        for o in objects
        if o["kind"] == "Deployment" and o["metadata"]["name"].startswith("engine-llama-3-8b")
    ]
    assert sum(o["spec"]["replicas"] for o in llama) == 3  # 3 engines on 2 GPUs, 2 slices each
    for o in llama:
        args = engine_args(o)
        fraction = float(args[args.index("--gpu-memory-utilization") + 1])
        assert 0 < fraction <= 0.45  # the plan's share: another engine may use the rest


def test_a_whole_gpu_goes_to_one_engine_pod(tmp_path: Path) -> None:
    """The device plugin gives each pod whole GPUs: 3 replicas of one GPU each do not fit on
    2 GPUs however little memory they need (pinned there, the third would stay Pending)."""
    with pytest.raises(RenderError) as err:
        render_placed(load_inventory(DATA / "inventory.yaml"))
    assert any(
        "cannot place llama-3-8b#2" in p and "one engine per GPU" in p for p in err.value.problems
    )


def test_what_cannot_run_on_kubernetes_is_refused_with_the_fix() -> None:
    config = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
    models = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: a}\n"
        f"spec: {{source: 'file:{config}', engine: emulator}}\n---\n"
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: b}\n"
        "spec: {source: 'hf://org/name', engine: vllm}\n---\n"
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: c}\n"
        "spec: {source: 'hf://org/name', engine: llamacpp}\n---\n"
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: d}\n"
        "spec: {engine: external, endpoints: [{url: 'https://api.example.com/v1',"
        " apiKey: {env: HOSTED_KEY}}],"
        " pricing: {perMillionInputTokens: 1, perMillionOutputTokens: 2}}\n"
    )
    with pytest.raises(RenderError) as err:
        render(models)
    problems = err.value.problems
    assert any("d: spec.endpoints[0].apiKey.env is read by gpufleet up" in p for p in problems)
    assert any("a: spec.engine 'emulator' runs only under 'gpufleet up'" in p for p in problems)
    assert any(f"a: spec.source 'file:{config}' is local to one machine" in p for p in problems)
    assert any("b: spec.resources.gpus is 0; vllm needs GPUs" in p for p in problems)
    assert any(
        "c: spec.source 'hf://org/name': llama.cpp loads one GGUF file" in p for p in problems
    )


def test_the_render_command_prints_the_same_manifests() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gpufleet", "render", "-f", str(DATA / "models.yaml"), "--crds"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    n = len(crds())
    assert [d["kind"] for d in docs[:n]] == ["CustomResourceDefinition"] * n
    assert docs[n:] == rendered()
    assert RenderSettings().namespace == "gpufleet"


def test_the_validator_catches_what_the_api_server_would_reject() -> None:
    deployment = next(o for o in rendered() if o["kind"] == "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["replicaz"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong)


def test_with_keda_the_replica_count_is_left_to_it() -> None:
    models, _ = load_file_resources(DATA / "models.yaml")
    settings = RenderSettings(keda_prometheus="http://prometheus.monitoring:9090")
    objects = render(models, settings=settings)
    scaled = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ScaledObject"}
    assert sorted(scaled) == ["engine-llama-3-8b", "engine-smol"]
    llama = scaled["engine-llama-3-8b"]["spec"]
    assert llama["scaleTargetRef"]["name"] == "engine-llama-3-8b"
    assert (llama["minReplicaCount"], llama["maxReplicaCount"]) == (2, 4)
    trigger = llama["triggers"][0]["metadata"]
    assert 'gpufleet_requests_in_flight{model="llama-3-8b"}' in trigger["query"]
    assert trigger["threshold"] == "8"
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        assert "replicas" not in deployment["spec"]  # never two autoscalers on one workload
        validate(deployment)
    assert [o["kind"] for o in objects][-2:] == ["ScaledObject", "ScaledObject"]


def test_weights_are_fetched_once_and_engines_wait_for_them() -> None:
    objects = rendered()
    jobs = [o for o in objects if o["kind"] == "Job"]
    assert len(jobs) == 2  # one per source
    hf = next(
        j
        for j in jobs
        if "huggingface-cli" in j["spec"]["template"]["spec"]["containers"][0]["command"][2]
    )
    script = hf["spec"]["template"]["spec"]["containers"][0]["command"][2]
    marker = "/models/hf/meta-llama/Meta-Llama-3-8B-Instruct.gpufleet-complete"
    assert script.startswith(f'[ -f "{marker}" ] && exit 0;')  # a re-run does nothing
    assert script.endswith(f'touch "{marker}"')
    s3 = next(j for j in jobs if j is not hf)
    assert (
        "aws s3 cp s3://models/smollm2/smollm2-135m-instruct-q8_0.gguf"
        in (s3["spec"]["template"]["spec"]["containers"][0]["command"][2])
    )
    for pod in pods(objects):
        (wait,) = pod["initContainers"]
        assert wait["name"] == "wait-for-weights" and ".gpufleet-complete" in wait["command"][2]


def test_one_gguf_file_of_a_hugging_face_repository() -> None:
    (model,) = load_text((Path(__file__).parents[2] / "deploy" / "e2e" / "model.yaml").read_text())
    objects = render([model])
    for obj in objects:
        validate(obj)
    (job,) = [o for o in objects if o["kind"] == "Job"]
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
    assert (
        "huggingface-cli download bartowski/SmolLM2-135M-Instruct-GGUF "
        "SmolLM2-135M-Instruct-Q4_K_M.gguf --local-dir /models/hf/bartowski/SmolLM2-135M-Instruct-GGUF"
    ) in script
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == [
        "--model",
        "/models/hf/bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf",
    ]


def test_the_end_to_end_datastores_are_valid() -> None:
    for doc in yaml.safe_load_all(
        (Path(__file__).parents[2] / "deploy" / "e2e" / "datastores.yaml").read_text()
    ):
        validate(doc)


def test_a_model_bigger_than_a_node_becomes_a_leader_worker_set() -> None:
    (model,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: llama-405b}\n"
        "spec: {source: 'hf://meta-llama/Llama-3.1-405B-Instruct', engine: vllm, "
        "resources: {gpus: 16, gpuTypes: [H100]}, replicas: {min: 1, max: 1}}\n"
    )
    objects = render([model])
    (lws,) = [o for o in objects if o["kind"] == "LeaderWorkerSet"]
    assert not [o for o in objects if o["kind"] == "Deployment"]
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2  # two 8-GPU nodes
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    script = leader["command"][2]
    assert script.startswith("ray start --head --port=6379 && exec python3 -m vllm")
    assert "--tensor-parallel-size 8" in script and "--pipeline-parallel-size 2" in script
    assert leader["resources"]["limits"] == {"nvidia.com/gpu": 8}
    worker = template["workerTemplate"]["spec"]["containers"][0]
    assert worker["command"][2] == "ray start --address=$(LWS_LEADER_ADDRESS):6379 --block"
    for role in ("leaderTemplate", "workerTemplate"):  # each pod template is a valid Pod
        validate(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "x"},
                **{"spec": template[role]["spec"]},
            }
        )
    (service,) = [o for o in objects if o["kind"] == "Service"]
    assert service["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    for obj in objects:
        if obj["kind"] != "LeaderWorkerSet":
            validate(obj)


def test_with_an_inventory_a_model_bigger_than_a_node_is_pinned_tp_within_pp_across(
    tmp_path: Path,
) -> None:
    """Three 8-GPU nodes, two replicas of a 16-GPU model: each a LeaderWorkerSet of two pods
    (TP 8 × PP 2), its leader and worker pinned to the nodes the planner gave that replica."""
    (model,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: big}\n"
        "spec: {source: 'hf://meta-llama/Llama-3.1-405B-Instruct', engine: vllm, "
        "resources: {gpus: 16, gpuTypes: [H100], memory: 40Gi}, replicas: {min: 2, max: 2}}\n"
    )
    path = tmp_path / "inventory.yaml"
    path.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: rack}\nspec:\n"
        "  nodes:\n"
        + "".join(f"    - {{name: n{i}, gpus: [{{type: H100, count: 8}}]}}\n" for i in range(4))
    )
    objects = render(
        [model], inventory=load_inventory(path), deployments={"big": deployment_for(model, None)}
    )
    groups = [o for o in objects if o["kind"] == "LeaderWorkerSet"]
    assert not [o for o in objects if o["kind"] == "Deployment"]
    assert len(groups) == 2
    used: list[str] = []
    for lws in groups:
        template = lws["spec"]["leaderWorkerTemplate"]
        assert (lws["spec"]["replicas"], template["size"]) == (1, 2)
        leader, worker = (template[r]["spec"] for r in ("leaderTemplate", "workerTemplate"))
        script = leader["containers"][0]["command"][2]
        assert "--tensor-parallel-size 8" in script and "--pipeline-parallel-size 2" in script
        pinned = []
        for pod in (leader, worker):
            validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod})
            assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
            terms = pod["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            (hosts,) = [
                e["values"]
                for e in terms["nodeSelectorTerms"][0]["matchExpressions"]
                if e["key"] == "kubernetes.io/hostname"
            ]
            pinned += hosts
            (apart,) = pod["affinity"]["podAntiAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]
            assert apart["matchLabelKeys"] == ["leaderworkerset.sigs.k8s.io/group-key"]
        assert len(pinned) == 2 and len(set(pinned)) == 2  # one node each, two nodes
        used += pinned
    assert sorted(used) == ["n0", "n1", "n2", "n3"]
    assert len({g["metadata"]["name"] for g in groups}) == 2
    (service,) = [o for o in objects if o["kind"] == "Service"]
    assert service["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"


def test_with_an_inventory_a_node_big_enough_runs_the_model_in_one_pod(tmp_path: Path) -> None:
    """A 16-GPU node: the planner keeps a 16-GPU model on it, so one pod does (TP 16), however
    many GPUs ``gpus_per_node`` guesses a node has."""
    (model,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: big}\n"
        "spec: {source: 'hf://meta-llama/Llama-3.1-405B-Instruct', engine: vllm, "
        "resources: {gpus: 16, gpuTypes: [H100], memory: 40Gi}, replicas: {min: 1, max: 1}}\n"
    )
    path = tmp_path / "inventory.yaml"
    path.write_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Inventory\nmetadata: {name: rack}\nspec:\n"
        "  nodes: [{name: wide, gpus: [{type: H100, count: 16}]}]\n"
    )
    objects = render(
        [model], inventory=load_inventory(path), deployments={"big": deployment_for(model, None)}
    )
    assert not [o for o in objects if o["kind"] == "LeaderWorkerSet"]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    args = engine_args(deployment)
    assert args[args.index("--tensor-parallel-size") + 1] == "16"


def test_weights_from_an_oci_registry_or_an_existing_claim() -> None:
    models = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: packed}\n"
        "spec: {source: 'oci://registry.internal/models/llama-3-8b:v1', engine: vllm, "
        "resources: {gpus: 1}}\n---\n"
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: mounted}\n"
        "spec: {source: 'pvc://team-models/llama/3-8b', engine: vllm, resources: {gpus: 1}}\n"
    )
    objects = render(models)
    for obj in objects:
        validate(obj)
    (job,) = [o for o in objects if o["kind"] == "Job"]  # none for the claim
    fetch = job["spec"]["template"]["spec"]
    assert fetch["containers"][0]["image"].startswith("ghcr.io/oras-project/oras")
    assert (
        "oras pull registry.internal/models/llama-3-8b:v1 --output /models/oci/"
        in (fetch["containers"][0]["command"][2])
    )
    assert fetch["volumes"][-1]["secret"]["secretName"] == "oci-credentials"
    by = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    mounted = by["engine-mounted"]["spec"]["template"]["spec"]
    assert mounted["initContainers"] == []  # already there: nothing to wait for
    assert mounted["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "team-models",
        "readOnly": True,
    }
    assert mounted["containers"][0]["args"][:2] == ["--model", "/models/llama/3-8b"]


def test_the_engine_port_is_carried_everywhere_engines_are_reached() -> None:
    models, tenants = load_file_resources(DATA / "models.yaml")
    (big,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: big}\n"
        "spec: {source: 'hf://org/big', engine: vllm, resources: {gpus: 16}}\n"
    )
    objects = render([*models, big], tenants, RenderSettings(engine_port=9000))
    for obj in objects:
        if obj["kind"] != "LeaderWorkerSet":
            validate(obj)
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["ports"] == [{"name": "http", "containerPort": 9000}]
        args = container["args"]
        assert args[args.index("--port") + 1] == "9000"
        for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] == "http"  # the port above, by name
    (lws,) = [o for o in objects if o["kind"] == "LeaderWorkerSet"]
    leader = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    assert leader["ports"] == [{"name": "http", "containerPort": 9000}]
    assert "--port 9000" in leader["command"][2]
    for service in (o for o in objects if o["kind"] == "Service"):
        assert service["spec"]["ports"] == [{"name": "http", "port": 9000, "targetPort": "http"}]
    policy = next(o for o in objects if o["metadata"]["name"] == "gateway-to-engines")
    assert policy["spec"]["ingress"][0]["ports"][0] == {"protocol": "TCP", "port": 9000}
    with pytest.raises(RenderError) as err:
        render(models, settings=RenderSettings(engine_port=6379))
    assert err.value.problems == ["engine port 6379 is Ray's on multi-node engines; pick another"]


def test_the_model_cache_claim_is_rendered_unless_it_exists() -> None:
    models, _ = load_file_resources(DATA / "models.yaml")
    from gpufleet.runtime.kubernetes.common import ModelCache

    cache = ModelCache(size="2Ti", storage_class="cephfs", access_mode="ReadWriteOnce")
    objects = render(
        models, settings=RenderSettings(model_cache_claim="weights", model_cache=cache)
    )
    (claim,) = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    validate(claim)
    assert claim["metadata"]["name"] == "weights"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "cephfs",
        "resources": {"requests": {"storage": "2Ti"}},
    }
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for o in objects
        if o["kind"] in ("Deployment", "Job")
        for v in o["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"weights"}  # what engines and loaders mount is what is rendered
    existing = render(models, settings=RenderSettings(model_cache=None))
    assert not [o for o in existing if o["kind"] == "PersistentVolumeClaim"]
    mounted = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: mounted}\n"
        "spec: {source: 'pvc://team-models/llama/3-8b', engine: vllm, resources: {gpus: 1}}\n"
    )
    assert not [o for o in render(mounted) if o["kind"] == "PersistentVolumeClaim"]
    with pytest.raises(RenderError) as err:
        render(
            models, settings=RenderSettings(model_cache=ModelCache(size="lots", access_mode="RWX"))
        )
    assert err.value.problems == [
        "model cache access mode 'RWX': one of ReadWriteMany, ReadWriteOnce, ReadWriteOncePod, "
        "ReadOnlyMany",
        "model cache size 'lots' is not a quantity such as 500Gi",
    ]


def test_the_render_command_sets_the_port_and_the_claim() -> None:
    def run(*options: str) -> list[dict[str, Any]]:
        out = subprocess.run(
            [sys.executable, "-m", "gpufleet", "render", "-f", str(DATA / "models.yaml"), *options],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    docs = run(
        "--engine-port", "9000", "--model-cache", "weights", "--model-cache-size", "1Ti",
        "--model-cache-storage-class", "fast", "--model-cache-access-mode", "ReadWriteOnce",
    )  # fmt: skip
    (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert (claim["metadata"]["name"], claim["spec"]["storageClassName"]) == ("weights", "fast")
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Ti"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["ports"][0]["port"] == 9000
    assert not [d for d in run("--no-model-cache-pvc") if d["kind"] == "PersistentVolumeClaim"]
