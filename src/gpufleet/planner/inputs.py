"""From a Model spec (and its architecture) to the planner's ``Deployment``.

Memory per GPU at each tensor-parallel degree comes from ``gpufleet.sizing``: weights / TP +
KV cache for ``kv_sequences`` full-context sequences + the engine's overhead. Four sequences is
the floor a replica must hold to be worth running; the engine uses whatever share of the GPU the
plan gives it beyond that for more. ``resources.memory`` overrides the estimate;
``resources.gpus`` fixes the degree, otherwise every valid degree is offered and the planner
picks the smallest that fits (automatic tensor parallelism).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from gpufleet.errors import SpecError
from gpufleet.hardware import CATALOG, Accelerator, normalise_gpu_name
from gpufleet.planner.model import DEFAULT_PRIORITIES, Deployment
from gpufleet.sizing import ModelArch, estimate_memory, valid_tp_degrees
from gpufleet.spec import Model

__all__ = ["PREFILL_POOL_SUFFIX", "deployment_for", "pool_deployments", "pool_preference"]

#: The planner's name for a disaggregated model's prefill pool: ``<model>:prefill`` (a name no
#: model can have, so it never meets one).
PREFILL_POOL_SUFFIX = ":prefill"


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


def pool_preference(
    gpu_types: tuple[str, ...],
    role: Literal["prefill", "decode"],
    catalog: Mapping[str, Accelerator] = CATALOG,
) -> tuple[str, ...]:
    """A disaggregated pool's accepted GPU types, best value first. Prefill is compute-bound:
    bf16 FLOP/s per dollar. Decode is memory-bound: bandwidth per dollar, then memory (KV room)
    per dollar. Types the catalog does not price keep their order, after the others."""

    def value(name: str) -> tuple[float, float]:
        gpu = catalog.get(name)
        if gpu is None or gpu.price_per_hour <= 0:
            return (0.0, 0.0)
        price = gpu.price_per_hour
        if role == "prefill":
            return (gpu.bf16_flops / price, 0.0)
        return (gpu.bandwidth_bytes_per_s / price, gpu.memory_bytes / price)

    return tuple(sorted(gpu_types, key=lambda t: tuple(-v for v in value(t))))


def pool_deployments(
    model: Model, arch: ModelArch | None, *, kv_sequences: int = 4
) -> list[Deployment]:
    """The deployments a model asks the planner for: itself, or — disaggregated — its decode
    pool (its replicas, under its own name) and its prefill pool (``<name>:prefill``), each
    sized from its pool's spec and preferring the GPU types that suit its phase."""
    spec = model.spec
    if spec.disaggregation is None:
        return [deployment_for(model, arch, kv_sequences=kv_sequences)]
    pools = []
    for role in ("decode", "prefill"):
        pooled = model.model_copy(update={"spec": spec.pool(role)})
        dep = deployment_for(pooled, arch, kv_sequences=kv_sequences)
        dep = dataclasses.replace(dep, gpu_types=pool_preference(dep.gpu_types, role))
        if role == "prefill":
            count = spec.disaggregation.prefill.replicas
            if not count:
                continue
            dep = dataclasses.replace(dep, name=model.name + PREFILL_POOL_SUFFIX, replicas=count)
        pools.append(dep)
    return pools
