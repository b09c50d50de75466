"""Dispatch: a resolved request onto an engine — hold for a replica, queue for a slot, forward.

Each deployment of the chain is tried in turn. One without a ready replica (starting, or
scaled to zero) is skipped while a later one may serve now; the last one is held for: the
control plane is asked to wake it and the request waits, within ``hold_s``, for a replica.
Then a slot among the requests this gateway sends the deployment at once
(``slots_per_replica`` per ready replica, or the spec's ``maxInFlightPerReplica``), waiting in
its fair queue when all are taken, and the request goes to the engine through ``Upstream``
(which picks the replica). An engine that cannot answer (502, 503) passes the request to the
next deployment of the chain. A deployment whose every replica refused the connection or broke
it under the request (an engine crashed, and the runtime has not seen it yet) is held like one
with none ready — within ``hold_s`` in all, until a replica takes connections again — when no
later deployment may serve, so the crash window is a wait, not a 502, for the requests in
flight on the engine that died as for those that come after. The slot is given back on every
path: when the answer is complete (by the accounting's finisher), when forwarding fails, while
the request is held, and when the caller is cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable

from starlette.responses import Response

from gpufleet.controller import ControlPlane, Directory, ModelEntry
from gpufleet.gateway.auth import Principal
from gpufleet.gateway.demand import DemandMeter
from gpufleet.gateway.errors import (
    ApiError,
    Unreachable,
    external_refused,
    model_not_found,
    no_replica,
)
from gpufleet.gateway.fairqueue import AdmissionQueues, QueueRejected
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.proxy import Done, Upstream
from gpufleet.gateway.request import Outbound

__all__ = ["Capacity", "Dispatcher", "Finisher", "Release"]

#: Gives a slot back (idempotent).
Release = Callable[[], None]
#: For a deployment and its slot: what receives the outcome once the answer is complete (and
#: what the replicas that gave no answer spent).
Finisher = Callable[[ModelEntry, Release], Done]


def _nothing() -> None:
    pass


def _has_endpoints(entry: ModelEntry) -> bool:
    return bool(entry.endpoints)


class Capacity:
    """Requests this gateway sends a deployment at once: its ready replicas times the slots
    of each. More wait in the deployment's fair queue."""

    def __init__(self, directory: Directory, slots_per_replica: int) -> None:
        self._directory = directory
        self._slots = slots_per_replica

    def __call__(self, name: str) -> int:
        entry = self._directory.get(name)
        if entry is None:
            return 0
        per_replica = entry.spec.routing.max_in_flight_per_replica or self._slots
        return len(entry.endpoints) * per_replica


