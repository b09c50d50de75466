"""The event loop watched: how late it runs, and what held it when it stalled.

Everything a gateway does for its requests runs on one event loop. A callback that holds the loop
for 40 ms — a synchronous store write, a big JSON body, a full garbage collection, a controller
pass — delays every request in flight by 40 ms, and that is where a gateway's p99 under load
comes from long before its CPU is spent. Two instruments, both cheap enough to stay on in
production (issue 17):

- **Lag.** A heartbeat callback re-arms itself every ``beat_s`` (10 ms) on the loop; how late
  each beat runs is the loop's lag, observed in ``gpufleet_event_loop_lag_seconds``. A beat
  costs a few µs: about 0.05 % of a core.
- **Stalls, with what ran.** A watchdog thread wakes every ``beat_s`` and, when the last beat is
  older than ``stall_s`` (20 ms), samples the loop thread's stack (``sys._current_frames``)
  once for that stall — the code that is holding the loop, caught in the act. When the loop
  runs again, the beat that ends the stall logs one line: how long it lasted, the garbage
  collections that ran inside it (``gc.callbacks``: a collection holds the GIL, so the
  watchdog cannot sample during one, and the line says so), and the sampled stack's innermost
  frames. Stalls count in ``gpufleet_event_loop_stalls_total``; collections' pauses in
  ``gpufleet_gc_pause_seconds{generation}``. The log is rate-limited: the first stall, then at
  most one line every ``log_every_s`` with how many more there were and the longest.

The watchdog only reads a float and, rarely, a stack: it takes the GIL about 100 times a second
for microseconds, never for the loop's whole switch interval. Like ``gpufleet.outages``, this
module imports nothing from gpufleet: every layer may use it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["LoopWatch", "Stall"]

log = logging.getLogger("gpufleet.loop")

_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True, slots=True)
class Stall:
    """One stall of the loop, as logged."""

    seconds: float
    #: The loop thread's innermost frames while it stalled (empty: no sample was taken).
    stack: tuple[str, ...]
    #: Garbage collections inside the stall: (generation, seconds).
    collections: tuple[tuple[int, float], ...]
    #: Other threads busy when the stack was sampled (they compete for the GIL), as
    #: ``name: function (file:line)``.
    others: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"the event loop stalled for {self.seconds * 1000:.0f} ms"]
        if self.collections:
            gcs = ", ".join(f"gen{g} {s * 1000:.0f} ms" for g, s in self.collections)
            parts.append(f"garbage collection inside it: {gcs}")
        if self.stack:
            parts.append("running: " + " <- ".join(self.stack))
        elif not self.collections:
            parts.append("no sample (the GIL was held throughout: a C call)")
        if self.others:
            parts.append("other threads busy: " + ", ".join(self.others))
        return "; ".join(parts)


class LoopWatch:
    """Lag, stalls and GC pauses of the running loop. ``start`` on the loop, ``close`` to stop."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        beat_s: float = 0.01,
        stall_s: float = 0.02,
        log_every_s: float = 10.0,
        frames: int = 6,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if stall_s <= beat_s:
            raise ValueError(f"stall_s ({stall_s}) must exceed beat_s ({beat_s})")
        self.beat_s = beat_s
        self.stall_s = stall_s
        self.log_every_s = log_every_s
        self._frames = frames
        self._clock = clock
        registry_kw: dict[str, Any] = {"registry": registry}
        self.lag = Histogram(
            "gpufleet_event_loop_lag_seconds",
            "How late the event loop ran a callback due now (a 10 ms heartbeat)",
            buckets=_LAG_BUCKETS,
            **registry_kw,
        )
        self.stalls = Counter(
            "gpufleet_event_loop_stalls",
            "Times the event loop was held longer than the stall threshold (20 ms)",
            **registry_kw,
        )
        self.gc_pause = Histogram(
            "gpufleet_gc_pause_seconds",
            "Garbage collection pauses of the process",
            ["generation"],
            buckets=_GC_BUCKETS,
            **registry_kw,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop_thread = 0
        self._last = 0.0  # when the last beat ran
        self._due = 0.0  # when the next beat is due
        #: (the beat it belongs to, the loop thread's stack, other threads busy)
        self._sample: tuple[float, tuple[str, ...], tuple[str, ...]] | None = None
        self._gc_started = 0.0
        self._gcs: list[tuple[float, int, float]] = []  # (ended at, generation, seconds)
        self._logged_at: float | None = None
        self._unlogged = 0
        self._unlogged_max = 0.0
        #: Every stall seen, newest last (bounded; tests and the console read it).
        self.recent: list[Stall] = []

    def start(self) -> None:
        """Start watching the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        now = self._clock()
        self._last = now
        self._due = now + self.beat_s
        self._handle = self._loop.call_at(self._loop.time() + self.beat_s, self._beat)
        gc.callbacks.append(self._on_gc)
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="gpufleet-loop-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    # On the loop.

    def _beat(self) -> None:
        now = self._clock()
        late = max(0.0, now - self._due)
        self.lag.observe(late)
        gap = now - self._last
        if gap > self.stall_s:
            self._stalled(gap, now)
        self._last = now
        self._due = now + self.beat_s
        assert self._loop is not None
        self._handle = self._loop.call_at(self._loop.time() + self.beat_s, self._beat)

    def _stalled(self, gap: float, now: float) -> None:
        sample = self._sample
        stack, others = (sample[1], sample[2]) if sample and sample[0] == self._last else ((), ())
        since = self._last
        collections = tuple((g, s) for ended, g, s in self._gcs if since <= ended <= now)
        self._gcs = [c for c in self._gcs if c[0] > now]
        stall = Stall(gap, stack, collections, others)
        self.stalls.inc()
        self.recent.append(stall)
        del self.recent[:-100]
        if self._logged_at is None or now - self._logged_at >= self.log_every_s:
            more = ""
            if self._unlogged:
                more = (
                    f" ({self._unlogged} more stalls since the last line, the longest "
                    f"{self._unlogged_max * 1000:.0f} ms)"
                )
            log.warning("%s%s", stall.describe(), more)
            self._logged_at = now
            self._unlogged = 0
            self._unlogged_max = 0.0
        else:
            self._unlogged += 1
            self._unlogged_max = max(self._unlogged_max, gap)

    # Off the loop: the watchdog thread and the collector's callback.

    def _watch(self) -> None:
        sampled_for = -1.0
        while not self._stop.wait(self.beat_s):
            last = self._last
            if last != sampled_for and self._clock() - last > self.stall_s:
                frames = sys._current_frames()
                frame = frames.get(self._loop_thread)
                if frame is not None:
                    self._sample = (
                        last,
                        _innermost(frame, self._frames),
                        _busy(frames, self._loop_thread),
                    )
                sampled_for = last

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = self._clock()
            return
        ended = self._clock()
        seconds = ended - self._gc_started
        generation = int(info.get("generation", 0))
        self.gc_pause.labels(str(generation)).observe(seconds)
        if seconds >= 0.001:
            self._gcs.append((ended, generation, seconds))
            del self._gcs[:-32]


#: Where an idle thread's innermost Python frame is: a pool worker waiting for work, an event or
#: condition waited on, a selector, this watchdog.
_IDLE = frozenset({"_worker", "wait", "select", "poll", "_watch", "sleep", "get", "accept"})


def _busy(frames: dict[int, FrameType], loop_thread: int) -> tuple[str, ...]:
    """The threads other than the loop's that are running Python code, innermost frame each."""
    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in frames.items():
        if ident in (me, loop_thread) or frame.f_code.co_name in _IDLE:
            continue
        out.append(f"{names.get(ident, ident)}: {_innermost(frame, 1)[0]}")
    return tuple(out)


def _innermost(frame: FrameType | None, count: int) -> tuple[str, ...]:
    """``count`` innermost frames as ``function (dir/file:line)``, innermost first (read from
    the frames themselves: no source lines are looked up on the watchdog's thread)."""
    out: list[str] = []
    while frame is not None and len(out) < count:
        code = frame.f_code
        short = "/".join(code.co_filename.rsplit("/", 2)[-2:])
        out.append(f"{code.co_name} ({short}:{frame.f_lineno})")
        frame = frame.f_back
    return tuple(out)
