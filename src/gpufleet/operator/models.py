"""Model resources mirrored into the controller, and what surrounds their engines.

``kubectl apply`` of a Model is ``gpufleet apply``: each pass lists the namespace's Models,
hands the valid ones to the controller, and keeps a Service and (for models that may run more
than one replica, a disaggregated model's prefill replicas counted) a PodDisruptionBudget per
model; loader Jobs whose weights no model uses any
more are removed. A spec gpufleet refuses (a rule the CRD's schema could not express) is
reported on the Model and changes nothing: the controller keeps running the last good
generation, and its Service and budget stay. A Model that is gone is deleted from the
controller, which stops its replicas. Status goes back once per pass, only where it changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gpufleet.controller import Controller
from gpufleet.errors import SpecError
from gpufleet.operator.objects import MANAGED, ensure
from gpufleet.operator.status import model_status
from gpufleet.runtime.kubernetes.api import KubeApi
from gpufleet.runtime.kubernetes.common import LABEL_COMPONENT, LABEL_MODEL, RenderSettings
from gpufleet.runtime.kubernetes.loader import loader_name
from gpufleet.runtime.kubernetes.manifests import model_disruption_budget, model_service
from gpufleet.runtime.kubernetes.resources import model_from_resource
from gpufleet.spec import API_VERSION, Metadata, Model

__all__ = ["WAKE_ANNOTATION", "ModelMirror"]

#: Set by a gateway (gpufleet.cluster) on a Model it holds a request for.
WAKE_ANNOTATION = "gpufleet.io/wake-at"

log = logging.getLogger("gpufleet.operator")


class ModelMirror:
    def __init__(
        self,
        api: KubeApi,
        controller: Controller,
        settings: RenderSettings,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.api = api
        self.controller = controller
        self.settings = settings
        self.namespace = settings.namespace
        self.clock = clock
        self._generations: dict[str, int] = {}
        self._invalid: dict[str, str] = {}
        self._woken: dict[str, str] = {}
        self._present: set[str] = set()
        #: Writes made by the last pass (a steady fleet makes none).
        self.writes = 0

    async def sync(self) -> None:
        resources = await self.api.list("Model", self.namespace)
        self.writes = 0
        await self._mirror(resources)
        await self._children()
        await self._publish(resources)

    async def _mirror(self, resources: list[dict[str, Any]]) -> None:
        wanted: list[Model] = []
        self._invalid.clear()
        for obj in resources:
            name = obj["metadata"]["name"]
            generation = int(obj["metadata"].get("generation", 1))
            try:
                model = model_from_resource(obj)
            except SpecError as exc:
                self._invalid[name] = "; ".join(exc.problems)
                self._generations[name] = generation
                continue
            self._generations[name] = generation
            wanted.append(model)
        if wanted:
            await self.controller.apply(wanted)
        for obj in resources:
            # A gateway holding a request for a model with no ready replica stamps it.
            stamp = (obj["metadata"].get("annotations") or {}).get(WAKE_ANNOTATION)
            name = obj["metadata"]["name"]
            if stamp and stamp != self._woken.get(name) and name not in self._invalid:
                self._woken[name] = stamp
                await self.controller.wake(name)
        present = {o["metadata"]["name"] for o in resources}
        self._present = present
        for entry in self.controller.directory.entries():
            if entry.name not in present:
                await self.controller.delete(entry.name)
                self._generations.pop(entry.name, None)

    def _running(self) -> list[Model]:
        """The models whose engines the controller runs and that are still declared (an invalid
        one: its last good spec); an external model runs none."""
        return [
            Model(
                api_version=API_VERSION,
                metadata=Metadata(name=e.name, namespace=self.namespace),
                spec=e.spec,
            )
            for e in self.controller.directory.entries()
            if e.name in self._present and e.spec.engine != "external"  # no pods, no weights
        ]

    async def _children(self) -> None:
        """A Service in front of each model's engines, a disruption budget when it may run
        more than one replica, and no loader Job that no model needs."""
        running = self._running()
        fronts: dict[tuple[str, str, str], dict[str, Any]] = {}
        for model in running:
            children = [model_service(model, self.settings)]
            if _most_replicas(model) > 1:
                children.append(model_disruption_budget(model, self.settings))
            for child in children:
                fronts[(child["kind"], self.namespace, child["metadata"]["name"])] = child
        self.writes += await ensure(
            self.api, fronts, ("Service", "PodDisruptionBudget"), self.namespace, LABEL_MODEL
        )
        needed = {loader_name(m) for m in running if m.spec.parsed_source.scheme != "pvc"}
        loaders = await self.api.list("Job", self.namespace, {**MANAGED, LABEL_COMPONENT: "loader"})
        for job in loaders:
            meta = job["metadata"]
            if meta["name"] not in needed and not meta.get("deletionTimestamp"):
                log.info("removing loader Job %s: no model uses its weights", meta["name"])
                self.writes += 1
                await self.api.delete("Job", self.namespace, meta["name"])

    async def _publish(self, resources: list[dict[str, Any]]) -> None:
        now = self.clock()
        autoscaler = self.controller.autoscaler
        for obj in resources:
            name = obj["metadata"]["name"]
            previous = obj.get("status") or {}
            status = model_status(
                self.controller.directory.get(name),
                name=name,
                observed_generation=self._generations.get(name, 1),
                unschedulable=autoscaler.unschedulable.get(name, ""),
                previous=previous,
                now=now,
                invalid=self._invalid.get(name, ""),
            )
            if status != previous:
                self.writes += 1
                gone = {k: None for k in previous if k not in status}  # a merge patch removes
                await self.api.patch_status("Model", self.namespace, name, {**status, **gone})


def _most_replicas(model: Model) -> int:
    """The most engine replicas a model may run: its own, and its prefill pool's."""
    most = model.spec.replicas.max
    if model.spec.disaggregation is not None:
        most += model.spec.disaggregation.prefill.bounds[1]
    return most
