"""What every engine adapter tells a runtime: how to launch it and how to know it is ready.

An adapter describes; it never runs anything. The local runtime turns a ``Launch`` into a child
process, the Kubernetes runtime into a container, so both share one adapter per engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from gpufleet.engines.metrics import EngineLoad
from gpufleet.spec import ModelSpec

__all__ = [
    "ENGINE_KEY_ENV",
    "KV_EVENTS_TOPIC",
    "LIVENESS_PATH",
    "LLAMACPP_COUNT_PATH",
    "LOCAL",
    "EngineAdapter",
    "KvEvents",
    "Launch",
    "Placement",
    "ReadinessProbe",
]

#: The path every engine answers cheaply, without waiting for a generation to finish: vLLM's,
#: SGLang's, llama.cpp's own server's and the emulator's ``/health``, and the one that
#: ``llamacpp_main`` adds to llama-cpp-python's server, which has none. Local liveness probes
#: and the Kubernetes pods' liveness probes both ask it.
LIVENESS_PATH = "/health"

#: Where ``llamacpp_main`` counts a finished stream's tokens, the engine's route appended
#: (``/extras/count/v1/chat/completions``): the prompt as the engine templates and tokenizes it,
#: without evaluating it, and the streamed text through its tokenizer — one call, one wait for
#: the model lock (``gateway/stream_usage.py``).
LLAMACPP_COUNT_PATH = "/extras/count"

#: The environment variable that carries an engine's secret to gpufleet's own engine processes
#: (the emulator, ``llamacpp_main``, a ``GPUFLEET_EMULATOR_COMMAND``) and, on Kubernetes, to the
#: gateway. A secret goes by environment, not argument, wherever the engine allows it: a
#: process's arguments are world-readable (``ps``), its environment is not.
ENGINE_KEY_ENV = "GPUFLEET_ENGINE_KEY"


@dataclass(frozen=True, slots=True)
class ReadinessProbe:
    """An HTTP request that succeeds (2xx) only once the engine can serve."""

    method: str
    path: str
    body: bytes | None = None
    #: Give up on a start that has not become ready in this long.
    timeout_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Launch:
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    readiness: ReadinessProbe = ReadinessProbe("GET", "/v1/models")
    #: Path of Prometheus metrics, when the engine has them.
    metrics_path: str | None = None
    #: Path asked every few seconds once ready; any HTTP answer means the engine is alive.
    liveness_path: str = LIVENESS_PATH
    #: Seconds between SIGTERM and SIGKILL when stopping.
    stop_grace_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a replica runs, as the planner decided. The default is "this machine, no GPU"."""

    node: str = "local"
    gpu_type: str | None = None
    gpu_indices: tuple[int, ...] = ()
    #: Share of each GPU's memory the engine may claim (vLLM's --gpu-memory-utilization).
    memory_fraction: float | None = None
    mig_profile: str | None = None

    def device_env(self) -> dict[str, str]:
        """The environment that shows an engine process only its planned GPUs."""
        if not self.gpu_indices:
            return {}
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in self.gpu_indices)}


LOCAL = Placement()

#: The topic engines publish KV-cache events under (vLLM's default is "", every topic).
KV_EVENTS_TOPIC = "kv-events"


@dataclass(frozen=True, slots=True)
class KvEvents:
    """Where a replica publishes its KV-cache events (``routing.prefixIndex: precise``): a
    ZeroMQ PUB socket on ``port`` and the replay ROUTER on ``replay_port``, both bound on
    every interface — vLLM's ``--kv-events-config``, which the emulator takes as well."""

    port: int
    replay_port: int
    topic: str = KV_EVENTS_TOPIC

    def config(self, engine_args: Sequence[str] = ()) -> str:
        """The ``--kv-events-config`` JSON; raises ``ValueError`` (the replica's failure, said
        to the user) when ``engine_args`` set their own, whose ports the gateway would not
        know."""
        if any(a.split("=", 1)[0] == "--kv-events-config" for a in engine_args):
            raise ValueError(
                "spec.engineArgs: --kv-events-config is gpufleet's to set with "
                "routing.prefixIndex: precise (each replica publishes on ports of its own, "
                "which the gateway subscribes to); remove it from engineArgs"
            )
        return json.dumps(
            {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": f"tcp://*:{self.port}",
                "replay_endpoint": f"tcp://*:{self.replay_port}",
                "topic": self.topic,
            },
            separators=(",", ":"),
        )


class EngineAdapter(Protocol):
    name: str
    #: Where the engine serves Prometheus metrics, if it does.
    metrics_path: str | None
    #: The environment variable the engine reads its API key from; None: it takes it only as an
    #: argument, which ``launch`` adds.
    api_key_env: str | None

    def unavailable_reason(self) -> str | None:
        """None when this engine can run here, else why not and how to fix it."""

    def launch(
        self,
        spec: ModelSpec,
        *,
        weights: Path,
        served_name: str,
        host: str,
        port: int,
        placement: Placement = ...,
        api_key: str | None = None,
        kv_events: KvEvents | None = None,
    ) -> Launch:
        """How to start the engine; with ``api_key`` it refuses requests without that key on
        its API routes (its liveness path stays open); with ``kv_events`` it publishes its
        KV-cache events there (only engines in ``spec.KV_EVENT_ENGINES`` are asked)."""

    def parse_metrics(self, text: str) -> EngineLoad | None:
        """The engine's ``/metrics`` text as common load signals; None if it has none."""
