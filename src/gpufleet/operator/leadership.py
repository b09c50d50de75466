"""One operator acts at a time: a ``coordination.k8s.io`` Lease held by one identity.

The holder renews it every pass; a stand-by takes it over once it has not been renewed for
``lease_s``. Leadership is more than the Lease object: everything that writes to the cluster
(the pod runtime's watch, the controller, the mirrors) runs only while the Lease is held —
``Leadership.run`` starts that work when the Lease is won and cancels it when it is lost, as
client-go's leader election does (a holder that cannot renew within its own lease duration
steps down before anyone else may take over).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from gpufleet.runtime.kubernetes.api import Conflict, KubeApi

__all__ = ["LeaderElection", "Leadership"]

log = logging.getLogger("gpufleet.operator")


def _micro(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_micro(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return (
            dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()
        )
    except ValueError:
        return None


class LeaderElection:
    """A Lease held by one identity at a time, renewed while it lives."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        identity: str,
        *,
        name: str = "gpufleet-operator",
        lease_s: float = 15.0,
        clock: Callable[[], float],
    ) -> None:
        self.api, self.namespace, self.identity, self.name = api, namespace, identity, name
        self.lease_s = lease_s
        self.clock = clock

    async def try_acquire(self) -> bool:
        """Take or renew the lease; True while this identity holds it."""
        now = self.clock()
        lease = await self.api.get("Lease", self.namespace, self.name)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_s)),
            "renewTime": _micro(now),
        }
        if lease is None:
            try:
                await self.api.create(
                    {
                        "apiVersion": "coordination.k8s.io/v1",
                        "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": {**spec, "acquireTime": _micro(now)},
                    }
                )
            except FileExistsError:
                return False
            return True
        held = lease.get("spec", {}) or {}
        holder = held.get("holderIdentity") or ""
        renewed = _parse_micro(held.get("renewTime"))
        expired = renewed is None or now - renewed > float(
            held.get("leaseDurationSeconds", self.lease_s)
        )
        if holder and holder != self.identity and not expired:
            return False
        if holder != self.identity:
            spec["acquireTime"] = _micro(now)
            log.info("taking over the operator lease from %s", holder or "nobody")
        lease["spec"] = {**held, **spec}
        try:
            await self.api.replace(lease)
        except Conflict:
            return False  # someone else renewed or took it in between
        return True

    async def release(self) -> None:
        """Give the lease up on a clean stop, so a stand-by need not wait for it to expire."""
        lease = await self.api.get("Lease", self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
        with contextlib.suppress(Conflict, KeyError):
            await self.api.replace(lease)


class Leadership:
    """Runs ``lead()`` while the lease is held: started when it is won, cancelled when it is
    lost (not renewed within ``lease_s``: the API away, or another holder)."""

    def __init__(
        self, election: LeaderElection, *, retry_s: float = 2.0, release_on_stop: bool = True
    ) -> None:
        self.election = election
        self.retry_s = retry_s
        #: Give the lease up when stopped (SIGTERM); False plays a process that was killed.
        self.release_on_stop = release_on_stop
        self.leading = False

    async def _renew(self) -> bool:
        try:
            return await self.election.try_acquire()
        except Exception as exc:  # noqa: BLE001 - the API is away: keep the lease while valid
            log.warning("cannot renew the operator lease: %s", exc)
            return False

    async def run(self, lead: Callable[[], Coroutine[object, object, None]]) -> None:
        try:
            while True:
                while not await self._renew():
                    await asyncio.sleep(self.retry_s)
                log.info("%s leads", self.election.identity)
                self.leading = True
                renewed = self.election.clock()
                task: asyncio.Task[None] = asyncio.create_task(lead(), name="operator:lead")
                try:
                    while not task.done():
                        # Not wait_for(shield(task)): on Python 3.11 it drops a cancellation
                        # that arrives as the task ends (see gpufleet.supervise.wait_set).
                        await asyncio.wait({task}, timeout=self.retry_s)
                        if task.done():
                            break
                        if await self._renew():
                            renewed = self.election.clock()
                        elif self.election.clock() - renewed >= self.election.lease_s * 2 / 3:
                            # Step down before the lease lapses, so two never act at once.
                            log.warning("%s lost the lease; standing by", self.election.identity)
                            break
                finally:
                    self.leading = False
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if not task.cancelled() and task.exception() is not None:
                    log.error("the leader's work failed: %s", task.exception())
                    await asyncio.sleep(self.retry_s)
        finally:
            if self.release_on_stop:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.election.release())
