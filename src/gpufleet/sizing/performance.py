"""A roofline performance model for one (model, accelerator, tensor-parallel degree) triple.

Decode is memory-bound: each step reads every active weight once plus the KV cache of every
running sequence, so ``step ≥ bytes / (bandwidth × MBU)``; at large batches the matmuls become
compute-bound (``2 × active params × batch`` FLOPs per step). Prefill is compute-bound:
``2 × active params`` FLOPs per prompt token at a model FLOPs utilisation (MFU) of 40–60 %
(REFERENCE.md). Tensor parallelism divides both by the degree; a fixed per-step overhead stands
for kernel launches and scheduling, which dominate tiny models.

The defaults (MFU 0.5, MBU 0.8, 4 ms/step, 10 ms/request) are textbook figures, meant to be
calibrated against a real engine; the simulator, the planner and the emulator all call this one
model so that a calibration improves all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpufleet.hardware import Accelerator
from gpufleet.sizing.architecture import ModelArch

__all__ = ["PerfModel"]


@dataclass(frozen=True, slots=True)
class PerfModel:
    arch: ModelArch
    gpu: Accelerator
    tp: int = 1
    mfu: float = 0.5
    mbu: float = 0.8
    step_overhead_s: float = 0.004
    request_overhead_s: float = 0.010
    kv_dtype_bytes: float = 2.0

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be ≥ 1 (got {self.tp})")
        if not 0 < self.mfu <= 1 or not 0 < self.mbu <= 1:
            raise ValueError("mfu and mbu must be in (0, 1]")

    @property
    def kv_bytes_per_token(self) -> float:
        a = self.arch
        return 2 * a.layers * a.kv_heads * a.head_dim * self.kv_dtype_bytes

    @property
    def active_weight_bytes(self) -> float:
        a = self.arch
        return a.weights_bytes * (a.active_parameters / a.parameters) if a.parameters else 0.0

    def prefill_tokens_per_s(self) -> float:
        return self.mfu * self.gpu.bf16_flops * self.tp / (2 * self.arch.active_parameters)

    def prefill_s(self, tokens: int) -> float:
        """Compute time of a prefill of ``tokens`` uncached prompt tokens."""
        return max(0, tokens) / self.prefill_tokens_per_s()

    def decode_step_s(self, batch: int, context: int) -> float:
        """One decode step for ``batch`` sequences of ``context`` tokens each."""
        batch = max(1, batch)
        read = self.active_weight_bytes + batch * context * self.kv_bytes_per_token
        memory_s = read / (self.gpu.bandwidth_bytes_per_s * self.mbu * self.tp)
        compute_s = (
            2 * self.arch.active_parameters * batch / (self.gpu.bf16_flops * self.mfu * self.tp)
        )
        return max(memory_s, compute_s) + self.step_overhead_s

    def ttft_s(self, prompt_tokens: int, cached_tokens: int = 0) -> float:
        """Time to first token of a request alone on the replica."""
        return self.request_overhead_s + self.prefill_s(prompt_tokens - cached_tokens)

    def kv_capacity_tokens(self, memory_per_gpu: int, overhead_per_gpu: int = 0) -> int:
        """Tokens of KV cache that fit once weights and overhead are placed."""
        free = memory_per_gpu * self.tp - self.arch.weights_bytes - overhead_per_gpu * self.tp
        return max(0, math.floor(free / self.kv_bytes_per_token))

    def max_batch(self, context: int, memory_per_gpu: int, overhead_per_gpu: int = 0) -> int:
        """Sequences of ``context`` tokens that fit in KV memory at once."""
        return self.kv_capacity_tokens(memory_per_gpu, overhead_per_gpu) // max(1, context)

    def decode_tokens_per_s(self, batch: int, context: int) -> float:
        """Aggregate generated tokens/s with ``batch`` sequences running."""
        return max(1, batch) / self.decode_step_s(batch, context)
