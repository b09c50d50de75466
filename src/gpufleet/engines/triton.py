"""NVIDIA Triton Inference Server behind its OpenAI-compatible front end (GPU engine).

Facts this rests on (triton-inference-server/server python/openai, r26.07 = Triton 2.71.0):
the front end is a Python program, ``/opt/tritonserver/python/openai/openai_frontend/main.py``
in NGC's ``tritonserver`` images, that starts Triton in-process on ``--model-repository``,
waits for its models, and serves ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/metrics`` (Triton's Prometheus text, as on tritonserver's port 8002) and ``/health/ready``
on ``--host``/``--openai-port``; it has no ``/health``. Each model of the repository is served
under its directory's name and other names are refused, so the repository's model (for
TensorRT-LLM, its LLM API model) must carry the Model's name. ``--backend vllm|tensorrtllm``
fixes the request format; ``--tokenizer`` (a Hugging Face ID or folder) is needed for chat
completions only, and goes in ``engineArgs``. ``--openai-restricted-api APIS HEADER VALUE``
(since 2025-09, server#8374) makes the listed APIs answer 401 without the header: gpufleet
restricts ``inference`` and ``model-repository`` to its ``Authorization: Bearer`` key and
leaves ``metrics`` and ``health`` open for the scraper and the probes. The key is an argument
(the front end reads no variable for it); on Kubernetes it names ``$(GPUFLEET_ENGINE_KEY)``.

What TP degree, memory share and batch size the model runs with is the repository's
(``model.json`` for vLLM; ``model.yaml``/``config.pbtxt`` for TensorRT-LLM): the front end has
no flags for them, and gpufleet does not rewrite a repository. It gives the engine its
placement's GPUs (``CUDA_VISIBLE_DEVICES`` here, ``nvidia.com/gpu`` on Kubernetes) and says so
in ``gpufleet plan``. TensorRT-LLM on several GPUs runs in orchestrator mode
(``TRTLLM_ORCHESTRATOR=1``, as the front end's README starts it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from gpufleet.engines.base import LOCAL, KvEvents, Launch, Placement, ReadinessProbe
from gpufleet.engines.metrics import EngineLoad, parse_triton
from gpufleet.spec import ModelSpec

__all__ = [
    "FRONTEND",
    "FRONTEND_ENV",
    "READY_PATH",
    "TritonEngine",
    "backend_env",
    "backend_of",
    "plan_note",
]

#: Where NGC's tritonserver images keep the front end; ``GPUFLEET_TRITON_FRONTEND`` elsewhere.
FRONTEND = "/opt/tritonserver/python/openai/openai_frontend/main.py"
FRONTEND_ENV = "GPUFLEET_TRITON_FRONTEND"
READY_PATH = "/health/ready"


def frontend() -> str:
    return os.environ.get(FRONTEND_ENV) or FRONTEND


def backend_of(spec: ModelSpec) -> str:
    """``vllm`` or ``tensorrtllm`` (``spec.triton.backend``; absent: vllm)."""
    return spec.triton.backend if spec.triton is not None else "vllm"


def backend_env(spec: ModelSpec) -> dict[str, str]:
    """The environment the backend needs beside the front end's arguments (a pod's too)."""
    return {"TRTLLM_ORCHESTRATOR": "1"} if backend_of(spec) == "tensorrtllm" else {}


def plan_note(spec: ModelSpec) -> str:
    """What ``gpufleet plan`` says of a Triton model: the plan gives it GPUs, nothing more."""
    return (
        f"triton ({backend_of(spec)}) takes its TP degree, memory share and batch size from its "
        f"model repository, not from the plan: make them fit {spec.resources.gpus or 'its'} "
        "GPU(s) and the share shown"
    )


class TritonEngine:
    name = "triton"
    metrics_path: str | None = "/metrics"
    #: The key is an argument only (``--openai-restricted-api``), which ``launch`` adds.
    api_key_env: str | None = None

    def unavailable_reason(self) -> str | None:
        if not Path(frontend()).is_file():
            return (
                f"Triton's OpenAI front end is not here ({frontend()}): Triton runs on NVIDIA "
                "GPUs; run gpufleet in an NGC tritonserver image (26.07-vllm-python-py3 or "
                f"26.07-trtllm-python-py3), or point {FRONTEND_ENV} at openai_frontend/main.py"
            )
        if importlib.util.find_spec("tritonserver") is None:
            return (
                "Triton's Python bindings ('tritonserver') are not installed here: "
                "pip install /opt/tritonserver/python/tritonserver-*.whl in the Triton image"
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
            sys.executable, frontend(),
            "--model-repository", str(weights),
            "--backend", backend,
            "--host", host,
            "--openai-port", str(port),
        ]  # fmt: skip
        if api_key is not None:
            argv += [
                "--openai-restricted-api",
                "inference,model-repository",
                "Authorization",
                f"Bearer {api_key}",
            ]
        argv += spec.engine_args
        env = {"HF_HUB_OFFLINE": "1", **backend_env(spec), **placement.device_env()}
        probe = json.dumps({"model": served_name, "prompt": "Are you ready?", "max_tokens": 1})
        return Launch(
            argv=tuple(argv),
            env=env,
            # A real completion: it also proves the repository serves the model by its name.
            readiness=ReadinessProbe("POST", "/v1/completions", probe.encode(), timeout_s=900.0),
            metrics_path="/metrics",
            liveness_path=READY_PATH,
            stop_grace_s=20.0,
        )

    def parse_metrics(self, text: str) -> EngineLoad | None:
        return parse_triton(text)
