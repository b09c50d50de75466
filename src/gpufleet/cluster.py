"""The gateway on Kubernetes: its ``ControlPlane`` is a view of the cluster.

Model resources give the specs (and, from their status, the replicas the operator wants and
why a model cannot serve); engine pods give the endpoints, read with the same
``KubernetesRuntime`` the operator runs pods with, in read-only use. What the gateway asks of
the control plane goes through the API for the operator to carry out: ``apply`` and ``delete``
write Model resources (the admin API and ``gpufleet apply`` work as with ``gpufleet up``),
``wake`` stamps the Model with ``gpufleet.io/wake-at`` so the operator scales it up from zero
at once, and the gateway's demand is published to Redis for the operator's autoscaler.

The view is followed by supervised loops (``gpufleet.supervise``): a loop that fails starts
again from a fresh list (models deleted meanwhile leave the directory), and ``unhealthy()``
names the loops that are down, for the gateway's readiness. Pods that are terminating are not
routed to: the runtime reports them ``Stopping`` as soon as their ``deletionTimestamp`` is set.

The gateway does not read the GPUs: the operator's leader does (the DCGM exporter), and the
gateway shows what it wrote to the store (``telemetry.StoredReadings``, as ``app.state.telemetry``
and on ``/metrics``).

An ``engine: external`` model has no pods: each gateway probes its endpoints itself, with the
keys it reads from the Secrets their ``secretKeyRef`` names (the chart lets it read exactly
the Secrets listed in ``externalEndpoints.keySecrets``), and routes to those that answer. A
new generation of the Model replaces the replicas; deleting it stops them.

Engines answer only bearers of the engine key (the Secret ``gpufleet-engine-key``, which the
operator creates): the gateway reads it from ``GPUFLEET_ENGINE_KEY`` (the chart mounts it there)
and sends it to every engine pod; NetworkPolicies stay as the second wall.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpufleet import heap
from gpufleet.controller import DemandSource, Directory
from gpufleet.controller.startup import StartupRecorder
from gpufleet.engines.base import ENGINE_KEY_ENV
from gpufleet.errors import PermanentError, SpecError
from gpufleet.gateway.shared_demand import DemandPublisher, demand_names
from gpufleet.outages import OutageReporter
from gpufleet.runtime import ReplicaRequest, Runtime
from gpufleet.runtime.kubernetes import KubernetesRuntime, RenderSettings
from gpufleet.runtime.kubernetes.api import Conflict, KubeApi
from gpufleet.runtime.kubernetes.manifests import PORT
from gpufleet.runtime.kubernetes.resources import model_from_resource
from gpufleet.spec import API_VERSION, Inventory, Model, ModelSpec
from gpufleet.store import ApplyResult, Store
from gpufleet.supervise import Supervisor

__all__ = ["WAKE_ANNOTATION", "ClusterPlane", "GatewayConfig", "serve_cluster_gateway"]

log = logging.getLogger("gpufleet.cluster")

WAKE_ANNOTATION = "gpufleet.io/wake-at"


class ClusterPlane:
    def __init__(
        self,
        api: KubeApi,
        store: Store,
        namespace: str,
        *,
        gateway_id: str,
        redis_url: str | None = None,
        engine_port: int = PORT,
        loops: Supervisor | None = None,
        engine_key: str | None = None,
    ) -> None:
        self.api = api
        self.store = store
        self.namespace = namespace
        self.gateway_id = gateway_id
        self.redis_url = redis_url
        self.directory = Directory()
        self.pods = KubernetesRuntime(
            api,
            RenderSettings(namespace=namespace, engine_port=engine_port),
            engine_port=engine_port,
            engine_key=engine_key,
        )
        #: For the admin API's replica listings (the gateway never starts or stops pods).
        self.runtime: Runtime = self.pods
        #: The view's loops (tests inject a supervisor with a fast clock).
        self._loops = loops or Supervisor()
        self._publisher: DemandPublisher | None = None
        #: Where the demand publisher's Redis outages are reported (``share_outages``).
        self._outages: OutageReporter | None = None
        #: Engine pods' start-ups, counted on this gateway's /metrics (the operator serves
        #: none; ``controller.startup``).
        self.startups = StartupRecorder()
        #: External models followed, by name: the generation whose endpoints are probed.
        self._external: dict[str, int] = {}
        self._external_changes: asyncio.Queue[tuple[str, int, ModelSpec | None]] = asyncio.Queue()

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the models and the engine pods, then follow them. Fails if the first read
        fails (the gateway cannot serve a cluster it cannot see)."""
        synced = asyncio.Event()
        try:
            await self._loops.spawn("cluster:models", lambda: self._follow_models(synced)).wait(
                synced
            )
            await self.pods.start_watching()
        except BaseException:
            await self._loops.close()
            raise
        self._loops.spawn("cluster:pods", self._follow_pods)
        self._loops.spawn("cluster:external", self._follow_external)

    def inventory(self) -> Inventory | None:
        """The nodes' inventory as the operator last shared it (the gateway may not list
        nodes itself); None until an operator has. Reads the store: call it off the loop."""
        return self.store.get_inventory(self.namespace)

    def share_outages(self, outages: OutageReporter) -> None:
        """Report the demand publisher's Redis outages with the gateway's: one outage of
        Redis, whichever part meets it, and ``gpufleet_dependency_up`` on its /metrics."""
        self._outages = outages
        if self._publisher is not None:
            self._publisher.outages = outages

    def unhealthy(self) -> list[str]:
        """The background loops of this view that are down: the gateway is not ready."""
        return sorted([*self._loops.unhealthy(), *self.pods.unhealthy()])

    async def close(self) -> None:
        await self._loops.close()
        if self._publisher is not None:
            await self._publisher.close()
        await self.pods.close()

    async def _follow_models(self, synced: asyncio.Event) -> None:
        """Model resources → the directory. A (re)start lists them first: models the directory
        had that are not in that list were deleted while nobody watched."""
        before = {entry.name for entry in self.directory.entries()}
        seen: set[str] = set()
        done = False  # this run's list is through (``synced`` stays set across restarts)

        def listed() -> None:
            nonlocal done
            done = True
            for name in before - seen:
                self.directory.remove(name)
                self._external_change(name, 0, None)
            synced.set()

        async for event in self.api.watch("Model", self.namespace, synced=listed):
            name = event.object["metadata"]["name"]
            if not done:
                seen.add(name)
            if event.type == "DELETED":
                self.directory.remove(name)
                self._external_change(name, 0, None)
            else:
                self._model(event.object)

    async def _follow_pods(self) -> None:
        stream = self.pods.watch()
        # What the runtime knows now, then its changes: the feed subscribes on the first
        # iteration, with no await in between, so nothing falls into a gap.
        for replica in self.pods.replicas():
            self.directory.observe(replica)
            self.startups.observe(replica)
        async for replica in stream:
            self.directory.observe(replica)
            self.startups.observe(replica)

    def _external_change(self, name: str, generation: int, spec: ModelSpec | None) -> None:
        """Queue a change of what this gateway probes for ``name``: a generation's endpoints
        (``spec``), or none (``None``: deleted, or no longer external)."""
        if spec is None and name not in self._external:
            return
        if spec is not None and self._external.get(name) == generation:
            return
        if spec is None:
            self._external.pop(name, None)
        else:
            self._external[name] = generation
        self._external_changes.put_nowait((name, generation, spec))

    async def _follow_external(self) -> None:
        """External models' endpoints: a generation's replicas started (one per endpoint),
        then the older ones stopped; all of them when the model goes."""
        endpoints = self.pods.external
        while True:
            name, generation, spec = await self._external_changes.get()
            old = [r.id for r in endpoints.replicas(name) if r.generation != generation]
            if spec is not None:
                have = {r.id for r in endpoints.replicas(name) if r.generation == generation}
                for _ in range(len(spec.endpoints) - len(have)):
                    await endpoints.start(ReplicaRequest(name, generation, spec))
            else:
                old = [r.id for r in endpoints.replicas(name)]
            for rid in old:
                await endpoints.stop(rid)

    def _model(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        try:
            model = model_from_resource(obj)
        except SpecError:
            return  # the operator reports it in the Model's status
        created = meta.get("creationTimestamp")
        when = (
            int(dt.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())
            if isinstance(created, str)
            else 0
        )
        name, generation = model.name, int(meta.get("generation", 1))
        self.directory.put_spec(name, generation, model.spec, when)
        status = obj.get("status") or {}
        desired = status.get("desiredReplicas")
        if model.spec.engine == "external":
            desired = len(model.spec.endpoints)  # one replica per endpoint, operator or not
        self.directory.set_desired(
            name, int(desired) if desired is not None else model.spec.replicas.min
        )
        self._external_change(
            name, generation, model.spec if model.spec.engine == "external" else None
        )
        self.directory.set_problem(name, *_problem(status))
        canary = status.get("canary") or {}
        if canary.get("generation") and canary.get("percent"):
            split = (int(canary["generation"]), int(canary["percent"]))
            self.directory.set_rollout(name, split, f"canary generation {split[0]} at {split[1]} %")
        else:
            self.directory.set_rollout(name, None, "")

    # -- ControlPlane -----------------------------------------------------------------------

    async def apply(self, models: list[Model]) -> list[tuple[str, ApplyResult, int]]:
        results: list[tuple[str, ApplyResult, int]] = []
        for model in models:
            spec = model.document()["spec"]
            existing = await self.api.get("Model", self.namespace, model.name)
            if existing is None:
                created = await self.api.create(
                    {
                        "apiVersion": API_VERSION,
                        "kind": "Model",
                        "metadata": {
                            "name": model.name,
                            "namespace": self.namespace,
                            "labels": dict(model.metadata.labels),
                        },
                        "spec": spec,
                    }
                )
                results.append((model.name, "created", int(created["metadata"]["generation"])))
                continue
            if existing.get("spec") == spec:
                results.append(
                    (model.name, "unchanged", int(existing["metadata"].get("generation", 1)))
                )
                continue
            existing["spec"] = spec
            replaced = await self.api.replace(existing)
            results.append(
                (model.name, "configured", int(replaced["metadata"].get("generation", 1)))
            )
        return results

    async def delete(self, name: str) -> bool:
        if await self.api.get("Model", self.namespace, name) is None:
            return False
        await self.api.delete("Model", self.namespace, name)
        return True

    async def wake(self, name: str) -> None:
        for _ in range(3):
            obj = await self.api.get("Model", self.namespace, name)
            if obj is None:
                return
            annotations = obj["metadata"].setdefault("annotations", {}) or {}
            annotations[WAKE_ANNOTATION] = dt.datetime.now(dt.UTC).isoformat()
            obj["metadata"]["annotations"] = annotations
            try:
                await self.api.replace(obj)
                return
            except Conflict:
                continue

    def attach_demand(self, source: DemandSource) -> None:
        if self.redis_url is None or self._publisher is not None:
            return
        directory = self.directory
        self._publisher = DemandPublisher(
            self.redis_url,
            self.gateway_id,
            source.sample,
            lambda: demand_names(directory.entries()),
            # Canaries' answers by generation, for the operator's verdict.
            canaries=lambda: [
                (e.name, e.canary[0]) for e in directory.entries() if e.canary is not None
            ],
            generation_stats=getattr(source, "generation_stats", None),
            outages=self._outages,
        )
        self._publisher.start()


@dataclass(frozen=True)
class GatewayConfig:
    namespace: str
    store_url: str
    redis_url: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    #: Where engines listen in their pods (the operator's ``--engine-port``).
    engine_port: int = PORT
    #: The ledger's spool: a volume of the pod's own (the chart's emptyDir survives a
    #: container restart, not the pod's deletion). None: rows wait in memory only.
    ledger_spool: Path | None = None


async def serve_cluster_gateway(cfg: GatewayConfig, api: KubeApi) -> None:
    """One gateway replica: keys, quotas (shared through Redis), ledger, the cluster's view."""
    from gpufleet.gateway import GatewaySettings, assemble
    from gpufleet.gateway.serving import bind_socket, gateway_server, raise_open_files_limit
    from gpufleet.telemetry import StoredReadings

    raise_open_files_limit()
    engine_key = os.environ.get(ENGINE_KEY_ENV) or None
    if engine_key is None:
        log.warning(
            "%s is not set: engines refuse a gateway without their key (mount the Secret "
            "gpufleet-engine-key, key 'key', as the Helm chart does)",
            ENGINE_KEY_ENV,
        )
    sock = bind_socket(cfg.host, cfg.port)
    store = await asyncio.to_thread(Store.open, cfg.store_url)
    plane = ClusterPlane(
        api,
        store,
        cfg.namespace,
        gateway_id=f"gw-{secrets.token_hex(4)}",
        redis_url=cfg.redis_url,
        engine_port=cfg.engine_port,
        engine_key=engine_key,
    )
    stack = assemble(plane, GatewaySettings(redis_url=cfg.redis_url), ledger_spool=cfg.ledger_spool)
    plane.share_outages(stack.gateway.outages)
    try:
        admin = await asyncio.to_thread(
            stack.keyring.bootstrap_admin, os.environ.get("GPUFLEET_ADMIN_KEY")
        )
    except ValueError as exc:  # a malformed GPUFLEET_ADMIN_KEY: said as gpufleet up says it
        await stack.close()
        await plane.close()
        store.close()
        sock.close()
        raise PermanentError(str(exc)) from exc
    if admin:
        # Printed once, by the first gateway to start against an empty store.
        log.warning("gpufleet admin key (shown once, keep it): %s", admin)
    # Gateways do not sample the GPUs: they show what the operator's leader wrote.
    gpus = StoredReadings(store, registry=stack.gateway.metrics.registry)
    stack.app.state.telemetry = gpus
    server = gateway_server(stack.app, stack.gateway.settings, stack.gateway.metrics)
    try:
        await plane.start()
        await stack.start()
        await gpus.start()
        heap.settle()  # start-up's objects out of the collector's way (gen2 pauses: the p99)
        log.info("gateway serving namespace %s on %s:%d", cfg.namespace, cfg.host, cfg.port)
        await server.serve(sockets=[sock])
    finally:
        await gpus.close()
        await stack.close()
        await plane.close()
        store.close()
        sock.close()


#: A Model's Ready reason (written by the operator) → the kind of problem the directory
#: reports (``gpufleet get models``' STATUS and PROBLEM, and the gateway's answers).
_PROBLEM_KINDS = {
    "InvalidSpec": "Failed",
    "Failed": "Failed",
    "Unschedulable": "Unschedulable",
    "OffSchedule": "OffSchedule",
}


def _problem(status: Mapping[str, Any]) -> tuple[str, str]:
    """What stops the model serving, as the operator reported it: (message, kind)."""
    conditions = {c.get("type"): c for c in status.get("conditions", []) or []}
    ready = conditions.get("Ready", {})
    kind = _PROBLEM_KINDS.get(str(ready.get("reason", "")))
    if kind is None or (ready.get("status") == "True" and kind != "OffSchedule"):
        return "", "Failed"
    return str(ready.get("message", "")), kind
