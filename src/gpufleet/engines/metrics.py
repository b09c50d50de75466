"""Engine ``/metrics`` text to one common ``EngineLoad``.

Each engine names the same signals differently (REFERENCE.md): vLLM ``vllm:num_requests_running``
/ ``vllm:num_requests_waiting`` / ``vllm:kv_cache_usage_perc`` (older: ``gpu_cache_usage_perc``) /
``vllm:prefix_cache_{hits,queries}_total``; SGLang ``sglang:num_running_reqs`` /
``sglang:num_queue_reqs`` / ``sglang:token_usage`` / ``sglang:cached_tokens_total`` /
``sglang:prompt_tokens_total`` (``parse_sglang``); TensorRT-LLM's ``trtllm-serve`` and NVIDIA
Triton their own (``parse_trtllm``, ``parse_triton``: the sources are named there). Routers
scrape every few hundred milliseconds, so the parser is a single pass over the lines with no
dependency: only the families we read are kept, summed over their label sets (several models
or ranks per engine) — or, where one family carries several signals in a label (Triton's),
summed per value of that label.

A signal an engine does not publish stays unset: ``running``/``waiting`` at 0 (the gateway's
own in-flight count leads routing anyway), ``kv_usage`` at None — an engine without the number
must not read as an empty cache to the autoscaler.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

__all__ = [
    "EngineLoad",
    "parse_by_label",
    "parse_exposition",
    "parse_sglang",
    "parse_triton",
    "parse_trtllm",
    "parse_vllm",
]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class EngineLoad:
    running: float = 0.0
    waiting: float = 0.0
    #: 0..1; None: the engine publishes no KV-cache use.
    kv_usage: float | None = 0.0
    prefix_hits: float = 0.0  # tokens served from cache, cumulative
    prefix_queries: float = 0.0  # prompt tokens looked up, cumulative

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


def _samples(text: str, names: Collection[str] | None) -> Iterator[tuple[str, str, float]]:
    """Each sample of ``names`` (all: None) as (name, label text, value); NaN left out."""
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name = m.group(1)
        if names is not None and name not in names:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        if not math.isnan(value):
            yield name, m.group(2) or "", value


def parse_exposition(text: str, names: frozenset[str] | None = None) -> dict[str, float]:
    """Sum each sample name's values over its label sets (Prometheus text format)."""
    out: dict[str, float] = {}
    for name, _, value in _samples(text, names):
        out[name] = out.get(name, 0.0) + value
    return out


def parse_by_label(text: str, labels: Mapping[str, str]) -> dict[tuple[str, str], float]:
    """Sum the samples of each family in ``labels`` per value of the label named there:
    ``{("nv_trt_llm_request_metrics", "waiting"): 3.0, ...}`` for ``request_type``."""
    out: dict[tuple[str, str], float] = {}
    for name, text_labels, value in _samples(text, labels):
        wanted = labels[name]
        for key, label_value in _LABEL.findall(text_labels):
            if key == wanted:
                out[name, label_value] = out.get((name, label_value), 0.0) + value
                break
    return out


_VLLM = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_queries_total",
    }
)


def parse_vllm(text: str) -> EngineLoad:
    v = parse_exposition(text, _VLLM)
    kv = v.get("vllm:kv_cache_usage_perc", v.get("vllm:gpu_cache_usage_perc", 0.0))
    return EngineLoad(
        running=v.get("vllm:num_requests_running", 0.0),
        waiting=v.get("vllm:num_requests_waiting", 0.0),
        kv_usage=min(1.0, kv),
        prefix_hits=v.get(
            "vllm:prefix_cache_hits_total", v.get("vllm:gpu_prefix_cache_hits_total", 0.0)
        ),
        prefix_queries=v.get(
            "vllm:prefix_cache_queries_total", v.get("vllm:gpu_prefix_cache_queries_total", 0.0)
        ),
    )


# SGLang (0.5.23, python/sglang/srt/observability/metrics_collector.py; only with
# ``--enable-metrics``, which the adapter passes). Each scheduler that reports (one per
# attention-DP group by default) labels its gauges with engine_type, model_name, tp_rank, pp_rank,
# moe_ep_rank (dp_rank under attention DP): ``sglang:num_running_reqs`` and
# ``sglang:num_queue_reqs`` are counts, summed over those — but with priority scheduling each
# total (``priority=""``) is also published per priority (``priority="3"``), which is left out;
# ``sglang:token_usage`` is a ratio (the fullest KV pool's tokens in use, rounded to 0.01; cached
# but evictable prefix tokens are not in it, they are ``sglang:kv_evictable_tokens``), so the
# largest is taken, not the sum. The gauges are refreshed at each prefill batch and every
# ``--decode-log-interval`` decode steps (40 by default). The prefix cache: the tokenizer's
# counters ``sglang:prompt_tokens_total`` (every prompt token, cached or not; one series per
# ``is_streaming``) and ``sglang:cached_tokens_total`` by ``cache_source``: "device" is the
# GPU's radix cache, "host" and "storage" HiCache's lower tiers (not counted as hits here, as
# vLLM's counters count only its GPU cache), "total" a count without that breakdown.
# ``sglang:cache_hit_rate`` is the last prefill batch's ratio, not a cumulative one: not read.
_SGLANG_COUNTS = frozenset({"sglang:num_running_reqs", "sglang:num_queue_reqs"})
_SGLANG_PROMPT = frozenset({"sglang:prompt_tokens_total"})
_SGLANG_KV = frozenset({"sglang:token_usage"})
_SGLANG_CACHED = "sglang:cached_tokens_total"
#: ``cache_source`` values of the tokens served from the device's own prefix cache.
_SGLANG_DEVICE_HITS = ("device", "total")


