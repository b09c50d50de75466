"""What the simulator needs to know of each model: its size, its engines, its start-up delay.

A model is sized the way ``gpufleet plan`` sizes it (its architecture from a ``file:`` or
``pypi:`` source here, ``deployment_for`` for the planner), and each replica's engine is built
the way the emulator server builds one (``emulator.main.build_replicas``): a ``PerfModel`` for
the placement's GPU type and tensor-parallel degree, and a KV cache of what the engine's share
of the GPU holds once weights and the engine's overhead are placed. The placement decides the
GPU type, so two replicas of one model on different cards run at different speeds.

Start-up delay, when not given: 20 s of engine initialisation (process, CUDA graphs — vLLM's
own start on a warm node) plus the weights read at 2 GB/s from the node's disk; about 28 s for
an 8B model in bf16, 90 s for a 70B one. A figure to calibrate, named so it can be.

An ``engine: external`` model has neither architecture nor deployment: its endpoints are a
hosted API of the latency ``hosted`` says (``sim.external``), ready from the start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpufleet.emulator.kvcache import kv_capacity_tokens
from gpufleet.errors import SpecError
from gpufleet.hardware import CATALOG, Accelerator, normalise_gpu_name
from gpufleet.planner import Deployment, Placement, deployment_for
from gpufleet.policies.costs import replica_price_per_hour
from gpufleet.runtime.weights import resolve_weights
from gpufleet.sim.external import HostedLatency
from gpufleet.sizing import ModelArch, load_architecture
from gpufleet.sizing.performance import PerfModel
from gpufleet.spec import Model

__all__ = [
    "DEFAULT_MAX_NUM_SEQS",
    "DEFAULT_SLOTS_PER_REPLICA",
    "ENGINE_INIT_S",
    "LOAD_BYTES_PER_S",
    "EngineParams",
    "SimModel",
    "sim_model",
]

ENGINE_INIT_S = 20.0
LOAD_BYTES_PER_S = 2e9
#: vLLM's default ``--max-num-seqs`` (and the emulator's).
DEFAULT_MAX_NUM_SEQS = 256
#: The gateway's default requests in flight per replica (``GatewaySettings.slots_per_replica``).
DEFAULT_SLOTS_PER_REPLICA = 64


@dataclass(frozen=True, slots=True)
class EngineParams:
    perf: PerfModel
    kv_tokens: int
    max_num_seqs: int
    gpus: int
    gpu_type: str | None
    price_per_hour: float


@dataclass(slots=True)
class SimModel:
    """One model of the simulated fleet, sized once (an external one: ``hosted``, with no
    architecture or deployment)."""

    model: Model
    arch: ModelArch | None
    deployment: Deployment | None
    startup_s: float
    max_num_seqs: int
    slots_per_replica: int
    #: ``engine: external``: how fast its endpoints answer; None for a model the fleet runs.
    hosted: HostedLatency | None = None
    #: (GPU type, TP) → the engine a replica placed there runs.
    _engines: dict[tuple[str | None, int, float], EngineParams] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.model.name

    def engine(
        self, placement: Placement | None, catalog: Mapping[str, Accelerator] = CATALOG
    ) -> EngineParams:
        """The engine of a replica at ``placement`` (None: the model is not bounded by the
        planner; it runs on its first accepted GPU type, or an H100, at its fixed degree)."""
        spec = self.model.spec
        if placement is not None and placement.gpu_type is not None:
            gpu_type: str | None = placement.gpu_type
            tp, fraction = max(1, placement.gpu_count), placement.memory_fraction
        else:
            first = spec.resources.gpu_types[0] if spec.resources.gpu_types else "H100"
            gpu_type = normalise_gpu_name(first) or first
            tp, fraction = max(1, spec.resources.gpus), 0.9
        key = (gpu_type, tp, fraction)
        params = self._engines.get(key)
        if params is None:
            params = self._engines[key] = self._build(gpu_type, tp, fraction, catalog)
        return params

    def _build(
        self, gpu_type: str | None, tp: int, fraction: float, catalog: Mapping[str, Accelerator]
    ) -> EngineParams:
        spec = self.model.spec
        if self.arch is None:
            raise ValueError(f"{self.name}: engine external runs no engine of the fleet's")
        gpu = catalog.get(gpu_type or "")
        if gpu is None:
            raise SpecError([f"{self.name}: GPU type {gpu_type!r} is not in the catalog"])
        perf = PerfModel(self.arch, gpu, tp)
        budget = int(gpu.memory_bytes * fraction)
        kv = kv_capacity_tokens(perf, budget, spec.engine)
        # The spec's own price when it has one, else the placed GPUs at the catalog's price.
        price = tp * gpu.price_per_hour
        if spec.pricing.per_replica_hour is not None:
            price = replica_price_per_hour(spec)
        return EngineParams(perf, max(16, kv), self.max_num_seqs, tp, gpu_type, price)


def sim_model(
    model: Model,
    *,
    arch: ModelArch | None = None,
    startup_s: float | None = None,
    slots_per_replica: int = DEFAULT_SLOTS_PER_REPLICA,
    kv_sequences: int = 4,
    hosted: HostedLatency | None = None,
) -> SimModel:
    """Size ``model`` for the simulator. Its architecture is needed (the engine model's timings
    come from it): from ``arch`` when given, else from a ``file:`` or ``pypi:`` source here.
    An ``engine: external`` model needs none: its endpoints answer at ``hosted`` (default:
    ``HostedLatency()``), a hosted API's latency whatever their load."""
    spec = model.spec
    slots = spec.routing.max_in_flight_per_replica or slots_per_replica
    if spec.engine == "external":
        latency = hosted or HostedLatency()
        return SimModel(model, None, None, 0.0, DEFAULT_MAX_NUM_SEQS, slots, hosted=latency)
    if arch is None:
        source = spec.parsed_source
        if source.scheme not in ("file", "pypi"):
            raise SpecError(
                [
                    f"{model.name}: the simulator needs the model's config.json or GGUF to time "
                    f"its engine; {source} is not on this machine (point spec.source at a local "
                    "file: config)"
                ]
            )
        arch = load_architecture(resolve_weights(source))
    deployment = deployment_for(model, arch, kv_sequences=kv_sequences)
    if startup_s is None:
        startup_s = ENGINE_INIT_S + arch.weights_bytes / LOAD_BYTES_PER_S
    return SimModel(model, arch, deployment, startup_s, _max_num_seqs(spec.engine_args), slots)


