"""The store: desired state (model specs) and events, in SQLite or PostgreSQL.

Synchronous SQLAlchemy 2 Core behind small methods: nothing here is on the request hot path
(the gateway reads an in-memory directory), and async callers use ``asyncio.to_thread``. The
schema is owned by Alembic; opening a store upgrades it to the newest revision, so a newer
gpufleet never runs against an older schema.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    String,
    Table,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from gpufleet.errors import StoreError
from gpufleet.spec import Model, Tenant, parse_document, parse_tenant
from gpufleet.store.batches import BatchStore
from gpufleet.store.tables import (
    HEAD_REVISION,
    api_keys,
    events,
    metadata,
    model_revisions,
    models,
    scale_state,
    tenants,
    usage,
    usage_daily,
)

__all__ = [
    "ApplyResult",
    "Event",
    "KeyRecord",
    "Revision",
    "Store",
    "StoredModel",
    "StoredTenant",
    "UsageRow",
    "sqlite_url",
]

ApplyResult = Literal["created", "configured", "unchanged"]


@dataclass(frozen=True, slots=True)
class StoredModel:
    model: Model
    generation: int
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Revision:
    generation: int
    model: Model
    #: new (not yet judged), active (promoted), rolled-back
    status: str
    reason: str


@dataclass(frozen=True, slots=True)
class Event:
    at: dt.datetime
    model: str
    type: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class StoredTenant:
    tenant: Tenant
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class KeyRecord:
    prefix: str
    hash: str
    tenant: str
    name: str
    role: str
    limits: dict[str, Any] | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    updated_at: dt.datetime


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

    def values(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}

    @classmethod
    def from_row(cls, row: Any) -> UsageRow:
        values = {f: getattr(row, f) for f in cls.__slots__}
        values["at"] = _aware(values["at"])
        return cls(**values)


# Alembic's own bookkeeping table, as Alembic creates it.
alembic_version = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), primary_key=True),
)


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'gpufleet.db'}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Store(BatchStore):
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            # LIFO: the ledger's writes come from a thread pool; handing out the most recently
            # used connection keeps one SQLite page cache warm instead of growing five.
            self._engine: Engine = create_engine(url, pool_pre_ping=True, pool_use_lifo=True)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise StoreError(f"cannot use store {_redact(url)}: {exc}") from exc
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _sqlite_pragmas)
        # SQLite allows one writer; serialising writes here avoids "database is locked".
        self._write_lock = threading.Lock()

    @classmethod
    def open(cls, url: str) -> Store:
        store = cls(url)
        store.migrate()
        return store

    def migrate(self) -> None:
        """Bring the schema to ``HEAD_REVISION``.

        An empty database gets the tables at once and is stamped at head (Alembic's advice for
        new databases); one at head is left alone. Only an older schema runs the migration
        scripts, so the common starts skip importing Alembic (~0.3 s of ``gpufleet up``).
        """
        with self._write() as conn:
            tables = set(inspect(conn).get_table_names())
            if not tables:
                metadata.create_all(conn)
                alembic_version.create(conn)
                conn.execute(insert(alembic_version).values(version_num=HEAD_REVISION))
                return
            if "alembic_version" in tables:
                current = conn.execute(select(alembic_version.c.version_num)).scalars().all()
                if list(current) == [HEAD_REVISION]:
                    return
        from alembic import command  # costs ~0.2 s to import: only when a migration runs
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self._write() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self._engine.dispose()

    # -- models -----------------------------------------------------------------------------

    def apply_model(self, model: Model) -> tuple[ApplyResult, int]:
        """Create or update a model; the generation changes only when the spec does."""
        doc = model.document()
        now = _now()
        with self._write() as conn:
            row = conn.execute(
                select(models.c.id, models.c.generation, models.c.document).where(
                    models.c.namespace == model.metadata.namespace, models.c.name == model.name
                )
            ).first()
            if row is None:
                self._add_revision(conn, model, 1, doc, now)
                conn.execute(
                    insert(models).values(
                        namespace=model.metadata.namespace,
                        name=model.name,
                        generation=1,
                        document=doc,
                        created_at=now,
                        updated_at=now,
                    )
                )
                return "created", 1
            if row.document == doc:
                return "unchanged", int(row.generation)
            generation = int(row.generation) + 1
            self._add_revision(conn, model, generation, doc, now)
            conn.execute(
                update(models)
                .where(models.c.id == row.id)
                .values(generation=generation, document=doc, updated_at=now)
            )
            return "configured", generation

    def delete_model(self, name: str, namespace: str = "default") -> bool:
        with self._write() as conn:
            result = conn.execute(
                delete(models).where(models.c.namespace == namespace, models.c.name == name)
            )
            conn.execute(
                delete(scale_state).where(
                    scale_state.c.namespace == namespace, scale_state.c.model == name
                )
            )
            conn.execute(
                delete(model_revisions).where(
                    model_revisions.c.namespace == namespace, model_revisions.c.model == name
                )
            )
            return result.rowcount > 0

    @staticmethod
    def _add_revision(
        conn: Connection, model: Model, generation: int, doc: Any, now: dt.datetime
    ) -> None:
        conn.execute(
            delete(model_revisions).where(
                model_revisions.c.namespace == model.metadata.namespace,
                model_revisions.c.model == model.name,
                model_revisions.c.generation >= generation,
            )
        )  # a model deleted and created again starts its generations anew
        conn.execute(
            insert(model_revisions).values(
                namespace=model.metadata.namespace,
                model=model.name,
                generation=generation,
                document=doc,
                status="new",
                reason="",
                created_at=now,
            )
        )

    def revisions(self, name: str, namespace: str = "default") -> list[Revision]:
        """The model's generations, oldest first."""
        query = (
            select(model_revisions)
            .where(model_revisions.c.namespace == namespace, model_revisions.c.model == name)
            .order_by(model_revisions.c.generation)
        )
        with self._connect() as conn:
            return [
                Revision(int(r.generation), parse_document(r.document), r.status, r.reason)
                for r in conn.execute(query)
            ]

    def set_revision_status(
        self, name: str, generation: int, status: str, reason: str = "", namespace: str = "default"
    ) -> None:
        with self._write() as conn:
            conn.execute(
                update(model_revisions)
                .where(
                    model_revisions.c.namespace == namespace,
                    model_revisions.c.model == name,
                    model_revisions.c.generation == generation,
                )
                .values(status=status, reason=reason)
            )

    # -- the autoscaler's state -------------------------------------------------------------

    def scale_states(self, namespace: str = "default") -> dict[str, tuple[int, float]]:
        """Model name → (desired replicas, last activity in unix seconds)."""
        query = select(scale_state).where(scale_state.c.namespace == namespace)
        with self._connect() as conn:
            return {r.model: (int(r.desired), float(r.last_active)) for r in conn.execute(query)}

    def put_scale_state(
        self, model: str, desired: int, last_active: float, namespace: str = "default"
    ) -> None:
        key = (scale_state.c.namespace == namespace) & (scale_state.c.model == model)
        values = {"desired": desired, "last_active": last_active, "updated_at": _now()}
        with self._write() as conn:
            if conn.execute(update(scale_state).where(key).values(**values)).rowcount == 0:
                conn.execute(insert(scale_state).values(namespace=namespace, model=model, **values))

    def get_model(self, name: str, namespace: str = "default") -> StoredModel | None:
        with self._connect() as conn:
            row = conn.execute(
                select(models).where(models.c.namespace == namespace, models.c.name == name)
            ).first()
        return _stored(row) if row is not None else None

    def list_models(self, namespace: str | None = None) -> list[StoredModel]:
        query = select(models).order_by(models.c.namespace, models.c.name)
        if namespace is not None:
            query = query.where(models.c.namespace == namespace)
        with self._connect() as conn:
            return [_stored(r) for r in conn.execute(query)]

    # -- events -----------------------------------------------------------------------------

    def add_event(
        self,
        model: str,
        reason: str,
        message: str,
        *,
        type: str = "Normal",
        namespace: str = "default",
    ) -> None:
        with self._write() as conn:
            conn.execute(
                insert(events).values(
                    at=_now(),
                    namespace=namespace,
                    model=model,
                    type=type,
                    reason=reason,
                    message=message,
                )
            )

    def events(
        self, model: str | None = None, *, limit: int = 100, namespace: str = "default"
    ) -> list[Event]:
        query = select(events).where(events.c.namespace == namespace)
        if model is not None:
            query = query.where(events.c.model == model)
        query = query.order_by(events.c.id.desc()).limit(limit)
        with self._connect() as conn:
            rows = list(conn.execute(query))
        return [Event(_aware(r.at), r.model, r.type, r.reason, r.message) for r in reversed(rows)]

    def count_events(self, model: str) -> int:
        with self._connect() as conn:
            return int(
                conn.execute(select(func.count()).where(events.c.model == model)).scalar_one()
            )

    # -- tenants ----------------------------------------------------------------------------

    def apply_tenant(self, tenant: Tenant) -> ApplyResult:
        doc = tenant.document()
        now = _now()
        with self._write() as conn:
            row = conn.execute(
                select(tenants.c.document).where(tenants.c.name == tenant.name)
            ).first()
            if row is None:
                conn.execute(
                    insert(tenants).values(
                        name=tenant.name, document=doc, created_at=now, updated_at=now
                    )
                )
                return "created"
            if row.document == doc:
                return "unchanged"
            conn.execute(
                update(tenants)
                .where(tenants.c.name == tenant.name)
                .values(document=doc, updated_at=now)
            )
            return "configured"

    def list_tenants(self) -> list[StoredTenant]:
        with self._connect() as conn:
            rows = list(conn.execute(select(tenants).order_by(tenants.c.name)))
        return [
            StoredTenant(parse_tenant(r.document), _aware(r.created_at), _aware(r.updated_at))
            for r in rows
        ]

    def delete_tenant(self, name: str) -> bool:
        """Delete a tenant and revoke its keys (their rows stay: the ledger refers to them)."""
        now = _now()
        with self._write() as conn:
            gone = conn.execute(delete(tenants).where(tenants.c.name == name)).rowcount > 0
            if gone:
                conn.execute(
                    update(api_keys)
                    .where(api_keys.c.tenant == name, api_keys.c.revoked_at.is_(None))
                    .values(revoked_at=now, updated_at=now)
                )
            return gone

    # -- API keys ---------------------------------------------------------------------------

    def add_key(self, key: KeyRecord) -> None:
        with self._write() as conn:
            conn.execute(
                insert(api_keys).values(
                    prefix=key.prefix,
                    hash=key.hash,
                    tenant=key.tenant,
                    name=key.name,
                    role=key.role,
                    limits=key.limits,
                    created_at=key.created_at,
                    expires_at=key.expires_at,
                    revoked_at=key.revoked_at,
                    updated_at=key.updated_at,
                )
            )

    def list_keys(
        self, *, tenant: str | None = None, changed_since: dt.datetime | None = None
    ) -> list[KeyRecord]:
        query = select(api_keys).order_by(api_keys.c.created_at)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        if changed_since is not None:
            query = query.where(api_keys.c.updated_at >= changed_since)
        with self._connect() as conn:
            return [_key(r) for r in conn.execute(query)]

    def get_key(self, prefix: str) -> KeyRecord | None:
        with self._connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.prefix == prefix)).first()
        return _key(row) if row is not None else None

    def revoke_key(self, prefix: str) -> KeyRecord | None:
        now = _now()
        with self._write() as conn:
            conn.execute(
                update(api_keys)
                .where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now, updated_at=now)
            )
            row = conn.execute(select(api_keys).where(api_keys.c.prefix == prefix)).first()
        return _key(row) if row is not None else None

    def replace_key_hash(self, prefix: str, hash: str, *, tenant: str, role: str) -> None:
        """Set a key's secret (the bootstrap admin key taken from the environment)."""
        now = _now()
        with self._write() as conn:
            conn.execute(delete(api_keys).where(api_keys.c.prefix == prefix))
            conn.execute(
                insert(api_keys).values(
                    prefix=prefix,
                    hash=hash,
                    tenant=tenant,
                    name="bootstrap-admin",
                    role=role,
                    limits=None,
                    created_at=now,
                    expires_at=None,
                    revoked_at=None,
                    updated_at=now,
                )
            )

    # -- usage ledger -----------------------------------------------------------------------

    def record_usage(self, rows: Sequence[UsageRow]) -> int:
        """Insert ledger rows and fold them into the daily rollups, in one transaction.

        A row whose request id is already in the ledger is skipped, and so are its rollup
        counts (at most once, even when a batch is retried). Returns the rows inserted.
        """
        if not rows:
            return 0
        unique: dict[str, UsageRow] = {}
        for r in rows:
            unique.setdefault(r.request_id, r)
        with self._write() as conn:
            # Rows already in the ledger (a batch retried after its commit was lost on the
            # way back) are skipped, and so are their rollup counts.
            seen = set(
                conn.execute(select(usage.c.request_id).where(usage.c.request_id.in_(unique)))
                .scalars()
                .all()
            )
            fresh = {rid: r for rid, r in unique.items() if rid not in seen}
            if not fresh:
                return 0
            conn.execute(insert(usage), [r.values() for r in fresh.values()])
            rollup: dict[tuple[dt.date, str, str, str], list[float]] = {}
            for r in fresh.values():
                k = (r.at.astimezone(dt.UTC).date(), r.tenant, r.key_prefix, r.model)
                acc = rollup.setdefault(k, [0, 0, 0, 0, 0, 0.0, 0.0])
                acc[0] += 1
                acc[1] += 1 if r.status >= 400 else 0
                acc[2] += r.prompt_tokens
                acc[3] += r.cached_tokens
                acc[4] += r.completion_tokens
                acc[5] += r.gpu_seconds
                acc[6] += r.cost_usd
            self._add_rollups(conn, rollup)
            return len(fresh)

    def _add_rollups(
        self, conn: Connection, rollup: dict[tuple[dt.date, str, str, str], list[float]]
    ) -> None:
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
            set_={
                "requests": c.requests + added.requests,
                "errors": c.errors + added.errors,
                "prompt_tokens": c.prompt_tokens + added.prompt_tokens,
                "cached_tokens": c.cached_tokens + added.cached_tokens,
                "completion_tokens": c.completion_tokens + added.completion_tokens,
                "gpu_seconds": c.gpu_seconds + added.gpu_seconds,
                "cost_usd": c.cost_usd + added.cost_usd,
            },
        )
        conn.execute(
            stmt,
            [
                {
                    "day": day,
                    "tenant": tenant,
                    "key_prefix": key,
                    "model": model,
                    "requests": int(acc[0]),
                    "errors": int(acc[1]),
                    "prompt_tokens": int(acc[2]),
                    "cached_tokens": int(acc[3]),
                    "completion_tokens": int(acc[4]),
                    "gpu_seconds": acc[5],
                    "cost_usd": acc[6],
                }
                for (day, tenant, key, model), acc in sorted(rollup.items())
            ],
        )

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
        """Totals grouped by tenant, model or key from ``since`` until now.

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
        q_daily = select(
            dim_d.label("name"),
            func.sum(d.requests),
            func.sum(d.errors),
            func.sum(d.prompt_tokens),
            func.sum(d.cached_tokens),
            func.sum(d.completion_tokens),
            func.sum(d.gpu_seconds),
            func.sum(d.cost_usd),
        ).where(d.day >= first_full_day)
        q_raw = select(
            dim_u.label("name"),
            func.count(),
            func.sum(case((u.status >= 400, 1), else_=0)),
            func.sum(u.prompt_tokens),
            func.sum(u.cached_tokens),
            func.sum(u.completion_tokens),
            func.sum(u.gpu_seconds),
            func.sum(u.cost_usd),
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
                    acc = totals.setdefault(str(row[0]), [0, 0, 0, 0, 0, 0.0, 0.0])
                    for i in range(7):
                        acc[i] += row[i + 1] or 0
        fields = (
            "requests",
            "errors",
            "prompt_tokens",
            "cached_tokens",
            "completion_tokens",
            "gpu_seconds",
            "cost_usd",
        )
        out = []
        for name in sorted(totals):
            acc = totals[name]
            item: dict[str, Any] = {by: name}
            for i, f in enumerate(fields):
                item[f] = round(acc[i], 6) if i >= 5 else int(acc[i])
            out.append(item)
        return out

    # -- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"store {_redact(self.url)}: {exc.__class__.__name__}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_lock, self._connect() as conn:
            yield conn


def _key(row: Any) -> KeyRecord:
    return KeyRecord(
        prefix=row.prefix,
        hash=row.hash,
        tenant=row.tenant,
        name=row.name,
        role=row.role,
        limits=row.limits,
        created_at=_aware(row.created_at),
        expires_at=_aware(row.expires_at) if row.expires_at is not None else None,
        revoked_at=_aware(row.revoked_at) if row.revoked_at is not None else None,
        updated_at=_aware(row.updated_at),
    )


def _stored(row: Any) -> StoredModel:
    return StoredModel(
        model=parse_document(row.document),
        generation=int(row.generation),
        created_at=_aware(row.created_at),
        updated_at=_aware(row.updated_at),
    )


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL with NORMAL syncs at checkpoints, not at every commit: the database cannot be
    # corrupted, and only an OS crash or power cut (not a process crash) can lose the last
    # commits. The ledger commits twice a second; an fsync each time cost the gateway ~8 %.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _redact(url: str) -> str:
    """Hide a password in a database URL before it reaches a message."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
