"""Engine adapters: how to launch each inference engine and how to tell it is ready.

Adapters are registered by the ``engine`` name a Model spec uses. The emulator engine arrives with
the engine emulator; until then it is reported as unavailable, never faked.
"""

from __future__ import annotations

from gpufleet.engines.base import EngineAdapter, Launch, ReadinessProbe
from gpufleet.engines.llamacpp import LlamaCppEngine
from gpufleet.engines.sglang import SglangEngine
from gpufleet.engines.vllm import VllmEngine
from gpufleet.errors import EngineUnavailableError

__all__ = ["ADAPTERS", "EngineAdapter", "Launch", "ReadinessProbe", "adapter_for"]

ADAPTERS: dict[str, EngineAdapter] = {
    a.name: a for a in (LlamaCppEngine(), VllmEngine(), SglangEngine())
}


def adapter_for(engine: str) -> EngineAdapter:
    adapter = ADAPTERS.get(engine)
    if adapter is None:
        raise EngineUnavailableError(
            f"engine {engine!r} has no adapter in this version of gpufleet "
            f"(available: {', '.join(ADAPTERS)})"
        )
    reason = adapter.unavailable_reason()
    if reason:
        raise EngineUnavailableError(f"engine {engine!r} cannot run here: {reason}")
    return adapter
