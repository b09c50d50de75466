"""Readings of a cluster's GPUs from NVIDIA's DCGM exporter, for the operator's leader.

The exporter (a DaemonSet, port 9400, ``/metrics``) publishes one series per GPU — and per MIG
instance, labelled ``GPU_I_PROFILE``/``GPU_I_ID`` under the parent's ``UUID`` — with, in its
Kubernetes mode, the ``pod``/``namespace`` of the workload on it. Scraped by Prometheus those
become ``exported_pod``/``exported_namespace`` (``pod`` is then the exporter's own pod), so a
series' ``exported_*`` labels win where it has them. Pods are traced to replicas by name
(``attribution.replica_of_pod``); a GPU whose pods are none of ours holds no replica.

Figures: ``DCGM_FI_DEV_FB_USED``/``_FREE`` (MiB; total = used + free + reserved), utilisation
from ``DCGM_FI_DEV_GPU_UTIL`` (%) or, where the exporter has none (MIG instances),
``DCGM_FI_PROF_GR_ENGINE_ACTIVE`` (0–1), ``DCGM_FI_PROF_SM_ACTIVE``, power (W), temperature.

The source is one or more exporter URLs (one per node; comma-separated) or a Prometheus
``…/api/v1/query`` URL, asked for the latest value of those series in one query.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.errors import TemporaryError
from gpufleet.runtime import Replica
from gpufleet.telemetry.attribution import replica_of_pod
from gpufleet.telemetry.gpus import GpuReading, place

__all__ = [
    "METRICS",
    "DcgmReader",
    "Series",
    "readings_from_series",
    "series_from_exposition",
    "series_from_prometheus",
]

_MIB = 1024 * 1024

FB_USED = "DCGM_FI_DEV_FB_USED"
FB_FREE = "DCGM_FI_DEV_FB_FREE"
FB_RESERVED = "DCGM_FI_DEV_FB_RESERVED"
GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"
GR_ACTIVE = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
SM_ACTIVE = "DCGM_FI_PROF_SM_ACTIVE"
POWER = "DCGM_FI_DEV_POWER_USAGE"
TEMP = "DCGM_FI_DEV_GPU_TEMP"
#: The series read; the rest of an exporter's page is skipped.
METRICS = (FB_USED, FB_FREE, FB_RESERVED, GPU_UTIL, GR_ACTIVE, SM_ACTIVE, POWER, TEMP)
PROMETHEUS_QUERY = '{__name__=~"' + "|".join(METRICS) + '"}'


@dataclass(frozen=True, slots=True)
class Series:
    """One sample of one DCGM field."""

    name: str
    labels: dict[str, str]
    value: float


class _PromSample(TypedDict):
    metric: dict[str, str]
    value: tuple[float, str]


class _PromData(TypedDict):
    resultType: str
    result: list[_PromSample]


class _PromAnswer(TypedDict, total=False):
    status: str
    data: _PromData
    error: str


def series_from_exposition(text: str) -> list[Series]:
    """The DCGM series of an exporter's Prometheus text page."""
    wanted = set(METRICS)
    return [
        Series(sample.name, sample.labels, float(sample.value))
        for family in text_string_to_metric_families(text)
        if family.name in wanted
        for sample in family.samples
        if sample.name in wanted
    ]


def series_from_prometheus(answer: _PromAnswer) -> list[Series]:
    """The DCGM series of a Prometheus instant query's answer (``/api/v1/query``)."""
    if answer.get("status") != "success" or "data" not in answer:
        raise ValueError(f"Prometheus answered {answer.get('status')}: {answer.get('error', '')}")
    if answer["data"]["resultType"] != "vector":
        raise ValueError(f"Prometheus answered a {answer['data']['resultType']}, not a vector")
    out = []
    for item in answer["data"]["result"]:
        labels = dict(item["metric"])
        name = labels.pop("__name__", "")
        out.append(Series(name, labels, float(item["value"][1])))
    return out


@dataclass
class _Device:
    node: str
    uuid: str
    gpu: str
    model_name: str
    profile: str | None
    instance: str | None
    figures: dict[str, float] = field(default_factory=dict)
    pods: set[tuple[str, str]] = field(default_factory=set)  # (namespace, pod)


def _workload(labels: dict[str, str]) -> tuple[str, str] | None:
    if "exported_pod" in labels:  # through Prometheus: ``pod`` is the exporter's own
        pod, namespace = labels["exported_pod"], labels.get("exported_namespace", "")
    else:
        pod, namespace = labels.get("pod", ""), labels.get("namespace", "")
    return (namespace, pod) if pod else None


