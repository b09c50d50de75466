"""SGLang's OpenAI-compatible server (GPU engine)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from gpufleet.engines.base import Launch, ReadinessProbe
from gpufleet.spec import ModelSpec

__all__ = ["SglangEngine"]


class SglangEngine:
    name = "sglang"

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("sglang") is None:
            return "SGLang is not installed here; install 'sglang[all]' on a GPU machine"
        return None

    def launch(
        self, spec: ModelSpec, *, weights: Path, served_name: str, host: str, port: int
    ) -> Launch:
        argv = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", str(weights),
            "--served-model-name", served_name,
            "--host", host,
            "--port", str(port),
            "--context-length", str(spec.context_length),
        ]  # fmt: skip
        if spec.resources.gpus > 1:
            argv += ["--tp-size", str(spec.resources.gpus)]
        argv += spec.engine_args
        return Launch(
            argv=tuple(argv),
            readiness=ReadinessProbe("GET", "/health_generate", timeout_s=900.0),
            metrics_path="/metrics",
            stop_grace_s=20.0,
        )
