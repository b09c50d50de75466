"""How much GPU memory a model needs: weights + KV cache + engine overhead, per GPU.

The arithmetic (REFERENCE.md, "Sizing"):

- weights split evenly over the tensor-parallel group (a slight undercount: norms are replicated,
  but they are ~0.01 % of a model);
- KV cache per token = 2 (K and V) × layers × kv_heads × head_dim × bytes — Llama-3-8B in bf16:
  2 × 32 × 8 × 128 × 2 = 131,072 bytes (128 KiB), so 8k context × 32 sequences ≈ 32 GiB. Each
  GPU holds ``kv_heads / tp`` heads; when ``tp > kv_heads`` vLLM replicates the KV heads so each
  GPU holds one, and the per-GPU KV stops shrinking;
- engine overhead per GPU (``engine_overhead_bytes``).

Whether it fits is judged against ``utilization × memory``: vLLM claims
``gpu_memory_utilization`` (default 0.9) of the card, and the plan sets it so models can share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpufleet.sizing.architecture import ModelArch

__all__ = [
    "ENGINE_OVERHEAD_BYTES",
    "MemoryEstimate",
    "engine_overhead_bytes",
    "estimate_memory",
    "fits",
    "kv_bytes_per_token",
    "max_concurrency",
    "valid_tp_degrees",
]

MiB = 1 << 20
GiB = 1 << 30

# Per GPU, outside weights and KV cache.
# vllm/sglang: CUDA context (~0.5 GiB), activation peak of the profiling run and captured CUDA
#   graphs; REFERENCE.md puts it at 1–3 GiB per GPU for vLLM, and SGLang's layout is the same
#   (torch + CUDA graphs), so both take the middle, 2 GiB.
# llamacpp: measured (bench/sizing_vs_reality.py, SmolLM2 on CPU, contexts 512–8192): the
#   replica process holds weights + KV + a constant ~128 MiB — ~68 MiB of Python and the server,
#   ~60 MiB of llama.cpp buffers. On a GPU add the CUDA context (~0.3–0.5 GiB), not measured here.
# trtllm/triton: not measured here (no GPU). TensorRT-LLM's default PyTorch backend has vLLM's
#   layout (torch, a profiling run, CUDA graphs) and Triton runs vLLM or TensorRT-LLM inside it,
#   so both take vLLM's figure. TensorRT-LLM sizes its KV cache from the memory left after the
#   weights (``kv_cache_free_gpu_memory_fraction``), not from a share of the card.
# emulator: a CPU process pretending to be an engine; it holds no GPU memory.
ENGINE_OVERHEAD_BYTES: dict[str, int] = {
    "vllm": 2 * GiB,
    "sglang": 2 * GiB,
    "trtllm": 2 * GiB,
    "triton": 2 * GiB,
    "llamacpp": 128 * MiB,
    "emulator": 0,
}


def kv_bytes_per_token(arch: ModelArch, kv_dtype_bytes: float = 2) -> int:
    """KV cache bytes one token occupies across the whole model (all GPUs of a TP group)."""
    return round(2 * arch.layers * arch.kv_heads * arch.head_dim * kv_dtype_bytes)


def _kv_bytes_per_token_per_gpu(arch: ModelArch, tp: int, kv_dtype_bytes: float) -> int:
    heads_per_gpu = max(1, arch.kv_heads // tp)
    return round(2 * arch.layers * heads_per_gpu * arch.head_dim * kv_dtype_bytes)


def valid_tp_degrees(arch: ModelArch, max_degree: int = 8) -> list[int]:
    """Tensor-parallel sizes (powers of two up to ``max_degree``) the architecture allows.

    A degree must divide the attention heads, and either divide the KV heads or be a multiple of
    them (vLLM then replicates KV heads). The vocabulary is not checked: vLLM pads it.
    """
    out = []
    tp = 1
    while tp <= max_degree:
        kv = arch.kv_heads
        if arch.attention_heads % tp == 0 and kv > 0 and (kv % tp == 0 or tp % kv == 0):
            out.append(tp)
        tp *= 2
    return out


def engine_overhead_bytes(engine: str, tp: int = 1) -> int:
    """Memory one GPU of a ``tp``-wide replica spends on ``engine`` itself (see the table above).

    The figure is per GPU and does not yet grow with ``tp``; NCCL buffers for TP are within the
    1–3 GiB range the vLLM figure comes from.
    """
    if tp < 1:
        raise ValueError(f"tp must be at least 1, got {tp}")
    try:
        return ENGINE_OVERHEAD_BYTES[engine]
    except KeyError:
        known = ", ".join(ENGINE_OVERHEAD_BYTES)
        raise ValueError(f"unknown engine {engine!r}; known: {known}") from None


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    tp: int
    context: int
    concurrency: int
    weights_bytes_per_gpu: int
    kv_bytes_per_gpu: int
    overhead_bytes_per_gpu: int
    kv_bytes_per_token: int  # whole model, as ``kv_bytes_per_token`` gives it

    @property
    def total_per_gpu(self) -> int:
        return self.weights_bytes_per_gpu + self.kv_bytes_per_gpu + self.overhead_bytes_per_gpu

    @property
    def total(self) -> int:
        """All GPUs of the replica together."""
        return self.total_per_gpu * self.tp


def _check_tp(arch: ModelArch, tp: int) -> None:
    if tp < 1 or tp not in valid_tp_degrees(arch, max_degree=max(tp, 1)):
        valid = ", ".join(map(str, valid_tp_degrees(arch, max_degree=max(tp, 8))))
        raise ValueError(
            f"tensor parallel size {tp} does not suit {arch.name or 'this model'} "
            f"({arch.attention_heads} attention heads, {arch.kv_heads} KV heads); valid: {valid}"
        )


def estimate_memory(
    arch: ModelArch,
    *,
    context: int,
    concurrency: int = 1,
    tp: int = 1,
    engine: str = "vllm",
    kv_dtype_bytes: float = 2,
) -> MemoryEstimate:
    """Memory per GPU for ``concurrency`` sequences of ``context`` tokens on a ``tp``-wide replica."""
    if context < 1:
        raise ValueError(f"context must be at least 1 token, got {context}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if kv_dtype_bytes <= 0:
        raise ValueError(f"kv_dtype_bytes must be positive, got {kv_dtype_bytes}")
    _check_tp(arch, tp)
    per_token = _kv_bytes_per_token_per_gpu(arch, tp, kv_dtype_bytes)
    return MemoryEstimate(
        tp=tp,
        context=context,
        concurrency=concurrency,
        weights_bytes_per_gpu=math.ceil(arch.weights_bytes / tp),
        kv_bytes_per_gpu=per_token * context * concurrency,
        overhead_bytes_per_gpu=engine_overhead_bytes(engine, tp),
        kv_bytes_per_token=kv_bytes_per_token(arch, kv_dtype_bytes),
    )


def fits(estimate: MemoryEstimate, gpu_memory_bytes: int, utilization: float = 0.9) -> bool:
    """Whether each GPU's share fits in ``utilization`` of a card with ``gpu_memory_bytes``."""
    return estimate.total_per_gpu <= gpu_memory_bytes * utilization


def max_concurrency(
    arch: ModelArch,
    gpu_memory_bytes: int,
    *,
    context: int,
    tp: int = 1,
    engine: str = "vllm",
    utilization: float = 0.9,
    kv_dtype_bytes: float = 2,
) -> int:
    """How many ``context``-token sequences fit beside the weights; 0 if the weights do not fit."""
    base = estimate_memory(
        arch, context=context, tp=tp, engine=engine, kv_dtype_bytes=kv_dtype_bytes
    )
    free = math.floor(gpu_memory_bytes * utilization) - base.weights_bytes_per_gpu
    free -= base.overhead_bytes_per_gpu
    if free <= 0:
        return 0
    return free // (_kv_bytes_per_token_per_gpu(arch, tp, kv_dtype_bytes) * context)
