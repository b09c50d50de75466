"""A replica's Prometheus metrics: vLLM's names for what vLLM reports, gpufleet's for the rest.

The vLLM families (``vllm:…``, labelled ``engine`` and ``model_name``) are what the gateway's and
the autoscaler's scrapers parse, so they keep vLLM's names, labels and units. What
vLLM has no name for — the replica's KV-transfer role and link, the KV pulled and offered in
disaggregated serving — is under ``gpufleet_emulator_``:

- ``gpufleet_emulator_kv_role{role}`` 1 for the replica's ``kv_role``;
- ``gpufleet_emulator_kv_link_bytes_per_second{link}`` the bandwidth of one link;
- ``gpufleet_emulator_kv_transfers_total{direction}``: ``in``, pulls ended here (decode calls);
  ``out``, prefill answers that offered their KV;
- ``gpufleet_emulator_kv_transfer_bytes_total{direction}``: ``in``, bytes pulled; ``out``, the
  bytes offered (the prompt's whole KV: a decode replica holding a prefix pulls less);
- ``gpufleet_emulator_kv_transfer_seconds`` (histogram): a pull, from admission to its end
  (waiting for the link included), scaled as every latency is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpufleet.emulator.engine import EmulatedEngine
from gpufleet.emulator.kvcache import BLOCK_TOKENS
from gpufleet.emulator.kvtransfer import KVRole

__all__ = ["Offers", "ReplicaMetrics", "replica_metrics"]

_LATENCY = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    10,
    20,
    40,
    80,
)


@dataclass
class Offers:
    """Prefill answers that offered their KV to a remote decode (the server counts them)."""

    count: int = 0
    bytes: float = 0.0


class _Gauges(Collector):
    def __init__(self, engine: EmulatedEngine, model: str) -> None:
        self.engine = engine
        self.model = model

    def collect(self) -> Iterable[Metric]:
        e, labels = self.engine, ["0", self.model]
        e.poll()
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests running on the engine", e.running),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled", e.waiting),
            ("vllm:kv_cache_usage_perc", "KV cache usage, 0..1", e.cache.usage),
        ):
            g = GaugeMetricFamily(name, doc, labels=["engine", "model_name"])
            g.add_metric(labels, value)
            yield g
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "KV cache configuration",
            labels=["block_size", "num_gpu_blocks"],
        )
        info.add_metric([str(BLOCK_TOKENS), str(e.cache.capacity)], 1)
        yield info
        for name, doc, total in (
            ("vllm:prompt_tokens", "Prompt tokens processed", e.prompt_tokens_total),
            ("vllm:generation_tokens", "Tokens generated", e.generation_tokens_total),
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache",
                e.prefix_queries,
            ),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", e.prefix_hits),
        ):
            c = CounterMetricFamily(name, doc, labels=["engine", "model_name"])
            c.add_metric(labels, total)
            yield c


class _Transfers(Collector):
    def __init__(self, engine: EmulatedEngine, model: str, role: KVRole, offers: Offers) -> None:
        self.engine, self.model, self.role, self.offers = engine, model, role, offers

    def collect(self) -> Iterable[Metric]:
        e, link = self.engine, self.engine.kv_link
        role = GaugeMetricFamily(
            "gpufleet_emulator_kv_role",
            "The replica's KV-transfer role (vLLM's kv_role)",
            labels=["model_name", "role"],
        )
        role.add_metric([self.model, self.role], 1)
        yield role
        bandwidth = GaugeMetricFamily(
            "gpufleet_emulator_kv_link_bytes_per_second",
            "Bandwidth of one link the replica pulls KV over",
            labels=["model_name", "link"],
        )
        bandwidth.add_metric([self.model, link.name], link.gbytes_per_s * 1e9)
        yield bandwidth
        e.poll()
        for name, doc, pulled, offered in (
            (
                "gpufleet_emulator_kv_transfers",
                "KV transfers: pulls ended here (in), prefill answers offering KV (out)",
                e.kv_pulls,
                self.offers.count,
            ),
            (
                "gpufleet_emulator_kv_transfer_bytes",
                "KV bytes pulled here (in) and offered by prefill answers (out)",
                e.kv_pulled_bytes,
                self.offers.bytes,
            ),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name", "direction"])
            c.add_metric([self.model, "in"], pulled)
            c.add_metric([self.model, "out"], offered)
            yield c


@dataclass
class ReplicaMetrics:
    registry: CollectorRegistry
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue: Histogram
    kv_transfer: Histogram
    offers: Offers


def replica_metrics(engine: EmulatedEngine, model: str, role: KVRole) -> ReplicaMetrics:
    r = CollectorRegistry()
    r.register(_Gauges(engine, model))
    offers = Offers()
    r.register(_Transfers(engine, model, role, offers))
    lab = ["engine", "model_name"]
    return ReplicaMetrics(
        r,
        Histogram("vllm:time_to_first_token_seconds", "TTFT", lab, buckets=_LATENCY, registry=r),
        Histogram(
            "vllm:inter_token_latency_seconds",
            "Gap between tokens",
            lab,
            buckets=_LATENCY,
            registry=r,
        ),
        Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency", lab, buckets=_LATENCY, registry=r
        ),
        Histogram(
            "vllm:request_queue_time_seconds", "Time waiting", lab, buckets=_LATENCY, registry=r
        ),
        Histogram(
            "gpufleet_emulator_kv_transfer_seconds",
            "A KV pull, from admission to its end",
            ["model_name"],
            buckets=_LATENCY,
            registry=r,
        ),
        offers,
    )
