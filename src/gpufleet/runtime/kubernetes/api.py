"""The operator's boundary with the Kubernetes API, and a stateful fake of it for tests.

``KubeApi`` is the handful of calls the runtime makes — create, delete, list and watch objects
of a kind in a namespace, read a pod's log, ask whether a kind is served — on plain dicts (the
API's JSON). The real implementation (``client.ClientKube``) speaks REST; ``FakeKube`` keeps
objects in memory with names, uids, resource versions, label selection and watch events, and
lets a test play the cluster's part (a pod becomes Ready, a container crash-loops, a node
disappears with its pods) — kopf's "stateful fake API" advice, at our own client boundary.

A watch is an informer's view, not the raw API's: the objects there now (as ``ADDED``), then
every change — so a consumer that (re)starts a watch misses nothing, and the real client keeps
that promise across 410 Gone by listing again and deriving what changed. Errors are one tree
(``KubeError``) whose classes say whether retrying helps (``errors.py``).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gpufleet.errors import GpufleetError, PermanentError, TemporaryError

__all__ = [
    "Conflict",
    "FakeKube",
    "Forbidden",
    "Gone",
    "Invalid",
    "KubeApi",
    "KubeError",
    "NotServed",
    "Unavailable",
    "WatchEvent",
]

EventType = Literal["ADDED", "MODIFIED", "DELETED"]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    object: dict[str, Any]


class KubeApi(Protocol):
    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """The object as stored; ``FileExistsError`` if it exists, ``NotServed`` if its kind
        is not installed (never ``None``)."""

    async def delete(
        self, kind: str, namespace: str, name: str, *, grace_s: int | None = None
    ) -> None:
        """Delete; deleting what does not exist is not an error."""

    async def list(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]: ...

    def watch(
        self,
        kind: str,
        namespace: str | None,
        selector: Mapping[str, str] | None = None,
        *,
        synced: Callable[[], None] | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """The objects there now, each as ``ADDED``; then every change, for ever. ``synced``
        is called once, after the last of the objects there at the start and before any
        change (a consumer that restarts its watch compares what it knew with what it saw)."""

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Write a whole object; ``Conflict`` when its resourceVersion is not the latest."""

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None: ...

    async def served(self, kind: str) -> bool:
        """Whether the cluster serves ``kind`` (a third-party kind exists only once its CRD is
        installed: LeaderWorkerSet)."""

    async def logs(
        self, namespace: str, pod: str, *, container: str | None = None, tail: int | None = None
    ) -> str:
        """The last ``tail`` lines a pod's container wrote (the pods/log API)."""


def _matches(obj: Mapping[str, Any], selector: Mapping[str, str] | None) -> bool:
    labels = obj.get("metadata", {}).get("labels", {}) or {}
    return all(labels.get(k) == v for k, v in (selector or {}).items())


class Gone(Exception):
    """HTTP 410: the resourceVersion a watch resumes from is no longer kept (the fake's)."""


class Conflict(Exception):
    """The object changed since it was read (HTTP 409): read it again and retry."""


class KubeError(GpufleetError):
    """The API server refused or failed a call; ``status`` is its HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Forbidden(KubeError, TemporaryError):
    """401/403: this identity may not do that. A person fixes the RBAC, not the spec, so it is
    retried — slowly."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message, status)
        self.retry_after = 30.0


class NotServed(KubeError, PermanentError):
    """The cluster does not serve the kind: a CRD that is not installed (LeaderWorkerSet)."""

    def __init__(self, kind: str, message: str = "") -> None:
        super().__init__(
            message or f"{kind} is not served by this cluster (CRD not installed)", 404
        )
        self.kind = kind


class Invalid(KubeError, PermanentError):
    """400/422: the server rejected the object as written."""


class Unavailable(KubeError, TemporaryError):
    """No answer, a timeout, 429 or 5xx: the API server is busy or away; try again."""


