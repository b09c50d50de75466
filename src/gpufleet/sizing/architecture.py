"""A model's architecture: the few numbers that decide its memory and speed.

Read from a Hugging Face ``config.json`` or a GGUF file's metadata (see ``readers``); every
other sizing function takes this value and nothing else, so the planner and simulator can size
models they will never load.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelArch"]


@dataclass(frozen=True, slots=True)
class ModelArch:
    name: str
    family: str  # "llama", "qwen2", "mistral", "mixtral", ...
    parameters: int  # all weights
    active_parameters: int  # weights read per token (MoE: shared + top-k experts)
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    max_context: int
    dtype: str  # "bfloat16", "float16", "float32", or a GGUF quantisation such as "Q4_1"
    bits_per_weight: float  # 16 for bf16; GGUF: from the tensors' actual sizes
    weights_bytes: int  # parameters × bytes (HF), or the sum of tensor sizes (GGUF)
    experts: int = 1
    experts_per_token: int = 1

    @property
    def is_moe(self) -> bool:
        return self.experts > 1
