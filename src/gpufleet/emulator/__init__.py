"""The engine emulator: an OpenAI-compatible server that behaves like a model on a GPU.

For tests, benchmarks and the simulator only — it is named as an emulator in every response and
generates no real text. See ``engine`` (timing, KV cache, faults) and ``server`` (HTTP, metrics).
"""

from gpufleet.emulator.engine import EmulatedEngine, EmulatedFailure, EmulatorCrash, Faults
from gpufleet.emulator.kvcache import BLOCK_TOKENS, KVCache, block_hashes, tokenize
from gpufleet.emulator.server import ReplicaServer, render_chat

__all__ = [
    "BLOCK_TOKENS",
    "EmulatedEngine",
    "EmulatedFailure",
    "EmulatorCrash",
    "Faults",
    "KVCache",
    "ReplicaServer",
    "block_hashes",
    "render_chat",
    "tokenize",
]
