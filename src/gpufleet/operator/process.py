"""The operator process, wired in one place: store, leadership, and — only while it leads —
the pod runtime, the controller, the planner's bound and the mirrors.

A stand-by operator holds nothing but its store connection: it neither watches pods nor
reconciles, so two replicas of the operator never both create pods. When it wins the Lease it
adopts the pods it finds (labels say their model and generation), makes the engine key's
Secret if it is missing, starts the controller and the GPU jobs' scheduler (adopting the
``batch/v1`` Jobs of attempts a previous leader left running), and runs a pass every
``interval_s``: tenants, then models, then GpuJobs, then status. Given a DCGM exporter's URL, the leader also reads the GPUs and
writes their history to the store, where the gateways read it.

While the API server, the store or Redis is away, each is one outage, reported once by the
controller's ``OutageReporter`` (``controller.failures``) — for the controller's passes, the
leader's pass, the node inventory and the shared demand alike — not a traceback a pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from gpufleet.controller import Autoscaler, Controller, PlannerCapacity
from gpufleet.controller.jobs import JobScheduler
from gpufleet.gateway.shared_demand import RedisDemand, demand_names
from gpufleet.operator.engine_key import ensure_engine_key
from gpufleet.operator.jobs import JobMirror
from gpufleet.operator.leadership import LeaderElection, Leadership
from gpufleet.operator.models import ModelMirror
from gpufleet.operator.placement import CLUSTER_PLANNING, ClusterPlacer, running_placements
from gpufleet.operator.tenants import TenantMirror
from gpufleet.runtime.kubernetes import KubernetesRuntime, RenderSettings, inventory_from_nodes
from gpufleet.runtime.kubernetes.api import KubeApi
from gpufleet.runtime.kubernetes.jobs import CheckpointVolume, KubernetesJobRunner
from gpufleet.spec import Inventory
from gpufleet.store import Store
from gpufleet.telemetry import dcgm_telemetry

__all__ = ["Operator", "OperatorConfig", "acting", "run_operator"]

log = logging.getLogger("gpufleet.operator")


class Operator:
    """The leader's pass: tenants, models, status. ``election``: when given, each ``step``
    first takes or renews the lease and does nothing without it."""

    def __init__(
        self,
        api: KubeApi,
        controller: Controller,
        namespace: str,
        election: LeaderElection | None = None,
        *,
        settings: RenderSettings | None = None,
    ) -> None:
        self.api = api
        self.controller = controller
        self.namespace = namespace
        self.election = election
        self.settings = settings or RenderSettings(namespace=namespace)
        clock = election.clock if election is not None else time.time
        self.models = ModelMirror(api, controller, self.settings, clock=clock)
        self.tenants = TenantMirror(api, controller.store, self.settings, clock=clock)
        #: GpuJob resources, when this operator runs GPU jobs (``acting`` gives it a scheduler).
        self.jobs = (
            JobMirror(api, controller.jobs, namespace, clock=clock)
            if controller.jobs is not None
            else None
        )
        self.leading = election is None

    @property
    def writes(self) -> int:
        """Writes the last pass made (0 in a steady state; the lease renewal not counted)."""
        return self.models.writes + self.tenants.writes + (self.jobs.writes if self.jobs else 0)

    async def step(self) -> None:
        if self.election is not None:
            self.leading = await self.election.try_acquire()
            if not self.leading:
                return
        await self.sync()

    async def sync(self) -> None:
        await self.tenants.sync()
        await self.models.sync()
        if self.jobs is not None:
            await self.jobs.sync()


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str
    store_url: str
    identity: str = ""
    interval_s: float = 2.0
    #: How often the node inventory (the planner's view of the cluster) is read again.
    inventory_s: float = 30.0
    #: Redis the gateways publish their demand to (None: replicas stay as the specs say).
    redis_url: str | None = None
    #: How long a leader's Lease lasts without renewal before a stand-by takes over.
    lease_s: float = 15.0
    settings: RenderSettings | None = None
    #: The DCGM exporters' (or a Prometheus') URL the leader reads the GPUs from, for their
    #: history in the store (gateways show it); None: no GPU telemetry.
    dcgm_url: str | None = None
    gpu_sample_s: float = 2.0
    #: GPU jobs' checkpoint claims: size and storage class (None: 10Gi, the default class).
    job_checkpoint: CheckpointVolume | None = None


@contextlib.asynccontextmanager
async def acting(cfg: OperatorConfig, api: KubeApi, store: Store) -> AsyncIterator[Operator]:
    """What runs while this operator leads; torn down (pods left running) when it stops."""
    settings = cfg.settings or RenderSettings(namespace=cfg.namespace)
    runtime = KubernetesRuntime(api, settings)
    # Running replicas keep their places: a newcomer of the same priority gets what is left.
    capacity = PlannerCapacity(
        inventory_from_nodes(await api.list("Node", None), await api.list("Pod", None)),
        settings=CLUSTER_PLANNING,
        running=lambda: running_placements(runtime),
    )
    controller = Controller(store, runtime, autoscaler=Autoscaler(store, capacity=capacity))
    # GPU jobs on what the models leave free: a batch/v1 Job per attempt, planned with them.
    job_runner = KubernetesJobRunner(api, settings, checkpoint=cfg.job_checkpoint)
    jobs = controller.jobs = JobScheduler(
        store,
        job_runner,
        capacity,
        data_dir=Path(tempfile.gettempdir()) / "gpufleet-operator",
        failures=controller.failures,
    )
    runtime.set_placer(ClusterPlacer(lambda: capacity.inventory, controller.directory, runtime))
    demand = None
    if cfg.redis_url is not None:
        demand = RedisDemand(
            cfg.redis_url,
            lambda: demand_names(controller.directory.entries()),
            outages=controller.failures.outages,
        )
        controller.attach_demand(demand)
        demand.start()

    stored: list[Inventory] = []

    async def share_inventory() -> None:
        """Gateways may not list nodes: the cost report's fleet idle reads this copy."""
        if not stored or stored[0] != capacity.inventory:
            now = dt.datetime.now(dt.UTC)
            await asyncio.to_thread(store.put_inventory, capacity.inventory, now, cfg.namespace)
            stored[:] = [capacity.inventory]

    async def refresh_inventory() -> None:
        while True:
            await asyncio.sleep(cfg.inventory_s)
            try:
                capacity.set_inventory(
                    inventory_from_nodes(await api.list("Node", None), await api.list("Pod", None))
                )
                await share_inventory()
            except Exception as exc:  # noqa: BLE001 - the API is away: keep the last view
                controller.failures.failed(
                    "node inventory read",
                    exc,
                    affected="node inventory (planning on the last one read)",
                    retry_s=cfg.inventory_s,
                )
            else:
                controller.failures.passed("node inventory read")

    tasks: list[asyncio.Task[None]] = []
    # One reader of the GPUs per cluster: the leader's, writing what gateways show.
    telemetry = (
        dcgm_telemetry(
            cfg.dcgm_url,
            namespace=cfg.namespace,
            replicas=runtime.replicas,
            store=store,
            interval_s=cfg.gpu_sample_s,
        )
        if cfg.dcgm_url
        else None
    )
    try:
        await ensure_engine_key(api, cfg.namespace)
        await runtime.start_watching()
        await controller.start()
        await jobs.start()  # adopts the attempts a previous leader left running
        await share_inventory()
        tasks.append(asyncio.create_task(refresh_inventory(), name="operator:inventory"))
        if telemetry is not None:
            await telemetry.start()
        yield Operator(api, controller, cfg.namespace, settings=settings)
    finally:
        if telemetry is not None:
            await telemetry.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await jobs.close(stop_attempts=False)  # their Jobs run on; the next leader adopts them
        await job_runner.close()
        await controller.stop()
        await runtime.close()  # the pods keep serving; the next leader adopts them
        if demand is not None:
            await demand.close()


