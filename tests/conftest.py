"""Fixtures shared by all tiers: ports, an in-loop HTTP server, task-leak checking."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar, cast

import pytest
import sqlalchemy as sa
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import ASGIApp

from gpufleet.controller import Controller
from gpufleet.outages import OutageReporter
from gpufleet.store import Store, sqlite_url

T = TypeVar("T")


async def eventually(
    check: Callable[[], T | Awaitable[T]], what: str, *, timeout: float = 30.0
) -> T:
    """The first truthy value of ``check()`` (sync or async), polled until ``timeout``.

    Tests wait on the condition they need, not on a sleep: the timeout is generous because it
    only catches a hang, and a fast machine does not wait for it.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = check()
        value = cast(T, await got) if inspect.isawaitable(got) else got
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.01)


async def passes(controller: Controller, name: str, n: int = 2, *, timeout: float = 30.0) -> None:
    """``n`` whole reconcile passes of ``name``, each begun after the one before finished.

    What a test waits for before asserting that nothing changed (no replica started, stopped
    or written): the controller has looked at the current state, acted, and looked again.
    """
    async with asyncio.timeout(timeout):
        for _ in range(n):
            await controller.reconciled(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """Serve an ASGI app on a free loopback port inside the running loop; yield its base URL."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, http="httptools")
    )
    # The test owns the process's signals: uvicorn's serve() would capture SIGINT/SIGTERM.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running (STYLE.md point 8)."""
    before = set(asyncio.all_tasks())
    yield
    await asyncio.sleep(0)
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    if leaked:
        for t in leaked:
            t.cancel()
        pytest.fail(f"test left tasks running: {[t.get_name() for t in leaked]}")


PG_ADMIN_URL = os.environ.get(
    "GPUFLEET_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the real server, dropped afterwards."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"gpufleet_test_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = (
        sqlite_url(tmp_path)
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    s = Store.open(url)
    assert s._engine.dialect.name == request.param
    yield s
    s.close()


_TIER_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add each test's set-up, call and tear-down time to its tier (tests/<tier>/...)."""
    parts = Path(report.fspath).parts
    if "tests" in parts and parts.index("tests") + 1 < len(parts) - 1:
        tier = parts[parts.index("tests") + 1]
        _TIER_SECONDS[tier] = _TIER_SECONDS.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _TIER_SECONDS:
        terminalreporter.write_sep("-", "time per tier")
        for tier, seconds in sorted(_TIER_SECONDS.items(), key=lambda kv: kv[0]):
            terminalreporter.write_line(f"{tier:12} {seconds:8.1f} s")


def redis_outages() -> tuple[OutageReporter, CollectorRegistry]:
    """A reporter of Redis outages with its gauge and counter in a registry of its own
    (``dep_up``, ``dep_failures_total``), for tests that read what it reported."""
    registry = CollectorRegistry()
    outages = OutageReporter(
        up=Gauge("dep_up", "", ["dependency"], registry=registry),
        failures=Counter("dep_failures", "", ["dependency"], registry=registry),
        dependencies=("redis",),
    )
    return outages, registry
