"""Engine /metrics text to EngineLoad, on exposition text in each engine's own names."""

from __future__ import annotations

from gpufleet.engines import ADAPTERS, EngineLoad, parse_exposition, parse_sglang, parse_vllm

# As vLLM v1 writes it (names from its docs; two label sets to check summing).
VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="smol"} 2.0
vllm:num_requests_running{engine="1",model_name="smol"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="smol"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="smol"} 0.375
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="smol"} 1400.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="smol"} 640.0
vllm:prefix_cache_hits_created{engine="0",model_name="smol"} 1.79e+09
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="smol"} 3.0
vllm:time_to_first_token_seconds_sum{model_name="smol"} NaN
"""

# Older vLLM (v0) named KV use differently.
VLLM_V0 = (
    'vllm:gpu_cache_usage_perc{model_name="x"} 0.5\nvllm:num_requests_running{model_name="x"} 1\n'
)

# SGLang's documented names.
SGLANG = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen",tp_rank="0"} 7.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen",tp_rank="0"} 3.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="qwen",tp_rank="0"} 0.62
sglang:gen_throughput{model_name="qwen",tp_rank="0"} 812.5
"""


def test_vllm() -> None:
    load = parse_vllm(VLLM)
    assert load == EngineLoad(
        running=3, waiting=4, kv_usage=0.375, prefix_hits=640, prefix_queries=1400
    )
    assert abs(load.prefix_hit_rate - 640 / 1400) < 1e-9


def test_vllm_v0_names() -> None:
    load = parse_vllm(VLLM_V0)
    assert (load.running, load.kv_usage) == (1, 0.5)


def test_sglang() -> None:
    assert parse_sglang(SGLANG) == EngineLoad(running=7, waiting=3, kv_usage=0.62)


def test_garbage_and_nan_are_skipped() -> None:
    values = parse_exposition('not a metric line !!\nfoo{a="b c"} 2\nfoo 3\nbar NaN\nbaz x\n')
    assert values == {"foo": 5.0}
    assert parse_vllm("") == EngineLoad()


def test_each_adapter_parses_its_own_engine() -> None:
    assert ADAPTERS["vllm"].parse_metrics(VLLM) == parse_vllm(VLLM)
    assert ADAPTERS["emulator"].parse_metrics(VLLM) == parse_vllm(VLLM)
    assert ADAPTERS["sglang"].parse_metrics(SGLANG) == parse_sglang(SGLANG)
    assert ADAPTERS["llamacpp"].parse_metrics("anything") is None
