"""The controller: reconciles desired state (store) with observed state (runtime)."""

from gpufleet.controller.directory import Directory, ModelEntry
from gpufleet.controller.reconcile import Controller

__all__ = ["Controller", "Directory", "ModelEntry"]
