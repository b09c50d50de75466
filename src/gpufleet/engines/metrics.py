"""Engine ``/metrics`` text to one common ``EngineLoad``.

Each engine names the same signals differently (REFERENCE.md): vLLM ``vllm:num_requests_running``
/ ``vllm:num_requests_waiting`` / ``vllm:kv_cache_usage_perc`` (older: ``gpu_cache_usage_perc``) /
``vllm:prefix_cache_{hits,queries}_total``; SGLang ``sglang:num_running_reqs`` /
``sglang:num_queue_reqs`` / ``sglang:token_usage``. Routers scrape every few hundred
milliseconds, so the parser is a single pass over the lines with no dependency: only the
families we read are kept, summed over their label sets (several models or ranks per engine).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["EngineLoad", "parse_exposition", "parse_sglang", "parse_vllm"]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{.*\})?\s+(\S+)")


@dataclass(frozen=True, slots=True)
class EngineLoad:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # 0..1
    prefix_hits: float = 0.0  # tokens served from cache, cumulative
    prefix_queries: float = 0.0  # prompt tokens looked up, cumulative

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


def parse_exposition(text: str, names: frozenset[str] | None = None) -> dict[str, float]:
    """Sum each sample name's values over its label sets (Prometheus text format)."""
    out: dict[str, float] = {}
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
            value = float(m.group(2))
        except ValueError:
            continue
        if math.isnan(value):
            continue
        out[name] = out.get(name, 0.0) + value
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


_SGLANG = frozenset(
    {
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
    }
)


def parse_sglang(text: str) -> EngineLoad:
    v = parse_exposition(text, _SGLANG)
    return EngineLoad(
        running=v.get("sglang:num_running_reqs", 0.0),
        waiting=v.get("sglang:num_queue_reqs", 0.0),
        kv_usage=min(1.0, v.get("sglang:token_usage", 0.0)),
    )