def _max_num_seqs(engine_args: list[str]) -> int:
    """vLLM's ``--max-num-seqs`` from the spec's engine arguments, or its default."""
    for i, arg in enumerate(engine_args):
        value = None
        if arg.startswith("--max-num-seqs="):
            value = arg.split("=", 1)[1]
        elif arg == "--max-num-seqs" and i + 1 < len(engine_args):
            value = engine_args[i + 1]
        if value is not None and value.isdigit() and int(value) > 0:
            return int(value)
    return DEFAULT_MAX_NUM_SEQS


def unsimulated(model: Model) -> list[str]:
    """What of ``model``'s spec the simulator does not model, each said as what it does instead
    (the command prints them, so a plan is never read as covering what it left out)."""
    spec = model.spec
    notes = []
    if spec.engine == "external":
        notes.append(
            "engine external is simulated as a hosted API of fixed latency (--external-ttft, "
            "then --external-tpot per token; assumed, not measured), whatever its load, "
            "bounded by the gateway's slots (endpoints × routing.maxInFlightPerReplica or 64)"
        )
    if spec.routing.fallbacks:
        notes.append(
            "routing.fallbacks are not simulated: a request waits for its own deployment "
            "(routing.cost alternatives are)"
        )
    if spec.disaggregation is not None:
        notes.append(
            "spec.disaggregation is not simulated: its replicas prefill and decode together "
            "(the decode pool's size and GPUs), and the prefill pool is left out"
        )
    if spec.routing.prefix_index == "precise":
        notes.append(
            "routing.prefixIndex: precise is simulated as approximate (the prefix policy's own "
            "index of where it sent prompts)"
        )
    return notes
