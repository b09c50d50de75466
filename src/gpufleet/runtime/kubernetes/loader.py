"""Weights on Kubernetes: fetched once per source into the shared model cache by a Job.

The Job writes the weights under ``/models/<scheme>/<location>`` of the cache claim and then a
completion mark beside them, so running it again does nothing; engine pods wait for the mark in
an init container. ``pvc://`` weights are already on a claim: no Job, the claim is mounted as is.

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
    ``hf-token`` (key ``token``) for Hugging Face, ``s3-credentials`` for S3."""
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
    """Where the weights are, mounted at /models: the cache's /models/<scheme>/<location>, or
    the path inside a ``pvc://`` claim."""
    source = model.spec.parsed_source
    if source.scheme == "pvc":
        return PurePosixPath("/models") / source.location.partition("/")[2]
    location = source.location.replace("@", "_").replace(":", "_")
    return PurePosixPath("/models") / source.scheme / location.strip("/")


def claim_of(model: Model, settings: RenderSettings) -> str:
    source = model.spec.parsed_source
    return (
        source.location.partition("/")[0] if source.scheme == "pvc" else settings.model_cache_claim
    )
