"""Supervised loops: restarted with exponential back-off after an error (or an unexpected end),
counted in a Prometheus counter, logged with their error, named by ``unhealthy()`` while down
(critical ones only) and healthy again after a stable run; cancellation is not an error; a
loop that fails before it is ready fails its start. Time is injected: no test here sleeps."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from gpufleet.supervise import Backoff, Supervisor, collectors, wait_set
from tests.conftest import eventually


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Records the back-off and lets time pass at once."""
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def restarts(task: str) -> float:
    registry = CollectorRegistry()
    for collector in collectors():
        registry.register(collector)
    return registry.get_sample_value("gpufleet_task_restarts_total", {"task": task}) or 0.0


async def until(check: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0)


def test_the_back_off_doubles_up_to_its_bound() -> None:
    backoff = Backoff(first_s=1, factor=2, max_s=60)
    assert [backoff.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


async def test_a_failing_loop_is_restarted_with_back_off_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    supervisor = Supervisor(sleep=clock.sleep, clock=clock, stable_s=30)
    runs: list[float] = []
    healthy = asyncio.Event()
    before = restarts("test:flaky")

    async def flaky() -> None:
        runs.append(clock.now)
        if len(runs) <= 3:
            raise ConnectionError(f"API server away (run {len(runs)})")
        healthy.set()
        await asyncio.Event().wait()  # then runs for good

    with caplog.at_level(logging.WARNING, logger="gpufleet.supervise"):
        supervisor.spawn("test:flaky", flaky)
        await asyncio.wait_for(healthy.wait(), 5)
    assert clock.sleeps == [1.0, 2.0, 4.0]
    assert restarts("test:flaky") - before == 3
    assert "API server away (run 3)" in caplog.text and "test:flaky" in caplog.text
    loop = supervisor.loops["test:flaky"]
    assert loop.restarts == 3 and "ConnectionError" in loop.last_error
    # Running again, but not yet for long enough to count as recovered.
    assert supervisor.unhealthy() == ["test:flaky"]
    clock.now += 30
    assert supervisor.unhealthy() == []
    await supervisor.close()
    assert loop.task is not None and loop.task.done()


async def test_only_critical_loops_that_are_down_make_it_unhealthy() -> None:
    clock = Clock()
    gate = asyncio.Event()

    async def sleep(seconds: float) -> None:
        clock.sleeps.append(seconds)
        await gate.wait()  # stays down until the test lets it restart

    supervisor = Supervisor(sleep=sleep, clock=clock, stable_s=10)

    async def broken() -> None:
        raise RuntimeError("boom")

    async def fine() -> None:
        await asyncio.Event().wait()

    supervisor.spawn("test:critical", broken)
    supervisor.spawn("test:optional", broken, critical=False)
    supervisor.spawn("test:fine", fine)
    await until(lambda: len(clock.sleeps) == 2)
    assert supervisor.unhealthy() == ["test:critical"]
    await supervisor.close()
    assert supervisor.unhealthy() == []


async def test_a_loop_that_returns_is_restarted_and_a_long_run_resets_the_back_off() -> None:
    clock = Clock()
    supervisor = Supervisor(sleep=clock.sleep, clock=clock, stable_s=30)
    runs = 0
    done = asyncio.Event()

    async def ends() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            clock.now += 60  # this run lasted: the back-off starts over
        if runs == 5:
            done.set()
            await asyncio.Event().wait()

    supervisor.spawn("test:ends", ends)
    await asyncio.wait_for(done.wait(), 5)
    assert clock.sleeps == [1.0, 2.0, 1.0, 2.0]
    assert "must not return" in supervisor.loops["test:ends"].last_error
    await supervisor.close()


async def test_cancelling_is_not_an_error_and_leaves_no_task() -> None:
    clock = Clock()
    supervisor = Supervisor(sleep=clock.sleep, clock=clock)
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    loop = supervisor.spawn("test:forever", forever)
    await started.wait()
    await supervisor.close()
    assert loop.task is not None and loop.task.cancelled()
    assert clock.sleeps == [] and loop.restarts == 0
    assert supervisor.loops == {}


async def test_a_loop_that_fails_before_it_is_ready_fails_its_start() -> None:
    clock = Clock()
    supervisor = Supervisor(sleep=clock.sleep, clock=clock)
    ready = asyncio.Event()

    async def forbidden() -> None:
        raise PermissionError("403: cannot list pods")

    loop = supervisor.spawn("test:start", forbidden)
    with pytest.raises(PermissionError, match="cannot list pods"):
        await loop.wait(ready)
    await supervisor.close()

    async def fine() -> None:
        ready.set()
        await asyncio.Event().wait()

    other = Supervisor(sleep=clock.sleep, clock=clock)
    await other.spawn("test:start", fine).wait(ready)
    await other.close()


async def test_two_loops_may_not_share_a_name() -> None:
    supervisor = Supervisor()

    async def forever() -> None:
        await asyncio.Event().wait()

    supervisor.spawn("test:twice", forever)
    with pytest.raises(ValueError, match="already running"):
        supervisor.spawn("test:twice", forever)
    await supervisor.close()


async def test_a_loop_woken_in_the_instant_it_is_cancelled_stops() -> None:
    # asyncio.wait_for on Python 3.11 drops a cancellation that arrives as the event is set: a
    # loop stopped by close() at that instant ran on forever and close() hung (the batch
    # runner did, in CI). wait_set never drops one.
    woken = asyncio.Event()
    waits = 0

    async def loop() -> None:
        nonlocal waits
        while True:
            waits += 1
            await wait_set(woken, 60)
            woken.clear()

    task = asyncio.create_task(loop())
    await eventually(lambda: waits == 1, "the loop waits")
    woken.set()
    task.cancel()
    await asyncio.wait({task}, timeout=30)
    assert task.cancelled(), f"the loop went on ({waits} waits)"


async def test_wait_set_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    event.set()
    assert await wait_set(event, 60) is True
