"""SGLang's OpenAI-compatible server (GPU engine).

SGLang reads its API key from ``--api-key`` only (no environment variable), so the key is an
argument here; its middleware leaves ``/health*`` and ``/metrics`` open.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from gpufleet.engines.base import LOCAL, KvEvents, Launch, Placement, ReadinessProbe
from gpufleet.engines.metrics import EngineLoad, parse_sglang
from gpufleet.spec import ModelSpec

__all__ = ["SglangEngine"]


class SglangEngine:
    name = "sglang"
    metrics_path: str | None = "/metrics"
    api_key_env: str | None = None

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("sglang") is None:
            return "SGLang is not installed here; install 'sglang[all]' on a GPU machine"
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
        argv = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", str(weights),
            "--served-model-name", served_name,
            "--host", host,
            "--port", str(port),
            "--context-length", str(spec.context_length),
        ]  # fmt: skip
        tp = len(placement.gpu_indices) or spec.resources.gpus
        if tp > 1:
            argv += ["--tp-size", str(tp)]
        if placement.memory_fraction is not None:
            argv += ["--mem-fraction-static", f"{placement.memory_fraction:.3f}"]
        if api_key is not None:
            argv += ["--api-key", api_key]
        argv += spec.engine_args
        return Launch(
            argv=tuple(argv),
            readiness=ReadinessProbe("GET", "/health_generate", timeout_s=900.0),
            metrics_path="/metrics",
            env=placement.device_env(),
            stop_grace_s=20.0,
        )

    def parse_metrics(self, text: str) -> EngineLoad | None:
        return parse_sglang(text)
