"""GPU telemetry: what each GPU is doing and who holds it, now and over the last week.

NVML on this machine (``gpufleet up``), the DCGM exporter on a cluster (the operator's leader);
readings attributed to replicas, served as Prometheus metrics and kept as history in the store.
A gateway on a cluster does not sample: it shows the leader's readings from the store.
"""

from gpufleet.telemetry.dcgm import DcgmReader
from gpufleet.telemetry.gpus import GpuReading, GpuReadings, GpuSource, idle, leaves
from gpufleet.telemetry.metrics import GpuCollector
from gpufleet.telemetry.nvml import NvmlSampler, load_nvml
from gpufleet.telemetry.sampler import Telemetry, dcgm_telemetry, nvml_telemetry
from gpufleet.telemetry.stored import StoredReadings

__all__ = [
    "DcgmReader",
    "GpuCollector",
    "GpuReading",
    "GpuReadings",
    "GpuSource",
    "NvmlSampler",
    "StoredReadings",
    "Telemetry",
    "dcgm_telemetry",
    "idle",
    "leaves",
    "load_nvml",
    "nvml_telemetry",
]
