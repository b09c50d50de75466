"""The operator's boundary with the Kubernetes API, and a stateful fake of it for tests.

``KubeApi`` is the handful of calls the runtime makes — create, delete, list and watch objects
of a kind in a namespace — on plain dicts (the API's JSON). The real implementation wraps the
official client; ``FakeKube`` keeps objects in memory with names, uids, resource versions,
label selection and watch events, and lets a test play the cluster's part (a pod becomes
Ready, a container crash-loops, a node disappears with its pods) — kopf's "stateful fake API"
advice, at our own client boundary.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = ["Conflict", "FakeKube", "KubeApi", "WatchEvent"]

EventType = Literal["ADDED", "MODIFIED", "DELETED"]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    object: dict[str, Any]


class KubeApi(Protocol):
    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...

    async def delete(
        self, kind: str, namespace: str, name: str, *, grace_s: int | None = None
    ) -> None:
        """Delete; deleting what does not exist is not an error."""

    async def list(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]: ...

    def watch(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Changes from now on (the runtime lists first, then watches)."""

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def replace(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Write a whole object; ``Conflict`` when its resourceVersion is not the latest."""

    async def patch_status(
        self, kind: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None: ...


def _matches(obj: Mapping[str, Any], selector: Mapping[str, str] | None) -> bool:
    labels = obj.get("metadata", {}).get("labels", {}) or {}
    return all(labels.get(k) == v for k, v in (selector or {}).items())


class Conflict(Exception):
    """The object changed since it was read (HTTP 409): read it again and retry."""


class FakeKube:
    """Objects by (kind, namespace, name); every change is a watch event."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._version = itertools.count(1)
        self._uids = itertools.count(1)
        self._watchers: list[
            tuple[str, str | None, Mapping[str, str] | None, asyncio.Queue[WatchEvent]]
        ] = []
        #: Every call that changed something, for idempotence checks.
        self.writes: list[tuple[str, str, str]] = []

    # -- KubeApi ----------------------------------------------------------------------------

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(dict(obj))
        meta = stored.setdefault("metadata", {})
        key = (stored["kind"], meta.get("namespace", ""), meta["name"])
        if key in self.objects:
            raise FileExistsError(f"{key[0]} {key[1]}/{key[2]} already exists")
        meta["uid"] = f"uid-{next(self._uids)}"
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._version))
        stored.setdefault("status", {})
        self.objects[key] = stored
        self.writes.append(("create", key[0], meta["name"]))
        self._emit("ADDED", stored)
        return copy.deepcopy(stored)

    async def delete(
        self, kind: str, namespace: str, name: str, *, grace_s: int | None = None
    ) -> None:
        stored = self.objects.pop((kind, namespace, name), None)
        if stored is not None:
            self.writes.append(("delete", kind, name))
            self._emit("DELETED", stored)

    async def list(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in sorted(self.objects.items())
            if k == kind and (namespace is None or ns == namespace) and _matches(o, selector)
        ]

    async def watch(
        self, kind: str, namespace: str | None, selector: Mapping[str, str] | None = None
    ) -> AsyncIterator[WatchEvent]:
        queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        entry = (kind, namespace, selector, queue)
        self._watchers.append(entry)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(entry)

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
        fresh["metadata"]["resourceVersion"] = str(next(self._version))
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

    # -- the cluster's part -----------------------------------------------------------------

    def peek(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, namespace, name))

    def update_spec(self, kind: str, namespace: str, name: str, spec: Mapping[str, Any]) -> None:
        """Someone edits the object's spec (``kubectl apply``): its generation moves."""
        stored = self.objects[(kind, namespace, name)]
        stored["spec"] = copy.deepcopy(dict(spec))
        stored["metadata"]["generation"] = stored["metadata"].get("generation", 1) + 1
        stored["metadata"]["resourceVersion"] = str(next(self._version))
        self._emit("MODIFIED", stored)

    def set_status(self, kind: str, namespace: str, name: str, **status: Any) -> None:
        stored = self.objects[(kind, namespace, name)]
        stored["status"] = {**stored.get("status", {}), **status}
        stored["metadata"]["resourceVersion"] = str(next(self._version))
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
        meta = obj["metadata"]
        for kind, namespace, selector, queue in self._watchers:
            if kind != obj["kind"]:
                continue
            if namespace is not None and namespace != meta.get("namespace", ""):
                continue
            if _matches(obj, selector):
                queue.put_nowait(WatchEvent(type, copy.deepcopy(obj)))
