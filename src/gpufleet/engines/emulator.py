"""The engine emulator as an engine: ``engine: emulator`` in a Model spec runs emulated replicas.

The source names an architecture (a ``config.json``, its folder, or a GGUF), the first entry of
``resources.gpuTypes`` the GPU it pretends to be (H100 if none), ``resources.gpus`` the
tensor-parallel degree. Replicas speak vLLM's metric names, so the vLLM parser reads them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gpufleet.engines.base import LOCAL, Launch, Placement, ReadinessProbe
from gpufleet.engines.metrics import EngineLoad, parse_vllm
from gpufleet.spec import ModelSpec

__all__ = ["EmulatorEngine"]


class EmulatorEngine:
    name = "emulator"
    metrics_path: str | None = "/metrics"

    def unavailable_reason(self) -> str | None:
        return None  # part of gpufleet itself

    def launch(
        self,
        spec: ModelSpec,
        *,
        weights: Path,
        served_name: str,
        host: str,
        port: int,
        placement: Placement = LOCAL,
    ) -> Launch:
        gpu = placement.gpu_type or (
            spec.resources.gpu_types[0] if spec.resources.gpu_types else "H100"
        )
        tp = len(placement.gpu_indices) or max(1, spec.resources.gpus)
        argv = [
            sys.executable, "-m", "gpufleet.emulator",
            "--arch", str(weights),
            "--name", served_name,
            "--gpu", gpu,
            "--tp", str(tp),
            "--host", host,
            "--port", str(port),
        ]  # fmt: skip
        if placement.memory_fraction is not None:
            argv += ["--gpu-memory-utilization", f"{placement.memory_fraction:.3f}"]
        argv += spec.engine_args
        return Launch(
            argv=tuple(argv),
            readiness=ReadinessProbe("GET", "/v1/models", timeout_s=60.0),
            metrics_path="/metrics",
            stop_grace_s=5.0,
        )

    def parse_metrics(self, text: str) -> EngineLoad | None:
        return parse_vllm(text)
