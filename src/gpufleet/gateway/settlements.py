"""Quota settlements that could not land yet, retried until the shared store takes them.

``RedisQuotas`` hands a settlement here when Redis cannot take it (down, restarting, hung past
the timeout). One task retries the backlog (``policies.settle_backlog``: bounded, one entry per
lease, a short back-off) and ends when it is empty; ``wake`` — the store just answered an
admission — makes the next attempt immediate, and ``flush`` is awaited by an admission while
settlements are pending, so the first request after Redis returns sees the slots those
settlements free. Settlements are idempotent per lease (``quotas_redis``' script), so one that
may have landed before its error is simply sent again.

With a ``journal`` (``gateway.settle_journal``, in the gateway's local durable directory) each
kept settlement is also one line on disk before ``keep`` returns, and ``start`` loads what a
previous process left there and retries it at once: a gateway SIGKILLed or restarted during an
outage still frees its tenants' slots when the store is back, not when their leases expire. The
file is emptied whenever the backlog is. Without one they live in memory only, and those still
pending at ``close`` are logged as lost (their slots free when their leases expire).

An outage is reported once, through an ``OutageReporter``: the gateway's (the same ``redis``
outage admissions report, its "back" line saying how many settlements landed), or a private one
when none is given, as the gateway's other Redis users do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from gpufleet.gateway.settle_journal import SettleJournal
from gpufleet.outages import OutageReporter
from gpufleet.policies.settle_backlog import SettleBacklog
from gpufleet.supervise import wait_set

__all__ = ["PendingSettlements"]

log = logging.getLogger("gpufleet.gateway.quotas")

T = TypeVar("T")

_AFFECTED = "quota settlements (kept and retried until it is back)"


class PendingSettlements(Generic[T]):
    """Settlements of type ``T`` kept until ``send`` succeeds for each.

    ``send`` raises an exception that ``temporary`` accepts while the store is away; any other
    error is permanent for that settlement, which is dropped with a log line rather than
    blocking the others behind it. ``where`` names the store in log lines, ``dependency`` in
    ``outages`` (a private reporter unless given; the gateway sets its own after construction,
    so that one Redis outage is reported once).
    """

    def __init__(
        self,
        send: Callable[[T], Awaitable[None]],
        temporary: Callable[[Exception], bool],
        *,
        where: str,
        dependency: str = "redis",
        outages: OutageReporter | None = None,
        journal: SettleJournal[T] | None = None,
        max_items: int = 10_000,
        max_delay_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._temporary = temporary
        self._where = where
        self.dependency = dependency
        self.outages = outages or OutageReporter()
        self.journal = journal
        self._clock = clock
        self.backlog: SettleBacklog[T] = SettleBacklog(max_items=max_items, max_delay_s=max_delay_s)
        self._lock = asyncio.Lock()
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.landed_total = 0
        #: Settlements a previous process left in the journal, loaded by ``start``.
        self.resumed = 0
        self.journal_errors = 0
        self._outage_landed = 0
        #: When a settlement first failed in the current episode (None: none failed yet).
        self._failed_since: float | None = None

    def __len__(self) -> int:
        return len(self.backlog)

    def start(self) -> None:
        """Load what a previous process left in the journal and retry it at once (in the
        running loop; the file is small, read on the loop like the ledger spool's)."""
        if self.journal is None or self.journal.is_open:
            return
        try:
            left = self.journal.open()
        except OSError as exc:  # unreadable: the gateway serves, settlements kept in memory
            log.error(
                "quota settlement journal %s cannot be used (%s); pending settlements are kept "
                "in memory only",
                self.journal.path,
                exc,
            )
            self.journal = None
            return
        now = self._clock()
        for lease, item in left:
            self._add(lease, item, now)
        if not left:
            self.journal.clear()  # unreadable lines only: nothing to send
            return
        self.resumed = len(self.backlog)
        log.warning(
            "%d quota settlements a previous gateway could not land on %s were in %s: "
            "retrying them now",
            self.resumed,
            self._where,
            self.journal.path,
        )
        self._ensure_task()

    def keep(self, lease: str, item: T, error: Exception) -> None:
        """``item`` could not land (``error``): keep it (on disk too, with a journal) and make
        sure it is retried."""
        now = self._clock()
        if not self.backlog:
            self.backlog.failed(now)  # the first retry after the back-off, not at once
        self._failed(error, now)
        self._add(lease, item, now)
        self._write(lease, item)
        self._ensure_task()

    def _add(self, lease: str, item: T, now: float) -> None:
        if self.backlog.add(lease, item, now) is not None and self.backlog.dropped == 1:
            log.error(
                "more than %d quota settlements pending: dropping the oldest (their slots free "
                "when their leases expire)",
                self.backlog.max_items,
            )

    def _write(self, lease: str, item: T) -> None:
        if self.journal is None:
            return
        try:
            if not self.journal.is_open:  # kept before ``start``: what is there is kept too
                for old, value in self.journal.open():
                    self._add(old, value, self._clock())
            self.journal.append(lease, item)
            if self.journal.lines > 2 * self.backlog.max_items:
                self.journal.rewrite(self.backlog.items())
        except OSError as exc:  # disk full: the settlement is still retried from memory
            self.journal_errors += 1
            if self.journal_errors == 1 or self.journal_errors % 1000 == 0:
                log.error("quota settlement journal %s: cannot write: %s", self.journal.path, exc)

    def _failed(self, error: Exception, now: float) -> None:
        if self._failed_since is None:
            self._failed_since = now
        self.outages.failed(self.dependency, error, affected=_AFFECTED)

    def _ensure_task(self) -> None:
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
            for lease, item in self.backlog.due(self._clock()):
                try:
                    await self._send(item)
                except Exception as exc:  # noqa: BLE001 - sorted by ``temporary`` below
                    if self._temporary(exc):
                        now = self._clock()
                        self.backlog.failed(now)
                        self._failed(exc, now)
                        break
                    log.error("dropping the quota settlement of %s: %s", lease, exc)
                self.backlog.landed(lease, self._clock())
                self.landed_total += 1
                self._outage_landed += 1
            if self._outage_landed and not self.backlog:
                self._emptied()

    def _emptied(self) -> None:
        """The last pending settlement landed: the journal is emptied, the outage over."""
        if self.journal is not None and self.journal.is_open:
            try:
                self.journal.clear()
            except OSError as exc:  # what it holds is replayed at the next start: harmless
                log.error("quota settlement journal %s: cannot empty: %s", self.journal.path, exc)
        landed, self._outage_landed = self._outage_landed, 0
        since, self._failed_since = self._failed_since, None
        what = f"{landed} pending quota settlements landed"
        if self.outages.is_down(self.dependency):
            self.outages.recovered(self.dependency, note=what)
        elif since is not None:
            log.warning(
                "quota store %s is back: %s %.1f s after the first failed",
                self._where,
                what,
                self._clock() - since,
            )
        else:
            log.info("quota store %s: %s (left by a previous gateway)", self._where, what)

    async def _run(self) -> None:
        while self.backlog:
            wait = self.backlog.next_attempt(self._clock())
            if wait > 0:
                self._woken.clear()
                await wait_set(self._woken, wait)
            await self.flush()
            if self.backlog and self.journal is not None and self.journal.is_open:
                # Now and then, off the hot path; the journal's lock keeps ``close`` and
                # ``rewrite`` from closing the file under it.
                await asyncio.to_thread(self.journal.sync)

    async def close(self) -> None:
        """Stop retrying after one last pass; what is still pending stays in the journal for
        the next start, or is logged as lost without one."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.backlog:
            self.backlog.wake(self._clock())
            await self.flush()
        if self.backlog and self.journal is not None and self.journal.is_open:
            log.warning(
                "%d quota settlements not yet taken by %s are kept in %s; the next start "
                "sends them",
                len(self.backlog),
                self._where,
                self.journal.path,
            )
        elif self.backlog:
            log.warning(
                "%d quota settlements never reached %s; their slots free when their leases expire",
                len(self.backlog),
                self._where,
            )
        if self.journal is not None:
            self.journal.close()


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("retrying quota settlements failed", exc_info=task.exception())
