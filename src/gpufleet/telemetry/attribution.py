"""Who holds a GPU: a process on it (NVML) or a pod on it (DCGM), traced to its replica.

On this machine the runtime knows each replica's engine pid, but the processes on a GPU are
often the engine's children: vLLM runs its model in an ``EngineCore`` process and, with tensor
parallelism, one worker per GPU. So a process belongs to the replica whose engine pid is the
process itself or one of its ancestors, read from ``/proc/<pid>/stat`` (the reader is passed in
for tests).

On Kubernetes each replica is a pod named after the replica's id; a replica bigger than a node
is a LeaderWorkerSet of that name, whose pods are ``<id>-<group>`` (the leader) and
``<id>-<group>-<worker>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from gpufleet.runtime import Replica

__all__ = ["ParentOf", "ProcessOwners", "proc_parent", "replica_of_pod"]

#: pid → its parent's pid, or None where the process is gone (or unreadable).
ParentOf = Callable[[int], int | None]

#: Ancestors followed at most: engine children are a few levels down, never dozens.
_MAX_DEPTH = 16


def proc_parent(pid: int) -> int | None:
    """The parent pid from ``/proc/<pid>/stat``; None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) state ppid …": comm may hold spaces and parentheses, so split after the last ")".
    fields = stat[stat.rfind(b")") + 2 :].split(b" ", 2)
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


class ProcessOwners:
    """pid → replica, for the replicas of one moment (the answers are remembered for it)."""

    def __init__(self, replicas: Iterable[Replica], parent_of: ParentOf = proc_parent) -> None:
        self._engines = {r.pid: r for r in replicas if r.pid is not None}
        self._parent_of = parent_of
        self._known: dict[int, Replica | None] = {}

    def owner(self, pid: int) -> Replica | None:
        if not self._engines:
            return None
        seen: list[int] = []
        current: int | None = pid
        found: Replica | None = None
        while current is not None and current > 1 and len(seen) < _MAX_DEPTH:
            if current in self._known:
                found = self._known[current]
                break
            seen.append(current)
            if current in self._engines:
                found = self._engines[current]
                break
            current = self._parent_of(current)
        for p in seen:
            self._known[p] = found
        return found


def replica_of_pod(pod: str, replicas: Sequence[Replica] | dict[str, Replica]) -> Replica | None:
    """The replica a pod belongs to: the pod is the replica, or a LeaderWorkerSet pod of it."""
    by_id = replicas if isinstance(replicas, dict) else {r.id: r for r in replicas}
    name = pod
    for _ in range(3):  # the pod itself, "<id>-<group>", "<id>-<group>-<worker>"
        if name in by_id:
            return by_id[name]
        base, _, suffix = name.rpartition("-")
        if not base or not suffix.isdigit():
            return None
        name = base
    return None
