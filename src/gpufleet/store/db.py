"""The store: desired state (model specs) and events, in SQLite or PostgreSQL.

Synchronous SQLAlchemy 2 Core behind small methods: nothing here is on the request hot path
(the gateway reads an in-memory directory), and async callers use ``asyncio.to_thread``. The
schema is owned by Alembic; opening a store upgrades it to the newest revision, so a newer
gpufleet never runs against an older schema.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
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
from gpufleet.planner import PREFILL_POOL_SUFFIX
from gpufleet.spec import Model, Tenant, parse_document, parse_tenant
from gpufleet.store.batches import BatchStore
from gpufleet.store.costs import CostStore
from gpufleet.store.jobs import JobStore
from gpufleet.store.tables import (
    HEAD_REVISION,
    api_keys,
    aware,
    events,
    metadata,
    model_revisions,
    models,
    scale_state,
    tenants,
)
from gpufleet.store.telemetry import GpuHistoryStore
from gpufleet.store.timings import TimingStore
from gpufleet.store.ui_sessions import UiSessionStore
from gpufleet.store.usage import UsageRow, UsageStore

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


class Store(
    BatchStore, UsageStore, CostStore, TimingStore, GpuHistoryStore, UiSessionStore, JobStore
):
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
                    scale_state.c.namespace == namespace,
                    # A disaggregated model's prefill pool keeps its own (``prefill_pool``).
                    scale_state.c.model.in_((name, name + PREFILL_POOL_SUFFIX)),
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
        return [Event(aware(r.at), r.model, r.type, r.reason, r.message) for r in reversed(rows)]

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
            StoredTenant(parse_tenant(r.document), aware(r.created_at), aware(r.updated_at))
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
        created_at=aware(row.created_at),
        expires_at=aware(row.expires_at) if row.expires_at is not None else None,
        revoked_at=aware(row.revoked_at) if row.revoked_at is not None else None,
        updated_at=aware(row.updated_at),
    )


def _stored(row: Any) -> StoredModel:
    return StoredModel(
        model=parse_document(row.document),
        generation=int(row.generation),
        created_at=aware(row.created_at),
        updated_at=aware(row.updated_at),
    )


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
