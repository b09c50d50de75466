"""Readings of this machine's GPUs through NVML (nvidia-ml-py), for ``gpufleet up``.

Per GPU: memory used and total, utilisation, power (NVML gives milliwatts), temperature and the
compute processes on it; with MIG on, each instance is read as a device of its own (memory and
processes are per instance; utilisation, power and temperature are not, and stay None there).
NVML has no SM-activity figure outside its GPM counters, so ``sm_active`` is None here.

A GPU whose processes belong to several replicas (time-sliced) is attributed to the one using
the most of its memory. NVML calls block, so ``read`` runs them in a worker thread. NVML is
passed in (``nvml=``) as discovery takes it, so tests hand in a fake (``fake_nvml``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from gpufleet.errors import TemporaryError
from gpufleet.runtime import Replica
from gpufleet.telemetry.attribution import ParentOf, ProcessOwners, proc_parent
from gpufleet.telemetry.gpus import GpuReading

__all__ = ["NvmlSampler", "load_nvml"]

log = logging.getLogger("gpufleet.telemetry")

T = TypeVar("T")


def load_nvml() -> Any | None:
    """``pynvml`` initialised, or None where there is no driver or no GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver (LibraryNotFound), or no GPU it can talk to
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError:
        count = 0
    if count == 0:
        pynvml.nvmlShutdown()
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlSampler:
    kind = "nvml"

    def __init__(
        self,
        nvml: Any,
        node: str,
        *,
        parent_of: ParentOf = proc_parent,
        shutdown: bool = False,
    ) -> None:
        self.nvml = nvml
        self.node = node
        self._parent_of = parent_of
        #: Whether ``close`` shuts NVML down (when this sampler was the one to start it).
        self._shutdown = shutdown
        self._said: set[tuple[str, str]] = set()

    async def read(self, replicas: Sequence[Replica], now: float) -> list[GpuReading]:
        return await asyncio.to_thread(self.read_now, replicas, now)

    async def close(self) -> None:
        if self._shutdown:
            await asyncio.to_thread(self.nvml.nvmlShutdown)

    def read_now(self, replicas: Sequence[Replica], now: float) -> list[GpuReading]:
        """Every GPU and MIG instance, in this thread."""
        owners = ProcessOwners(replicas, self._parent_of)
        nvml = self.nvml
        try:
            readings: list[GpuReading] = []
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                instances = self._mig_instances(handle)
                # A GPU cut into instances holds nothing itself: its instances do.
                readings.append(
                    self._reading(handle, uuid, str(i), None, owners, now, processes=not instances)
                )
                for mig in instances:
                    name = _text(nvml.nvmlDeviceGetName(mig))
                    index = (
                        f"{i}/mig-{name.rsplit(' ', 1)[-1]}/{nvml.nvmlDeviceGetGpuInstanceId(mig)}"
                    )
                    mig_uuid = _text(nvml.nvmlDeviceGetUUID(mig))
                    readings.append(self._reading(mig, mig_uuid, index, uuid, owners, now))
        except nvml.NVMLError as exc:
            raise TemporaryError(f"NVML: {exc}", retry_after=2.0) from exc
        return readings

    def _reading(
        self,
        handle: Any,
        uuid: str,
        index: str,
        parent: str | None,
        owners: ProcessOwners,
        now: float,
        *,
        processes: bool = True,
    ) -> GpuReading:
        nvml = self.nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        rates = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        milliwatts = self._optional(nvml.nvmlDeviceGetPowerUsage, handle)
        temp = self._optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        holder = self._holder(handle, owners) if processes else None
        return GpuReading(
            node=self.node,
            device=uuid,
            index=index,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            parent=parent,
            memory_used=int(memory.used),
            memory_total=int(memory.total),
            util=rates.gpu / 100 if rates is not None else None,
            sm_active=None,
            power_w=milliwatts / 1000 if milliwatts is not None else None,
            temp_c=float(temp) if temp is not None else None,
            replica=holder.id if holder is not None else None,
            model=holder.model if holder is not None else None,
            at=now,
        )

    def _holder(self, handle: Any, owners: ProcessOwners) -> Replica | None:
        """The replica using the most of this device's memory among those with a process here."""
        use: dict[str, int] = {}
        by_id: dict[str, Replica] = {}
        for process in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            replica = owners.owner(int(process.pid))
            if replica is None:
                continue
            by_id[replica.id] = replica
            # None where the driver cannot tell (some containers): the process still counts.
            used = process.usedGpuMemory
            use[replica.id] = use.get(replica.id, 0) + (int(used) if used is not None else 0)
        if not use:
            return None
        return by_id[max(use, key=lambda rid: (use[rid], rid))]

    def _mig_instances(self, handle: Any) -> list[Any]:
        nvml = self.nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:  # GPUs without MIG say NotSupported
            return []
        if not current:
            return []
        instances = []
        for j in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                instances.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j))
            except nvml.NVMLError:  # an unused slot says NotFound
                continue
        return instances

    def _optional(self, call: Callable[..., T], *args: Any) -> T | None:
        """A figure the device may not give: None. A MIG instance has no power or utilisation
        of its own (NotSupported, expected); any other refusal is said once per call and error,
        not every tick."""
        try:
            return call(*args)
        except self.nvml.NVMLError_NotSupported:
            return None
        except self.nvml.NVMLError as exc:
            said = (call.__name__, type(exc).__name__)
            if said not in self._said:
                self._said.add(said)
                log.warning("NVML %s failed (%s): that figure is left out", said[0], exc)
            return None
