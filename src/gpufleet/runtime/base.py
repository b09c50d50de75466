"""The ``Runtime`` protocol: what the controller may ask of whatever runs engine replicas.

The local backend runs child processes; the Kubernetes backend will run pods; a fake backend
keeps everything in memory. The controller only ever sees ``Replica`` snapshots (frozen values)
and change notifications, so it cannot tell them apart — which is the point.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gpufleet.spec import ModelSpec

__all__ = ["Capabilities", "Phase", "Replica", "ReplicaFeed", "ReplicaRequest", "Role", "Runtime"]

#: A replica's part in a disaggregated model: its prefill pool, or its decode pool (the model's
#: replicas); "" for a model that is not disaggregated.
Role = Literal["", "prefill", "decode"]


class Phase(enum.StrEnum):
    STARTING = "Starting"  # launched, not yet passing readiness
    READY = "Ready"  # receives traffic
    UNREADY = "Unready"  # was ready, stopped answering probes: no traffic
    BACKOFF = "BackOff"  # exited unexpectedly, waiting to be restarted
    FAILED = "Failed"  # cannot start at all (bad weights, engine missing); not retried
    STOPPING = "Stopping"
    STOPPED = "Stopped"


@dataclass(frozen=True, slots=True)
class Capabilities:
    mig: bool = False
    multi_node: bool = False
    sleep_wake: bool = False


@dataclass(frozen=True, slots=True)
class ReplicaRequest:
    """Everything needed to start one replica of one generation of a model."""

    model: str
    generation: int
    #: The spec this replica runs: a disaggregated model's pool spec (``ModelSpec.pool``).
    spec: ModelSpec
    role: Role = ""


@dataclass(frozen=True, slots=True)
class Replica:
    id: str
    model: str
    generation: int
    phase: Phase
    url: str | None = None  # base URL of the engine's OpenAI API (no /v1)
    pid: int | None = None
    restarts: int = 0
    message: str = ""
    started_at: float | None = None
    ready_at: float | None = None
    embeddings: bool = False
    #: Start-up by phase, in seconds (``gpufleet.runtime.startup``): fetching the weights,
    #: loading them (engine started → answering its health path), and the first ready probe
    #: (answering → the readiness probe passes); ``startup_s`` from the replica's start to
    #: ready, all in. None where the runtime cannot tell, or the phase is not over yet. A
    #: restart fetches nothing: its ``fetch_s`` is None and the others are its own.
    fetch_s: float | None = None
    load_s: float | None = None
    ready_s: float | None = None
    startup_s: float | None = None
    #: Bytes of the weights fetched so far, of how many: both or neither, and only where the
    #: source tells them (a download's length, a copy of a file of known size) — never guessed.
    fetched_bytes: int | None = None
    weights_bytes: int | None = None
    role: Role = ""
    #: Where its engine publishes KV-cache events (``tcp://host:port``) and answers replays
    #: of them, with ``routing.prefixIndex: precise``; None otherwise.
    kv_events: str | None = None
    kv_replay: str | None = None
    #: An external endpoint's name for the model: the gateway sends requests with it (None:
    #: the engine serves the model under the model's own name).
    served_model: str | None = None
    #: An endpoint outside the company (``location: external``): prompts sent there leave it,
    #: so only tenants that opt in are routed to it.
    external: bool = False
    #: The engine's secret: it answers only requests bearing it, and only the gateway (and the
    #: runtime's probes) hold it. Never shown: not in repr, listings, events or logs.
    api_key: str | None = field(default=None, repr=False)

    @property
    def routable(self) -> bool:
        return self.phase is Phase.READY and self.url is not None

    def auth_headers(self) -> dict[str, str]:
        """The headers that let a request through to this replica's engine."""
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class ReplicaFeed:
    """Every change of any replica, fanned out to each watcher: what ``Runtime.watch`` yields,
    shared by the runtimes."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[Replica]] = set()

    def publish(self, replica: Replica) -> None:
        for queue in self._subscribers:
            queue.put_nowait(replica)

    async def watch(self) -> AsyncIterator[Replica]:
        queue: asyncio.Queue[Replica] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)


class Runtime(Protocol):
    capabilities: Capabilities

    async def start(self, request: ReplicaRequest) -> Replica:
        """Create a replica and return at once; readiness arrives through ``watch``."""

    async def stop(self, replica_id: str) -> None:
        """Stop a replica gracefully and forget it. Stopping an unknown id is not an error."""

    def replicas(self, model: str | None = None) -> list[Replica]: ...

    def watch(self) -> AsyncIterator[Replica]:
        """Every change of any replica, as a new snapshot."""

    async def logs(self, replica_id: str, tail: int = 200) -> str: ...

    async def close(self) -> None:
        """Stop every replica; return only when none is left running."""
