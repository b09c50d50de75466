"""``ControlPlane``: what the gateway needs from whoever runs the models.

Under ``gpufleet up`` that is the ``Controller`` in the same process; on Kubernetes it is a
view of the cluster (Model resources, engine pods) whose changes go through the API for the
operator to carry out. The gateway cannot tell them apart.
"""

from __future__ import annotations

from typing import Protocol

from gpufleet.controller.autoscaler import DemandSource
from gpufleet.controller.directory import Directory
from gpufleet.runtime import Runtime
from gpufleet.spec import Model
from gpufleet.store import ApplyResult, Store

__all__ = ["ControlPlane"]


class ControlPlane(Protocol):
    directory: Directory
    runtime: Runtime
    store: Store

    async def apply(self, models: list[Model]) -> list[tuple[str, ApplyResult, int]]: ...

    async def delete(self, name: str) -> bool: ...

    async def wake(self, name: str) -> None:
        """A request waits for ``name``, which has no ready replica: make one come."""

    def unhealthy(self) -> list[str]:
        """Critical background loops that are down (the gateway is not ready meanwhile)."""

    def attach_demand(self, source: DemandSource) -> None:
        """The gateway's demand, for the autoscaler (in process, or published for it)."""
