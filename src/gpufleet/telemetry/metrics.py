"""The latest GPU readings as Prometheus metrics: per GPU, per replica, per model, idle.

A custom collector, not gauges set each tick: a GPU or replica that is gone is simply absent
from the next scrape, with no stale label set to remove. Figures a source does not give are
left out rather than written as 0. Per-replica and per-model sums and counts are of the leaves
(whole GPUs and MIG instances): a GPU cut into instances is not counted beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gpufleet.telemetry.gpus import GpuReading, leaves

__all__ = ["GpuCollector"]

_GPU_LABELS = ["node", "gpu", "index", "name", "replica", "model"]

#: (name, help, the reading's field)
_PER_GPU = (
    ("gpufleet_gpu_memory_used_bytes", "GPU memory in use", "memory_used"),
    ("gpufleet_gpu_memory_total_bytes", "GPU memory in all", "memory_total"),
    ("gpufleet_gpu_utilization_ratio", "Share of time the GPU ran a kernel (0–1)", "util"),
    ("gpufleet_gpu_sm_active_ratio", "Share of SMs busy (0–1; DCGM only)", "sm_active"),
    ("gpufleet_gpu_power_watts", "GPU power draw", "power_w"),
    ("gpufleet_gpu_temperature_celsius", "GPU temperature", "temp_c"),
)


class GpuCollector(Collector):
    def __init__(self, latest: Callable[[], Sequence[GpuReading]]) -> None:
        self._latest = latest

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        readings = list(self._latest())
        families = self._families()
        per_gpu, (replica_memory, replica_gpus, model_memory, model_gpus, idle) = (
            families[: len(_PER_GPU)],
            families[len(_PER_GPU) :],
        )
        for r in readings:
            labels = [r.node, r.device, r.index, r.name, r.replica or "", r.model or ""]
            for family, (_, _, attr) in zip(per_gpu, _PER_GPU, strict=True):
                value = getattr(r, attr)
                if value is not None:
                    family.add_metric(labels, float(value))
        by_replica: dict[tuple[str, str], list[GpuReading]] = {}
        by_model: dict[str, list[GpuReading]] = {}
        idle_count = 0
        for r in leaves(readings):
            if r.replica is None or r.model is None:
                idle_count += 1
                continue
            by_replica.setdefault((r.replica, r.model), []).append(r)
            by_model.setdefault(r.model, []).append(r)
        for (replica, model), held in sorted(by_replica.items()):
            replica_memory.add_metric([replica, model], float(_memory(held)))
            replica_gpus.add_metric([replica, model], float(len(held)))
        for model, held in sorted(by_model.items()):
            model_memory.add_metric([model], float(_memory(held)))
            model_gpus.add_metric([model], float(len(held)))
        idle.add_metric([], float(idle_count))
        yield from families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            *(GaugeMetricFamily(name, text, labels=_GPU_LABELS) for name, text, _ in _PER_GPU),
            GaugeMetricFamily(
                "gpufleet_replica_gpu_memory_used_bytes",
                "GPU memory in use on the GPUs a replica holds",
                labels=["replica", "model"],
            ),
            GaugeMetricFamily(
                "gpufleet_replica_gpus",
                "GPUs (or MIG instances) a replica holds",
                labels=["replica", "model"],
            ),
            GaugeMetricFamily(
                "gpufleet_model_gpu_memory_used_bytes",
                "GPU memory in use on the GPUs a model's replicas hold",
                labels=["model"],
            ),
            GaugeMetricFamily(
                "gpufleet_model_gpus",
                "GPUs (or MIG instances) a model's replicas hold",
                labels=["model"],
            ),
            GaugeMetricFamily("gpufleet_gpus_idle", "GPUs (or MIG instances) holding no replica"),
        ]


def _memory(readings: Sequence[GpuReading]) -> int:
    return sum(r.memory_used or 0 for r in readings)
