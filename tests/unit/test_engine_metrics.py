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

# As SGLang 0.5.23 writes it with --enable-metrics (names and labels as its metrics collector
# has them): the gauges of two attention-DP groups (one scheduler reports for each), the prompt
# counter per is_streaming, the cached tokens per cache_source.
SGLANG = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 7.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="1"} 2.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 3.0
# TYPE sglang:token_usage gauge
sglang:token_usage{dp_rank="0",engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 0.62
sglang:token_usage{dp_rank="1",engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="1"} 0.57
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{dp_rank="0",engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 0.98
sglang:cache_hit_rate{dp_rank="1",engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="1"} 0.9
sglang:kv_evictable_tokens{dp_rank="0",engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 646.0
sglang:gen_throughput{dp_rank="0",engine_type="unified",model_name="qwen",moe_ep_rank="0",pp_rank="0",tp_rank="0"} 812.5
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{engine_type="unified",is_streaming="false",model_name="qwen"} 1247.0
sglang:prompt_tokens_total{engine_type="unified",is_streaming="true",model_name="qwen"} 153.0
sglang:prompt_tokens_created{engine_type="unified",is_streaming="false",model_name="qwen"} 1.79e+09
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{cache_source="device",engine_type="unified",model_name="qwen"} 609.0
sglang:cached_tokens_total{cache_source="host",engine_type="unified",model_name="qwen"} 128.0
sglang:cached_tokens_created{cache_source="device",engine_type="unified",model_name="qwen"} 1.79e+09
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
    """Counts summed over groups, the KV ratio the fullest pool's (not a sum), prefix hits the
    device's cached tokens over every prompt token (streamed or not); the hit-rate gauge, a
    ratio of the last batch, is not summed into anything."""
    load = parse_sglang(SGLANG)
    assert load == EngineLoad(
        running=9, waiting=3, kv_usage=0.62, prefix_hits=609, prefix_queries=1400
    )
    assert abs(load.prefix_hit_rate - 609 / 1400) < 1e-9


def test_sglang_without_a_breakdown_of_its_cached_tokens() -> None:
    """A request whose cached tokens came with no per-source breakdown is counted under
    ``cache_source="total"``: device hits too. No ``token_usage`` at all (before the first
    batch): KV use unknown, not an empty cache."""
    text = (
        'sglang:cached_tokens_total{cache_source="total",model_name="m"} 40\n'
        'sglang:cached_tokens_total{cache_source="device",model_name="m"} 2\n'
        'sglang:cached_tokens_total{cache_source="storage",model_name="m"} 500\n'
        'sglang:prompt_tokens_total{is_streaming="true",model_name="m"} 90\n'
    )
    assert parse_sglang(text) == EngineLoad(kv_usage=None, prefix_hits=42, prefix_queries=90)
    assert parse_sglang("") == EngineLoad(kv_usage=None)


def test_sglang_with_priority_scheduling_counts_each_request_once() -> None:
    """With --enable-priority-scheduling the running and waiting totals (``priority=""``) come
    with a breakdown per priority, which is not added to them again."""
    text = (
        'sglang:num_queue_reqs{model_name="m",priority="",tp_rank="0"} 5\n'
        'sglang:num_queue_reqs{model_name="m",priority="0",tp_rank="0"} 2\n'
        'sglang:num_queue_reqs{model_name="m",priority="7",tp_rank="0"} 3\n'
        'sglang:num_running_reqs{model_name="m",priority="",tp_rank="0"} 4\n'
        'sglang:num_running_reqs{model_name="m",priority="7",tp_rank="0"} 4\n'
        'sglang:prompt_tokens_total{is_streaming="false",model_name="m",priority=""} 10\n'
        'sglang:prompt_tokens_total{is_streaming="false",model_name="m",priority="7"} 20\n'
    )
    load = parse_sglang(text)
    assert (load.running, load.waiting, load.prefix_queries) == (4, 5, 30)


def test_garbage_and_nan_are_skipped() -> None:
    values = parse_exposition('not a metric line !!\nfoo{a="b c"} 2\nfoo 3\nbar NaN\nbaz x\n')
    assert values == {"foo": 5.0}
    assert parse_vllm("") == EngineLoad()


def test_each_adapter_parses_its_own_engine() -> None:
    assert ADAPTERS["vllm"].parse_metrics(VLLM) == parse_vllm(VLLM)
    assert ADAPTERS["emulator"].parse_metrics(VLLM) == parse_vllm(VLLM)
    assert ADAPTERS["sglang"].parse_metrics(SGLANG) == parse_sglang(SGLANG)
    assert ADAPTERS["llamacpp"].parse_metrics("anything") is None
