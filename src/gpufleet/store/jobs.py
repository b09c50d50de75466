"""GPU jobs in the store: one row per job across its attempts.

A mixin of ``Store``. The row is the job's truth for the scheduler (``controller.jobs``): a job
submitted is Queued; the scheduler moves it to Running when it starts an attempt (with where it
runs), to Preempting or Cancelling while an attempt is asked to stop, and back to Queued — or on to Succeeded, Failed or Cancelled. Each move is one
conditional update (``move_job``: from the phase the caller saw), so a scheduler that restarts
finds every job where it was, and one that races a cancel loses cleanly instead of starting a
cancelled job.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from gpufleet.store.tables import aware, gpu_jobs

__all__ = ["ACTIVE_PHASES", "JOB_PHASES", "JobExists", "JobRecord", "JobStore"]

JOB_PHASES = ("Queued", "Running", "Preempting", "Cancelling", "Succeeded", "Failed", "Cancelled")
#: Phases of a job that is not finished.
ACTIVE_PHASES = ("Queued", "Running", "Preempting", "Cancelling")


class JobExists(Exception):
    """A job of that name is queued or running (a finished one is replaced)."""


@dataclass(frozen=True, slots=True)
class JobRecord:
    name: str
    tenant: str
    document: dict[str, Any]
    phase: str
    attempt: int
    failures: int
    preemptions: int
    reason: str
    placement: dict[str, Any] | None
    pid: int | None
    gpu_seconds: float
    cost_usd: float
    submitted_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES


_FIELDS = tuple(JobRecord.__dataclass_fields__)


def _record(row: Any) -> JobRecord:
    values = {f: getattr(row, f) for f in _FIELDS}
    for name in ("submitted_at", "started_at", "finished_at"):
        if values[name] is not None:
            values[name] = aware(values[name])
    return JobRecord(**values)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class JobStore:
    # Provided by Store.
    def _connect(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def submit_job(self, name: str, tenant: str, document: dict[str, Any]) -> JobRecord:
        """Queue a job; ``JobExists`` while one of that name is not finished (a finished one,
        its ledger rows kept, is replaced by the new submission)."""
        now = _now()
        values = {
            "tenant": tenant,
            "document": document,
            "phase": "Queued",
            "attempt": 0,
            "failures": 0,
            "preemptions": 0,
            "reason": "submitted",
            "placement": None,
            "pid": None,
            "gpu_seconds": 0.0,
            "cost_usd": 0.0,
            "submitted_at": now,
            "started_at": None,
            "finished_at": None,
        }
        with self._write() as conn:
            row = conn.execute(select(gpu_jobs.c.phase).where(gpu_jobs.c.name == name)).first()
            if row is None:
                conn.execute(insert(gpu_jobs).values(name=name, **values))
            elif row.phase in ACTIVE_PHASES:
                raise JobExists(f"job {name!r} is {row.phase.lower()}; cancel it first")
            else:
                conn.execute(update(gpu_jobs).where(gpu_jobs.c.name == name).values(**values))
            return _record(conn.execute(select(gpu_jobs).where(gpu_jobs.c.name == name)).one())

    def job(self, name: str) -> JobRecord | None:
        with self._connect() as conn:
            row = conn.execute(select(gpu_jobs).where(gpu_jobs.c.name == name)).first()
        return _record(row) if row is not None else None

    def jobs(
        self, *, tenant: str | None = None, phases: Sequence[str] | None = None
    ) -> list[JobRecord]:
        query = select(gpu_jobs).order_by(gpu_jobs.c.submitted_at, gpu_jobs.c.name)
        if tenant is not None:
            query = query.where(gpu_jobs.c.tenant == tenant)
        if phases is not None:
            query = query.where(gpu_jobs.c.phase.in_(list(phases)))
        with self._connect() as conn:
            return [_record(r) for r in conn.execute(query)]

    def move_job(self, name: str, expected: Sequence[str], **changes: Any) -> JobRecord | None:
        """Change a job only if it is in one of the ``expected`` phases: the new record, or
        None when it was not (moved meanwhile, or gone). A move to a finished phase stamps
        ``finished_at``."""
        if changes.get("phase") in JOB_PHASES and changes["phase"] not in ACTIVE_PHASES:
            changes.setdefault("finished_at", _now())
        with self._write() as conn:
            done = conn.execute(
                update(gpu_jobs)
                .where(gpu_jobs.c.name == name, gpu_jobs.c.phase.in_(list(expected)))
                .values(**changes)
            )
            if done.rowcount != 1:
                return None
            return _record(conn.execute(select(gpu_jobs).where(gpu_jobs.c.name == name)).one())
