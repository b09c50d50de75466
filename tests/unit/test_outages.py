"""Outages reported, not shouted: one line down, a reminder a minute, one line back, a gauge;
the batch runner and the admin API through a store that cannot be reached."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from gpufleet.errors import StoreError
from gpufleet.gateway.batch_runner import BatchRunner
from gpufleet.outages import OutageReporter, summary
from gpufleet.store import Store, sqlite_url
from tests import sites
from tests.conftest import eventually


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reporter(clock: Clock) -> tuple[OutageReporter, CollectorRegistry]:
    registry = CollectorRegistry()
    up = Gauge("dep_up", "", ["dependency"], registry=registry)
    failures = Counter("dep_failures", "", ["dependency"], registry=registry)
    outages = OutageReporter(up=up, failures=failures, dependencies=("store", "redis"), clock=clock)
    return outages, registry


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gpufleet.outages"]


def test_one_line_down_a_reminder_a_minute_one_line_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpufleet.outages")
    clock = Clock()
    outages, registry = reporter(clock)
    assert registry.get_sample_value("dep_up", {"dependency": "store"}) == 1
    error = StoreError("store postgresql+psycopg://…: OperationalError: refused\n(Background…)")

    outages.failed("store", error, affected="batches")
    for _ in range(100):  # a pass every half second for 50 s
        clock.now += 0.5
        outages.failed("store", error, affected="admin API (503)")
    [down] = lines(caplog)
    assert down.levelno == logging.ERROR and down.exc_info is None
    assert "store is down (affects batches)" in down.getMessage()
    assert "OperationalError: refused" in down.getMessage()
    assert "Background" not in down.getMessage()  # one line
    assert registry.get_sample_value("dep_up", {"dependency": "store"}) == 0
    assert registry.get_sample_value("dep_up", {"dependency": "redis"}) == 1
    assert registry.get_sample_value("dep_failures_total", {"dependency": "store"}) == 101

    clock.now += 10  # 60 s since the first line: one reminder with the count since
    outages.failed("store", error, affected="batches")
    outages.failed("store", error, affected="batches")
    reminder = lines(caplog)[1]
    assert reminder.levelno == logging.WARNING
    assert "still down after 60 s" in reminder.getMessage()
    assert "101 failures in the last 60 s" in reminder.getMessage()
    assert "batches, admin API (503)" in reminder.getMessage()
    assert len(lines(caplog)) == 2

    clock.now += 5
    outages.note("store", "3 ledger rows held in the spool")
    outages.recovered("store")
    outages.recovered("store")  # already up: nothing more
    back = lines(caplog)[2]
    assert len(lines(caplog)) == 3
    assert back.levelno == logging.INFO
    assert "store is back after 65.0 s: 103 failed calls" in back.getMessage()
    assert "3 ledger rows held in the spool" in back.getMessage()
    assert registry.get_sample_value("dep_up", {"dependency": "store"}) == 1
    assert not outages.is_down("store")


def test_summary_is_one_bounded_line() -> None:
    assert summary(ValueError("a\nb")) == "ValueError: a"
    assert summary(ValueError()) == "ValueError"
    assert len(summary(ValueError("x" * 1000))) == 300


@contextlib.contextmanager
def unreachable(store: Store, where: Path) -> Iterator[None]:
    """The store pointed at a database that cannot be opened (its directory is missing), then
    back at its own: what every store call meets while the database is away."""
    from sqlalchemy import create_engine

    own = store._engine
    store._engine = create_engine(sqlite_url(where / "missing" / "store.db"))
    try:
        yield
    finally:
        store._engine.dispose()
        store._engine = own


async def test_the_batch_runner_logs_one_line_per_outage_not_a_traceback_a_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    store = Store.open(sqlite_url(tmp_path))
    clock = Clock()
    outages, registry = reporter(clock)

    async def execute(*_: object) -> object:
        raise AssertionError("no batch to run")

    runner = BatchRunner(
        store, execute, lambda _: None, gateway_id="gw-test", interval_s=0.01, outages=outages
    )
    runner.start()
    try:
        with unreachable(store, tmp_path):
            start = runner.passes
            await eventually(lambda: runner.passes >= start + 20, "20 passes with the store away")
            assert registry.get_sample_value("dep_up", {"dependency": "store"}) == 0
        await eventually(lambda: not outages.is_down("store"), "the store back")
    finally:
        await runner.close()
        store.close()
    batch_lines = [r for r in caplog.records if r.name.startswith("gpufleet.gateway.batch")]
    assert batch_lines == []  # no traceback a pass
    assert all(r.exc_info is None for r in caplog.records)
    down, back = lines(caplog)
    assert "store is down (affects batches (lines wait))" in down.getMessage()
    assert "store is back" in back.getMessage()
    assert registry.get_sample_value("dep_up", {"dependency": "store"}) == 1


async def test_admin_usage_answers_503_with_retry_after_while_the_store_is_away(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    models = f"""
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: m}}
spec: {{source: "file:{sites.CONFIG}", engine: emulator}}
"""
    async with (
        sites.replica_servers([("m", sites.emulated(time_scale=0.02))]) as urls,
        sites.site(tmp_path, models, lambda *_: urls[0]) as site,
        aiohttp.ClientSession() as http,
    ):
        usage = site.url + "/admin/v1/usage?by=model"
        async with http.get(usage) as r:
            assert r.status == 200
        with unreachable(site.store, tmp_path):
            for _ in range(5):
                async with http.get(usage) as r:
                    assert r.status == 503
                    assert r.headers["retry-after"] == "5"
                    body = await r.json()
                    assert body["error"]["code"] == "store_unavailable"
                    assert body["error"]["type"] == "service_unavailable"
                    text = await r.text()
                    assert "Traceback" not in text and "sqlite" not in text.lower()
            async with http.get(site.url + "/metrics") as r:
                assert 'gpufleet_dependency_up{dependency="store"} 0.0' in await r.text()
        async with http.get(usage) as r:
            assert r.status == 200
        async with http.get(site.url + "/metrics") as r:
            assert 'gpufleet_dependency_up{dependency="store"} 1.0' in await r.text()
    ours = lines(caplog)
    assert len([r for r in ours if " is down " in r.getMessage()]) == 1
    assert len([r for r in ours if " is back " in r.getMessage()]) == 1
    assert not [r for r in caplog.records if r.name.startswith("gpufleet.gateway") and r.exc_info]
