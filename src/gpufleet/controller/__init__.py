"""The controller: reconciles desired state (store, autoscaler) with observed state (runtime)."""

from gpufleet.controller.autoscaler import (
    Autoscaler,
    Capacity,
    DemandSource,
    ScaleChange,
    prefill_pool,
    prefill_scaling,
)
from gpufleet.controller.capacity import PlannerCapacity, size_emulated
from gpufleet.controller.directory import Directory, ModelEntry
from gpufleet.controller.failures import PassFailures
from gpufleet.controller.plane import ControlPlane
from gpufleet.controller.reconcile import Controller
from gpufleet.controller.rollout import GenerationStats, RolloutStats, judge

__all__ = [
    "Autoscaler",
    "Capacity",
    "ControlPlane",
    "Controller",
    "DemandSource",
    "Directory",
    "GenerationStats",
    "ModelEntry",
    "PassFailures",
    "PlannerCapacity",
    "RolloutStats",
    "ScaleChange",
    "judge",
    "prefill_pool",
    "prefill_scaling",
    "size_emulated",
]
