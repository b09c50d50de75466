"""SGLang's OpenAI-compatible server (GPU engine; also its CPU path).

Facts this rests on (SGLang 0.5.23): it reads its API key from ``--api-key`` only (no
environment variable), so the key is an argument here; that key guards ``/v1`` while
``/health``, ``/health_generate`` and ``/metrics`` stay open for the probes and the scraper.
``/metrics`` answers 404 unless the server runs with ``--enable-metrics``, and usage carries
``prompt_tokens_details.cached_tokens`` only with ``--enable-cache-report``: both are added unless
the spec's ``engineArgs`` already have them. ``/health_generate`` answers 503 until SGLang's own
warm-up request has finished, then runs a one-token generation: the readiness probe.

SGLang pins torch and much else, so it may live in an environment of its own:
``GPUFLEET_SGLANG_PYTHON`` names that interpreter. Nothing here is specific to a CPU: SGLang's CPU
path (``SGLANG_USE_CPU_ENGINE=1`` in gpufleet's environment, ``--device cpu`` and a KV-cache cap
such as ``--max-total-tokens`` in ``engineArgs``) is the deployment's choice, as in
tests/sglang.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from gpufleet.engines.base import LOCAL, KvEvents, Launch, Placement, ReadinessProbe
from gpufleet.engines.metrics import EngineLoad, parse_sglang
from gpufleet.spec import ModelSpec

__all__ = ["SglangEngine"]

#: Flags every launch carries unless the spec's ``engineArgs`` already do: the scraper's
#: ``/metrics`` and the cached tokens in usage.
_ALWAYS = ("--enable-metrics", "--enable-cache-report")


def engine_python() -> str:
    """The interpreter that runs SGLang: ``GPUFLEET_SGLANG_PYTHON``, else gpufleet's own."""
    return os.environ.get("GPUFLEET_SGLANG_PYTHON") or sys.executable


class SglangEngine:
    name = "sglang"
    metrics_path: str | None = "/metrics"
    api_key_env: str | None = None

    def unavailable_reason(self) -> str | None:
        python = engine_python()
        if python != sys.executable:
            if not os.access(python, os.X_OK):
                return f"GPUFLEET_SGLANG_PYTHON={python} is not an executable Python"
            return None
        if importlib.util.find_spec("sglang") is None:
            return "SGLang is not installed here; install 'sglang[all]' on a GPU machine, or point GPUFLEET_SGLANG_PYTHON at an environment that has it"
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
            engine_python(), "-m", "sglang.launch_server",
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
        argv += [flag for flag in _ALWAYS if flag not in spec.engine_args]
        if api_key is not None:
            argv += ["--api-key", api_key]
        argv += spec.engine_args
        return Launch(
            argv=tuple(argv),
            readiness=ReadinessProbe("GET", "/health_generate", timeout_s=900.0),
            metrics_path="/metrics",
            # gpufleet hands SGLang a local folder: nothing is to be fetched from the Hub.
            env={"HF_HUB_OFFLINE": "1", **placement.device_env()},
            stop_grace_s=20.0,
        )

    def parse_metrics(self, text: str) -> EngineLoad | None:
        return parse_sglang(text)
