"""A stand-in for ``pynvml`` with the calls the sampler makes, for tests and benchmarks.

It answers as NVML does where that matters to the sampler: a GPU in MIG mode has no utilisation
of its own, a MIG instance no power, temperature or utilisation (``NVMLError_NotSupported``),
an unused MIG slot is ``NVMLError_NotFound``, and a GPU without MIG refuses ``GetMigMode``.
Figures are plain attributes, changed between samples as a test likes. It proves the sampler's
logic, never a claim about a real GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FakeGpu", "FakeMig", "FakeNvml", "FakeProcess"]

NVML_TEMPERATURE_GPU = 0
_MAX_MIG = 7
_GIB = 1024**3


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_NotFound(NVMLError):
    pass


@dataclass
class FakeProcess:
    pid: int
    usedGpuMemory: int | None  # pynvml's name


@dataclass
class FakeMig:
    profile: str  # "1g.10gb"
    gpu_instance: int
    uuid: str
    memory_total: int
    memory_used: int = 0
    processes: list[FakeProcess] = field(default_factory=list)


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total: int = 80 * _GIB
    memory_used: int = 0
    util: int = 0  # percent
    power_mw: int = 70_000
    temp: int = 35
    processes: list[FakeProcess] = field(default_factory=list)
    #: MIG instances by slot; None: MIG off. ``mig_capable``: whether MIG can be asked about.
    mig: dict[int, FakeMig] | None = None
    mig_capable: bool = True


@dataclass
class _Memory:
    total: int
    used: int
    free: int


@dataclass
class _Rates:
    gpu: int
    memory: int


class FakeNvml:
    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NotFound = NVMLError_NotFound
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU

    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.calls = 0

    def _gpu(self, handle: tuple[int, ...]) -> FakeGpu:
        self.calls += 1
        return self.gpus[handle[0]]

    def _mig(self, handle: tuple[int, ...]) -> FakeMig | None:
        gpu = self._gpu(handle)
        if len(handle) == 1:
            return None
        assert gpu.mig is not None
        return gpu.mig[handle[1]]

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> tuple[int, ...]:
        return (i,)

    def nvmlDeviceGetUUID(self, handle: tuple[int, ...]) -> str:
        mig = self._mig(handle)
        return mig.uuid if mig is not None else self._gpu(handle).uuid

    def nvmlDeviceGetName(self, handle: tuple[int, ...]) -> str:
        gpu, mig = self._gpu(handle), self._mig(handle)
        return f"{gpu.name} MIG {mig.profile}" if mig is not None else gpu.name

    def nvmlDeviceGetMemoryInfo(self, handle: tuple[int, ...]) -> _Memory:
        gpu, mig = self._gpu(handle), self._mig(handle)
        if mig is not None:
            return _Memory(mig.memory_total, mig.memory_used, mig.memory_total - mig.memory_used)
        used = gpu.memory_used + sum(m.memory_used for m in (gpu.mig or {}).values())
        return _Memory(gpu.memory_total, used, gpu.memory_total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: tuple[int, ...]) -> _Rates:
        gpu = self._gpu(handle)
        if len(handle) > 1 or gpu.mig is not None:
            raise NVMLError_NotSupported("Not Supported")
        return _Rates(gpu.util, 0)

    def nvmlDeviceGetPowerUsage(self, handle: tuple[int, ...]) -> int:
        if len(handle) > 1:
            raise NVMLError_NotSupported("Not Supported")
        return self._gpu(handle).power_mw

    def nvmlDeviceGetTemperature(self, handle: tuple[int, ...], sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        if len(handle) > 1:
            raise NVMLError_NotSupported("Not Supported")
        return self._gpu(handle).temp

    def nvmlDeviceGetComputeRunningProcesses(self, handle: tuple[int, ...]) -> list[FakeProcess]:
        gpu, mig = self._gpu(handle), self._mig(handle)
        if mig is not None:
            return list(mig.processes)
        return list(gpu.processes)

    def nvmlDeviceGetMigMode(self, handle: tuple[int, ...]) -> tuple[int, int]:
        gpu = self._gpu(handle)
        if not gpu.mig_capable:
            raise NVMLError_NotSupported("Not Supported")
        on = int(gpu.mig is not None)
        return on, on

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: tuple[int, ...]) -> int:
        return _MAX_MIG if self._gpu(handle).mig is not None else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(
        self, handle: tuple[int, ...], j: int
    ) -> tuple[int, ...]:
        gpu = self._gpu(handle)
        if gpu.mig is None or j not in gpu.mig:
            raise NVMLError_NotFound("Not Found")
        return (handle[0], j)

    def nvmlDeviceGetGpuInstanceId(self, handle: tuple[int, ...]) -> int:
        mig = self._mig(handle)
        if mig is None:
            raise NVMLError_NotSupported("Not Supported")
        return mig.gpu_instance