async def run_operator(
    cfg: OperatorConfig,
    api: KubeApi,
    *,
    stop: asyncio.Event | None = None,
    release_on_stop: bool = True,
) -> None:
    """The operator process until SIGTERM (or ``stop``); ``release_on_stop=False`` leaves the
    Lease to expire, as a killed process would."""
    identity = cfg.identity or f"{socket.gethostname()}-{int(time.time())}"
    store = await asyncio.to_thread(Store.open, cfg.store_url)
    election = LeaderElection(api, cfg.namespace, identity, lease_s=cfg.lease_s, clock=time.time)
    leadership = Leadership(
        election, retry_s=min(2.0, cfg.lease_s / 5), release_on_stop=release_on_stop
    )

    async def lead() -> None:
        async with acting(cfg, api, store) as operator:
            failures = operator.controller.failures
            while True:
                try:
                    await operator.sync()
                except Exception as exc:  # noqa: BLE001 - failures says it (a bug, traced)
                    failures.failed(
                        "operator pass",
                        exc,
                        affected="Model status and tenants",
                        retry_s=cfg.interval_s,
                    )
                else:
                    failures.passed("operator pass")
                await asyncio.sleep(cfg.interval_s)

    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(leadership.run(lead), name=f"operator:{identity}")
    log.info("gpufleet operator %s watching namespace %s", identity, cfg.namespace)
    try:
        await stop.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()
