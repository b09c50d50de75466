"""``KubernetesRuntime``: engine replicas as pods, driven by the same controller as locally.

One pod per replica — created from the pod spec ``render`` writes — so the controller keeps
what it does everywhere: start and stop single replicas, drain one before it goes, run a
canary beside the stable generation, replace in place. The kubelet restarts crashed
containers; this runtime reports what the pods say:

- Ready condition true → ``Ready`` (URL = pod IP, an IPv6 one in brackets, and engine port;
  for a pod whose engine container names the ``kv-events`` and ``kv-replay`` ports — a
  ``routing.prefixIndex: precise`` model's — its KV-event endpoints ``tcp://<pod IP>:<port>``
  too, which the gateway subscribes to); ready before, not now → ``Unready`` (no traffic);
- a container waiting in ``CrashLoopBackOff`` → ``BackOff`` with its message and restarts;
- not schedulable → ``Starting`` with the scheduler's reason;
- terminating (``deletionTimestamp`` set: deleted with a grace period, evicted, its node
  drained) → ``Stopping`` at once, no URL: a terminating pod gets no new request, although the
  kubelet may keep it Ready until its containers stop;
- deleted by someone else (a node gone, an eviction) or ``Failed`` → ``Stopped``, and the
  controller starts a replacement.

Each replica carries its start-up figures as the pod's status gives them (``startup``): the
weights' wait in the init container, the engine container's start to Ready, the whole.

Pods carry their model and generation as labels, so an operator that restarts adopts the pods
it finds instead of starting them again.

An ``engine: external`` model runs no pod: one replica stands for each of its endpoints, probed
(``runtime.external``) with the key its ``secretKeyRef`` names (``SecretKeys``; kept trying
while the Secret is missing or not readable, since it may come at any time). The operator's
replicas say whether the endpoints answer (its Model status); each gateway runs its own, which
carry the key it sends (``cluster.ClusterPlane``).

A disaggregated model's replicas are two sets of pods: its prefill pool's and its decode pool's
(the model's replicas), each started from its pool's spec (``ReplicaRequest.spec``) and
labelled with its role (``gpufleet.io/role``). The label is what a restarted operator, and a
gateway reading the pods, learn a replica's role from; a prefill replica's id also says it
(``<model>-prefill-g<generation>-…``), as under ``gpufleet up``.

The pod watch runs supervised (``gpufleet.supervise``): after an error it starts again from a
fresh list, and replicas whose pods went meanwhile are reported stopped.

A replica the placer (the operator's planner) puts across nodes — tensor parallel within each,
pipeline parallel across them — is a LeaderWorkerSet of one group, its leader and workers
pinned to the planned nodes, its leader's pod speaking for it. The placement (JSON) is kept on
the pod, or on the LeaderWorkerSet, so the next plans — and an operator adopting them after a
restart — count the GPUs they hold. LeaderWorkerSet is optional: without its CRD the runtime
runs every model that fits a node and refuses, with the way to install it, those that do not.
Logs come from the pods/log API (a multi-node replica's: its leader's). Closing the runtime
stops watching; the pods outlive the operator (unlike ``gpufleet up``'s child processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from gpufleet.errors import PermanentError
from gpufleet.runtime.base import Capabilities, Phase, Replica, ReplicaFeed, ReplicaRequest, Role
from gpufleet.runtime.external import ExternalEndpoints
from gpufleet.runtime.kubernetes.api import KubeApi, KubeError, NotServed, WatchEvent
from gpufleet.runtime.kubernetes.common import KV_EVENTS_PORT_NAME, KV_REPLAY_PORT_NAME
from gpufleet.runtime.kubernetes.manifests import (
    LABEL_COMPONENT,
    LABEL_MODEL,
    LABEL_ROLE,
    LWS_INDEX,
    MANAGED,
    EngineGroup,
    RenderError,
    RenderSettings,
    check,
    engine_pod,
    leader_worker_set,
    loader_job,
    role_labels,
)
from gpufleet.runtime.kubernetes.secret_keys import SecretKeys
from gpufleet.runtime.kubernetes.startup import pod_startup
from gpufleet.spec import API_VERSION, Metadata, Model
from gpufleet.supervise import Supervisor

__all__ = [
    "LABEL_GENERATION",
    "LABEL_PLACEMENT",
    "LABEL_REPLICA",
    "LWS_INSTALL",
    "KubernetesRuntime",
]

log = logging.getLogger("gpufleet.runtime.kubernetes")

LABEL_GENERATION = "gpufleet.io/generation"
#: Annotation: where the planner put the replica (JSON of its Placement).
LABEL_PLACEMENT = "gpufleet.io/placement"
#: On the pods of a multi-node replica: the LeaderWorkerSet (= replica) they belong to.
LABEL_REPLICA = "gpufleet.io/replica"
_SELECTOR = {"app.kubernetes.io/managed-by": "gpufleet", LABEL_COMPONENT: "engine"}
_WATCH = "kubernetes:watch-pods"
#: How to install the LeaderWorkerSet controller and CRD (https://lws.sigs.k8s.io/docs/installation/).
LWS_INSTALL = (
    "kubectl apply --server-side -f "
    "https://github.com/kubernetes-sigs/lws/releases/download/v0.7.0/manifests.yaml"
)


class KubernetesRuntime:
    capabilities = Capabilities(mig=True)

    def __init__(
        self,
        api: KubeApi,
        settings: RenderSettings | None = None,
        *,
        place: Callable[[ReplicaRequest], EngineGroup] | None = None,
        engine_port: int | None = None,
        loops: Supervisor | None = None,
        engine_key: str | None = None,
    ) -> None:
        self.api = api
        #: The key engine pods answer to (their Secret's), carried by every replica for the
        #: gateway; None where nobody calls the engines (the operator).
        self._engine_key = engine_key
        settings = settings or RenderSettings()
        if engine_port is not None and engine_port != settings.engine_port:
            # Kept for callers that still pass it: the port lives in the settings, which the
            # pods' arguments, probes and Services follow too.
            settings = dataclasses.replace(settings, engine_port=engine_port)
        self.settings = settings
        self.namespace = self.settings.namespace
        #: Where a new replica goes (the planner's choice); default: the model's GPUs anywhere.
        self._place = place or (lambda r: EngineGroup("main", 1, gpus=r.spec.resources.gpus))
        self._replicas: dict[str, Replica] = {}
        #: Replicas that are LeaderWorkerSets (multi-node), by name.
        self._groups: set[str] = set()
        self._placements: dict[str, str] = {}
        self._feed = ReplicaFeed()
        #: The pod watch's supervisor (tests inject one with a fast clock).
        self._loops = loops or Supervisor()
        #: Whether the cluster serves LeaderWorkerSet (known after ``start_watching``).
        self.lws_served = False
        #: ``engine: external`` models' replicas: endpoints probed, no pod.
        self.external = ExternalEndpoints(
            self._feed.publish, keys=SecretKeys(api, self.namespace), keep_trying=True
        )

    def set_placer(self, place: Callable[[ReplicaRequest], EngineGroup]) -> None:
        """Where new replicas go from now on (the operator's planner)."""
        self._place = place

    async def start_watching(self) -> None:
        """Adopt the pods (and multi-node groups) already there, then follow every change.
        Fails if the first list fails (a process that cannot see its pods says so at once)."""
        self.lws_served = await self.api.served("LeaderWorkerSet")
        if self.lws_served:
            for group in await self.api.list("LeaderWorkerSet", self.namespace, _SELECTOR):
                self._groups.add(group["metadata"]["name"])
                self._observe({"metadata": group["metadata"], "status": {}})
        else:
            log.warning(
                "LeaderWorkerSet is not installed: models bigger than one node cannot run "
                "(install it: %s)",
                LWS_INSTALL,
            )
        synced = asyncio.Event()
        loop = self._loops.spawn(_WATCH, lambda: self._watch(synced))
        try:
            await loop.wait(synced)
        except BaseException:
            await self._loops.close()
            raise

    def unhealthy(self) -> list[str]:
        """The runtime's background loops that are down (readiness fails on them)."""
        return self._loops.unhealthy()

    async def close(self) -> None:
        await self.external.close()
        await self._loops.close()

    # -- Runtime ----------------------------------------------------------------------------

    async def start(self, request: ReplicaRequest) -> Replica:
        """One replica: a pod where the placer put it, or — when the placer planned it across
        nodes (or, unplanned, it asks for more GPUs than ``gpus_per_node``) — a LeaderWorkerSet
        of one group. The placer raises (``TemporaryError``) rather than leave a group that
        spans nodes unpinned, and nothing is created for a replica refused. A replica of a
        disaggregated model's pool (``request.role``) is labelled with its role."""
        model = Model(
            api_version=API_VERSION,
            metadata=Metadata(name=request.model, namespace=self.namespace),
            spec=request.spec,
        )
        problems = check(model, self.settings)
        if request.role and request.spec.disaggregation is None:
            problems.append(
                f"{request.model}: a {request.role} replica of a model without "
                "spec.disaggregation (only a disaggregated model has pools)"
            )
        if problems:
            raise PermanentError("; ".join(problems))
        if request.spec.engine == "external":
            return await self.external.start(request)
        pool = "prefill-" if request.role == "prefill" else ""
        name = f"{request.model}-{pool}g{request.generation}-{secrets.token_hex(3)}"
        labels = {
            **MANAGED,
            LABEL_MODEL: request.model,
            LABEL_GENERATION: str(request.generation),
            **role_labels(model, request.role),
            LABEL_COMPONENT: "engine",
        }
        group = self._place(request)
        multi_node = group.pp > 1 or (
            group.node is None and request.spec.resources.gpus > self.settings.gpus_per_node
        )
        if multi_node:
            await self._need_lws(request, group)  # before anything is created for it
        if request.spec.parsed_source.scheme != "pvc":
            with contextlib.suppress(FileExistsError):
                await self.api.create(loader_job(model, self.settings))
        metadata: dict[str, Any] = {"name": name, "namespace": self.namespace, "labels": labels}
        if group.placement:
            metadata["annotations"] = {LABEL_PLACEMENT: group.placement}
        if multi_node:
            # Bigger than a node: the replica is a LeaderWorkerSet of one group, served by its
            # leader pod; the placement is kept on the LeaderWorkerSet (adopted from there).
            try:
                lws = leader_worker_set(
                    model, self.settings, group if group.pp > 1 else None, request.role
                )
            except RenderError as exc:
                raise PermanentError("; ".join(exc.problems)) from exc
            lws["metadata"] = metadata
            lws["spec"]["replicas"] = 1
            for role in ("leaderTemplate", "workerTemplate"):
                template = lws["spec"]["leaderWorkerTemplate"][role]
                template["metadata"]["labels"] = {**labels, LABEL_REPLICA: name}
            await self.api.create(lws)
            self._groups.add(name)
        else:
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": metadata,
                "spec": engine_pod(model, group, self.settings, request.role),
            }
            await self.api.create(pod)
        if group.placement:
            self._placements[name] = group.placement
        return self._started(request, name)

    async def _need_lws(self, request: ReplicaRequest, group: EngineGroup) -> None:
        if not self.lws_served:  # asked again: it may have been installed since
            self.lws_served = await self.api.served("LeaderWorkerSet")
        if not self.lws_served:
            shape = f" (TP {group.gpus} × PP {group.pp})" if group.pp > 1 else ""
            raise NotServed(
                "LeaderWorkerSet",
                f"LeaderWorkerSet is not installed in this cluster: {request.model} needs "
                f"{request.spec.resources.gpus} GPUs, more than one node has, and runs as a "
                f"LeaderWorkerSet across nodes{shape}. Install it: {LWS_INSTALL}",
            )

    def _started(self, request: ReplicaRequest, name: str) -> Replica:
        replica = Replica(
            id=name,
            model=request.model,
            generation=request.generation,
            phase=Phase.STARTING,
            started_at=time.time(),
            embeddings=request.spec.embeddings,
            role=request.role,
            api_key=self._engine_key,
        )
        self._set(replica)
        return replica

    async def stop(self, replica_id: str) -> None:
        if self.external.has(replica_id):
            await self.external.stop(replica_id)
            return
        replica = self._replicas.pop(replica_id, None)
        if replica_id in self._groups:
            self._groups.discard(replica_id)
            await self.api.delete("LeaderWorkerSet", self.namespace, replica_id)
        else:
            await self.api.delete("Pod", self.namespace, replica_id)
        if replica is not None:
            self._publish(dataclasses.replace(replica, phase=Phase.STOPPED, url=None))

    def placements(self) -> dict[str, str]:
        """The planner's placement (JSON) of every replica that has one, by replica id."""
        return {rid: p for rid, p in self._placements.items() if rid in self._replicas}

    def replicas(self, model: str | None = None) -> list[Replica]:
        pods = [r for r in self._replicas.values() if model is None or r.model == model]
        return pods + self.external.replicas(model)

    def watch(self) -> AsyncIterator[Replica]:
        return self._feed.watch()

    async def logs(self, replica_id: str, tail: int = 200) -> str:
        """The engine container's last ``tail`` lines (a multi-node replica: its leader's).
        ``KubeError`` when the cluster cannot give them (no kubelet answers, no such pod)."""
        if self.external.has(replica_id):
            raise KubeError(
                f"replica {replica_id} is an external endpoint: it has no log here", 404
            )
        pod = replica_id
        if replica_id in self._groups:
            selector = {LABEL_REPLICA: replica_id, LWS_INDEX: "0"}
            leaders = await self.api.list("Pod", self.namespace, selector)
            if not leaders:
                raise KubeError(f"replica {replica_id} has no leader pod (yet)", 404)
            pod = leaders[0]["metadata"]["name"]
        return await self.api.logs(self.namespace, pod, container="engine", tail=tail)

    # -- pods → replicas --------------------------------------------------------------------

    async def _watch(self, synced: asyncio.Event) -> None:
        """Follow the engine pods. A (re)start lists them first: replicas known before whose
        pods are not in that list went while nobody watched, and are reported stopped."""
        before = {rid for rid in self._replicas if rid not in self._groups}
        seen: set[str] = set()
        done = False  # this run's list is through (``synced`` stays set across restarts)

        def listed() -> None:
            nonlocal done
            done = True
            for rid in before - seen:
                if rid in self._replicas and rid not in self._groups:
                    self._gone(rid, "the pod was deleted while its watch was down")
            synced.set()

        async for event in self.api.watch("Pod", self.namespace, _SELECTOR, synced=listed):
            if not done:
                seen.add(event.object["metadata"]["name"])
            self._on(event)

    def _gone(self, name: str, message: str) -> None:
        replica = self._replicas.pop(name, None)
        if replica is not None:
            self._publish(
                dataclasses.replace(replica, phase=Phase.STOPPED, url=None, message=message)
            )

    def _on(self, event: WatchEvent) -> None:
        labels = event.object["metadata"].get("labels", {}) or {}
        group = labels.get(LABEL_REPLICA)
        if group is not None:
            # A pod of a multi-node replica: its leader speaks for the group.
            if labels.get(LWS_INDEX) != "0" or group not in self._replicas:
                return
            terminating = event.object["metadata"].get("deletionTimestamp")
            if event.type == "DELETED" or terminating:  # the group is being recreated, not gone
                current = self._replicas[group]
                self._set(dataclasses.replace(current, phase=Phase.STARTING, url=None))
                return
            pod = copy.deepcopy(event.object)
            pod["metadata"]["name"] = group
            self._observe(pod)
            return
        name = event.object["metadata"]["name"]
        if event.type == "DELETED":
            self._gone(name, "the pod was deleted (node gone, evicted or removed by hand)")
            return
        if event.object["metadata"].get("deletionTimestamp"):
            # Terminating: no new request goes there, whatever its Ready condition still says.
            # A pod this runtime stopped (or never knew) is not adopted again.
            known = self._replicas.get(name)
            if known is not None and known.phase is not Phase.STOPPING:
                message = "the pod is terminating (deleted, evicted or its node drained)"
                self._set(
                    dataclasses.replace(known, phase=Phase.STOPPING, url=None, message=message)
                )
            return
        self._observe(event.object)

    def _observe(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        labels = meta.get("labels", {})
        name = meta["name"]
        placement = (meta.get("annotations") or {}).get(LABEL_PLACEMENT)
        if placement:
            self._placements[name] = placement
        try:
            generation = int(labels.get(LABEL_GENERATION, "0"))
        except ValueError:
            return
        current = self._replicas.get(name) or Replica(
            id=name,
            model=labels.get(LABEL_MODEL, ""),
            generation=generation,
            phase=Phase.STARTING,
            started_at=time.time(),
            role=_role(labels.get(LABEL_ROLE, "")),
            api_key=self._engine_key,
        )
        status = pod.get("status", {}) or {}
        if status.get("phase") in ("Failed", "Succeeded"):
            self._replicas.pop(name, None)
            message = status.get("message") or status.get("reason") or "the pod ended"
            self._publish(
                dataclasses.replace(current, phase=Phase.STOPPED, url=None, message=message)
            )
            return
        conditions = {c.get("type"): c for c in status.get("conditions", []) or []}
        containers = status.get("containerStatuses", []) or []
        restarts = sum(int(c.get("restartCount", 0)) for c in containers)
        waiting = next(
            (
                c["state"]["waiting"]
                for c in containers
                if (c.get("state") or {}).get("waiting", {}).get("reason") == "CrashLoopBackOff"
            ),
            None,
        )
        ready = conditions.get("Ready", {}).get("status") == "True" and status.get("podIP")
        figures = pod_startup(pod)
        load, total = figures.load_s, figures.startup_s
        if load is None and restarts == current.restarts:  # not Ready now: the start it made
            load, total = current.load_s, current.startup_s
        current = dataclasses.replace(
            current, fetch_s=figures.fetch_s, load_s=load, startup_s=total
        )
        if ready:
            host = _host(status["podIP"])
            ports = _engine_ports(pod)
            events, replay = ports.get(KV_EVENTS_PORT_NAME), ports.get(KV_REPLAY_PORT_NAME)
            replica = dataclasses.replace(
                current,
                phase=Phase.READY,
                url=f"http://{host}:{self.settings.engine_port}",
                kv_events=f"tcp://{host}:{events}" if events is not None else None,
                kv_replay=f"tcp://{host}:{replay}" if replay is not None else None,
                restarts=restarts,
                message="",
                ready_at=figures.ready_at or current.ready_at or time.time(),
            )
        elif waiting is not None:
            replica = dataclasses.replace(
                current,
                phase=Phase.BACKOFF,
                url=None,
                restarts=restarts,
                message=f"CrashLoopBackOff: {waiting.get('message', '')}".strip(),
            )
        elif current.phase is Phase.READY:
            replica = dataclasses.replace(
                current, phase=Phase.UNREADY, url=None, message="readiness probe failing"
            )
        else:
            scheduled = conditions.get("PodScheduled", {})
            message = ""
            if scheduled.get("status") == "False":
                message = f"{scheduled.get('reason', '')}: {scheduled.get('message', '')}"
            replica = dataclasses.replace(current, restarts=restarts, message=message)
        if replica != self._replicas.get(name):
            self._set(replica)

    def _set(self, replica: Replica) -> None:
        self._replicas[replica.id] = replica
        self._publish(replica)

    def _publish(self, replica: Replica) -> None:
        self._feed.publish(replica)


def _host(ip: str) -> str:
    """A pod IP as a URL's host: an IPv6 address in brackets."""
    return f"[{ip}]" if ":" in ip else ip


def _engine_ports(pod: dict[str, Any]) -> dict[str, int]:
    """The engine container's named ports (``pods.engine_pod``'s), by name."""
    containers = (pod.get("spec") or {}).get("containers") or []
    engine: dict[str, Any] = next((c for c in containers if c.get("name") == "engine"), {})
    return {
        p["name"]: int(p["containerPort"])
        for p in engine.get("ports") or []
        if p.get("name") and p.get("containerPort")
    }


def _role(label: str) -> Role:
    """A pod's role label as a replica's role: anything but ``prefill`` serves requests."""
    if label == "prefill":
        return "prefill"
    return "decode" if label == "decode" else ""
