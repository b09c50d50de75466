"""llama.cpp through llama-cpp-python's OpenAI-compatible server (CPU engine).

Replicas run ``gpufleet.engines.llamacpp_main``, which is the stock server plus mean pooling for
embeddings (see that module). Facts this rests on (llama-cpp-python 0.3.x): the server loads the model before it binds its
port, so ``GET /v1/models`` answering is a true readiness signal; it serves one request at a time;
``interrupt_requests`` defaults to true, which would let a new request cut off a stream in flight
behind a gateway, so it is switched off; it has no ``/metrics``, and no ``/health`` but the one
``llamacpp_main`` adds for liveness (the default ``Launch.liveness_path``). Its ``api_key``
guards every other route (a 401 without it); ``llamacpp_main`` reads the key from
``GPUFLEET_ENGINE_KEY`` rather than an argument anyone could read with ``ps``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from gpufleet.engines.base import ENGINE_KEY_ENV, LOCAL, KvEvents, Launch, Placement, ReadinessProbe
from gpufleet.engines.metrics import EngineLoad
from gpufleet.spec import ModelSpec

__all__ = ["LlamaCppEngine"]


class LlamaCppEngine:
    name = "llamacpp"
    metrics_path: str | None = None
    api_key_env: str | None = ENGINE_KEY_ENV

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed; run: pip install 'llama-cpp-python[server]'"
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
        if weights.is_dir():
            ggufs = sorted(weights.glob("*.gguf"))
            if not ggufs:
                raise ValueError(f"llamacpp needs a .gguf file; none in {weights}")
            weights = ggufs[0]
        threads = str(max(1, os.cpu_count() or 1))
        argv = [
            sys.executable, "-m", "gpufleet.engines.llamacpp_main",
            "--model", str(weights),
            "--model_alias", served_name,
            "--host", host,
            "--port", str(port),
            "--n_ctx", str(spec.context_length),
            "--n_threads", threads,
            "--interrupt_requests", "false",
        ]  # fmt: skip
        if spec.embeddings:
            argv += ["--embedding", "true", "--pooling", "mean"]
        argv += spec.engine_args
        env = placement.device_env()
        if api_key is not None:
            env[ENGINE_KEY_ENV] = api_key
        return Launch(
            argv=tuple(argv),
            env=env,
            readiness=ReadinessProbe("GET", "/v1/models", timeout_s=120.0),
            metrics_path=None,
            stop_grace_s=5.0,
        )

    def parse_metrics(self, text: str) -> EngineLoad | None:
        return None  # llama-cpp-python's server has no /metrics