class FakeKube:
    """Objects by (kind, namespace, name); every change is a watch event."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._version = itertools.count(1)
        self._last = 0
        #: Changes by resourceVersion, for watches that resume from one (the HTTP fake's).
        self._history: list[tuple[int, WatchEvent]] = []
        #: Versions up to this one are forgotten (``compact``): resuming from them is 410 Gone.
        self.compacted = 0
        self._uids = itertools.count(1)
        self._watchers: list[
            tuple[str, str | None, Mapping[str, str] | None, asyncio.Queue[WatchEvent]]
        ] = []
        #: Every call that changed something, for idempotence checks.
        self.writes: list[tuple[str, str, str]] = []
        #: Kinds this cluster does not serve (their CRD is not installed).
        self.unserved: set[str] = set()
        #: What each pod's engine wrote, by (namespace, pod): what ``logs`` serves.
        self.pod_logs: dict[tuple[str, str], str] = {}
        #: False: a deleted pod stays terminating (``deletionTimestamp``) until deleted with
        #: grace 0, as on a cluster whose kubelet has not stopped its containers yet.
        self.finish_deletions = True

    def _served(self, kind: str) -> None:
        if kind in self.unserved:
            raise NotServed(kind)

    # -- KubeApi ----------------------------------------------------------------------------

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self._served(obj["kind"])
        stored = copy.deepcopy(dict(obj))
        meta = stored.setdefault("metadata", {})
        key = (stored["kind"], meta.get("namespace", ""), meta["name"])
        if key in self.objects:
            raise FileExistsError(f"{key[0]} {key[1]}/{key[2]} already exists")
        meta["uid"] = f"uid-{next(self._uids)}"
        meta.setdefault("generation", 1)
        stored.setdefault("status", {})
        self.objects[key] = stored
        self.writes.append(("create", key[0], meta["name"]))
        self._emit("ADDED", stored)
        return copy.deepcopy(stored)

    async def delete(
        self, kind: str, namespace: str, name: str, *, grace_s: int | None = None
    ) -> None:
        if kind == "Pod" and not self.finish_deletions and grace_s != 0:
            if (kind, namespace, name) in self.objects:
                self.writes.append(("delete", kind, name))
                self.terminate(namespace, name)
            return
        stored = self.objects.pop((kind, namespace, name), None)
        if stored is not None:
            self.writes.append(("delete", kind, name))
            self._emit("DELETED", stored)

    async def list(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        self._served(kind)
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in sorted(self.objects.items())
            if k == kind and (namespace is None or ns == namespace) and _matches(o, selector)
        ]

    async def watch(
        self,
        kind: str,
        namespace: str | None,
        selector: Mapping[str, str] | None = None,
        *,
        synced: Callable[[], None] | None = None,
    ) -> AsyncIterator[WatchEvent]:
        self._served(kind)
        # The list and the subscription in one step (no await between): no change is lost.
        queue = self._subscribe(kind, namespace, selector)
        try:
            for obj in await self.list(kind, namespace, selector):
                yield WatchEvent("ADDED", obj)
            if synced is not None:
                synced()
            while True:
                yield await queue.get()
        finally:
            self._unsubscribe(queue)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        stored = self.objects.get((kind, namespace, name))
        return copy.deepcopy(stored) if stored is not None else None

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        key = (obj["kind"], meta.get("namespace", ""), meta["name"])
        stored = self.objects.get(key)
        if stored is None:
            raise KeyError(f"{key[0]} {key[1]}/{key[2]} does not exist")
        if meta.get("resourceVersion") != stored["metadata"]["resourceVersion"]:
            raise Conflict(f"{key[0]} {key[1]}/{key[2]} changed since it was read")
        fresh = copy.deepcopy(dict(obj))
        fresh["metadata"]["uid"] = stored["metadata"]["uid"]
        generation = stored["metadata"].get("generation", 1)
        if fresh.get("spec") != stored.get("spec"):
            generation += 1  # as the API server does for a changed spec
        fresh["metadata"]["generation"] = generation
        fresh["status"] = stored.get("status", {})  # status only through its subresource
        self.objects[key] = fresh
        self.writes.append(("replace", key[0], meta["name"]))
        self._emit("MODIFIED", fresh)
        return copy.deepcopy(fresh)

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        self.writes.append(("status", kind, name))
        self.set_status(kind, namespace, name, **status)

    async def served(self, kind: str) -> bool:
        return kind not in self.unserved

    async def logs(
        self, namespace: str, pod: str, *, container: str | None = None, tail: int | None = None
    ) -> str:
        if ("Pod", namespace, pod) not in self.objects:
            raise KubeError(f'pods "{pod}" not found', 404)
        lines = self.pod_logs.get((namespace, pod), "").splitlines(keepends=True)
        return "".join(lines[-tail:] if tail is not None else lines)

    # -- the cluster's part -----------------------------------------------------------------

    @property
    def version(self) -> str:
        """The latest resourceVersion (what a list answers with)."""
        return str(self._last)

    async def changes(
        self,
        kind: str,
        namespace: str | None,
        selector: Mapping[str, str] | None = None,
        *,
        since: str | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """The raw API's watch: the changes after resourceVersion ``since`` (default: now),
        then every new one — what the HTTP fake streams. ``Gone`` if ``since`` is compacted."""
        start = int(since) if since else self._last
        if start < self.compacted:
            raise Gone(f"too old resource version: {start} ({self.compacted})")
        queue = self._subscribe(kind, namespace, selector)
        past = list(self._history)  # what comes from now on is in the queue
        try:
            for version, event in past:
                if version > start and _wanted(event.object, kind, namespace, selector):
                    yield WatchEvent(event.type, copy.deepcopy(event.object))
            while True:
                yield await queue.get()
        finally:
            self._unsubscribe(queue)

    def compact(self) -> None:
        """Forget the changes so far (etcd's compaction): watches resuming from before now get
        410 Gone and must list again."""
        self.compacted = self._last
        self._history.clear()

    def _subscribe(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None
    ) -> asyncio.Queue[WatchEvent]:
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._watchers.append((kind, namespace, selector, queue))
        return queue

    def _unsubscribe(self, queue: asyncio.Queue[WatchEvent]) -> None:
        self._watchers = [w for w in self._watchers if w[3] is not queue]

    def terminate(self, namespace: str, name: str) -> None:
        """A pod starts terminating (deleted with a grace period, evicted, its node drained):
        ``deletionTimestamp`` set, still there until the kubelet has stopped it."""
        stored = self.objects[("Pod", namespace, name)]
        if stored["metadata"].get("deletionTimestamp"):
            return
        stored["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        self._emit("MODIFIED", stored)

    def peek(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace, name))

    def update_spec(self, kind: str, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        """Someone edits the object's spec (``kubectl apply``): its generation moves."""
        stored = self.objects[(kind, namespace, name)]
        stored["spec"] = copy.deepcopy(dict(spec))
        stored["metadata"]["generation"] = stored["metadata"].get("generation", 1) + 1
        self._emit("MODIFIED", stored)

    def set_status(self, kind: str, namespace: str, name: str, /, **status: Any) -> None:
        stored = self.objects[(kind, namespace, name)]
        stored["status"] = {**stored.get("status", {}), **status}
        self._emit("MODIFIED", stored)

    def pod_ready(self, namespace: str, name: str, ip: str, node: str = "node-1") -> None:
        self.objects[("Pod", namespace, name)].setdefault("spec", {})["nodeName"] = node
        self.set_status(
            "Pod",
            namespace,
            name,
            phase="Running",
            podIP=ip,
            conditions=[{"type": "Ready", "status": "True"}],
            containerStatuses=[{"name": "engine", "ready": True, "restartCount": 0}],
        )

    def pod_crashing(self, namespace: str, name: str, restarts: int, message: str) -> None:
        self.set_status(
            "Pod",
            namespace,
            name,
            phase="Running",
            conditions=[{"type": "Ready", "status": "False"}],
            containerStatuses=[
                {
                    "name": "engine",
                    "ready": False,
                    "restartCount": restarts,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": message}},
                }
            ],
        )

    def pod_unschedulable(self, namespace: str, name: str, message: str) -> None:
        self.set_status(
            "Pod",
            namespace,
            name,
            phase="Pending",
            conditions=[
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": message,
                }
            ],
        )

    def remove_node(self, node: str) -> tuple[str, ...]:
        """A node disappears: its pods go with it (the node controller's eviction)."""
        self.objects.pop(("Node", "", node), None)
        gone = [
            key
            for key, o in self.objects.items()
            if key[0] == "Pod" and o.get("spec", {}).get("nodeName") == node
        ]
        for key in gone:
            self._emit("DELETED", self.objects.pop(key))
        return tuple(k[2] for k in gone)

    def _emit(self, type: EventType, obj: dict[str, Any]) -> None:
        """Every change gets the next resourceVersion and is kept for watches that resume."""
        meta = obj["metadata"]
        self._last = next(self._version)
        meta["resourceVersion"] = str(self._last)
        self._history.append((self._last, WatchEvent(type, copy.deepcopy(obj))))
        for kind, namespace, selector, queue in self._watchers:
            if _wanted(obj, kind, namespace, selector):
                queue.put_nowait(WatchEvent(type, copy.deepcopy(obj)))


def _wanted(
    obj: Mapping[str, Any], kind: str, namespace: str | None, selector: Mapping[str, str] | None
) -> bool:
    if kind != obj["kind"]:
        return False
    if namespace is not None and namespace != obj["metadata"].get("namespace", ""):
        return False
    return _matches(obj, selector)
