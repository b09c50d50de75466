"""Outages of a dependency (the store, Redis), reported rather than shouted.

A dependency that is down fails every call made to it: a loop every half second, every request
that needs it. Logging each failure buries the one fact an operator needs under a traceback a
pass (the batch runner wrote 550 KB in 90 s of a PostgreSQL outage). ``OutageReporter`` turns the
failures into an outage: one line when the first fails (what is down, what that affects, the
error in one line), a reminder at most every ``remind_s`` with the failures since, one line when
a call succeeds again (how long it lasted, how many calls failed). ``gpufleet_dependency_up``
says which are down now, ``gpufleet_dependency_failures`` counts every failure.

``recovered`` is called on every success, so it costs a dict lookup while nothing is down. The
clock is injected. Like ``gpufleet.supervise``, this module imports nothing from gpufleet: every
layer may use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

__all__ = ["OutageReporter", "summary"]

log = logging.getLogger("gpufleet.outages")


def summary(exc: BaseException, limit: int = 300) -> str:
    """An error in one line: its class and the first line of its message (no traceback; the
    store's errors carry SQLAlchemy's multi-line text)."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass(slots=True)
class _Outage:
    since: float
    error: str
    affected: list[str]
    failures: int = 1
    reminded_at: float = 0.0
    since_reminder: int = 0
    notes: list[str] = field(default_factory=list)


class OutageReporter:
    """Outages per dependency. ``up``/``failures`` are a gauge and a counter labelled by
    ``dependency`` (the gateway's, in its registry); ``dependencies`` start as up."""

    def __init__(
        self,
        *,
        up: Gauge | None = None,
        failures: Counter | None = None,
        dependencies: Iterable[str] = (),
        remind_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self._up = up
        self._failures = failures
        self.remind_s = remind_s
        self._clock = clock
        self._log = logger
        self._down: dict[str, _Outage] = {}
        for dependency in dependencies:
            self._set_up(dependency, True)

    def is_down(self, dependency: str) -> bool:
        return dependency in self._down

    def failed(self, dependency: str, exc: BaseException, *, affected: str) -> None:
        """A call to ``dependency`` failed; ``affected`` says what that stops (``"batches"``,
        ``"admin API (503)"``)."""
        if self._failures is not None:
            self._failures.labels(dependency).inc()
        now = self._clock()
        outage = self._down.get(dependency)
        if outage is None:
            outage = _Outage(since=now, error=summary(exc), affected=[affected], reminded_at=now)
            self._down[dependency] = outage
            self._set_up(dependency, False)
            self._log.error("%s is down (affects %s): %s", dependency, affected, outage.error)
            return
        outage.failures += 1
        outage.since_reminder += 1
        outage.error = summary(exc)
        if affected not in outage.affected:
            outage.affected.append(affected)
        if now - outage.reminded_at >= self.remind_s:
            self._log.warning(
                "%s still down after %.0f s (affects %s): %d failures in the last %.0f s; %s",
                dependency,
                now - outage.since,
                ", ".join(outage.affected),
                outage.since_reminder,
                now - outage.reminded_at,
                outage.error,
            )
            outage.reminded_at = now
            outage.since_reminder = 0

    def note(self, dependency: str, what: str) -> None:
        """Something held or lost during the outage, said in the line when it is back."""
        outage = self._down.get(dependency)
        if outage is not None and what not in outage.notes:
            outage.notes.append(what)

    def recovered(self, dependency: str, *, note: str | None = None) -> None:
        """A call to ``dependency`` succeeded: if it was down, say it is back."""
        outage = self._down.pop(dependency, None)
        if outage is None:
            return
        self._set_up(dependency, True)
        notes = [*outage.notes, *([note] if note else [])]
        self._log.info(
            "%s is back after %.1f s: %d failed calls (%s)%s",
            dependency,
            self._clock() - outage.since,
            outage.failures,
            ", ".join(outage.affected),
            "; " + "; ".join(notes) if notes else "",
        )

    def _set_up(self, dependency: str, up: bool) -> None:
        if self._up is not None:
            self._up.labels(dependency).set(1 if up else 0)
