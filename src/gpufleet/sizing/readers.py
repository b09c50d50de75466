"""Read a ``ModelArch`` from what a model ships with: a Hugging Face ``config.json`` or a GGUF file.

Parameters are counted from the architecture rather than taken from a model card, so a config
nobody has sized before still gets a number. The count for a Llama-style decoder is

- embeddings ``vocab × hidden``, twice unless ``tie_word_embeddings`` (the LM head);
- per layer, attention ``q: hidden × heads × head_dim``, ``k, v: hidden × kv_heads × head_dim``,
  ``o: heads × head_dim × hidden`` (+ q/k/v biases for qwen2, all four with ``attention_bias``);
- per layer, a gated MLP ``3 × hidden × intermediate`` per expert, plus a router
  ``hidden × experts`` for MoE (Mixtral layout: every layer is MoE, no shared expert);
- RMSNorm weights, ``2 × hidden`` per layer and ``hidden`` at the end.

This gives Llama-3-8B 8,030,261,248 parameters (16.06 GB in bf16), Meta's published 8.03B.

Weights are ``parameters × bytes`` for the config's dtype. With a ``quantization_config`` only
the linear layers of the blocks are quantised (embeddings, LM head and norms stay in the base
dtype, as AutoAWQ, AutoGPTQ and llm-compressor's FP8 leave them): fp8 is 1 byte; awq/gptq at
``bits`` with ``group_size`` carry one fp16 scale and one ``bits``-wide zero point per group.

A GGUF file states its size exactly: parameters and bytes are sums over its tensor table (see
``gguf_header``), so the block-wise quantisation of each tensor is counted as stored.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpufleet.errors import SourceError
from gpufleet.sizing.architecture import ModelArch
from gpufleet.sizing.gguf_header import GGUFArray, GGUFHeader, MetaValue, read_gguf_header

__all__ = ["from_gguf", "from_hf_config", "load_architecture"]

_DTYPE_BYTES: dict[str, float] = {"bfloat16": 2, "float16": 2, "float32": 4}
_FP16_BITS = 16


def _int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise SourceError(f"config.json has no {key!r}; it is needed to size the model")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SourceError(f"config.json {key!r} must be a non-negative integer, got {value!r}")
    return value


def _linear_bytes_per_weight(quant: Mapping[str, Any]) -> tuple[float, str]:
    """Bytes per quantised linear weight and the dtype label, from a ``quantization_config``."""
    method = str(quant.get("quant_method", "")).lower()
    if method == "fp8":
        return 1.0, "fp8"
    if method in ("awq", "gptq"):
        bits = int(quant.get("bits", quant.get("w_bit", 4)))
        group = int(quant.get("group_size", quant.get("q_group_size", 128)))
        extra = (_FP16_BITS + bits) / group if group > 0 else 0.0
        return (bits + extra) / 8, f"{method}-int{bits}"
    raise SourceError(
        f"quantization method {method or '(none)'!r} is not supported for sizing; "
        "supported: fp8, awq, gptq"
    )


def from_hf_config(config: Mapping[str, Any], name: str = "") -> ModelArch:
    """The architecture a Hugging Face ``config.json`` describes (already parsed to a mapping)."""
    text = config.get("text_config")
    if "hidden_size" not in config and isinstance(text, Mapping):  # multimodal: the LM's part
        config = {"torch_dtype": config.get("torch_dtype") or config.get("dtype"), **text}
    family = str(config.get("model_type") or "unknown")
    hidden = _int(config, "hidden_size")
    layers = _int(config, "num_hidden_layers")
    heads = _int(config, "num_attention_heads")
    if heads == 0:
        raise SourceError("config.json 'num_attention_heads' must be at least 1")
    kv_heads = _int(config, "num_key_value_heads", heads)
    head_dim = _int(config, "head_dim", hidden // heads)
    vocab = _int(config, "vocab_size")
    inter = _int(config, "intermediate_size")
    max_context = _int(config, "max_position_embeddings", 2048)
    experts = _int(config, "num_local_experts", 1) or 1
    top_k = min(_int(config, "num_experts_per_tok", 1) or 1, experts)

    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    biases = 0
    if family == "qwen2":
        biases = heads * head_dim + 2 * kv_heads * head_dim
    if config.get("attention_bias"):
        biases = heads * head_dim + 2 * kv_heads * head_dim + hidden
    expert_mlp = 3 * hidden * inter
    router = hidden * experts if experts > 1 else 0
    linear = layers * (attention + experts * expert_mlp + router)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    other = embeddings + layers * (biases + 2 * hidden) + hidden
    parameters = linear + other
    active = parameters - layers * (experts - top_k) * expert_mlp

    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    if dtype not in _DTYPE_BYTES:
        raise SourceError(
            f"dtype {dtype!r} is not known; expected one of {', '.join(_DTYPE_BYTES)}"
        )
    base_bytes = _DTYPE_BYTES[dtype]
    linear_bytes = base_bytes
    quant = config.get("quantization_config")
    if isinstance(quant, Mapping):
        linear_bytes, dtype = _linear_bytes_per_weight(quant)
    weights_bytes = round(linear * linear_bytes + other * base_bytes)
    return ModelArch(
        name=name,
        family=family,
        parameters=parameters,
        active_parameters=active,
        layers=layers,
        hidden_size=hidden,
        attention_heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        intermediate_size=inter,
        max_context=max_context,
        dtype=dtype,
        bits_per_weight=8 * weights_bytes / parameters if parameters else 0.0,
        weights_bytes=weights_bytes,
        experts=experts,
        experts_per_token=top_k,
    )


def _meta_int(meta: Mapping[str, MetaValue], key: str, default: int | None = None) -> int:
    """An integer GGUF key; a per-layer array gives its largest value (the worst case for KV)."""
    value = meta.get(key)
    if isinstance(value, GGUFArray) and value.values:
        value = max(int(v) for v in value.values)
    if isinstance(value, bool) or not isinstance(value, int):
        if default is None:
            raise SourceError(
                f"GGUF metadata has no integer {key!r}; it is needed to size the model"
            )
        return default
    return value


def from_gguf(path: str | Path) -> ModelArch:
    """The architecture of a GGUF file, from its metadata and tensor table only (milliseconds)."""
    path = Path(path)
    return _arch_from_header(read_gguf_header(path), path.name.removesuffix(".gguf"))


def _arch_from_header(header: GGUFHeader, name: str) -> ModelArch:
    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise SourceError(f"GGUF file {name!r} has no 'general.architecture'")
    hidden = _meta_int(meta, f"{arch}.embedding_length")
    heads = _meta_int(meta, f"{arch}.attention.head_count")
    if heads == 0:
        raise SourceError(f"GGUF file {name!r}: '{arch}.attention.head_count' is 0")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = (
        tokens.length if isinstance(tokens, GGUFArray) else _meta_int(meta, f"{arch}.vocab_size")
    )
    experts = _meta_int(meta, f"{arch}.expert_count", 1) or 1
    top_k = min(_meta_int(meta, f"{arch}.expert_used_count", 1) or 1, experts)
    inter = _meta_int(meta, f"{arch}.feed_forward_length", 0)
    if experts > 1:
        inter = _meta_int(meta, f"{arch}.expert_feed_forward_length", inter)

    parameters = sum(t.n_elements for t in header.tensors)
    weights_bytes = sum(t.n_bytes for t in header.tensors)
    expert_elements = sum(t.n_elements for t in header.tensors if "_exps." in t.name)
    active = parameters - expert_elements * (experts - top_k) // experts
    by_type: Counter[str] = Counter()
    for t in header.tensors:
        by_type[t.type_name] += t.n_bytes
    dtype = by_type.most_common(1)[0][0] if by_type else "unknown"
    return ModelArch(
        name=name,
        family=arch,
        parameters=parameters,
        active_parameters=active,
        layers=_meta_int(meta, f"{arch}.block_count"),
        hidden_size=hidden,
        attention_heads=heads,
        kv_heads=_meta_int(meta, f"{arch}.attention.head_count_kv", heads),
        head_dim=_meta_int(meta, f"{arch}.attention.key_length", hidden // heads),
        vocab_size=vocab,
        intermediate_size=inter,
        max_context=_meta_int(meta, f"{arch}.context_length", 2048),
        dtype=dtype,
        bits_per_weight=8 * weights_bytes / parameters if parameters else 0.0,
        weights_bytes=weights_bytes,
        experts=experts,
        experts_per_token=top_k,
    )


def _read_config(path: Path, name: str) -> ModelArch:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: cannot read a Hugging Face config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise SourceError(f"{path}: expected a JSON object, found {type(config).__name__}")
    try:
        return from_hf_config(config, name)
    except SourceError as exc:
        raise SourceError(f"{path}: {exc}") from exc


def load_architecture(path: str | Path) -> ModelArch:
    """A ``.gguf`` file, a ``*.json`` config, or a directory holding ``config.json`` or one GGUF."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _read_config(path / "config.json", path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return from_gguf(ggufs[0])
        found = f"{len(ggufs)} .gguf files" if ggufs else "neither"
        raise SourceError(
            f"{path}: expected a directory with config.json or exactly one .gguf file; found {found}"
        )
    if not path.exists():
        raise SourceError(f"{path}: no such file or directory")
    if path.suffix == ".gguf":
        return from_gguf(path)
    if path.suffix == ".json":
        name = path.parent.name if path.name == "config.json" else path.stem
        return _read_config(path, name)
    raise SourceError(
        f"{path}: expected a .gguf file, a config.json, or a directory holding one; "
        f"found a {path.suffix or 'suffix-less'} file"
    )
