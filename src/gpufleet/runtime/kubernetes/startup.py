"""A replica's start-up, read off its pod's status (``runtime.startup`` defines the phases).

The kubelet records when each container started and ended, and when the pod became Ready; the
API server keeps those times to the second (RFC 3339, no fraction), so these figures are whole
seconds:

- fetch: the ``wait-for-weights`` init container's ``startedAt`` → ``finishedAt`` (it ended
  with 0: the weights are in the cache). None without one (a ``pvc://`` source), before it
  ends, and once the engine container has restarted (a restart fetches nothing);
- load: the engine container's current ``state.running.startedAt`` → the Ready condition's
  ``lastTransitionTime``. The kubelet's probes (start-up every 10 s, then readiness every 5 s)
  find the engine answering up to a probe period late, and the pod's status does not say when
  it began to: that wait is inside load, and the first-probe phase is None here;
- total: the pod's ``creationTimestamp`` → Ready (scheduling, the image pull, the fetch and the
  load); after a restart, the restarted container's own start → Ready.

A pod that is not Ready has no load or total yet; times missing or unreadable give None, never
a guess.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PodStartup", "pod_startup"]

#: The init container that waits for the loader Job's weights (``loader.wait_for_weights``).
_FETCH = "wait-for-weights"
_ENGINE = "engine"


@dataclass(frozen=True, slots=True)
class PodStartup:
    fetch_s: float | None = None
    load_s: float | None = None
    startup_s: float | None = None
    #: When the pod last became Ready (unix seconds), if it is Ready.
    ready_at: float | None = None


def pod_startup(pod: Mapping[str, Any]) -> PodStartup:
    """The start-up figures of the replica whose (leader) pod is ``pod``."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    engine = _named(status.get("containerStatuses"), _ENGINE)
    restarted = int(engine.get("restartCount", 0) or 0) > 0
    fetch = None
    init = (_named(status.get("initContainerStatuses"), _FETCH).get("state") or {}).get(
        "terminated"
    ) or {}
    if init.get("exitCode") == 0 and not restarted:
        fetch = _span(_time(init.get("startedAt")), _time(init.get("finishedAt")))
    ready = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == "Ready" and c.get("status") == "True"
        ),
        None,
    )
    if ready is None:
        return PodStartup(fetch_s=fetch)
    ready_at = _time(ready.get("lastTransitionTime"))
    running = _time(((engine.get("state") or {}).get("running") or {}).get("startedAt"))
    load = _span(running, ready_at)
    total = load if restarted else _span(_time(meta.get("creationTimestamp")), ready_at)
    return PodStartup(fetch_s=fetch, load_s=load, startup_s=total, ready_at=ready_at)


def _named(statuses: Any, name: str) -> Mapping[str, Any]:
    for s in statuses or []:
        if isinstance(s, Mapping) and s.get("name") == name:
            return s
    return {}


def _time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _span(start: float | None, end: float | None) -> float | None:
    if start is None or end is None or end < start:
        return None
    return end - start
