"""Files and batches in the store: what the Batch API and its runner read and write.

A mixin of ``Store`` (same engine, same write lock) kept apart from the rest of the store. The
runner's guarantees rest on two statements here: ``claim_batches`` hands a batch to one gateway
at a time (a lease in the row, renewed while it runs and taken over once expired), and
``finish_line`` answers a line only while it is pending and moves the batch's counters in the
same transaction — so a line answered twice (a retry after a crash) is written once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, delete, insert, or_, select, update

from gpufleet.store.tables import aware, batch_lines, batches, files

__all__ = ["BatchLine", "BatchRecord", "BatchStore", "FileRecord"]

#: Statuses in which a batch still has work for a runner.
RUNNING = ("in_progress", "cancelling", "finalizing")


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class BatchRecord:
    id: str
    tenant: str
    key_prefix: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    meta: dict[str, str] | None
    created_at: dt.datetime
    expires_at: dt.datetime
    in_progress_at: dt.datetime | None = None
    finalizing_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    cancelling_at: dt.datetime | None = None
    cancelled_at: dt.datetime | None = None
    expired_at: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class BatchLine:
    line: int
    custom_id: str
    body: dict[str, Any]
    status: str = "pending"
    result: dict[str, Any] | None = None


_BATCH_FIELDS = tuple(BatchRecord.__dataclass_fields__)


def _batch(row: Any) -> BatchRecord:
    values = {f: getattr(row, f) for f in _BATCH_FIELDS}
    for key, value in values.items():
        if isinstance(value, dt.datetime):
            values[key] = aware(value)
    return BatchRecord(**values)


def _file(row: Any) -> FileRecord:
    return FileRecord(
        row.id, row.tenant, row.purpose, row.filename, row.bytes, aware(row.created_at)
    )


class BatchStore:
    # Provided by Store.
    def _connect(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    # -- files ------------------------------------------------------------------------------

    def add_file(self, record: FileRecord, content: bytes) -> None:
        with self._write() as conn:
            conn.execute(
                insert(files).values(
                    id=record.id,
                    tenant=record.tenant,
                    purpose=record.purpose,
                    filename=record.filename,
                    bytes=record.bytes,
                    content=content,
                    created_at=record.created_at,
                )
            )

    def get_file(self, file_id: str) -> FileRecord | None:
        cols = [files.c[f] for f in FileRecord.__dataclass_fields__]
        with self._connect() as conn:
            row = conn.execute(select(*cols).where(files.c.id == file_id)).first()
        if row is None:
            return None
        return _file(row)

    def file_content(self, file_id: str) -> bytes | None:
        with self._connect() as conn:
            value = conn.execute(select(files.c.content).where(files.c.id == file_id)).scalar()
        return bytes(value) if value is not None else None

    def list_files(self, tenant: str | None, *, purpose: str | None = None) -> list[FileRecord]:
        cols = [files.c[f] for f in FileRecord.__dataclass_fields__]
        query = select(*cols).order_by(files.c.created_at.desc(), files.c.id.desc())
        if tenant is not None:
            query = query.where(files.c.tenant == tenant)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        with self._connect() as conn:
            return [_file(r) for r in conn.execute(query)]

    def delete_file(self, file_id: str) -> bool:
        with self._write() as conn:
            return conn.execute(delete(files).where(files.c.id == file_id)).rowcount > 0

    # -- batches ----------------------------------------------------------------------------

    def create_batch(self, record: BatchRecord, lines: Sequence[BatchLine]) -> None:
        """The batch and all its lines, in one transaction."""
        row = {f: getattr(record, f) for f in _BATCH_FIELDS}
        with self._write() as conn:
            conn.execute(insert(batches).values(**row))
            conn.execute(
                insert(batch_lines),
                [
                    {
                        "batch_id": record.id,
                        "line": ln.line,
                        "custom_id": ln.custom_id,
                        "body": ln.body,
                        "status": "pending",
                        "result": None,
                    }
                    for ln in lines
                ],
            )

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        with self._connect() as conn:
            row = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
        return _batch(row) if row is not None else None

    def list_batches(
        self, tenant: str | None, *, limit: int = 20, after: str | None = None
    ) -> list[BatchRecord]:
        query = select(batches).order_by(batches.c.created_at.desc(), batches.c.id.desc())
        if tenant is not None:
            query = query.where(batches.c.tenant == tenant)
        with self._connect() as conn:
            if after is not None:
                anchor = conn.execute(
                    select(batches.c.created_at, batches.c.id).where(batches.c.id == after)
                ).first()
                if anchor is not None:
                    query = query.where(
                        or_(
                            batches.c.created_at < anchor.created_at,
                            and_(
                                batches.c.created_at == anchor.created_at,
                                batches.c.id < anchor.id,
                            ),
                        )
                    )
            return [_batch(r) for r in conn.execute(query.limit(limit))]

    def update_batch(self, batch_id: str, *, only_from: Sequence[str] = (), **values: Any) -> bool:
        """Change a batch's fields; with ``only_from``, only while its status is one of them."""
        query = update(batches).where(batches.c.id == batch_id)
        if only_from:
            query = query.where(batches.c.status.in_(only_from))
        with self._write() as conn:
            return conn.execute(query.values(**values)).rowcount > 0

    def claim_batches(
        self, owner: str, now: dt.datetime, lease: dt.timedelta, *, take_over: bool = False
    ) -> list[BatchRecord]:
        """Batches with work this gateway now holds (its own, unclaimed or expired claims),
        their leases renewed; ``take_over`` also takes live claims of others (one gateway)."""
        free = or_(batches.c.owner.is_(None), batches.c.owner == owner, batches.c.lease_until < now)
        condition: ColumnElement[bool] = batches.c.status.in_(RUNNING)
        if not take_over:
            condition = and_(condition, free)
        with self._write() as conn:
            conn.execute(
                update(batches).where(condition).values(owner=owner, lease_until=now + lease)
            )
            rows = conn.execute(
                select(batches).where(batches.c.status.in_(RUNNING), batches.c.owner == owner)
            )
            return [_batch(r) for r in rows]

    def pending_lines(
        self, batch_id: str, *, limit: int, skip: Sequence[int] = ()
    ) -> list[BatchLine]:
        query = (
            select(batch_lines.c.line, batch_lines.c.custom_id, batch_lines.c.body)
            .where(batch_lines.c.batch_id == batch_id, batch_lines.c.status == "pending")
            .order_by(batch_lines.c.line)
            .limit(limit + len(skip))
        )
        with self._connect() as conn:
            rows = list(conn.execute(query))
        skipped = set(skip)
        return [BatchLine(r.line, r.custom_id, r.body) for r in rows if r.line not in skipped][
            :limit
        ]

    def finish_line(self, batch_id: str, line: int, ok: bool, result: dict[str, Any]) -> bool:
        """Record a line's answer once; False when it was already answered."""
        with self._write() as conn:
            changed = conn.execute(
                update(batch_lines)
                .where(
                    batch_lines.c.batch_id == batch_id,
                    batch_lines.c.line == line,
                    batch_lines.c.status == "pending",
                )
                .values(status="done" if ok else "failed", result=result)
            ).rowcount
            if not changed:
                return False
            counter = batches.c.completed if ok else batches.c.failed
            conn.execute(
                update(batches).where(batches.c.id == batch_id).values({counter: counter + 1})
            )
            return True

    def answered_lines(self, batch_id: str) -> Iterator[BatchLine]:
        query = (
            select(batch_lines)
            .where(batch_lines.c.batch_id == batch_id, batch_lines.c.status != "pending")
            .order_by(batch_lines.c.line)
        )
        with self._connect() as conn:
            rows = list(conn.execute(query))
        for r in rows:
            yield BatchLine(r.line, r.custom_id, r.body, r.status, r.result)
