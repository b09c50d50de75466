"""Prometheus metrics of the gateway, in a registry of its own (several apps per process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from gpufleet import supervise
from gpufleet.controller import startup

__all__ = ["GatewayMetrics"]

_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # process_open_fds / process_max_fds, RSS, CPU: every stream holds two descriptors,
        # and a gateway out of them refuses connections without an error of its own.
        ProcessCollector(registry=self.registry)
        # Restarts of supervised background loops, and which are down (gpufleet.supervise).
        for collector in supervise.collectors():
            self.registry.register(collector)
        # Replicas' start-up times (gpufleet.controller.startup): counted by the controller in
        # this process, or on Kubernetes by this gateway's view of the engine pods.
        for collector in startup.collectors():
            self.registry.register(collector)
        self.requests = Counter(
            "gpufleet_requests",
            "Requests answered, by model, tenant, API route and HTTP status",
            ["model", "tenant", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "gpufleet_request_duration_seconds",
            "Time from request to the last byte of the response",
            ["model", "tenant", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "gpufleet_time_to_first_token_seconds",
            "Time from request to the first streamed chunk",
            ["model", "tenant"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "gpufleet_requests_in_flight",
            "Requests being served, by model",
            ["model"],
            registry=self.registry,
        )
        self.replicas = Gauge(
            "gpufleet_replicas",
            "Replicas by model and phase",
            ["model", "phase"],
            registry=self.registry,
        )
        self.desired = Gauge(
            "gpufleet_replicas_desired",
            "Replicas the autoscaler wants for each model (bounded by what the fleet can place)",
            ["model"],
            registry=self.registry,
        )
        self.held = Counter(
            "gpufleet_requests_held",
            "Requests that waited for a replica of a model with none ready",
            ["model"],
            registry=self.registry,
        )
        self.split = Counter(
            "gpufleet_split_requests",
            "Requests for a model with a canary/A-B split, by the deployment that took them",
            ["model", "target"],
            registry=self.registry,
        )
        self.disaggregation = Counter(
            "gpufleet_disaggregation_requests",
            "Requests of disaggregated models by how their prompt was prefilled: remote, or "
            "local_short / local_cached / local_no_prefill_replica / local_prefill_failed",
            ["model", "path"],
            registry=self.registry,
        )
        self.prefix_lookups = Counter(
            "gpufleet_prefix_lookups",
            "Requests of routing.prefixIndex: precise models by the view they were routed on: "
            "precise (the engines' KV-cache events), or approximate (no live event stream, or "
            "the prompt could not be tokenized)",
            ["model", "index"],
            registry=self.registry,
        )
        self.prefix_index_blocks = Gauge(
            "gpufleet_prefix_index_blocks",
            "KV-cache blocks the gateway's index holds for a replica of a routing.prefixIndex: "
            "precise model, from its engine's events (a subset of what the engine caches)",
            ["model", "replica"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "gpufleet_fallbacks",
            "Requests passed to a fallback model after the first could not serve them",
            ["model", "to"],
            registry=self.registry,
        )
        self.itl = Histogram(
            "gpufleet_inter_token_latency_seconds",
            "Gaps between streamed chunks (one token each on vLLM and llama.cpp)",
            ["model", "tenant"],
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "gpufleet_tokens",
            "Tokens by model, tenant and direction (prompt, cached, completion)",
            ["model", "tenant", "direction"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "gpufleet_queue_wait_seconds",
            "Time requests waited in the model's admission queue",
            ["model", "tenant"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "gpufleet_queue_depth",
            "Requests waiting in the model's admission queue",
            ["model"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "gpufleet_rejections",
            "Requests refused before reaching an engine, by tenant and reason "
            "(rpm, tpm, concurrency, budget, queue_full, queue_timeout, unauthorized)",
            ["tenant", "reason"],
            registry=self.registry,
        )
        self.cost = Counter(
            "gpufleet_cost_usd",
            "Cost of served requests (their share of replica busy time at the replica's price)",
            ["model", "tenant"],
            registry=self.registry,
        )
        self.engine_scrape_pause = Gauge(
            "gpufleet_engine_scrape_pause_seconds",
            "Pause between passes over the engines' /metrics: the configured interval, longer "
            "while a pass costs more than its share of the event loop (many replicas)",
            registry=self.registry,
        )
        self.gpu_seconds = Counter(
            "gpufleet_gpu_seconds",
            "GPU time requests held (replica time × the replica's GPUs, as the ledger's "
            "gpu_seconds), by model and tenant",
            ["model", "tenant"],
            registry=self.registry,
        )
        self.slow_clients = Counter(
            "gpufleet_slow_clients_closed",
            "Client connections closed for sending too slowly, by what was late (headers, body)",
            ["stage"],
            registry=self.registry,
        )
        self.dependency_up = Gauge(
            "gpufleet_dependency_up",
            "1 while a dependency (store, redis) answers, 0 during an outage (gpufleet.outages)",
            ["dependency"],
            registry=self.registry,
        )
        self.dependency_failures = Counter(
            "gpufleet_dependency_failures",
            "Calls to a dependency (store, redis) that failed",
            ["dependency"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "gpufleet_upstream_errors",
            "Failed attempts to reach an engine, by model and kind",
            ["model", "kind"],
            registry=self.registry,
        )
