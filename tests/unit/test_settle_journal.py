"""The journal of pending quota settlements: one line each on disk, emptied when none is
pending, read back at the next start (issue 16: settlements survive a gateway restart)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gpufleet.gateway.settle_journal import SettleJournal
from gpufleet.gateway.settlements import PendingSettlements
from gpufleet.outages import OutageReporter
from tests.conftest import eventually
from tests.unit.test_settle_backlog import FakeStore, temporary


def decode(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"not a settlement: {value!r}")
    return value


def journal(path: Path) -> SettleJournal[str]:
    return SettleJournal(path, lambda item: item, decode)


def pending(
    store: FakeStore,
    path: Path,
    *,
    max_items: int = 10_000,
    max_delay_s: float = 0.05,
    outages: OutageReporter | None = None,
) -> PendingSettlements[str]:
    return PendingSettlements(
        store.send,
        temporary,
        where="fake",
        journal=journal(path),
        max_items=max_items,
        max_delay_s=max_delay_s,
        outages=outages,
    )


def test_settlements_round_trip_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    first = journal(path)
    assert first.open() == []
    first.append("a", "settle a")
    first.append("b", "settle b")
    first.append("a", "settle a again")  # the backlog keeps the last one per lease
    first.close()
    again = journal(path)
    assert again.open() == [("a", "settle a"), ("b", "settle b"), ("a", "settle a again")]
    assert again.lines == 3
    again.close()


def test_a_torn_last_line_is_skipped_and_cut_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j.jsonl"
    j = journal(path)
    j.open()
    j.append("a", "settle a")
    j.close()
    with path.open("ab") as f:
        f.write(b'{"lease":"b","settlem')  # a crash in the middle of a write
    again = journal(path)
    with caplog.at_level(logging.WARNING, "gpufleet.gateway.quotas"):
        assert again.open() == [("a", "settle a")]
    assert [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()]
    again.append("c", "settle c")  # starts on a line of its own
    again.close()
    assert journal(path).open() == [("a", "settle a"), ("c", "settle c")]


def test_unreadable_lines_are_skipped_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(
        b"not json\n"
        b'{"lease":"a","settlement":"settle a"}\n'
        b"[1,2]\n"
        b'{"lease":"b","settlement":42}\n'
        b'{"settlement":"no lease"}\n'
        b"\n"
        b'{"lease":"c","settlement":"settle c"}\n'
    )
    j = journal(path)
    with caplog.at_level(logging.WARNING, "gpufleet.gateway.quotas"):
        assert j.open() == [("a", "settle a"), ("c", "settle c")]
    j.close()
    (line,) = [r.getMessage() for r in caplog.records]
    assert "4 unreadable lines skipped" in line and "JSONDecodeError" in line


async def test_the_journal_is_emptied_when_the_backlog_is(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    store = FakeStore()
    p = pending(store, path)
    p.start()
    try:
        p.keep("a", "settle a", ConnectionError("down"))
        p.keep("b", "settle b", ConnectionError("down"))
        # On disk before ``keep`` returned: a SIGKILL now loses nothing.
        assert journal(path).open() == [("a", "settle a"), ("b", "settle b")]
        await p.flush()  # still down: nothing lands, the file keeps both
        assert path.stat().st_size > 0
        store.up = True
        await eventually(lambda: not p, "the backlog drained")
        assert path.stat().st_size == 0
        assert store.landed == ["settle a", "settle b"]
    finally:
        await p.close()


async def test_what_a_dead_process_left_is_retried_at_start(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    store = FakeStore()
    dead = journal(path)  # a gateway SIGKILLed during the outage: no close, no flush
    dead.open()
    dead.append("a", "settle a")
    dead.append("b", "settle b")

    store.up = True
    p = pending(store, path, max_delay_s=3600.0)  # landing must not wait for a back-off
    try:
        p.start()
        assert len(p) == 2 and p.resumed == 2
        await eventually(lambda: not p, "the settlements left behind landed")
        assert store.landed == ["settle a", "settle b"]
        assert path.stat().st_size == 0
    finally:
        await p.close()
        dead.close()


async def test_settlements_pending_at_close_stay_for_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    store = FakeStore()
    p = pending(store, path)
    p.start()
    p.keep("a", "settle a", ConnectionError("down"))
    await p.close()  # still down: kept on disk, not lost
    store.up = True
    again = pending(store, path)
    try:
        again.start()
        await eventually(lambda: not again, "the settlement landed after the restart")
        assert store.landed == ["settle a"]
    finally:
        await again.close()


async def test_the_bound_applies_to_what_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    dead = journal(path)
    dead.open()
    for i in range(5):
        dead.append(f"l{i}", f"settle {i}")
    dead.close()
    store = FakeStore()
    p = pending(store, path, max_items=3)
    try:
        p.start()
        assert [lease for lease, _ in p.backlog.items()] == ["l2", "l3", "l4"]
        assert p.backlog.dropped == 2
    finally:
        await p.close()


async def test_a_long_outage_compacts_the_file_to_what_is_pending(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    p = pending(FakeStore(), path, max_items=3)
    p.start()
    try:
        for i in range(7):  # past twice the bound: rewritten as the 3 still pending
            p.keep(f"l{i}", f"settle {i}", ConnectionError("down"))
        assert [lease for lease, _ in journal(path).open()] == ["l4", "l5", "l6"]
    finally:
        await p.close()


async def test_one_outage_report_for_admissions_and_settlements(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Given the gateway's reporter, settlements report the same ``redis`` outage; its one
    "back" line says how many landed."""
    outages = OutageReporter()
    store = FakeStore()
    p = pending(store, tmp_path / "j.jsonl", outages=outages)
    p.start()
    with caplog.at_level(logging.INFO):
        outages.failed("redis", ConnectionError("refused"), affected="admission")
        p.keep("a", "settle a", ConnectionError("refused"))
        p.keep("b", "settle b", ConnectionError("refused"))
        await asyncio.sleep(0)
        store.up = True
        await eventually(lambda: not p, "the backlog drained")
        await p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert not [m for m in lines if "cannot reach" in m]  # no line of their own
    assert len([m for m in lines if "redis is down" in m]) == 1
    (back,) = [m for m in lines if "redis is back" in m]
    assert "quota settlements (kept" in back and "2 pending quota settlements landed" in back
