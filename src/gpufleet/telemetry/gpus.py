"""One GPU (or MIG instance) as a sampler saw it, and who holds it.

A MIG instance is a device of its own — its memory and its processes are its own, and a replica
is placed on it as on a whole GPU — so it gets a reading of its own, with ``parent`` naming the
GPU it is cut from. The parent keeps a reading too, for what only the whole GPU has (power,
temperature), but it holds nothing itself: counts of GPUs (idle ones, a replica's) are of the
*leaves*, the devices that are not cut into instances.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from gpufleet.runtime import Replica
from gpufleet.store.telemetry import GpuPoint

__all__ = ["GpuReading", "GpuReadings", "GpuSource", "idle", "leaves", "place"]


#: A GPU's figures at one moment. One class with the store's history rows, which hold the same
#: fields: a reading is written as it is and read back as one.
GpuReading = GpuPoint


class GpuSource(Protocol):
    """Where readings come from: NVML on this machine, or the DCGM exporter on a cluster."""

    #: What it reads: "nvml" or "dcgm".
    kind: str

    async def read(self, replicas: Sequence[Replica], now: float) -> list[GpuReading]:
        """Every device now, attributed to ``replicas``."""

    async def close(self) -> None: ...


class GpuReadings(Protocol):
    """What the gateway's ``app.state.telemetry`` is (or None where no GPU is seen): the
    devices as last read, for the admin API and the web console. A sampler (``Telemetry``)
    or, on a gateway that does not sample, the leader's readings from the store
    (``StoredReadings``)."""

    #: Where the readings come from: "nvml", "dcgm" or "store".
    @property
    def kind(self) -> str: ...

    def latest(self) -> list[GpuReading]:
        """The devices as last read (empty before the first reading); never blocks."""


def leaves(readings: Iterable[GpuReading]) -> list[GpuReading]:
    """The devices work runs on: whole GPUs and MIG instances, not GPUs cut into instances."""
    readings = list(readings)
    parents = {r.parent for r in readings if r.parent is not None}
    return [r for r in readings if r.device not in parents]


def idle(readings: Iterable[GpuReading]) -> list[GpuReading]:
    """The devices holding no replica."""
    return [r for r in leaves(readings) if r.replica is None]


def place(r: GpuReading) -> tuple[str, tuple[int, str], tuple[int, str]]:
    """A sort key: node, GPU, MIG instance, in number order (GPU 2 before GPU 10, a GPU
    before its instances, instance 5 before 13)."""
    parts = r.index.split("/")
    return r.node, _number(parts[0]), _number(parts[-1]) if len(parts) > 1 else (-1, "")


def _number(text: str) -> tuple[int, str]:
    return (int(text), "") if text.isdigit() else (-1, text)
