"""The GPUs now and their history, for the admin API (``GET /admin/v1/gpus``,
``GET /admin/v1/gpus/history``) and the web console.

Now: the readings of ``app.state.telemetry`` (NVML under ``gpufleet up``; on Kubernetes the
operator's leader's, read from the store), each marked idle or not. Idle is of the devices work
runs on: a GPU cut into MIG instances is neither idle nor counted, its instances are
(``telemetry.idle``). History: the store's rows, 2-second samples for windows up to the hour they
are kept, 1-minute rows beyond, unless the caller names a resolution.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from gpufleet.store.telemetry import KEEP_RAW_S, MINUTE_S, RAW_S, GpuHistoryStore
from gpufleet.telemetry import GpuReading, GpuReadings, idle

__all__ = ["MAX_HISTORY_POINTS", "build_history", "gpus_view", "resolution_of"]

#: Points one history answer holds at most (a week of 1-minute rows is ~10,000 per GPU):
#: past it the answer says ``truncated`` and a filter (device, model) narrows it.
MAX_HISTORY_POINTS = 100_000

_RESOLUTIONS = {"2": RAW_S, "2s": RAW_S, "60": MINUTE_S, "60s": MINUTE_S, "1m": MINUTE_S}

#: A reading's and a point's fields (the same ones), as JSON keys.
_FIELDS = tuple(f.name for f in dataclasses.fields(GpuReading))

_NO_READINGS = {
    None: "no GPUs: NVML found no NVIDIA GPU on this machine, so GPU telemetry is off",
    "store": "no GPU readings in the store: the cluster has no GPUs, or the operator reads no "
    "DCGM exporter (gpufleet operator --dcgm-url, the chart's operator.dcgmUrl)",
}


def gpus_view(readings: GpuReadings | None) -> dict[str, Any]:
    """``{"source", "gpus": [reading + "idle"], "idle": n}``, and a ``note`` when there are
    no GPUs to show."""
    kind = readings.kind if readings is not None else None
    latest = readings.latest() if readings is not None else []
    unused = {r.device for r in idle(latest)}
    body: dict[str, Any] = {
        "source": kind,
        "gpus": [{**_fields(r), "idle": r.device in unused} for r in latest],
        "idle": len(unused),
    }
    if not latest:
        body["note"] = _NO_READINGS.get(kind, "no GPU readings yet: the first comes within seconds")
    return body


def _fields(row: GpuReading) -> dict[str, Any]:
    return {name: getattr(row, name) for name in _FIELDS}


def resolution_of(text: str | None, seconds: float) -> int | None:
    """The rows' resolution in seconds: as asked ("2s", "1m", or 2, 60), or by the window —
    the 2-second samples for windows they cover (an hour), 1-minute rows beyond. None: not
    a resolution the store keeps."""
    if not text:
        return RAW_S if seconds <= KEEP_RAW_S else MINUTE_S
    return _RESOLUTIONS.get(text.strip().lower())


async def build_history(
    store: GpuHistoryStore,
    since: float,
    until: float,
    resolution: int,
    *,
    device: str | None = None,
    model: str | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    rows = await asyncio.to_thread(
        store.gpu_history,
        since,
        until,
        resolution=resolution,
        device=device,
        model=model,
        node=node,
        limit=MAX_HISTORY_POINTS + 1,
    )
    return {
        "resolution": resolution,
        "points": [_fields(p) for p in rows[:MAX_HISTORY_POINTS]],
        "truncated": len(rows) > MAX_HISTORY_POINTS,
    }
