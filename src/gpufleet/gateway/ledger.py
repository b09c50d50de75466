"""The usage ledger: one row per request, written behind the hot path, and what it cost.

**Cost.** A replica costs its price per hour whether it is busy or idle; what a request is
charged is its share of the replica's *busy* time. While several requests are in flight on a
replica, each second of busy time is split between them in proportion to their token weight
(prompt + output budget), so a long generation pays more than a short one beside it. That is a
fair-share integral, kept in O(1) per request with a per-replica "virtual clock" (as weighted
fair queueing does): ``V`` advances by ``dt / W`` where ``W`` is the weight in flight, and a
request of weight ``w`` that started at ``V0`` is charged ``w × (V − V0)`` replica-seconds.
GPU-seconds are replica-seconds × the replica's GPUs; the price is replica-seconds × the
replica's price per second (GPUs × the catalog's price per hour, or ``spec.pricing``).

**Writing.** ``record`` appends to a list and returns: the gateway never waits on the database.
A background task writes the list in batches every ``flush_s`` (or at ``batch`` rows), in one
transaction that also updates the daily rollups. A batch that fails is kept and retried; the
store's unique request id makes the retry count each request at most once. ``close`` writes
everything left, so a graceful shutdown loses no row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from gpufleet.store import Store, UsageRow

__all__ = ["BusyMeter", "Ledger", "MeterTicket"]

log = logging.getLogger("gpufleet.gateway.ledger")


@dataclass(slots=True)
class _Clock:
    virtual: float = 0.0
    weight: float = 0.0
    last: float = 0.0
    count: int = 0


@dataclass(frozen=True, slots=True)
class MeterTicket:
    replica: str
    weight: float
    start: float


class BusyMeter:
    """Each replica's busy time, split between its requests by token weight."""

    def __init__(self) -> None:
        self._clocks: dict[str, _Clock] = {}

    def _advance(self, replica: str, now: float) -> _Clock:
        clock = self._clocks.get(replica)
        if clock is None:
            clock = self._clocks[replica] = _Clock(last=now)
        if clock.weight > 0:
            clock.virtual += (now - clock.last) / clock.weight
        clock.last = now
        return clock

    def start(self, replica: str, weight: float, now: float | None = None) -> MeterTicket:
        weight = max(weight, 1.0)
        clock = self._advance(replica, time.monotonic() if now is None else now)
        clock.weight += weight
        clock.count += 1
        return MeterTicket(replica, weight, clock.virtual)

    def stop(self, ticket: MeterTicket, now: float | None = None) -> float:
        """The request's replica-seconds."""
        clock = self._advance(ticket.replica, time.monotonic() if now is None else now)
        share = ticket.weight * (clock.virtual - ticket.start)
        clock.count -= 1
        clock.weight = clock.weight - ticket.weight if clock.count else 0.0
        if not clock.count:
            del self._clocks[ticket.replica]  # idle: the next request starts a fresh clock
        return share


class Ledger:
    def __init__(self, store: Store, *, flush_s: float = 0.5, batch: int = 500) -> None:
        self.store = store
        self.flush_s = flush_s
        self.batch = batch
        self._rows: list[UsageRow] = []
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.written = 0

    def record(self, row: UsageRow) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.batch:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ledger:writer")

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Write every row recorded so far. One flush at a time: a caller that finds one in
        progress (the timer's) waits for it, so when this returns its rows are in the store."""
        async with self._flushing:
            while self._rows:
                rows, self._rows = self._rows[: self.batch * 4], self._rows[self.batch * 4 :]
                try:
                    self.written += await asyncio.to_thread(self.store.record_usage, rows)
                except Exception as exc:  # noqa: BLE001 - any failure: keep the rows, retry
                    # Keep the rows (ahead of newer ones) and retry on the next tick.
                    self._rows[:0] = rows
                    log.warning("usage ledger: cannot write %d rows yet: %s", len(rows), exc)
                    return

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for _ in range(3):
            await self.flush()
            if not self._rows:
                return
            await asyncio.sleep(0.5)
        log.error("usage ledger: %d rows could not be written at shutdown", len(self._rows))

    @property
    def pending(self) -> int:
        return len(self._rows)
