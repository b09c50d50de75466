"""Quota settlements that could not land yet, retried until the shared store takes them.

``RedisQuotas`` hands a settlement here when Redis cannot take it (down, restarting, hung past
the timeout). One task retries the backlog (``policies.settle_backlog``: bounded, one entry per
lease, a short back-off) and ends when it is empty; ``wake`` — the store just answered an
admission — makes the next attempt immediate, and ``flush`` is awaited by an admission that a
scope refused while settlements are pending, so the first request after Redis returns sees the
slots those settlements free. Settlements are idempotent per lease (``quotas_redis``' script), so
one that may have landed before its error is simply sent again.

An outage is logged twice: when the first settlement is kept, and when the last one lands.
Settlements still pending at ``close`` are logged as lost (their slots free when their leases
expire). They are kept in memory only: a gateway restarted during an outage loses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from gpufleet.policies.settle_backlog import SettleBacklog

__all__ = ["PendingSettlements"]

log = logging.getLogger("gpufleet.gateway.quotas")

T = TypeVar("T")


class PendingSettlements(Generic[T]):
    """Settlements of type ``T`` kept until ``send`` succeeds for each.

    ``send`` raises an exception that ``temporary`` accepts while the store is away; any other
    error is permanent for that settlement, which is dropped with a log line rather than
    blocking the others behind it.
    """

    def __init__(
        self,
        send: Callable[[T], Awaitable[None]],
        temporary: Callable[[Exception], bool],
        *,
        where: str,
        max_items: int = 10_000,
        max_delay_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._temporary = temporary
        self._where = where
        self._clock = clock
        self.backlog: SettleBacklog[T] = SettleBacklog(max_items=max_items, max_delay_s=max_delay_s)
        self._lock = asyncio.Lock()
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.landed_total = 0
        self._outage_landed = 0

    def __len__(self) -> int:
        return len(self.backlog)

    def keep(self, lease: str, item: T, error: Exception) -> None:
        """``item`` could not land (``error``): keep it and make sure it is retried."""
        now = self._clock()
        if not self.backlog:
            log.warning(
                "quota settlements cannot reach %s (%s: %s); keeping them and retrying "
                "until it is back",
                self._where,
                type(error).__name__,
                error,
            )
            self.backlog.failed(now)
        if self.backlog.add(lease, item, now) is not None and self.backlog.dropped == 1:
            log.error(
                "more than %d quota settlements pending: dropping the oldest (their slots free "
                "when their leases expire)",
                self.backlog.max_items,
            )
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="gateway:quota-settlements")
            self._task.add_done_callback(_report)

    def wake(self) -> None:
        """The store answered: retry now rather than after the back-off."""
        if self.backlog:
            self.backlog.wake(self._clock())
            self._woken.set()

    async def flush(self) -> None:
        """One pass over the backlog now; stops at the first temporary failure."""
        async with self._lock:
            since = self.backlog.since
            for lease, item in self.backlog.due(self._clock()):
                try:
                    await self._send(item)
                except Exception as exc:  # noqa: BLE001 - sorted by ``temporary`` below
                    if self._temporary(exc):
                        self.backlog.failed(self._clock())
                        break
                    log.error("dropping the quota settlement of %s: %s", lease, exc)
                self.backlog.landed(lease, self._clock())
                self.landed_total += 1
                self._outage_landed += 1
            if since is not None and not self.backlog:
                log.warning(
                    "quota store %s is back: %d pending settlements landed %.1f s after the "
                    "first failed",
                    self._where,
                    self._outage_landed,
                    self._clock() - since,
                )
                self._outage_landed = 0

    async def _run(self) -> None:
        while self.backlog:
            wait = self.backlog.next_attempt(self._clock())
            if wait > 0:
                self._woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), wait)
            await self.flush()

    async def close(self) -> None:
        """Stop retrying after one last pass; what is still pending is logged as lost."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.backlog:
            self.backlog.wake(self._clock())
            await self.flush()
        if self.backlog:
            log.warning(
                "%d quota settlements never reached %s; their slots free when their leases expire",
                len(self.backlog),
                self._where,
            )


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("retrying quota settlements failed", exc_info=task.exception())
