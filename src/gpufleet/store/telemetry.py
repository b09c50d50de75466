"""GPU history in the store: 2-second samples for an hour, 1-minute rows for a week.

A mixin of ``Store`` (same engine, same write lock). The sampler writes each tick's readings in
one ``executemany``; devices are written once (and again only when their name, place or size
change) and their ids kept in memory. Once a minute it rolls the minutes that have ended into
1-minute rows — one ``INSERT … SELECT … GROUP BY`` in the database, so the rows need not come
back to Python, and a process that restarted rolls what it missed from the samples kept — and
prunes what is past its resolution's keep.

A minute's row holds the averages of its samples and the maximum of memory used (the peak is
what decides whether something else fits); a GPU that changed hands within a minute is charged
to one of its holders for that minute.

At 1,000 GPUs that is 1,000 rows every 2 s, and ~10 M 1-minute rows a week
(``bench/telemetry_sampler.py`` measures the bytes per GPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sqlalchemy import (
    ColumnClause,
    Connection,
    Engine,
    Insert,
    Integer,
    Select,
    delete,
    exists,
    func,
    insert,
    literal_column,
    select,
    update,
)

from gpufleet.store.tables import gpu_devices, gpu_samples

__all__ = [
    "KEEP_MINUTE_S",
    "KEEP_RAW_S",
    "MINUTE_S",
    "RAW_S",
    "GpuHistoryStore",
    "GpuPoint",
]

#: The resolutions, in seconds: the samples themselves, and their 1-minute rollup.
RAW_S = 2
MINUTE_S = 60
#: How long each is kept.
KEEP_RAW_S = 3600
KEEP_MINUTE_S = 7 * 86400


@dataclass(frozen=True, slots=True)
class GpuPoint:
    """A GPU (or MIG instance) at one moment: a sampler's reading (``telemetry.GpuReading`` is
    this class) or a row of its history. Fields a source does not give are None."""

    node: str
    #: The GPU's UUID ("GPU-…"), or the MIG instance's ("MIG-…" from NVML; the DCGM exporter
    #: names no MIG UUID, so there it is "<parent UUID>/<GPU instance id>").
    device: str
    #: The GPU's index on its node ("0"), or the instance's: "0/mig-1g.10gb/3" (GPU index,
    #: profile, GPU instance id).
    index: str
    name: str
    #: The parent GPU's UUID for a MIG instance, else None.
    parent: str | None
    memory_used: int | None  # bytes
    memory_total: int | None  # bytes
    util: float | None  # 0–1: time the GPU was busy with any kernel
    sm_active: float | None  # 0–1: share of SMs busy (DCGM's profiling field)
    power_w: float | None
    temp_c: float | None
    #: The replica whose engine holds the device, and its model; None: idle.
    replica: str | None
    model: str | None
    at: float  # unix seconds


#: What a device row holds besides its UUID: (node, index, name, parent, memory_total).
_Meta = tuple[str, str, str, str | None, int | None]

_SIXTY: ColumnClause[int] = literal_column(
    str(MINUTE_S), Integer
)  # inline: the same text in SELECT and GROUP BY


def _meta(r: GpuPoint) -> _Meta:
    return (r.node, r.index, r.name, r.parent, r.memory_total)


class GpuHistoryStore:
    # Provided by Store.
    _engine: Engine

    def _write(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def _connect(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    @cached_property
    def _gpu_devices(self) -> dict[str, tuple[int, _Meta]]:
        """Device UUID → (id, what its row says), as written; read and changed under the
        write lock."""
        return {}

    def put_gpu_samples(
        self, readings: Sequence[GpuPoint], at: float, resolution: int = RAW_S
    ) -> int:
        """Write one tick's readings at ``at`` (unix seconds, kept to the second)."""
        if not readings:
            return 0
        second = int(at)
        with self._write() as conn:
            known = self._gpu_devices
            changed = [
                r for r in readings if (k := known.get(r.device)) is None or k[1] != _meta(r)
            ]
            fresh = self._register_devices(conn, changed) if changed else {}
            ids = {
                d: fresh[d][0] if d in fresh else known[d][0] for d in (r.device for r in readings)
            }
            conn.execute(
                self._insert_samples(),
                [
                    {
                        "device_id": ids[r.device],
                        "resolution": resolution,
                        "at": second,
                        "memory_used": r.memory_used,
                        "util": r.util,
                        "sm_active": r.sm_active,
                        "power_w": r.power_w,
                        "temp_c": r.temp_c,
                        "replica": r.replica,
                        "model": r.model,
                    }
                    for r in readings
                ],
            )
        known.update(fresh)  # only once the rows are in: a failed write keeps nothing
        return len(readings)

    def _insert_samples(self) -> Insert:
        """An insert that skips a (device, resolution, time) already written: a process that
        restarted within a 2-second slot, or an operator taking over from a leader that wrote
        the same slot, writes nothing twice and fails nothing."""
        if self._engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
        return upsert(gpu_samples).on_conflict_do_nothing()

    def _register_devices(
        self, conn: Connection, readings: Sequence[GpuPoint]
    ) -> dict[str, tuple[int, _Meta]]:
        d = gpu_devices.c
        wanted = {r.device: _meta(r) for r in readings}
        rows = conn.execute(
            select(d.id, d.device, d.node, d.gpu_index, d.name, d.parent, d.memory_total).where(
                d.device.in_(wanted)
            )
        ).all()
        stored = {
            r.device: (int(r.id), (r.node, r.gpu_index, r.name, r.parent, r.memory_total))
            for r in rows
        }
        out: dict[str, tuple[int, _Meta]] = {}
        for device, meta in wanted.items():
            values = dict(
                zip(("node", "gpu_index", "name", "parent", "memory_total"), meta, strict=True)
            )
            if device not in stored:
                conn.execute(insert(gpu_devices).values(device=device, **values))
            elif stored[device][1] != meta:
                conn.execute(update(gpu_devices).where(d.device == device).values(**values))
        for r in conn.execute(select(d.id, d.device).where(d.device.in_(wanted))):
            out[r.device] = (int(r.id), wanted[r.device])
        return out

    def roll_gpu_samples(self, until: float) -> int:
        """Roll every minute that ended by ``until`` and is not rolled yet into 1-minute rows;
        the rows written."""
        s = gpu_samples.c
        end = int(until) - int(until) % MINUTE_S
        with self._write() as conn:
            last = conn.execute(select(func.max(s.at)).where(s.resolution == MINUTE_S)).scalar()
            if last is not None:
                start = int(last) + MINUTE_S
            else:
                first = conn.execute(select(func.min(s.at)).where(s.resolution == RAW_S)).scalar()
                if first is None:
                    return 0
                start = int(first) - int(first) % MINUTE_S
            if start >= end:
                return 0
            minute = s.at - s.at % _SIXTY
            rollup = (
                select(
                    s.device_id,
                    _SIXTY,
                    minute,
                    func.max(s.memory_used),
                    func.avg(s.util),
                    func.avg(s.sm_active),
                    func.avg(s.power_w),
                    func.avg(s.temp_c),
                    func.max(s.replica),
                    func.max(s.model),
                )
                .where(s.resolution == RAW_S, s.at >= start, s.at < end)
                .group_by(s.device_id, minute)
            )
            columns = [
                "device_id",
                "resolution",
                "at",
                "memory_used",
                "util",
                "sm_active",
                "power_w",
                "temp_c",
                "replica",
                "model",
            ]
            # An INSERT's row count is kept only when asked for (psycopg answers -1 otherwise).
            roll = insert(gpu_samples).from_select(columns, rollup)
            return int(conn.execute(roll.execution_options(preserve_rowcount=True)).rowcount)

    def prune_gpu_samples(
        self, now: float, *, keep_raw_s: float = KEEP_RAW_S, keep_minute_s: float = KEEP_MINUTE_S
    ) -> int:
        """Drop rows past their keep, and devices left without any; the rows dropped."""
        s = gpu_samples.c
        with self._write() as conn:
            dropped = 0
            for resolution, keep in ((RAW_S, keep_raw_s), (MINUTE_S, keep_minute_s)):
                dropped += conn.execute(
                    delete(gpu_samples).where(s.resolution == resolution, s.at < int(now - keep))
                ).rowcount
            gone = conn.execute(
                delete(gpu_devices).where(~exists().where(s.device_id == gpu_devices.c.id))
            ).rowcount
            if gone:
                self._gpu_devices.clear()
        return int(dropped)

    def gpu_history(
        self,
        since: float,
        until: float,
        *,
        resolution: int = RAW_S,
        device: str | None = None,
        model: str | None = None,
        node: str | None = None,
        limit: int | None = None,
    ) -> list[GpuPoint]:
        """Rows of ``resolution`` with ``since <= at < until`` (unix seconds), by device and
        time; only of one device, model or node where given; the first ``limit`` of them."""
        s, d = gpu_samples.c, gpu_devices.c
        # Integer bounds (``at`` is whole seconds): a float compared with a BIGINT would keep
        # PostgreSQL off the index.
        query = (
            _points()
            .where(s.resolution == resolution, s.at >= math.ceil(since), s.at < math.ceil(until))
            .order_by(d.device, s.at)
        )
        if device is not None:
            query = query.where(d.device == device)
        if model is not None:
            query = query.where(s.model == model)
        if node is not None:
            query = query.where(d.node == node)
        if limit is not None:
            query = query.limit(limit)
        with self._connect() as conn:
            return [_point(r) for r in conn.execute(query)]

    def latest_gpu_samples(self, within_s: float, now: float | None = None) -> list[GpuPoint]:
        """The newest sample of each device written in the last ``within_s`` seconds before
        ``now`` (the clock's when None), by node and index: what a gateway that does not
        sample shows as the GPUs now (the operator's leader writes them)."""
        s, d = gpu_samples.c, gpu_devices.c
        now = time.time() if now is None else now
        newest = (
            select(s.device_id, func.max(s.at).label("at"))
            .where(s.resolution == RAW_S, s.at >= math.ceil(now - within_s))
            .group_by(s.device_id)
            .subquery()
        )
        query = (
            _points()
            .join(newest, (newest.c.device_id == s.device_id) & (newest.c.at == s.at))
            .where(s.resolution == RAW_S)
            .order_by(d.node, d.gpu_index)
        )
        with self._connect() as conn:
            return [_point(r) for r in conn.execute(query)]


def _points() -> Select[Any]:
    """A history row with its device's fields, as ``GpuPoint`` has them."""
    s, d = gpu_samples.c, gpu_devices.c
    return select(
        d.node,
        d.device,
        d.gpu_index,
        d.name,
        d.parent,
        s.memory_used,
        d.memory_total,
        s.util,
        s.sm_active,
        s.power_w,
        s.temp_c,
        s.replica,
        s.model,
        s.at,
    ).join_from(gpu_samples, gpu_devices, s.device_id == d.id)


def _point(r: Any) -> GpuPoint:
    memory_used = r.memory_used
    return GpuPoint(
        node=r.node,
        device=r.device,
        index=r.gpu_index,
        name=r.name,
        parent=r.parent,
        # A minute's maximum comes back as the database's number type.
        memory_used=int(memory_used) if memory_used is not None else None,
        memory_total=r.memory_total,
        util=r.util,
        sm_active=r.sm_active,
        power_w=r.power_w,
        temp_c=r.temp_c,
        replica=r.replica,
        model=r.model,
        at=float(r.at),
    )
