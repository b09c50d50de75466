"""The usage ledger: one row per request, written behind the hot path, and what it cost.

**Cost.** A replica costs its price per hour whether it is busy or idle; what a request is
charged is its share of the replica's *busy* time. While several requests are in flight on a
replica, each second of busy time is split between them in proportion to their token weight
(prompt + output budget), so a long generation pays more than a short one beside it
(``policies.busy_meter``, which the simulator runs too).
GPU-seconds are replica-seconds × the replica's GPUs; the price is replica-seconds × the
replica's price per second (GPUs × the catalog's price per hour, or ``spec.pricing``).

**Writing.** ``record`` hands the row to the local spool (``spool``: one ``write()``, so it
survives a SIGKILL; fsync every ~100 ms for power loss) and to a bounded buffer, and returns:
the gateway never waits on the database. It is called before the answer's last byte (a
stream's ``[DONE]``) is sent, so an answered request always has its row on disk. A background
task writes the rows every ``flush_s`` (or at ``batch`` rows), in transactions that also update
the daily rollups, then removes the spool segments they came from; segments a dead process left
are replayed at start. Past ``max_pending`` rows in memory (a long store outage) the spool alone
keeps them and they are read back from it. The store's unique request id makes a retried or
replayed row count at most once. A failure of the store (an outage) keeps every row and retries;
a row the store rejects for a fixed reason (``RowsRejected``) is set aside with its error in the
dead-letter table and the rows behind it go on. Without a spool (tests, benchmarks' baseline)
rows past ``max_pending`` are dropped and counted. Refusals (requests that never reached an
engine) are only counted — per day, tenant, key, model, status and reason — and written with
each flush; those counted in the last ``flush_s`` before a SIGKILL are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpufleet.gateway.spool import Spool, encode_row
from gpufleet.store import DeadLetter, RefusalKey, RowsRejected, Store, UsageRow
from gpufleet.supervise import Supervisor, wait_set

__all__ = ["Ledger"]

log = logging.getLogger("gpufleet.gateway.ledger")


class Ledger:
    def __init__(
        self,
        store: Store,
        *,
        spool: Spool | None = None,
        flush_s: float = 0.5,
        batch: int = 500,
        max_pending: int = 50_000,
        fsync_s: float = 0.1,
    ) -> None:
        self.store = store
        self.spool = spool
        self.flush_s = flush_s
        self.batch = batch
        self.max_pending = max_pending
        self.fsync_s = fsync_s
        #: Rows waiting for the store, by spool segment (0: in memory only).
        self._rows: dict[int, list[UsageRow]] = {}
        self._count = 0
        #: Segments some of whose rows are only in the spool (the buffer was full).
        self._partial: set[int] = set()
        self._refusals: dict[RefusalKey, int] = {}
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._loops = Supervisor()
        self._syncing: asyncio.Future[None] | None = None
        #: When the store started failing (None: it takes rows), for one line down, one back.
        self._down_since: float | None = None
        self._reminded = 0.0
        self.written = 0
        self.dead_letters = 0
        self.dropped = 0
        self.spool_errors = 0
        self.replayed = 0

    def record(self, row: UsageRow) -> None:
        seq = 0
        if self.spool is not None:
            try:
                seq = self.spool.append(encode_row(row))
            except OSError as exc:  # disk full: the row is kept in memory, if there is room
                self.spool_errors += 1
                if self.spool_errors == 1 or self.spool_errors % 1000 == 0:
                    log.error("usage ledger: cannot write to the spool: %s", exc)
        if self._count >= self.max_pending:
            if seq:
                self._partial.add(seq)  # on disk: read back from the spool
            else:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("usage ledger: %d rows dropped (buffer full)", self.dropped)
            self._wake.set()
            return
        self._rows.setdefault(seq, []).append(row)
        self._count += 1
        if self._count >= self.batch:
            self._wake.set()

    def refuse(self, key: RefusalKey) -> None:
        """Count a request refused before it reached an engine (written with the next batch)."""
        self._refusals[key] = self._refusals.get(key, 0) + 1

    def start(self) -> None:
        """Take the spool, start the writer (its first flush replays what the spool holds
        from a previous process) and the fsyncs. Raises ``SpoolBusy``."""
        if self.spool is not None:
            self.spool.open()
        self._loops.spawn("ledger:writer", self._loop, critical=False)
        if self.spool is not None:
            self._loops.spawn("ledger:fsync", self._sync_loop, critical=False)

    async def _loop(self) -> None:
        while True:
            await self.flush()
            await wait_set(self._wake, self.flush_s)
            self._wake.clear()

    async def _sync_loop(self) -> None:
        assert self.spool is not None
        while True:
            await asyncio.sleep(self.fsync_s)
            self._syncing = asyncio.ensure_future(asyncio.to_thread(self.spool.sync))
            await asyncio.shield(self._syncing)

    async def flush(self) -> bool:
        """Write every row recorded so far (and what the spool holds from before). One flush at
        a time: a caller that finds one in progress waits for it. True when all is written."""
        async with self._flushing:
            ok = await self._flush()
        now = time.monotonic()
        if not ok and self._down_since is None:
            self._down_since = self._reminded = now
            log.error(
                "usage ledger: the store does not take rows; they wait in the %s",
                "spool" if self.spool is not None else "gateway's memory",
            )
        elif not ok and now - self._reminded >= 60:
            self._reminded = now
            log.warning(
                "usage ledger: the store still does not take rows (%d waiting)", self.pending
            )
        elif ok and self._down_since is not None:
            log.warning(
                "usage ledger: the store takes rows again after %.0f s", now - self._down_since
            )
            self._down_since = None
        return ok

    async def _flush(self) -> bool:
        sealed = self.spool.seal() if self.spool is not None else []
        if not await self._write_segment(0):
            return False
        for seq in sealed:
            if not await self._write_segment(seq):
                return False
            assert self.spool is not None
            self.spool.remove(seq)
        if self._refusals:
            counts, self._refusals = self._refusals, {}
            try:
                await asyncio.to_thread(self.store.record_refusals, counts)
            except Exception as exc:  # noqa: BLE001 - an outage: keep the counts, retry
                for key, n in counts.items():
                    self._refusals[key] = self._refusals.get(key, 0) + n
                self._log_failure(exc)
                return False
        return True

    async def _write_segment(self, seq: int) -> bool:
        """Write one segment's rows (0: the rows kept only in memory); False to retry later."""
        bad: list[DeadLetter] = []
        if seq and (seq in self._partial or seq not in self._rows):
            assert self.spool is not None
            segment = await asyncio.to_thread(self.spool.read, seq)
            rows = [row for row, _ in segment.rows]
            bad = [DeadLetter(_line_key(b.line), b.error, _text(b.line)) for b in segment.bad]
            replay = seq not in self._rows and seq not in self._partial
        elif seq:
            rows, replay = self._rows.get(seq, []), False
        else:  # still growing: taken whole, given back in front on failure
            rows = self._rows.pop(0, [])
            self._count -= len(rows)
            written = False
            try:
                written = await self._write_rows(rows, bad, replay=False)
            finally:  # failed, or cancelled (close): written again later counts once
                if not written:
                    self._rows[0] = rows + self._rows.get(0, [])
                    self._count += len(rows)
            return written
        if not await self._write_rows(rows, bad, replay=replay):
            return False
        self._count -= len(self._rows.pop(seq, ()))
        self._partial.discard(seq)
        return True

    async def _write_rows(
        self, rows: list[UsageRow], bad: list[DeadLetter], *, replay: bool
    ) -> bool:
        for i in range(0, len(rows), self.batch * 4):
            chunk = rows[i : i + self.batch * 4]
            try:
                written = await asyncio.to_thread(self.store.record_usage, chunk)
            except RowsRejected:
                alone = await self._one_by_one(chunk, bad)
                if alone is None:
                    return False
                written = alone
            except Exception as exc:  # noqa: BLE001 - an outage: keep the rows, retry
                self._log_failure(exc)
                return False
            self.written += written
            if replay:
                self.replayed += written
        if bad:
            try:
                await asyncio.to_thread(self.store.record_dead_letters, bad)
            except Exception as exc:  # noqa: BLE001 - an outage: keep the rows, retry
                self._log_failure(exc)
                return False
            self.dead_letters += len(bad)
            for letter in bad:
                log.error("usage ledger: row %s set aside: %s", letter.key, letter.error)
        return True

    async def _one_by_one(self, rows: list[UsageRow], bad: list[DeadLetter]) -> int | None:
        """A batch the store rejected: each row alone, so only those at fault are set aside."""
        written = 0
        for row in rows:
            try:
                written += await asyncio.to_thread(self.store.record_usage, [row])
            except RowsRejected as exc:
                line = _text(encode_row(row)) if _encodable(row) else repr(row)
                bad.append(DeadLetter(row.request_id or _line_key(line.encode()), str(exc), line))
            except Exception as exc:  # noqa: BLE001 - an outage: keep the rows, retry
                self._log_failure(exc)
                return None
        return written

    def _log_failure(self, exc: Exception) -> None:
        if self._down_since is None:
            log.warning("usage ledger: cannot write rows yet: %s: %s", type(exc).__name__, exc)

    async def close(self) -> None:
        """Stop the loops, write what is left (three tries), close the spool — what could not
        be written stays in it for the next start."""
        await self._loops.close()
        if self._syncing is not None:
            with contextlib.suppress(Exception):
                await self._syncing
        for attempt in range(3):
            if await self.flush():
                break
            if attempt < 2:
                await asyncio.sleep(0.5)
        else:
            log.error(
                "usage ledger: %d rows could not be written at shutdown%s",
                self.pending,
                "; they stay in the spool" if self.spool is not None else "",
            )
        if self.spool is not None:
            self.spool.close()

    @property
    def pending(self) -> int:
        return self._count + len(self._partial)

    def collector(self) -> Collector:
        """The ledger's counters, for the registry the gateway serves."""
        return _LedgerCollector(self)


class _LedgerCollector(Collector):
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def collect(self) -> Iterable[Metric]:
        ledger = self._ledger
        for name, doc, value in (
            ("gpufleet_ledger_rows_written", "Usage rows written to the store", ledger.written),
            (
                "gpufleet_ledger_rows_replayed",
                "Usage rows written from a spool a previous process left",
                ledger.replayed,
            ),
            (
                "gpufleet_ledger_dead_letters",
                "Usage rows the store rejected for a fixed reason, set aside",
                ledger.dead_letters,
            ),
            (
                "gpufleet_ledger_rows_dropped",
                "Usage rows dropped: no spool and the buffer full",
                ledger.dropped,
            ),
            (
                "gpufleet_ledger_spool_errors",
                "Usage rows the spool could not write (disk full)",
                ledger.spool_errors,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "gpufleet_ledger_rows_pending", "Usage rows waiting for the store", value=ledger.pending
        )


def _encodable(row: UsageRow) -> bool:
    try:
        encode_row(row)
    except (TypeError, ValueError):
        return False
    return True


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\n")


def _line_key(line: bytes) -> str:
    return "sha256:" + hashlib.sha256(line).hexdigest()
