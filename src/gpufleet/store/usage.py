"""The usage ledger in the store: one row per request, and the daily rollups reports read.

A mixin of ``Store`` (same engine, same write lock). Rows arrive in batches from the gateway's
ledger writer; each batch is inserted with its rollups in one transaction, skipping request ids
already recorded (at most once per request). Reports over whole days read the rollups, the
partial first day the raw rows — so a month's report reads thousands of rollup rows, not
millions of requests.
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Callable, Collection, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from sqlalchemy import Connection, Engine, case, func, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.default import DefaultDialect

from gpufleet.errors import StoreError
from gpufleet.store.tables import (
    aware,
    usage,
    usage_daily,
    usage_dead_letters,
    usage_refusals_daily,
)

__all__ = [
    "ROLLUP_SUMS",
    "DeadLetter",
    "RefusalKey",
    "RowsRejected",
    "UsageRow",
    "UsageStore",
]


class RowsRejected(Exception):
    """The store refused rows for a fixed reason (a value it cannot hold, a missing field):
    writing them again fails again. Any other failure (an outage) may pass."""


#: What a refusal is counted by: (day, tenant, key prefix, model, status, reason).
RefusalKey = tuple[dt.date, str, str, str, int, str]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A ledger row set aside: its request id (or a hash of its line), the error, the line."""

    key: str
    error: str
    line: str


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One request in the usage ledger."""

    request_id: str  # the gateway's own, unique
    at: dt.datetime
    tenant: str
    key_prefix: str
    model: str
    replica: str
    route: str
    status: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    duration_ms: float
    gpu_seconds: float
    cost_usd: float
    #: The client's ``x-request-id``, when it sent one (for finding its row; not unique).
    client_request_id: str | None = None
    # Fields are appended, never inserted: the spool stores a row as a positional array, and a
    # line written before a field existed still loads with the field's default.
    #: The request was sent to an endpoint outside the company (``location: external``).
    external: bool = False
    #: Its token counts are the gateway's estimate, not the engine's (or its tokenizer's) count.
    estimated: bool = False

    def values(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}

    @classmethod
    def from_row(cls, row: Any) -> UsageRow:
        values = {f: getattr(row, f) for f in cls.__slots__}
        values["at"] = aware(values["at"])
        return cls(**values)


def _rejected(exc: BaseException | None) -> bool:
    """The database refused the values themselves (or they could not be bound): fixed."""
    if isinstance(exc, (sa_exc.DataError, sa_exc.IntegrityError, TypeError, ValueError)):
        return True
    return isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError)


class _UsageSQL:
    """The ledger's duplicate check and insert as the DBAPI takes them: plain tuples bound by
    the driver. SQLAlchemy's per-row parameter processing was most of a batch's CPU, and the
    writer's thread holds the GIL, so that CPU is the gateway core's; this way a batch takes
    ~0.6 of it on SQLite, ~0.7 on PostgreSQL (bench/ledger_cpu.py). The insert's SQL and the
    columns' bind processors (SQLite's DATETIME string, its floats) are SQLAlchemy's own for
    the dialect, PostgreSQL's bind casts included, so a row is stored exactly as
    ``insert(usage)`` stores it."""

    def __init__(self, dialect: Dialect) -> None:
        positional = dialect
        if not dialect.positional:  # tuples, not dicts: psycopg takes ``%s`` as well
            assert isinstance(dialect, DefaultDialect)
            positional = type(dialect)(paramstyle="format")
        compiled = insert(usage).compile(
            dialect=positional, column_keys=list(UsageRow.__slots__), for_executemany=True
        )
        names = compiled.positiontup
        assert names is not None  # a positional dialect's compilation
        self._insert = compiled.string
        self._values = operator.attrgetter(*names)
        self._processors: list[tuple[int, Callable[[Any], Any]]] = [
            (i, process)
            for i, name in enumerate(names)
            if (process := usage.c[name].type.dialect_impl(dialect).bind_processor(dialect))
        ]
        # PostgreSQL: the ids as one array, since psycopg parses a query of more than a few
        # dozen parameters anew on every call.
        self._array = dialect.name == "postgresql"
        self._select = (
            "SELECT request_id FROM usage WHERE request_id = ANY(%s::VARCHAR[])"
            if self._array
            else "SELECT request_id FROM usage WHERE request_id IN ("
        )

    def present(self, conn: Connection, ids: Collection[str]) -> set[str]:
        """The request ids among ``ids`` already in the ledger."""
        if self._array:
            result = conn.exec_driver_sql(self._select, (list(ids),))
        else:
            result = conn.exec_driver_sql(
                self._select + ", ".join(["?"] * len(ids)) + ")", tuple(ids)
            )
        return set(result.scalars())

    def insert(self, conn: Connection, rows: Sequence[UsageRow]) -> None:
        """Insert rows, each through the bind processors SQLAlchemy would apply."""
        values = self._values
        if not self._processors:
            conn.exec_driver_sql(self._insert, [values(r) for r in rows])
            return
        params = []
        for r in rows:
            v = list(values(r))
            for i, process in self._processors:
                v[i] = process(v[i])
            params.append(tuple(v))
        conn.exec_driver_sql(self._insert, params)


#: What a daily rollup sums, in ``daily_rollups``'s order; ``usage_report`` names them so. The
#: ``external_…`` sums are of rows sent to an endpoint outside the company, ``estimated_requests``
#: counts rows whose tokens are the gateway's estimate: columns beside the totals rather than a
#: key, so a report reads as many rollup rows as before.
ROLLUP_SUMS = (
    "requests",
    "errors",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "gpu_seconds",
    "cost_usd",
    "external_requests",
    "external_prompt_tokens",
    "external_completion_tokens",
    "external_cost_usd",
    "estimated_requests",
)
#: The sums that are money or seconds (floats); the others count.
_FLOAT_SUMS = frozenset({"gpu_seconds", "cost_usd", "external_cost_usd"})

Rollups = dict[tuple[dt.date, str, str, str], list[float]]


def _zeros() -> list[float]:
    """A rollup's sums before any row: counts as ints (PostgreSQL sums them as ``Decimal``,
    which adds to an int, not to a float)."""
    return [0.0 if name in _FLOAT_SUMS else 0 for name in ROLLUP_SUMS]


def daily_rollups(rows: Iterable[UsageRow]) -> Rollups:
    """What ``rows`` add to the daily rollups, per (UTC day, tenant, key, model): the
    ``ROLLUP_SUMS``, in order."""
    rollup: Rollups = {}
    for r in rows:
        k = (r.at.astimezone(dt.UTC).date(), r.tenant, r.key_prefix, r.model)
        acc = rollup.get(k)
        if acc is None:
            acc = rollup[k] = _zeros()
        acc[0] += 1
        acc[1] += 1 if r.status >= 400 else 0
        acc[2] += r.prompt_tokens
        acc[3] += r.cached_tokens
        acc[4] += r.completion_tokens
        acc[5] += r.gpu_seconds
        acc[6] += r.cost_usd
        if r.external:
            acc[7] += 1
            acc[8] += r.prompt_tokens
            acc[9] += r.completion_tokens
            acc[10] += r.cost_usd
        if r.estimated:
            acc[11] += 1
    return rollup


class UsageStore:
    # Provided by Store.
    _engine: Engine

    def _connect(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def record_usage(self, rows: Sequence[UsageRow]) -> int:
        """Insert ledger rows and fold them into the daily rollups, in one transaction.

        A row whose request id is already in the ledger is skipped, and so are its rollup
        counts (at most once, even when a batch is retried). Returns the rows inserted.
        """
        if not rows:
            return 0
        try:
            return self._record_usage(rows)
        except (StoreError, TypeError, ValueError) as exc:
            cause = exc.__cause__ if isinstance(exc, StoreError) else exc
            if not _rejected(cause):
                raise  # the database (or the way to it) failed: may pass
            raise RowsRejected(str(cause).splitlines()[0][:500]) from exc

    @cached_property
    def _usage_sql(self) -> _UsageSQL:
        return _UsageSQL(self._engine.dialect)

    def _record_usage(self, rows: Sequence[UsageRow]) -> int:
        unique: dict[str, UsageRow] = {}
        for r in rows:
            unique.setdefault(r.request_id, r)
        sql = self._usage_sql
        with self._write() as conn:
            # Rows already in the ledger (a batch retried after its commit was lost on the
            # way back) are skipped, and so are their rollup counts.
            seen = sql.present(conn, unique)
            fresh = [r for rid, r in unique.items() if rid not in seen]
            if not fresh:
                return 0
            sql.insert(conn, fresh)
            self._add_rollups(conn, daily_rollups(fresh))
            return len(fresh)

    def _add_rollups(self, conn: Connection, rollup: Rollups) -> None:
        """Add to the daily rollups in one statement (an upsert: both dialects have one)."""
        if self._engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
        stmt = upsert(usage_daily)
        added = stmt.excluded
        c = usage_daily.c
        stmt = stmt.on_conflict_do_update(
            index_elements=[c.day, c.tenant, c.key_prefix, c.model],
            set_={name: c[name] + added[name] for name in ROLLUP_SUMS},
        )
        conn.execute(
            stmt,
            [
                {
                    "day": day,
                    "tenant": tenant,
                    "key_prefix": key,
                    "model": model,
                    **{
                        name: v if name in _FLOAT_SUMS else int(v)
                        for name, v in zip(ROLLUP_SUMS, acc, strict=True)
                    },
                }
                for (day, tenant, key, model), acc in sorted(rollup.items())
            ],
        )

    def record_refusals(self, counts: dict[RefusalKey, int]) -> None:
        """Add refusal counts to the daily refusal rollup (an upsert, one statement)."""
        if not counts:
            return
        if self._engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
        c = usage_refusals_daily.c
        stmt = upsert(usage_refusals_daily)
        stmt = stmt.on_conflict_do_update(
            index_elements=[c.day, c.tenant, c.key_prefix, c.model, c.status, c.reason],
            set_={"refused": c.refused + stmt.excluded.refused},
        )
        with self._write() as conn:
            conn.execute(
                stmt,
                [
                    {
                        "day": day,
                        "tenant": tenant[:63],
                        "key_prefix": key[:16],
                        "model": model[:63],
                        "status": status,
                        "reason": reason[:64],
                        "refused": n,
                    }
                    for (day, tenant, key, model, status, reason), n in sorted(counts.items())
                ],
            )

    def record_dead_letters(self, letters: Sequence[DeadLetter]) -> int:
        """Set rows aside; one already set aside (a replayed spool) is kept once."""
        unique = {d.key[:128]: d for d in letters}
        if not unique:
            return 0
        with self._write() as conn:
            seen = set(
                conn.execute(
                    select(usage_dead_letters.c.key).where(usage_dead_letters.c.key.in_(unique))
                )
                .scalars()
                .all()
            )
            now = dt.datetime.now(dt.UTC)
            fresh = [
                {"key": k, "at": now, "error": d.error, "line": d.line}
                for k, d in unique.items()
                if k not in seen
            ]
            if fresh:
                conn.execute(insert(usage_dead_letters), fresh)
            return len(fresh)

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        t = usage_dead_letters.c
        query = select(t.key, t.at, t.error, t.line).order_by(t.id.desc()).limit(limit)
        with self._connect() as conn:
            return [
                {"key": r.key, "at": aware(r.at).isoformat(), "error": r.error, "line": r.line}
                for r in conn.execute(query)
            ]

    def refusal_report(
        self,
        by: Literal["tenant", "model", "key"],
        *,
        since: dt.datetime,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """Refusals grouped by tenant, model or key, status and reason, over the days from
        ``since``'s (refusals are counted per day)."""
        c = usage_refusals_daily.c
        dim = {"tenant": c.tenant, "model": c.model, "key": c.key_prefix}[by]
        query = (
            select(dim, c.status, c.reason, func.sum(c.refused))
            .where(c.day >= since.astimezone(dt.UTC).date())
            .group_by(dim, c.status, c.reason)
            .order_by(dim, c.status, c.reason)
        )
        if tenant is not None:
            query = query.where(c.tenant == tenant)
        with self._connect() as conn:
            return [
                {by: str(r[0]), "status": int(r[1]), "reason": str(r[2]), "refused": int(r[3])}
                for r in conn.execute(query)
            ]

    def usage_rows(
        self,
        *,
        since: dt.datetime | None = None,
        tenant: str | None = None,
        limit: int = 1000,
    ) -> list[UsageRow]:
        query = select(usage).order_by(usage.c.id.desc()).limit(limit)
        if since is not None:
            query = query.where(usage.c.at >= since)
        if tenant is not None:
            query = query.where(usage.c.tenant == tenant)
        with self._connect() as conn:
            rows = list(conn.execute(query))
        return [UsageRow.from_row(r) for r in reversed(rows)]

    def usage_report(
        self,
        by: Literal["tenant", "model", "key"],
        *,
        since: dt.datetime,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """Totals grouped by tenant, model or key from ``since`` until now: the ``ROLLUP_SUMS``
        by name (of which ``external_…``: what went to endpoints outside the company, and
        ``estimated_requests``: rows whose token counts are the gateway's estimate).

        Whole days come from the daily rollups; the part of the first day after ``since`` is
        summed from the ledger itself (its time index keeps that to one day's rows), so a
        report stays exact and fast at millions of rows.
        """
        since = since.astimezone(dt.UTC)
        first_full_day = since.date() + dt.timedelta(days=1)
        if since.time() == dt.time(0, 0):
            first_full_day = since.date()
        d, u = usage_daily.c, usage.c
        dim_d = {"tenant": d.tenant, "model": d.model, "key": d.key_prefix}[by]
        dim_u = {"tenant": u.tenant, "model": u.model, "key": u.key_prefix}[by]
        sums = [func.sum(d[name]) for name in ROLLUP_SUMS]
        q_daily = select(dim_d.label("name"), *sums).where(d.day >= first_full_day)
        q_raw = select(
            dim_u.label("name"),
            func.count(),
            func.sum(case((u.status >= 400, 1), else_=0)),
            func.sum(u.prompt_tokens),
            func.sum(u.cached_tokens),
            func.sum(u.completion_tokens),
            func.sum(u.gpu_seconds),
            func.sum(u.cost_usd),
            func.sum(case((u.external, 1), else_=0)),
            func.sum(case((u.external, u.prompt_tokens), else_=0)),
            func.sum(case((u.external, u.completion_tokens), else_=0)),
            func.sum(case((u.external, u.cost_usd), else_=0.0)),
            func.sum(case((u.estimated, 1), else_=0)),
        ).where(
            u.at >= since,
            u.at < dt.datetime.combine(first_full_day, dt.time(0, 0), dt.UTC),
        )
        if tenant is not None:
            q_daily = q_daily.where(d.tenant == tenant)
            q_raw = q_raw.where(u.tenant == tenant)
        totals: dict[str, list[float]] = {}
        with self._connect() as conn:
            for query in (q_daily.group_by(dim_d), q_raw.group_by(dim_u)):
                for row in conn.execute(query):
                    acc = totals.setdefault(str(row[0]), _zeros())
                    for i in range(len(ROLLUP_SUMS)):
                        acc[i] += row[i + 1] or 0
        out = []
        for name in sorted(totals):
            item: dict[str, Any] = {by: name}
            for field, v in zip(ROLLUP_SUMS, totals[name], strict=True):
                item[field] = round(v, 6) if field in _FLOAT_SUMS else int(v)
            out.append(item)
        return out