class Dispatcher:
    def __init__(
        self,
        plane: ControlPlane,
        queues: AdmissionQueues,
        capacity: Capacity,
        upstream: Upstream,
        demand: DemandMeter,
        metrics: GatewayMetrics,
        *,
        hold_s: float,
    ) -> None:
        self._plane = plane
        self._directory = plane.directory
        self.queues = queues
        self._capacity = capacity
        self._upstream = upstream
        self._demand = demand
        self._metrics = metrics
        self.hold_s = hold_s

    async def dispatch(
        self,
        chain: list[ModelEntry],
        request: Outbound,
        principal: Principal,
        route: str,
        request_id: str,
        finisher: Finisher,
    ) -> Response:
        """The first answer of the chain, marked with the deployment that gave it; the last
        deployment's refusal otherwise."""
        for i, target in enumerate(chain):
            last = i == len(chain) - 1
            if not principal.external_endpoints and _only_external(target):
                if not last:
                    continue  # data stays in the company: the next in the chain, if any
                raise external_refused(target.name, principal.tenant)
            if not target.endpoints and not target.problem:
                if not last:
                    continue  # a fallback is ready now: no need to wait for this one
                target = await self.hold(target.name)
                self.queues.get(target.name).poke()
            try:
                response = await self._send(
                    target, request, principal, route, request_id, finisher, held=last
                )
            except ApiError as exc:
                if last or exc.status not in (502, 503):
                    raise
                self._metrics.fallbacks.labels(request.model, chain[i + 1].name).inc()
                continue
            response.headers["x-gpufleet-model"] = target.name
            return response
        raise AssertionError("unreachable: the last model of a chain answers or raises")

    async def _send(
        self,
        target: ModelEntry,
        request: Outbound,
        principal: Principal,
        route: str,
        request_id: str,
        finisher: Finisher,
        *,
        held: bool,
    ) -> Response:
        """Forward to ``target`` in a slot given back on every failure; when ``held``, a
        crash window (``Unreachable``) waits, within ``hold_s`` in all, for a replica that
        takes connections, and the request goes again."""
        deadline = time.monotonic() + self.hold_s
        body = request.body_for(target.name)
        while True:
            release = await self.take_slot(target, principal, request.priority, request.tokens)
            try:
                return await self._upstream.forward(
                    target,
                    route,
                    body,
                    stream=request.stream,
                    request_id=request_id,
                    features=request.features,
                    tenant=principal.tenant,
                    external=principal.external_endpoints,
                    weight=float(request.tokens),
                    strip_usage=request.strip_usage,
                    done=finisher(target, release),
                )
            except Unreachable:
                release()
                if not held:
                    raise
            except BaseException:
                release()  # failed, or cancelled (a batch runner stopping)
                raise
            target = await self.hold(target.name, deadline=deadline, ready=self._upstream.routable)

    async def hold(
        self,
        name: str,
        *,
        deadline: float | None = None,
        ready: Callable[[ModelEntry], bool] = _has_endpoints,
    ) -> ModelEntry:
        """Wait, until ``deadline`` (``hold_s`` from now by default), for a ready replica; ask
        the control plane for one meanwhile."""
        if deadline is None:
            deadline = time.monotonic() + self.hold_s
        self._metrics.held.labels(name).inc()
        self._demand.hold(name, 1)
        try:
            await self._plane.wake(name)
            while True:
                entry = self._directory.get(name)
                if entry is None:
                    raise model_not_found(name)
                if entry.problem or ready(entry):
                    return entry
                if time.monotonic() >= deadline:
                    raise no_replica(
                        name, f"none became ready within {self.hold_s:g} s", retry_after=5
                    )
                await asyncio.sleep(0.05)
        finally:
            self._demand.hold(name, -1)

    async def take_slot(
        self, target: ModelEntry, principal: Principal, priority: int, tokens: int
    ) -> Release:
        """A place among the requests in flight to ``target`` (waiting in its fair queue when
        all are taken); returns how to give it back. A model without ready replicas skips the
        queue: the proxy answers it at once with the reason."""
        if not target.endpoints:
            return _nothing
        queue = self.queues.get(target.name)
        try:
            slot = await queue.acquire(
                principal.tenant, priority=priority, weight=principal.weight, cost=float(tokens)
            )
        except QueueRejected as exc:
            reason = f"queue_{exc.reason}"
            self._metrics.rejections.labels(principal.tenant, reason).inc()
            full = exc.reason == "full"
            raise ApiError(
                429 if full else 503,
                str(exc),
                type="rate_limit_error" if full else "service_unavailable",
                code=reason,
                headers={"retry-after": str(max(1, round(exc.retry_after_s)))},
            ) from exc
        self._metrics.queue_wait.labels(target.name, principal.tenant).observe(slot.waited_s)
        return functools.partial(queue.release, slot)

    def has_room(self, entry: ModelEntry) -> bool:
        """Ready replicas and a free slot now: a request there would not wait in the queue."""
        if not entry.endpoints:
            return False
        stats = self.queues.get(entry.name).stats()
        return stats.waiting == 0 and stats.in_flight < self._capacity(entry.name)


def _only_external(target: ModelEntry) -> bool:
    """``target`` is served by endpoints outside the company alone."""
    return target.spec.engine == "external" and all(
        e.location == "external" for e in target.spec.endpoints
    )
