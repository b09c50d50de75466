"""From a Model spec (and its architecture) to the planner's ``Deployment``.

Memory per GPU at each tensor-parallel degree comes from ``gpufleet.sizing``: weights / TP +
KV cache for ``kv_sequences`` full-context sequences + the engine's overhead. Four sequences is
the floor a replica must hold to be worth running; the engine uses whatever share of the GPU the
plan gives it beyond that for more. ``resources.memory`` overrides the estimate;
``resources.gpus`` fixes the degree, otherwise every valid degree is offered and the planner
picks the smallest that fits (automatic tensor parallelism).
"""

from __future__ import annotations

from collections.abc import Mapping

from gpufleet.errors import SpecError
from gpufleet.hardware import normalise_gpu_name
from gpufleet.planner.model import DEFAULT_PRIORITIES, Deployment
from gpufleet.sizing import ModelArch, estimate_memory, valid_tp_degrees
from gpufleet.spec import Model

__all__ = ["deployment_for"]


def deployment_for(
    model: Model,
    arch: ModelArch | None,
    *,
    kv_sequences: int = 4,
    priorities: Mapping[str, int] = DEFAULT_PRIORITIES,
    max_tp: int = 8,
) -> Deployment:
    spec = model.spec
    if spec.priority_class not in priorities:
        known = ", ".join(priorities)
        raise SpecError(
            [
                f"{model.name}: spec.priorityClass {spec.priority_class!r} is not known (known: {known})"
            ]
        )
    gpus = spec.resources.gpus
    cpu = gpus == 0 and spec.engine == "llamacpp"
    if spec.resources.memory is None and arch is None:
        raise SpecError(
            [
                f"{model.name}: cannot size {spec.source} without its config here; "
                "set spec.resources.memory or point spec.source at a local config.json/GGUF"
            ]
        )
    if cpu:
        degrees = [0]
    elif gpus:
        degrees = [gpus]
    else:
        assert arch is not None or spec.resources.memory is not None
        degrees = valid_tp_degrees(arch, max_tp) if arch is not None else [1]
    memory: dict[int, int] = {}
    for tp in degrees:
        if spec.resources.memory is not None:
            memory[tp] = spec.resources.memory // max(1, tp)
        else:
            assert arch is not None
            engine = "llamacpp" if tp == 0 else spec.engine
            est = estimate_memory(
                arch,
                context=spec.context_length,
                concurrency=kv_sequences,
                tp=max(1, tp),
                engine=engine,
            )
            memory[tp] = est.total if tp == 0 else est.total_per_gpu
    types = tuple(normalise_gpu_name(t) or t for t in spec.resources.gpu_types)
    return Deployment(
        name=model.name,
        replicas=max(spec.replicas.min, 1),
        memory_per_gpu=memory,
        priority=priorities[spec.priority_class],
        priority_class=spec.priority_class,
        gpu_types=types,
        sharing=spec.placement.sharing,
        spread=spec.placement.spread,
    )
