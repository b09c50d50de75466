"""The ledger's spool: rows on disk before the answer ends, replayed after a crash exactly once;
a torn last line skipped; the buffer bounded; a row the store rejects set aside, never blocking
the rows behind it; refusals counted per day."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpufleet.gateway.ledger import Ledger
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.spool import Spool, SpoolBusy, decode_row, encode_row
from gpufleet.store import DeadLetter, Store, UsageRow
from tests.unit.test_ledger import row

NOW = dt.datetime.now(dt.UTC)


def ids(store: Store) -> list[str]:
    return sorted(r.request_id for r in store.usage_rows(limit=100_000))


def requests(store: Store) -> int:
    report = store.usage_report("tenant", since=NOW - dt.timedelta(days=1))
    return sum(r["requests"] for r in report)


def crash(spool: Spool) -> None:
    """What the kernel does to a SIGKILLed process's spool: descriptors closed, nothing else."""
    for fd in (spool._fd, spool._lock_fd, *spool._retired):
        os.close(fd)
    spool._fd = spool._lock_fd = -1
    spool._retired.clear()


class Down:
    """A store that is down until ``up`` is set (an outage), then the real one."""

    def __init__(self, store: Store) -> None:
        self.store, self.up = store, False

    def record_usage(self, rows: list[UsageRow]) -> int:
        if not self.up:
            raise OSError("connection refused")
        return self.store.record_usage(rows)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


