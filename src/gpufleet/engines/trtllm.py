"""TensorRT-LLM's OpenAI-compatible server, ``trtllm-serve`` (GPU engine).

Facts this rests on (TensorRT-LLM docs/source/commands/trtllm-serve/trtllm-serve.rst and
tensorrt_llm/commands/serve.py, 1.x): ``trtllm-serve MODEL`` (its default subcommand is
``serve``) takes ``--host``, ``--port``, ``--backend pytorch|tensorrt`` (pytorch, the default,
loads a Hugging Face checkpoint; tensorrt runs an engine ``trtllm-build`` made, fixed to one TP
degree and GPU type), ``--tp_size``, ``--max_batch_size``, ``--max_seq_len`` and
``--kv_cache_free_gpu_memory_fraction`` (the share of the memory *free after the weights* that
the KV cache takes, default 0.9 — not a share of the card), and ``--extra_llm_api_options`` (also
``--config`` in newer releases), a YAML file of LLM API arguments. It serves ``/v1/models``,
``/v1/completions``, ``/v1/chat/completions``, ``/health`` and, only when started with
``return_perf_metrics: true``, Prometheus text at ``/prometheus/metrics``, whose load gauges need
``enable_iter_perf_stats: true`` too (tensorrt_llm/serve/openai_server.py) — its ``/metrics`` is
JSON iteration statistics that each read removes. Both keys exist only in such a YAML file, so
the engine starts through a ``sh`` line that writes one to ``$TMPDIR`` (a pod's ``/tmp`` is an
``emptyDir``): a ``--config`` of the user's in ``engineArgs`` comes later and replaces it (it
must then carry the two keys for the load to be seen). The TensorRT backend's LLM arguments have
no ``enable_iter_perf_stats`` (it always collects them), so it gets only the first key; a
TensorRT engine's sequence length and batch size are fixed when it is built, so it gets
neither ``--max_seq_len`` nor ``--max_batch_size``.

A placement's memory share (only a time-sliced GPU shared with other pods has one) goes to
``--kv_cache_free_gpu_memory_fraction`` as it is: started beside neighbours that hold their
shares, the engine stays within its own; started first on an idle card, it can take up to
(1 − share) × (weights + overhead) more, until the neighbours start.

trtllm-serve checks no API key (serve.py in the 1.x releases read has no such option; the
request is NVIDIA/TensorRT-LLM#9950): the key a replica is given is not passed, and only the
network keeps others out (on Kubernetes the tenants' NetworkPolicies admit just the gateways). It does not check the request's ``model``
either, so the served name needs no flag. It loads the model before it listens, and readiness is
one real one-token completion, as for vLLM.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gpufleet.engines.base import LOCAL, KvEvents, Launch, Placement, ReadinessProbe
from gpufleet.engines.metrics import EngineLoad, parse_trtllm
from gpufleet.spec import ModelSpec

__all__ = [
    "PROMETHEUS_PATH",
    "TRTLLM_SERVE",
    "TrtllmEngine",
    "backend_of",
    "build_note",
    "with_metrics",
]

TRTLLM_SERVE = "trtllm-serve"
PROMETHEUS_PATH = "/prometheus/metrics"


def with_metrics(backend: str, port: int) -> str:
    """The ``sh -c`` line that writes the LLM API options turning the Prometheus metrics on
    (a file per port: replicas on one machine share ``/tmp``), then runs ``$0`` — the
    ``trtllm-serve`` after the line in argv — with them and its arguments. No ``$$`` and no
    ``$(``: Kubernetes would read those in a container's command as its own references."""
    options = {"return_perf_metrics": True}
    if backend != "tensorrt":
        options["enable_iter_perf_stats"] = True
    path = f'"${{TMPDIR:-/tmp}}/gpufleet-trtllm-{port}.yaml"'
    return (
        f"printf '%s\\n' '{json.dumps(options)}' > {path}"
        f' && exec "$0" --extra_llm_api_options {path} "$@"'
    )


def backend_of(spec: ModelSpec) -> str:
    """``pytorch`` or ``tensorrt`` (``spec.trtllm.backend``; absent: pytorch)."""
    return spec.trtllm.backend if spec.trtllm is not None else "pytorch"


def build_note(spec: ModelSpec) -> str | None:
    """What ``gpufleet plan`` says of a TensorRT engine: it runs only where it was built for."""
    if backend_of(spec) != "tensorrt":
        return None
    gpu_type = spec.resources.gpu_types[0] if spec.resources.gpu_types else "?"
    return (
        f"trtllm backend tensorrt runs an engine built for TP {spec.resources.gpus} on "
        f"{gpu_type}: every replica is placed with exactly that; another TP degree or GPU type "
        "needs an engine built for it (trtllm-build), or backend pytorch, which needs none"
    )


class TrtllmEngine:
    name = "trtllm"
    metrics_path: str | None = PROMETHEUS_PATH
    #: No key at all (see the module's docstring): ``launch`` ignores the one it is given.
    api_key_env: str | None = None

    def unavailable_reason(self) -> str | None:
        if shutil.which(TRTLLM_SERVE) is None:
            return (
                f"{TRTLLM_SERVE} is not on PATH: TensorRT-LLM runs on NVIDIA GPUs only; install "
                "it there ('pip install tensorrt-llm') or run gpufleet in "
                "nvcr.io/nvidia/tensorrt-llm/release"
            )
        return None

    def launch(
        self,
        spec: ModelSpec,
        *,
        weights: Path,
        served_name: str,
        host: str,
        port: int,
        placement: Placement = LOCAL,
        api_key: str | None = None,
        kv_events: KvEvents | None = None,
    ) -> Launch:
        backend = backend_of(spec)
        argv = [
            "sh", "-c", with_metrics(backend, port), TRTLLM_SERVE,
            str(weights),
            "--host", host,
            "--port", str(port),
            "--backend", backend,
        ]  # fmt: skip
        tp = len(placement.gpu_indices) or spec.resources.gpus
        if tp > 1:
            argv += ["--tp_size", str(tp)]
        if placement.memory_fraction is not None:
            argv += ["--kv_cache_free_gpu_memory_fraction", f"{placement.memory_fraction:.3f}"]
        if backend == "pytorch":  # a TensorRT engine's are fixed when it is built
            argv += ["--max_seq_len", str(spec.context_length)]
            if spec.routing.max_in_flight_per_replica is not None:
                # The gateway lets this many through to a replica: the engine batches them all.
                argv += ["--max_batch_size", str(spec.routing.max_in_flight_per_replica)]
        argv += spec.engine_args
        probe = json.dumps({"model": served_name, "prompt": "Are you ready?", "max_tokens": 1})
        return Launch(
            argv=tuple(argv),
            env=placement.device_env(),
            readiness=ReadinessProbe("POST", "/v1/completions", probe.encode(), timeout_s=900.0),
            metrics_path=PROMETHEUS_PATH,
            stop_grace_s=20.0,
        )

    def parse_metrics(self, text: str) -> EngineLoad | None:
        return parse_trtllm(text)