def readings_from_series(
    series: Iterable[Series],
    replicas: Sequence[Replica],
    now: float,
    *,
    namespace: str | None = None,
) -> list[GpuReading]:
    """One reading per GPU and MIG instance, attributed to ``replicas`` by their pods (only
    pods in ``namespace``, where given)."""
    devices: dict[tuple[str, str, str | None], _Device] = {}
    for s in series:
        uuid = s.labels.get("UUID", "")
        if not uuid or math.isnan(s.value):
            continue
        node = s.labels.get("Hostname") or s.labels.get("instance", "")
        instance = s.labels.get("GPU_I_ID") or None
        key = (node, uuid, instance)
        device = devices.get(key)
        if device is None:
            device = devices[key] = _Device(
                node=node,
                uuid=uuid,
                gpu=s.labels.get("gpu", ""),
                model_name=s.labels.get("modelName", ""),
                profile=s.labels.get("GPU_I_PROFILE") or None,
                instance=instance,
            )
        device.figures[s.name] = s.value
        workload = _workload(s.labels)
        if workload is not None and (namespace is None or workload[0] in ("", namespace)):
            device.pods.add(workload)
    by_id = {r.id: r for r in replicas}
    cut = {(d.node, d.uuid) for d in devices.values() if d.instance is not None}
    readings = []
    for d in devices.values():
        held = sorted(
            (r for _, pod in d.pods if (r := replica_of_pod(pod, by_id)) is not None),
            key=lambda r: r.id,
        )
        # A GPU cut into MIG instances holds nothing itself: its instances do.
        holder = (
            held[0] if held and (d.instance is not None or (d.node, d.uuid) not in cut) else None
        )
        readings.append(_reading(d, holder, now))
    readings.sort(key=place)
    return readings


def _reading(d: _Device, holder: Replica | None, now: float) -> GpuReading:
    f = d.figures
    used, free = f.get(FB_USED), f.get(FB_FREE)
    total = None
    if used is not None and free is not None:
        total = int((used + free + f.get(FB_RESERVED, 0.0)) * _MIB)
    util = f[GPU_UTIL] / 100 if GPU_UTIL in f else f.get(GR_ACTIVE)
    if d.instance is not None:
        device = f"{d.uuid}/{d.instance}"
        index = f"{d.gpu}/mig-{d.profile}/{d.instance}"
        name = f"{d.model_name} MIG {d.profile}"
    else:
        device, index, name = d.uuid, d.gpu, d.model_name
    return GpuReading(
        node=d.node,
        device=device,
        index=index,
        name=name,
        parent=d.uuid if d.instance is not None else None,
        memory_used=int(used * _MIB) if used is not None else None,
        memory_total=total,
        util=util,
        sm_active=f.get(SM_ACTIVE),
        power_w=f.get(POWER),
        temp_c=f.get(TEMP),
        replica=holder.id if holder is not None else None,
        model=holder.model if holder is not None else None,
        at=now,
    )


class DcgmReader:
    """Reads the exporters (or Prometheus) at ``url`` each time it is asked."""

    kind = "dcgm"

    def __init__(self, url: str, *, namespace: str | None = None, timeout_s: float = 5.0) -> None:
        self.urls = [u.strip() for u in url.split(",") if u.strip()]
        if not self.urls:
            raise ValueError("no DCGM exporter or Prometheus URL given")
        self.namespace = namespace
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    async def read(self, replicas: Sequence[Replica], now: float) -> list[GpuReading]:
        pages = await asyncio.gather(*(self._fetch(u) for u in self.urls))
        return await asyncio.to_thread(self._parse, pages, list(replicas), now)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _parse(
        self, pages: list[tuple[str, str]], replicas: list[Replica], now: float
    ) -> list[GpuReading]:
        series: list[Series] = []
        for url, body in pages:
            try:
                if _is_prometheus(url):
                    series += series_from_prometheus(json.loads(body))
                else:
                    series += series_from_exposition(body)
            except (ValueError, KeyError, TypeError) as exc:
                raise TemporaryError(f"DCGM metrics from {url} unreadable: {exc}") from exc
        return readings_from_series(series, replicas, now, namespace=self.namespace)

    async def _fetch(self, url: str) -> tuple[str, str]:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=self._timeout)
        params = {"query": PROMETHEUS_QUERY} if _is_prometheus(url) else None
        try:
            async with self._http.get(url, params=params) as response:
                body = await response.text()
                if response.status != 200:
                    raise TemporaryError(f"DCGM metrics from {url}: HTTP {response.status}")
                return url, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TemporaryError(f"DCGM metrics from {url}: {exc or type(exc).__name__}") from exc


def _is_prometheus(url: str) -> bool:
    return "/api/v1/query" in url