async def test_rows_of_a_sigkilled_process_are_replayed_at_start(
    store: Store, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    # A real process spools three rows and is SIGKILLed before any flush.
    script = textwrap.dedent(
        f"""
        import datetime as dt, os, signal
        from pathlib import Path
        from gpufleet.gateway.spool import Spool, encode_row
        from tests.unit.test_ledger import row
        spool = Spool(Path({str(spool_dir)!r}))
        spool.open()
        for i in range(3):
            spool.append(encode_row(row(f"k{{i}}", dt.datetime.now(dt.UTC))))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], cwd=Path.cwd(), check=False
    )
    assert proc.returncode == -signal.SIGKILL
    ledger = Ledger(store, spool=Spool(spool_dir), flush_s=3600)
    ledger.start()  # its first flush replays
    ledger.record(row("after", NOW))
    await ledger.close()
    assert ids(store) == ["after", "k0", "k1", "k2"]
    assert ledger.replayed == 3
    assert not list(spool_dir.glob("usage-*"))  # every segment written, then removed


async def test_a_torn_last_line_is_skipped_and_replay_counts_once(
    store: Store, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    first = Spool(spool_dir)
    first.open()
    rows = [row(f"t{i}", NOW) for i in range(4)]
    for r in rows[:3]:
        first.append(encode_row(r))
    # Two of them reached the store before the crash (the segment was not yet removed).
    assert store.record_usage(rows[:2]) == 2
    # The fourth was cut short by the crash: never answered, never counted.
    os.write(first._fd, encode_row(rows[3])[:40])
    crash(first)
    ledger = Ledger(store, spool=Spool(spool_dir), flush_s=3600)
    ledger.start()
    await ledger.close()
    assert ids(store) == ["t0", "t1", "t2"]
    assert requests(store) == 3  # the rollups too: exactly once
    assert ledger.dead_letters == 0


async def test_one_process_per_spool(tmp_path: Path) -> None:
    one = Spool(tmp_path)
    one.open()
    with pytest.raises(SpoolBusy):
        Spool(tmp_path).open()
    one.close()


async def test_the_buffer_is_bounded_and_the_spool_keeps_the_rest(
    store: Store, tmp_path: Path
) -> None:
    down = Down(store)
    ledger = Ledger(down, spool=Spool(tmp_path), flush_s=3600, max_pending=3)  # type: ignore[arg-type]
    ledger.start()
    for i in range(10):
        ledger.record(row(f"b{i}", NOW))
        if i % 4 == 0:
            assert not await ledger.flush()  # the store is down: kept
    assert ledger._count == 3  # in memory: no more than the bound
    assert ledger.pending > 3
    down.up = True
    await ledger.close()
    assert ids(store) == sorted(f"b{i}" for i in range(10))
    assert ledger.pending == 0


async def test_without_a_spool_rows_past_the_bound_are_dropped_and_counted(store: Store) -> None:
    down = Down(store)
    ledger = Ledger(down, flush_s=3600, max_pending=2)  # type: ignore[arg-type]
    for i in range(5):
        ledger.record(row(f"d{i}", NOW))
    assert ledger.dropped == 3 and ledger.pending == 2
    down.up = True
    await ledger.close()
    assert ids(store) == ["d0", "d1"]


async def test_a_row_rejected_for_a_fixed_reason_is_set_aside_and_others_go_on(
    store: Store, tmp_path: Path
) -> None:
    metrics = GatewayMetrics()
    ledger = Ledger(store, spool=Spool(tmp_path), flush_s=3600)
    metrics.registry.register(ledger.collector())
    ledger.start()
    ledger.record(row("ok1", NOW))
    ledger.record(row("poison", NOW, model=None))  # NOT NULL: the store refuses it, always
    ledger.record(row("ok2", NOW))
    assert await ledger.flush()
    ledger.record(row("ok3", NOW))  # rows behind it are not blocked
    assert await ledger.flush()
    assert ids(store) == ["ok1", "ok2", "ok3"]
    (letter,) = store.dead_letters()
    assert letter["key"] == "poison" and '"poison"' in letter["line"] and letter["error"]
    assert metrics.registry.get_sample_value("gpufleet_ledger_dead_letters_total") == 1
    await ledger.close()


async def test_an_unreadable_spool_line_is_a_dead_letter(store: Store, tmp_path: Path) -> None:
    first = Spool(tmp_path)
    first.open()
    first.append(b"not json\n")
    first.append(encode_row(row("fine", NOW)))
    crash(first)
    ledger = Ledger(store, spool=Spool(tmp_path), flush_s=3600)
    ledger.start()
    await ledger.close()
    assert ids(store) == ["fine"]
    assert [d["line"] for d in store.dead_letters()] == ["not json"]
    # Replayed again (a crash before the segment was removed), it is set aside once.
    (kept,) = store.dead_letters()
    assert store.record_dead_letters([DeadLetter(kept["key"], "again", kept["line"])]) == 0
    assert len(store.dead_letters()) == 1


async def test_refusals_are_counted_per_day_not_one_row_each(store: Store) -> None:
    ledger = Ledger(store, flush_s=3600)
    day = NOW.date()
    for _ in range(3):
        ledger.refuse((day, "acme", "gpf_acme0001", "m", 429, "rpm_limit_exceeded"))
    ledger.refuse((day, "", "", "", 401, "invalid_api_key"))
    await ledger.close()
    assert store.usage_rows() == []
    assert store.refusal_report("tenant", since=NOW) == [
        {"tenant": "", "status": 401, "reason": "invalid_api_key", "refused": 1},
        {"tenant": "acme", "status": 429, "reason": "rpm_limit_exceeded", "refused": 3},
    ]


#: A row as the spool wrote it before its lines became arrays (one JSON object a line).
OBJECT_LINE = (
    b'{"request_id":"before-1","at":"2026-11-20T01:02:03.456789-08:00","tenant":"acme",'
    b'"key_prefix":"gpf_acme0001","model":"m","replica":"m-1","route":"chat/completions",'
    b'"status":200,"prompt_tokens":10,"cached_tokens":4,"completion_tokens":5,"ttft_ms":null,'
    b'"duration_ms":80.0,"gpu_seconds":0.5,"cost_usd":0.001,"client_request_id":"c-1"}\n'
)


def test_a_row_survives_its_line_every_field_in_place() -> None:
    at = dt.datetime(2026, 11, 20, 1, 2, 3, 456789, tzinfo=dt.timezone(dt.timedelta(hours=-8)))
    rows = [
        UsageRow(
            request_id="rid",
            at=at,
            tenant="tenant",
            key_prefix="gpf_key",
            model="model",
            replica="replica",
            route="route",
            status=201,
            prompt_tokens=11,
            cached_tokens=12,
            completion_tokens=13,
            ttft_ms=1.5,
            duration_ms=2.5,
            gpu_seconds=3.5,
            cost_usd=4.5e-7,
            client_request_id='client ✓ "quoted"\n',
        ),
        row("nulls", NOW, ttft_ms=None, client_request_id=None),
    ]
    for r in rows:
        line = encode_row(r)
        assert line.startswith(b"[1,") and line.count(b"\n") == 1 and line.endswith(b"\n")
        assert decode_row(line) == r


async def test_a_spool_written_before_the_array_lines_is_replayed(
    store: Store, tmp_path: Path
) -> None:
    assert decode_row(OBJECT_LINE) == row(
        "before-1",
        dt.datetime(2026, 11, 20, 9, 2, 3, 456789, tzinfo=dt.UTC),
        key_prefix="gpf_acme0001",
        ttft_ms=None,
        client_request_id="c-1",
    )
    first = Spool(tmp_path)
    first.open()
    first.append(OBJECT_LINE)  # an upgrade: the old process's lines, then the new one's
    first.append(encode_row(row("after-1", NOW)))
    crash(first)
    ledger = Ledger(store, spool=Spool(tmp_path), flush_s=3600)
    ledger.start()
    await ledger.close()
    assert ids(store) == ["after-1", "before-1"]
    assert ledger.replayed == 2 and ledger.dead_letters == 0


def test_lines_that_are_not_rows_are_set_aside(tmp_path: Path) -> None:
    good = encode_row(row("good", NOW))
    bad = [
        b"[2" + good[2:],  # a version this one does not know
        good.replace(b',"chat/completions"', b""),  # a field short
        OBJECT_LINE.replace(b'"model":"m",', b""),  # an object a field short
        b'"a string"\n',
    ]
    spool = Spool(tmp_path)
    spool.open()
    for line in [*bad, good]:
        spool.append(line)
    (seq,) = spool.seal()
    segment = spool.read(seq)
    spool.close()
    assert [r.request_id for r, _ in segment.rows] == ["good"]
    assert [b.line + b"\n" for b in segment.bad] == bad
