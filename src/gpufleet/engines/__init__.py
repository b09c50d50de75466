"""Engine adapters: how to launch each inference engine and how to tell it is ready.

Adapters are registered by the ``engine`` name a Model spec uses (llama.cpp, vLLM, SGLang,
TensorRT-LLM's trtllm-serve, Triton's OpenAI front end); the emulator is one of them
(for tests and benchmarks: it says so in every response). ``GPUFLEET_EMULATOR_COMMAND``, a
benchmark hook, runs a command of the benchmark's in its place (see ``engines/emulator.py``).
"""

from __future__ import annotations

from gpufleet.engines.base import (
    KV_EVENTS_TOPIC,
    LOCAL,
    EngineAdapter,
    KvEvents,
    Launch,
    Placement,
    ReadinessProbe,
)
from gpufleet.engines.emulator import EmulatorEngine
from gpufleet.engines.llamacpp import LlamaCppEngine
from gpufleet.engines.metrics import (
    EngineLoad,
    parse_exposition,
    parse_sglang,
    parse_triton,
    parse_trtllm,
    parse_vllm,
)
from gpufleet.engines.sglang import SglangEngine
from gpufleet.engines.triton import TritonEngine
from gpufleet.engines.trtllm import TrtllmEngine
from gpufleet.engines.vllm import VllmEngine
from gpufleet.errors import EngineUnavailableError

__all__ = [
    "ADAPTERS",
    "KV_EVENTS_TOPIC",
    "LOCAL",
    "EngineAdapter",
    "EngineLoad",
    "KvEvents",
    "Launch",
    "Placement",
    "ReadinessProbe",
    "adapter_for",
    "parse_exposition",
    "parse_sglang",
    "parse_triton",
    "parse_trtllm",
    "parse_vllm",
]

ADAPTERS: dict[str, EngineAdapter] = {
    a.name: a
    for a in (
        LlamaCppEngine(),
        VllmEngine(),
        SglangEngine(),
        TrtllmEngine(),
        TritonEngine(),
        EmulatorEngine.from_env(),
    )
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