def parse_sglang(text: str) -> EngineLoad:
    counts: dict[str, float] = {}
    for name, labels, value in _samples(text, _SGLANG_COUNTS):
        if dict(_LABEL.findall(labels)).get("priority", ""):
            continue  # one priority's share of a total that is published too
        counts[name] = counts.get(name, 0.0) + value
    kv = max((value for _, _, value in _samples(text, _SGLANG_KV)), default=None)
    by_source = parse_by_label(text, {_SGLANG_CACHED: "cache_source"})
    return EngineLoad(
        running=counts.get("sglang:num_running_reqs", 0.0),
        waiting=counts.get("sglang:num_queue_reqs", 0.0),
        kv_usage=None if kv is None else min(1.0, kv),
        prefix_hits=sum(by_source.get((_SGLANG_CACHED, s), 0.0) for s in _SGLANG_DEVICE_HITS),
        prefix_queries=parse_exposition(text, _SGLANG_PROMPT).get(
            "sglang:prompt_tokens_total", 0.0
        ),
    )


# trtllm-serve, ``GET /prometheus/metrics`` (mounted only when the server runs with
# ``return_perf_metrics: true``; the iteration gauges also need ``enable_iter_perf_stats: true``):
# names from TensorRT-LLM's tensorrt_llm/metrics/collector.py (``MetricsCollector``, 1.3.0
# pre-releases, PR #12545 of 2026-03): ``trtllm_num_requests_running`` (the iteration's
# ``numActiveRequests``), ``trtllm_num_requests_waiting`` (``numQueuedRequests``),
# ``trtllm_kv_cache_utilization`` (``usedNumBlocks / maxNumBlocks``, 0..1),
# ``trtllm_prompt_cached_tokens_total`` and ``trtllm_prompt_tokens_total`` (prompt tokens
# served from the KV cache, and all prompt tokens). Releases before that (1.2 and older) expose
# only request histograms there: the load then stays unset. Its ``/metrics`` is JSON iteration
# statistics, a queue drained by each read — not for a scraper.
_TRTLLM = frozenset(
    {
        "trtllm_num_requests_running",
        "trtllm_num_requests_waiting",
        "trtllm_kv_cache_utilization",
        "trtllm_prompt_cached_tokens_total",
        "trtllm_prompt_tokens_total",
    }
)


def parse_trtllm(text: str) -> EngineLoad:
    v = parse_exposition(text, _TRTLLM)
    kv = v.get("trtllm_kv_cache_utilization")
    return EngineLoad(
        running=v.get("trtllm_num_requests_running", 0.0),
        waiting=v.get("trtllm_num_requests_waiting", 0.0),
        kv_usage=None if kv is None else min(1.0, kv),
        prefix_hits=v.get("trtllm_prompt_cached_tokens_total", 0.0),
        prefix_queries=v.get("trtllm_prompt_tokens_total", 0.0),
    )


# Triton's metrics, which its OpenAI-compatible front end serves at ``GET /metrics`` on its own
# port (server python/openai/openai_frontend/frontend/fastapi/routers/observability.py, r26.07;
# the same text as tritonserver's port 8002). The TensorRT-LLM backend's batch-manager gauges
# (tensorrtllm_backend README, "Triton Metrics"; TensorRT-LLM
# triton_backend/inflight_batcher_llm/src/custom_metrics_reporter.cc):
# ``nv_trt_llm_request_metrics{request_type="active"|"waiting"|"scheduled"|"context"|"max"}``
# and ``nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used"|"max"|"free"|"fraction"|
# "tokens_per"}``; "active" is the executor's ``numActiveRequests`` (what trtllm-serve calls
# running), "waiting" its ``numQueuedRequests``, "scheduled" only this iteration's batch. They
# come from that C++ backend, which TensorRT-LLM removed from its sources in 2026-07 (#15907);
# the LLM-API Python backend left (all_models/llmapi) reports no such gauge in the code read.
# Triton's own ``nv_inference_pending_request_count`` (docs/user_guide/metrics.md: requests
# awaiting execution by a backend) is the queue where the backend reports none. Triton's vLLM
# backend publishes only ``vllm:`` counters and histograms (vllm_backend src/utils/metrics.py,
# r25.12: tokens, TTFT, TPOT, latency): no running count and no KV-cache use, which stay unset.
_TRITON_BY_LABEL = {
    "nv_trt_llm_request_metrics": "request_type",
    "nv_trt_llm_kv_cache_block_metrics": "kv_cache_block_type",
}
_TRITON = frozenset({"nv_inference_pending_request_count"})


def parse_triton(text: str) -> EngineLoad:
    by = parse_by_label(text, _TRITON_BY_LABEL)
    requests, blocks = "nv_trt_llm_request_metrics", "nv_trt_llm_kv_cache_block_metrics"
    waiting = by.get((requests, "waiting"))
    if waiting is None:
        waiting = parse_exposition(text, _TRITON).get("nv_inference_pending_request_count", 0.0)
    used, most = by.get((blocks, "used")), by.get((blocks, "max"))
    kv: float | None = None
    if used is not None and most:
        kv = min(1.0, used / most)
    elif (blocks, "fraction") in by:  # no block counts: the reported fraction
        kv = min(1.0, by[blocks, "fraction"])
    return EngineLoad(running=by.get((requests, "active"), 0.0), waiting=waiting, kv_usage=kv)
