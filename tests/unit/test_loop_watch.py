"""The event loop watched (issue 17): its lag observed, a stall logged once with the code that
held the loop, garbage collections timed, the log rate-limited."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from gpufleet.loop_watch import LoopWatch, Stall
from tests.conftest import eventually


@pytest.fixture
async def watch() -> AsyncIterator[LoopWatch]:
    w = LoopWatch(CollectorRegistry(), log_every_s=3600.0)
    w.start()
    yield w
    w.close()


def hold_the_loop(watch: LoopWatch) -> None:
    """Block the loop (as a synchronous call would) until the watchdog has caught it."""
    deadline = time.monotonic() + 30
    while watch._sample is None and time.monotonic() < deadline:
        time.sleep(0.005)


def value(metric: Histogram | Counter, name: str, **labels: str) -> float:
    return sum(
        s.value
        for m in metric.collect()
        for s in m.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def stall_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gpufleet.loop"]


async def test_a_stall_is_logged_once_with_what_held_the_loop(
    watch: LoopWatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "gpufleet.loop")
    await eventually(
        lambda: value(watch.lag, "gpufleet_event_loop_lag_seconds_count") >= 3, "three beats"
    )
    assert not watch.recent
    hold_the_loop(watch)

    await eventually(lambda: watch.recent, "the stall seen")
    stall = watch.recent[-1]
    assert stall.seconds > watch.stall_s
    assert any("hold_the_loop" in frame for frame in stall.stack), stall.stack
    assert "test_loop_watch.py" in stall.stack[0]
    (line,) = stall_lines(caplog)
    assert "the event loop stalled for" in line and "hold_the_loop" in line
    assert value(watch.stalls, "gpufleet_event_loop_stalls_total") == 1


async def test_beats_on_a_free_loop_are_no_stalls(watch: LoopWatch) -> None:
    """Awaiting (the loop free to run its callbacks) for a while is not a stall."""
    for _ in range(20):
        await asyncio.sleep(0.005)
    assert not watch.recent


async def test_later_stalls_are_counted_into_the_next_line(
    watch: LoopWatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "gpufleet.loop")
    for n in range(1, 4):
        watch._sample = None
        hold_the_loop(watch)
        await eventually(lambda: len(watch.recent) >= n, f"stall {n}")  # noqa: B023
    assert len(stall_lines(caplog)) == 1
    assert watch._unlogged == 2
    watch.log_every_s = 0.0
    watch._sample = None
    hold_the_loop(watch)
    await eventually(lambda: len(stall_lines(caplog)) == 2, "the next line")
    assert "(2 more stalls since the last line, the longest" in stall_lines(caplog)[1]


async def test_garbage_collections_are_timed(watch: LoopWatch) -> None:
    def count() -> float:
        return value(watch.gc_pause, "gpufleet_gc_pause_seconds_count", generation="2")

    before = count()
    gc.collect()
    assert count() == before + 1


async def test_a_thread_busy_during_a_stall_is_named(watch: LoopWatch) -> None:
    """A thread running Python code competes for the GIL with the loop: the stall says which."""
    stop = threading.Event()

    def spin_in_a_thread() -> None:
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=spin_in_a_thread, name="busy-bee")
    thread.start()
    try:
        hold_the_loop(watch)
        await eventually(lambda: watch.recent, "the stall seen")
    finally:
        stop.set()
        thread.join()
    assert any(o.startswith("busy-bee: ") for o in watch.recent[-1].others)
    assert "other threads busy: busy-bee" in watch.recent[-1].describe()


def test_a_stall_inside_a_collection_says_so() -> None:
    assert Stall(0.05, (), ((2, 0.045),)).describe() == (
        "the event loop stalled for 50 ms; garbage collection inside it: gen2 45 ms"
    )
    assert "no sample" in Stall(0.03, (), ()).describe()


def test_the_threshold_must_exceed_the_beat() -> None:
    with pytest.raises(ValueError, match="stall_s"):
        LoopWatch(CollectorRegistry(), beat_s=0.02, stall_s=0.02)
