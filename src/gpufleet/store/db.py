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
from gpufleet.spec import Model, parse_document
from gpufleet.store.tables import HEAD_REVISION, events, metadata, models

__all__ = ["ApplyResult", "Event", "Store", "StoredModel", "sqlite_url"]

ApplyResult = Literal["created", "configured", "unchanged"]


@dataclass(frozen=True, slots=True)
class StoredModel:
    model: Model
    generation: int
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Event:
    at: dt.datetime
    model: str
    type: str
    reason: str
    message: str


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


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self._engine: Engine = create_engine(url, pool_pre_ping=True)
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
            return result.rowcount > 0

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
