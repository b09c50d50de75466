"""The engine emulator: an OpenAI-compatible server that behaves like a model on a GPU.

For tests, benchmarks and the simulator only — it is named as an emulator in every response and
generates no real text. ``model`` is the engine itself as a pure, event-driven core (admission,
prefill, continuous-batch decode, KV and prefix cache; time is a parameter), which the simulator
drives in virtual time; ``engine`` runs it on the wall clock with faults, and ``server`` puts it
behind HTTP with vLLM's metric names (``metrics``). ``kvtransfer`` is disaggregated serving:
vLLM's KV-transfer contract (prefill and decode calls), ``kv_role`` and the links the KV crosses.
"""

from gpufleet.emulator.engine import EmulatedEngine, EmulatedFailure, EmulatorCrash, Faults
from gpufleet.emulator.kvcache import BLOCK_TOKENS, KVCache, block_hashes, tokenize
from gpufleet.emulator.model import EngineModel, Generation, RequestTooLarge
from gpufleet.emulator.server import ReplicaServer, render_chat

__all__ = [
    "BLOCK_TOKENS",
    "EmulatedEngine",
    "EmulatedFailure",
    "EmulatorCrash",
    "EngineModel",
    "Faults",
    "Generation",
    "KVCache",
    "ReplicaServer",
    "RequestTooLarge",
    "block_hashes",
    "render_chat",
    "tokenize",
]
