"""Runtimes run engine replicas: ``local`` (child processes) now, ``kubernetes`` next."""

from gpufleet.runtime.base import Capabilities, Phase, Replica, ReplicaRequest, Role, Runtime

__all__ = ["Capabilities", "Phase", "Replica", "ReplicaRequest", "Role", "Runtime"]
