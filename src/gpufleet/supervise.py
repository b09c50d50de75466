"""Long-lived background loops, supervised: named, restarted with back-off, counted, watched.

A process of gpufleet keeps a few loops running for its whole life — following pods, following
Model resources, feeding the controller replica changes. Before this module each was a bare
``asyncio.create_task``: one exception (the API server away for a moment, a store write that
failed) ended it for good and nothing noticed — the gateway went on routing from a frozen view.
``Supervisor`` runs each loop under one policy, as kopf and controller-runtime do:

- an error (or a loop that returns, which a long-lived loop never should) is logged with its
  error and the loop starts again after an exponential back-off (1 s, 2 s, 4 s … 60 s), reset
  once a run has lasted ``stable_s``;
- every restart counts in ``gpufleet_task_restarts_total{task}`` (prometheus_client) and
  ``gpufleet_task_down{task}`` says which loops are down now; ``collectors()`` hands both to a
  registry that serves them;
- ``unhealthy()`` names the *critical* loops that are down — failed and not yet running again
  for ``stable_s`` — which is what a readiness probe fails on.

Cancellation is never an error: cancelling the task (``close``) ends the loop. Time is injected
(``sleep``, ``clock``) so back-off and recovery are tested in milliseconds. This module imports
nothing from gpufleet: every layer may use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge
from prometheus_client.registry import Collector

__all__ = ["RESTARTS", "Backoff", "Loop", "Supervisor", "collectors", "wait_set"]

log = logging.getLogger("gpufleet.supervise")


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; whether it was set.

    What a loop that sleeps until woken calls instead of ``asyncio.wait_for(event.wait(), t)``:
    on Python 3.11 ``wait_for`` swallows a cancellation that arrives as the event is set (the
    inner wait finished first, so it returns; python/cpython#86296, fixed in 3.12), and a loop
    cancelled by ``close()`` at the instant something woke it runs on forever — ``close()``
    awaiting it hangs. ``asyncio.timeout`` counts cancellations and never drops one.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


#: Not registered anywhere by default: ``collectors()`` are for the registry a process serves.
RESTARTS = Counter(
    "gpufleet_task_restarts",
    "Restarts of supervised background loops after an error, by loop",
    ["task"],
    registry=None,
)
DOWN = Gauge(
    "gpufleet_task_down",
    "1 while a supervised background loop is down (failed, waiting to restart), by loop",
    ["task"],
    registry=None,
)


def collectors() -> tuple[Collector, ...]:
    """The metrics of every supervisor in this process, to register where they are served."""
    return (RESTARTS, DOWN)


@dataclass(frozen=True, slots=True)
class Backoff:
    first_s: float = 1.0
    factor: float = 2.0
    max_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait before the restart that follows the ``failures``-th failure in a row."""
        return float(min(self.max_s, self.first_s * self.factor ** max(0, failures - 1)))


@dataclass(eq=False)
class Loop:
    """One supervised loop: its task and what it has been through."""

    name: str
    critical: bool
    task: asyncio.Task[None] | None = None
    restarts: int = 0
    #: Failures since the last run that lasted ``stable_s`` (drives the back-off).
    failures: int = 0
    last_error: str = ""
    #: When the current run began (clock), None while waiting to restart.
    running_since: float | None = None
    #: Resolved with the first error, for ``wait``: a loop that fails before it is ready
    #: fails its start.
    _first_error: asyncio.Future[None] = field(default_factory=asyncio.Future)

    async def wait(self, ready: asyncio.Event) -> None:
        """Wait until ``ready`` is set; if the loop fails first, raise its error instead (a
        process that cannot start says so rather than waiting)."""
        waiter: asyncio.Future[Any] = asyncio.ensure_future(ready.wait())
        either: list[asyncio.Future[Any]] = [waiter, self._first_error]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not ready.is_set() and self._first_error.done():
            self._first_error.result()


class Supervisor:
    """The supervised loops of one component (a runtime, a controller, a gateway's view)."""

    def __init__(
        self,
        *,
        backoff: Backoff = Backoff(),
        stable_s: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backoff = backoff
        self.stable_s = stable_s
        self._sleep = sleep
        self._clock = clock
        self.loops: dict[str, Loop] = {}

    def spawn(
        self,
        name: str,
        run: Callable[[], Coroutine[Any, Any, None]],
        *,
        critical: bool = True,
    ) -> Loop:
        """Run ``run()`` as the task ``name`` for as long as the supervisor lives, starting it
        again after each error. ``critical``: while it is down, ``unhealthy()`` names it."""
        if name in self.loops and not _finished(self.loops[name]):
            raise ValueError(f"a loop named {name!r} is already running")
        loop = Loop(name, critical)
        # Nobody may ever await the first error: keep asyncio from reporting it as lost.
        loop._first_error.add_done_callback(_consume)
        self.loops[name] = loop
        loop.task = asyncio.create_task(self._supervise(loop, run), name=name)
        return loop

    def unhealthy(self) -> list[str]:
        """Names of the critical loops that are down now."""
        return sorted(n for n, loop in self.loops.items() if loop.critical and self._down(loop))

    async def close(self) -> None:
        tasks = [loop.task for loop in self.loops.values() if loop.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for loop in self.loops.values():
            DOWN.labels(loop.name).set(0)
        self.loops.clear()

    # -- the policy -------------------------------------------------------------------------

    def _down(self, loop: Loop) -> bool:
        if loop.failures == 0:
            return False
        if loop.running_since is None:
            return True
        return self._clock() - loop.running_since < self.stable_s

    async def _supervise(self, loop: Loop, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while True:
            loop.running_since = self._clock()
            try:
                await run()
                error = "the loop ended (a long-lived loop must not return)"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if not loop._first_error.done():
                    loop._first_error.set_exception(exc)
                log.error("%s failed: %s", loop.name, error, exc_info=exc)
            ran = self._clock() - loop.running_since
            loop.running_since = None
            loop.failures = 1 if ran >= self.stable_s else loop.failures + 1
            loop.last_error = error
            delay = self.backoff.delay(loop.failures)
            log.warning("%s down (%s); restarting in %.1f s", loop.name, error, delay)
            DOWN.labels(loop.name).set(1)
            await self._sleep(delay)
            loop.restarts += 1
            RESTARTS.labels(loop.name).inc()
            DOWN.labels(loop.name).set(0)


def _finished(loop: Loop) -> bool:
    return loop.task is None or loop.task.done()


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
