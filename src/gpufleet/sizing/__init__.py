"""Sizing: what a model needs (memory per GPU, valid tensor-parallel sizes) from its architecture.

Pure functions of plain values — no I/O beyond reading the model's own config or GGUF header —
so the planner, the simulator and ``gpufleet estimate`` size models they will never load.
"""

from gpufleet.sizing.architecture import ModelArch
from gpufleet.sizing.memory import (
    ENGINE_OVERHEAD_BYTES,
    MemoryEstimate,
    engine_overhead_bytes,
    estimate_memory,
    fits,
    kv_bytes_per_token,
    max_concurrency,
    valid_tp_degrees,
)
from gpufleet.sizing.performance import PerfModel
from gpufleet.sizing.readers import from_gguf, from_hf_config, load_architecture

__all__ = [
    "ENGINE_OVERHEAD_BYTES",
    "MemoryEstimate",
    "ModelArch",
    "PerfModel",
    "engine_overhead_bytes",
    "estimate_memory",
    "fits",
    "from_gguf",
    "from_hf_config",
    "kv_bytes_per_token",
    "load_architecture",
    "max_concurrency",
    "valid_tp_degrees",
]
