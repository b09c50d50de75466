"""The controller: reconciles desired state (store, autoscaler) with observed state (runtime)."""

from gpufleet.controller.autoscaler import Autoscaler, Capacity, DemandSource, ScaleChange
from gpufleet.controller.capacity import PlannerCapacity
from gpufleet.controller.directory import Directory, ModelEntry
from gpufleet.controller.reconcile import Controller

__all__ = [
    "Autoscaler",
    "Capacity",
    "Controller",
    "DemandSource",
    "Directory",
    "ModelEntry",
    "PlannerCapacity",
    "ScaleChange",
]
