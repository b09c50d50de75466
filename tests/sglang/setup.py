"""What every SGLang-tier test needs: the environment scripts/setup-sglang-cpu made, a mark that
skips the tier with the reason when it is missing, and the environment `gpufleet up` runs
SGLang's CPU path under.

The CPU path is this tier's choice, not the adapter's: ``SGLANG_USE_CPU_ENGINE=1`` here, and
``--device cpu`` with a KV-cache cap in the test's ``engineArgs`` (``CPU_ARGS``). A GPU user's
SGLang gets none of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".cache" / "sglang-cpu"
MODEL = ROOT / ".cache" / "smollm2-hf"

NEEDS_SGLANG = [
    pytest.mark.sglang,
    pytest.mark.skipif(
        not (VENV / ".ready").exists() or not (MODEL / "config.json").exists(),
        reason="real SGLang is not set up: run scripts/setup-sglang-cpu (the README's test command does)",
    ),
]

#: SGLang on a CPU: its torch paths (``--device cpu``), the KV cache capped (by default it takes
#: ~15 GB of RAM) and an idle scheduler that sleeps instead of spinning a core.
CPU_ARGS = ("--device", "cpu", "--max-total-tokens", "32768", "--sleep-on-idle")


def fleet_env(work: Path) -> dict[str, str]:
    """`gpufleet up`'s environment for SGLang on this CPU, its caches and temporary files in
    ``work``."""
    return {
        "GPUFLEET_SGLANG_PYTHON": str(VENV / "bin" / "python"),
        "SGLANG_USE_CPU_ENGINE": "1",
        "TMPDIR": str(work),
        "HF_HOME": str(work / "hf"),
    }
