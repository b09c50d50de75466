"""Failed controller passes, reported rather than shouted.

A model whose reconcile fails is tried again every few seconds, the autoscaler every pass. Logged
as they came, an API server away for ten minutes wrote a warning per model per retry, and a
store that failed a traceback per autoscaler pass. ``PassFailures`` tells two kinds apart, by
the error's class (as retries are decided, ``errors.py``):

- a dependency that did not answer — the store (``StoreError``), the Kubernetes API server
  (``Unavailable``: no answer, a timeout, 429 or 5xx) — is an outage, told through an
  ``OutageReporter`` (``gpufleet.outages``): one line when the first pass fails on it, saying
  what it stops, a reminder a minute, one line when it is back. It is back once every pass that
  failed on it has passed since: a model whose pass happens not to call the API server does not
  end an outage the others still wait out.
- anything else is logged for its subject (a model's reconcile, the autoscaler pass) and class:
  the first at once, then at most one every ``every_s``, with how many were held back; one line
  when the subject passes again. An error of gpufleet's own (``GpufleetError``: a temporary
  one, a refusal a person must fix) in one line; anything else is a bug, and keeps its
  traceback — rate-limited, so a bug that fails every pass cannot flood the log either.

The clock is injected; ``outages`` may be replaced before the controller starts (``gpufleet
up`` shares the gateway's, whose metrics are served).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpufleet.errors import GpufleetError, StoreError, TemporaryError
from gpufleet.outages import OutageReporter
from gpufleet.runtime.kubernetes.api import Unavailable

__all__ = ["DEPENDENCIES", "PassFailures", "dependency_of"]

log = logging.getLogger("gpufleet.controller")

#: The errors that mean a dependency did not answer, and the name its outage is reported by.
DEPENDENCIES: tuple[tuple[type[BaseException], str], ...] = (
    (StoreError, "store"),
    (Unavailable, "kubernetes API"),
)


def dependency_of(exc: BaseException) -> str | None:
    """The dependency whose outage ``exc`` is, or None for any other failure."""
    for kind, name in DEPENDENCIES:
        if isinstance(exc, kind):
            return name
    return None


@dataclass(slots=True)
class _Logged:
    """The failures of one subject with one class of error since it last passed."""

    at: float
    failures: int = 1
    held: int = 0


class PassFailures:
    """Outcomes of passes by subject (``"reconcile m"``, ``"autoscaler pass"``): ``failed``
    after a pass raised, ``passed`` after one did not."""

    def __init__(
        self,
        outages: OutageReporter | None = None,
        *,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger = log,
    ) -> None:
        self.outages = outages or OutageReporter()
        self.every_s = every_s
        self._clock = clock
        self._log = logger
        #: Dependency → the subjects whose last pass failed on it.
        self._waiting: dict[str, set[str]] = {}
        #: Subject → its other failures since it last passed, by class.
        self._logged: dict[str, dict[type[BaseException], _Logged]] = {}

    def failed(self, subject: str, exc: Exception, *, affected: str, retry_s: float) -> None:
        """A pass of ``subject`` raised ``exc``; it runs again in ``retry_s``. ``affected``
        says what an outage of a dependency stops (``"reconciling models"``)."""
        dependency = dependency_of(exc)
        self._release(subject, keep=dependency)
        if dependency is not None:
            self._waiting.setdefault(dependency, set()).add(subject)
            self.outages.failed(dependency, exc, affected=affected)
            return
        now = self._clock()
        kinds = self._logged.setdefault(subject, {})
        logged = kinds.get(type(exc))
        if logged is None:
            kinds[type(exc)] = _Logged(at=now)
            self._say(subject, exc, retry_s, "")
            return
        logged.failures += 1
        if now - logged.at < self.every_s:
            logged.held += 1
            return
        held = f" ({logged.held} more like it in the last {now - logged.at:.0f} s)"
        self._say(subject, exc, retry_s, held if logged.held else "")
        logged.at, logged.held = now, 0

    def passed(self, subject: str) -> None:
        """A pass of ``subject`` went through: what it waited on answers, its errors are over."""
        self._release(subject, keep=None)
        kinds = self._logged.pop(subject, None)
        if kinds:
            failures = sum(k.failures for k in kinds.values())
            self._log.info("%s passes again after %d failed passes", subject, failures)

    def _release(self, subject: str, *, keep: str | None) -> None:
        """``subject`` no longer waits on any dependency but ``keep``: those it was the last
        to wait on are back."""
        for dependency, subjects in list(self._waiting.items()):
            if dependency == keep or subject not in subjects:
                continue
            subjects.discard(subject)
            if not subjects:
                del self._waiting[dependency]
                self.outages.recovered(dependency)

    def _say(self, subject: str, exc: Exception, retry_s: float, held: str) -> None:
        if isinstance(exc, TemporaryError):
            self._log.warning("%s: %s (retrying in %gs)%s", subject, exc, retry_s, held)
        elif isinstance(exc, GpufleetError):
            self._log.error("%s: %s (retrying in %gs)%s", subject, exc, retry_s, held)
        else:
            self._log.error("%s failed; retrying in %gs%s", subject, retry_s, held, exc_info=exc)
