"""An in-memory runtime for tests and the simulator: replicas are values, not processes.

Each started replica gets the URL ``url_for(request, index)`` returns (tests point it at a fake
engine, or at a closed port to see failures) and becomes Ready at once unless ``auto_ready`` is
off. ``fail_with`` makes ``start`` raise, as a runtime does for missing weights or engines.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable

from gpufleet.runtime.base import Capabilities, Phase, Replica, ReplicaFeed, ReplicaRequest

__all__ = ["FakeRuntime"]


class FakeRuntime:
    capabilities = Capabilities()

    def __init__(
        self,
        url_for: Callable[[ReplicaRequest, int], str | None] = lambda _r, _i: None,
        *,
        auto_ready: bool = True,
    ) -> None:
        self._url_for = url_for
        self.auto_ready = auto_ready
        self.fail_with: Exception | None = None
        self._replicas: dict[str, Replica] = {}
        self._feed = ReplicaFeed()
        self._ids = itertools.count(1)
        self.started: list[ReplicaRequest] = []

    async def start(self, request: ReplicaRequest) -> Replica:
        if self.fail_with is not None:
            raise self.fail_with
        index = next(self._ids)
        self.started.append(request)
        pool = f"{request.role}-" if request.role == "prefill" else ""
        replica = Replica(
            id=f"{request.model}-{pool}g{request.generation}-{index}",
            model=request.model,
            generation=request.generation,
            phase=Phase.STARTING,
            url=self._url_for(request, index),
            embeddings=request.spec.embeddings,
            role=request.role,
        )
        self._set(replica)
        if self.auto_ready:
            self.set_phase(replica.id, Phase.READY)
        return replica

    async def stop(self, replica_id: str) -> None:
        replica = self._replicas.pop(replica_id, None)
        if replica is not None:
            self._publish(dataclasses.replace(replica, phase=Phase.STOPPED, url=None))

    def replicas(self, model: str | None = None) -> list[Replica]:
        return [r for r in self._replicas.values() if model is None or r.model == model]

    def watch(self) -> AsyncIterator[Replica]:
        return self._feed.watch()

    async def logs(self, replica_id: str, tail: int = 200) -> str:
        return f"fake replica {replica_id}\n" if replica_id in self._replicas else ""

    async def close(self) -> None:
        for rid in list(self._replicas):
            await self.stop(rid)

    def set_phase(self, replica_id: str, phase: Phase, message: str = "") -> None:
        """Move a replica to ``phase``, as a real one would by itself."""
        replica = dataclasses.replace(self._replicas[replica_id], phase=phase, message=message)
        self._set(replica)

    def set_startup(
        self,
        replica_id: str,
        *,
        fetch_s: float | None = None,
        load_s: float | None = None,
        ready_s: float | None = None,
        startup_s: float | None = None,
        fetched_bytes: int | None = None,
        weights_bytes: int | None = None,
    ) -> None:
        """Give a replica the start-up figures (and progress) a real runtime would measure."""
        replica = dataclasses.replace(
            self._replicas[replica_id],
            fetch_s=fetch_s,
            load_s=load_s,
            ready_s=ready_s,
            startup_s=startup_s,
            fetched_bytes=fetched_bytes,
            weights_bytes=weights_bytes,
        )
        self._set(replica)

    def _set(self, replica: Replica) -> None:
        self._replicas[replica.id] = replica
        self._publish(replica)

    def _publish(self, replica: Replica) -> None:
        self._feed.publish(replica)
