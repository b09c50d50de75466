"""The gateway's upstream HTTP client (``gateway.upstream_http``) against aiohttp, which it
replaced: the same answers from an emulated engine, the same request as the engine sees it,
connections kept alive and reused (and not once closed, asked to close, or idle too long), and
every failure the proxy tells apart raised as an error the proxy reads as it read aiohttp's —
against a small server that fails on purpose (``Engine``). Then what aiohttp did and the
prototype did not: interim answers skipped, limits on heads and on a body read whole, a reply
dropped unclosed, a host name resolved and its addresses kept."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import aiohttp
import pytest

from gpufleet.gateway import upstream_http
from gpufleet.gateway.proxy import _GONE_ERRNOS, IDLE_CONNECTION_S, _broke
from gpufleet.gateway.upstream_http import (
    BadAnswer,
    Broken,
    ConnectTimeout,
    CutShort,
    Refused,
    Unconnected,
    UpstreamClient,
)
from tests import sites
from tests.conftest import eventually, free_port

#: What ``Upstream.forward`` sends besides the body.
HEADERS = {
    "content-type": "application/json",
    "x-request-id": "4f1c6a3e-0b7d-4e51-9a0e-2f9d1c5b7a10",
    "authorization": "Bearer engine-secret",
}
BODY = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
).encode()
OK = b'{"ok":true}'
JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
OK_ANSWER = JSON_HEAD + b"content-length: %d\r\n\r\n%s" % (len(OK), OK)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Engine:
    """A small HTTP/1.1 server whose answer is chosen by the request's path (a leading ``/p``
    ignored), some wrong on purpose; it counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.requests: list[bytes] = []
        self.gate = asyncio.Event()  # lets a held answer go on
        self.gone = asyncio.Event()  # a connection the client closed mid-answer
        self.url = ""
        self._server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def __aenter__(self) -> Engine:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._handlers.values():  # the handlers then see the close, and end
            writer.transport.abort()
        await asyncio.gather(*self._handlers)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        self.accepted += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                path = head.split(b" ", 2)[1].decode().removeprefix("/p")
                if not await self._answer(path, reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client closed the connection (or reset it)
        finally:
            writer.close()
            del self._handlers[task]

    async def _answer(
        self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer ``path``; False closes the connection afterwards."""
        fixed = {
            "/ok": (OK_ANSWER, True),
            "/drop": (OK_ANSWER, False),
            # Kept open: closing it is the client's part.
            "/close-after": (
                JSON_HEAD + b"connection: close\r\ncontent-length: 11\r\n\r\n" + OK,
                True,
            ),
            "/close-before": (b"", False),
            "/cut-length": (JSON_HEAD + b"content-length: 100\r\n\r\n" + b'{"choices":', False),
            "/cut-chunked": (CHUNKED + chunk(b"data: one\n\n"), False),
            "/garbage": (b"HELLO THERE\r\n\r\n", False),
            "/eof-body": (
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n"
                b"ended by the close",
                False,
            ),
            "/interim": (
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n" + OK_ANSWER,
                True,
            ),
            "/many-headers": (
                b"HTTP/1.1 200 OK\r\n"
                + b"".join(b"x-field-%d: y\r\n" % i for i in range(200))
                + b"content-length: 11\r\n\r\n"
                + OK,
                True,
            ),
            "/big-header": (
                JSON_HEAD
                + b"x-big: "
                + b"a" * (70 * 1024)
                + b"\r\ncontent-length: 11\r\n\r\n"
                + OK,
                True,
            ),
            "/large": (
                JSON_HEAD + b"content-length: %d\r\n\r\n" % (2 << 20) + b"x" * (2 << 20),
                True,
            ),
        }
        if path in fixed:
            answer, keep = fixed[path]
            writer.write(answer)
            await writer.drain()
            return keep
        if path == "/reset-before":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if path == "/big":
            writer.write(CHUNKED)
            for i in range(64):
                writer.write(chunk(bytes([65 + i % 26]) * 65536))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if path == "/endless-head":  # a header line that never ends: held until the client goes
            writer.write(b"HTTP/1.1 200 OK\r\nx-endless: " + b"a" * (128 * 1024))
        elif path == "/slow-stream":  # closed after it: no race with the client's next request
            writer.write(CHUNKED.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n"))
            writer.write(chunk(b"data: first\n\n"))
        elif path != "/hang":
            raise ValueError(path)
        await writer.drain()
        gate = asyncio.ensure_future(self.gate.wait())
        eof = asyncio.ensure_future(reader.read(1))
        await asyncio.wait([gate, eof], return_when=asyncio.FIRST_COMPLETED)
        gate.cancel()
        if eof.done():
            with contextlib.suppress(ConnectionError):
                eof.result()  # b"" (a close) or a reset: either way, gone
            self.gone.set()
            return False
        eof.cancel()
        writer.write(chunk(b"data: second\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        return False


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with Engine() as server:
        yield server


@contextlib.asynccontextmanager
async def client(**options: float) -> AsyncIterator[UpstreamClient]:
    http = UpstreamClient(**{"keepalive_s": IDLE_CONNECTION_S, **options})
    try:
        yield http
    finally:
        await http.close()


@contextlib.asynccontextmanager
async def aiohttp_session(connect_timeout_s: float = 5.0) -> AsyncIterator[aiohttp.ClientSession]:
    """aiohttp as ``Upstream`` configured it before this client."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=IDLE_CONNECTION_S),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    ) as session:
        yield session


Answer = tuple[int, str | None, bytes]


async def ours(
    http: UpstreamClient,
    base: str,
    path: str,
    *,
    method: str = "POST",
    body: bytes = BODY,
    whole: bool = False,
) -> Answer:
    """An answer as the proxy reads one: whole (``read``), or chunk by chunk."""
    reply = await http.request(method, base, path, body, HEADERS)
    try:
        if whole:
            return reply.status, reply.header("content-type"), await reply.read()
        parts = [part async for part in reply.iter_chunks()]
    finally:
        reply.close()
    return reply.status, reply.header("content-type"), b"".join(parts)


async def theirs(
    session: aiohttp.ClientSession,
    url: str,
    *,
    method: str = "POST",
    body: bytes = BODY,
    whole: bool = False,
) -> Answer:
    async with session.request(method, url, data=body or None, headers=HEADERS) as resp:
        if whole:
            return resp.status, resp.headers.get("content-type"), await resp.read()
        parts = [part async for part in resp.content.iter_any()]
        return resp.status, resp.headers.get("content-type"), b"".join(parts)


async def failure(answer: Awaitable[object]) -> BaseException | None:
    try:
        await answer
    except Exception as exc:
        return exc
    return None


def aiohttp_broke(exc: BaseException | None) -> bool:
    """How the proxy read aiohttp's failures: the engine's connection broke under the
    request (the replica sits out), or it failed otherwise."""
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and exc.errno in _GONE_ERRNOS


# Answers and requests: what aiohttp reads and sends.


async def test_an_engines_answers_read_as_aiohttp_reads_them() -> None:
    stream = json.dumps({**json.loads(BODY), "stream": True}).encode()
    async with (
        sites.replica_servers([("m", sites.emulated(time_scale=0.001))]) as (url,),
        aiohttp_session() as session,
        client() as http,
    ):
        for method, path in [("GET", "/v1/models"), ("GET", "/health")]:
            mine = await ours(http, url, path, method=method, body=b"")
            assert mine == await theirs(session, url + path, method=method, body=b"")
            assert mine[0] == 200
        for whole in (True, False):
            status, kind, payload = await ours(http, url, "/v1/chat/completions", whole=whole)
            other = await theirs(session, url + "/v1/chat/completions", whole=whole)
            assert (status, kind) == other[:2] and kind and kind.startswith("application/json")
            assert json.loads(payload)["usage"] == json.loads(other[2])["usage"]
        status, kind, payload = await ours(http, url, "/v1/chat/completions", body=stream)
        other = await theirs(session, url + "/v1/chat/completions", body=stream)
        assert (status, kind) == other[:2] and kind and kind.startswith("text/event-stream")
        assert payload.endswith(b"data: [DONE]\n\n") and other[2].endswith(b"data: [DONE]\n\n")
        assert payload.count(b"\n\ndata: ") == other[2].count(b"\n\ndata: ") > 3


async def test_the_engine_sees_the_request_aiohttp_sent(engine: Engine) -> None:
    def fields(raw: bytes) -> set[tuple[str, str]]:
        head, _, body = raw.partition(b"\r\n\r\n")
        line, *rest = head.decode().split("\r\n")
        got = {("", line), ("body", body.decode())}
        for field in rest:
            name, _, value = field.partition(":")
            got.add((name.strip().lower(), value.strip()))
        return got

    async with aiohttp_session() as session, client() as http:
        await theirs(session, engine.url + "/ok")
        await ours(http, engine.url, "/ok")
    theirs_sent, ours_sent = (fields(r) for r in engine.requests)
    assert ours_sent == theirs_sent
    assert ("host", engine.url.removeprefix("http://")) in ours_sent


async def test_bodies_come_whole_by_length_chunks_or_the_close(engine: Engine) -> None:
    async with aiohttp_session() as session, client() as http:
        for path, whole in [("/ok", True), ("/big", False), ("/big", True), ("/eof-body", True)]:
            mine = await ours(http, engine.url, path, whole=whole)
            assert mine == await theirs(session, engine.url + path, whole=whole)
        assert len((await ours(http, engine.url, "/big", whole=True))[2]) == 64 * 65536
        # Read whole once reading paused (a body not read at once): resumed, read to its end.
        reply = await http.request("POST", engine.url, "/big", BODY, HEADERS)
        await eventually(lambda: reply._buffered >= upstream_http.HIGH_WATER, "reading paused")
        assert len(await asyncio.wait_for(reply.read(), 30)) == 64 * 65536
        assert (await ours(http, engine.url, "/eof-body"))[2] == b"ended by the close"


async def test_a_base_url_path_prefixes_the_route(engine: Engine) -> None:
    async with client() as http:
        assert (await ours(http, engine.url + "/p/", "/ok"))[2] == OK
    assert engine.requests[-1].startswith(b"POST /p/ok HTTP/1.1\r\n")


# Connections kept alive, and when not.


async def test_connections_are_kept_alive_and_reused(engine: Engine) -> None:
    async with client() as http:
        for _ in range(20):
            assert (await ours(http, engine.url, "/ok"))[2] == OK
        assert engine.accepted == 1
        many = await asyncio.gather(*(ours(http, engine.url, "/big") for _ in range(16)))
        assert {len(answer[2]) for answer in many} == {64 * 65536}
        assert engine.accepted == 16  # the kept one and 15 more, all then kept
        await asyncio.gather(*(ours(http, engine.url, "/ok") for _ in range(16)))
        assert engine.accepted == 16


async def test_a_connection_the_engine_closes_or_asks_to_close_is_not_reused(
    engine: Engine,
) -> None:
    async with client() as http:
        await ours(http, engine.url, "/close-after")
        await ours(http, engine.url, "/ok")
        assert engine.accepted == 2  # 'connection: close' is honoured
        await ours(http, engine.url, "/drop")  # closed by the engine once answered
        await eventually(lambda: not http._open, "the client saw the connection closed")
        assert (await ours(http, engine.url, "/ok"))[2] == OK
        assert engine.accepted == 3


async def test_a_connection_idle_over_keepalive_is_closed_and_not_reused(engine: Engine) -> None:
    async with client(keepalive_s=0.05) as http:
        await ours(http, engine.url, "/ok")
        await eventually(lambda: not http._open, "the sweep closed the idle connection")
        await ours(http, engine.url, "/ok")
        assert engine.accepted == 2
        # Taken after keepalive_s and before the sweep ran (a late timer): not used either.
        assert http._sweep is not None
        http._sweep.cancel()
        http._sweep = None
        idle_from = http.loop.time()
        await eventually(lambda: http.loop.time() > idle_from + 0.05, "keepalive_s elapsed")
        assert http._open  # still open: nothing closed it
        await ours(http, engine.url, "/ok")
        assert engine.accepted == 3


async def test_a_host_name_is_resolved_and_its_addresses_kept(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    resolved: list[str] = []
    getaddrinfo = loop.getaddrinfo

    async def counted(host: str, *args: Any, **kwargs: Any) -> Any:
        resolved.append(host)
        return await getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", counted)
    named = engine.url.replace("127.0.0.1", "localhost")
    async with client() as http:
        await ours(http, named, "/ok")
        await asyncio.gather(*(ours(http, named, "/ok") for _ in range(3)))  # 2 more connections
        await ours(http, engine.url, "/ok")  # an address: nothing to resolve
    assert engine.accepted == 4 and resolved == ["localhost"]
    monkeypatch.setattr(upstream_http, "RESOLVE_TTL_S", 0.0)  # kept no time: resolved each time
    async with client() as http:
        for _ in range(2):
            await ours(http, named, "/close-after")
    assert engine.accepted == 6 and resolved == ["localhost"] * 3


# Failures, each read by the proxy as it read aiohttp's.


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose listen queue is full: connections to it hang (SYNs are dropped)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        with socket.create_connection(listener.getsockname()):
            yield listener.getsockname()[1]


async def test_no_connection_is_a_refusal_or_a_connect_timeout(full_backlog: int) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    stuck = f"http://127.0.0.1:{full_backlog}"
    async with aiohttp_session(0.3) as session, client(connect_timeout_s=0.3) as http:
        their_refusal = await failure(theirs(session, closed + "/ok"))
        our_refusal = await failure(ours(http, closed, "/ok"))
        assert isinstance(their_refusal, aiohttp.ClientConnectorError)
        assert isinstance(our_refusal, Refused)
        their_timeout = await failure(theirs(session, stuck + "/ok"))
        our_timeout = await failure(ours(http, stuck, "/ok"))
        assert isinstance(their_timeout, aiohttp.ConnectionTimeoutError)
        assert isinstance(our_timeout, ConnectTimeout)
        assert isinstance(await failure(ours(http, "ftp://127.0.0.1:1", "/ok")), Unconnected)


@pytest.mark.parametrize(
    ("path", "whole", "expected"),
    [
        ("/close-before", True, Broken),
        ("/reset-before", True, Broken),
        ("/cut-length", True, CutShort),
        ("/cut-length", False, CutShort),
        ("/cut-chunked", True, CutShort),
        ("/cut-chunked", False, CutShort),
        ("/garbage", True, BadAnswer),
    ],
)
async def test_each_failure_is_read_as_aiohttps_was(
    engine: Engine, path: str, whole: bool, expected: type[Exception]
) -> None:
    async with aiohttp_session() as session, client() as http:
        their_failure = await failure(theirs(session, engine.url + path, whole=whole))
        our_failure = await failure(ours(http, engine.url, path, whole=whole))
    assert isinstance(our_failure, expected), repr(our_failure)
    assert their_failure is not None
    assert _broke(our_failure) == aiohttp_broke(their_failure)
    if path == "/reset-before" and isinstance(our_failure, Broken) and our_failure.errno:
        assert our_failure.errno == errno.ECONNRESET


async def test_a_kept_alive_connection_closed_under_a_request_is_broken_reused(
    engine: Engine,
) -> None:
    async with aiohttp_session() as session, client() as http:
        await theirs(session, engine.url + "/ok")
        await ours(http, engine.url, "/ok")
        their_failure = await failure(theirs(session, engine.url + "/close-before"))
        our_failure = await failure(ours(http, engine.url, "/close-before"))
    assert isinstance(our_failure, Broken) and our_failure.reused
    assert _broke(our_failure) and aiohttp_broke(their_failure)
    assert engine.accepted == 2  # one each: the request went on the kept-alive connection


async def test_a_header_with_cr_or_lf_is_refused_before_connecting(engine: Engine) -> None:
    async with client() as http:
        for bad in ("secret\r\nx-injected: 1", "secret\nx"):
            with pytest.raises(ValueError, match="CR or LF"):
                await http.request("POST", engine.url, "/ok", BODY, {"authorization": bad})
    assert engine.accepted == 0


# Streams and cancellation.


async def test_a_streamed_chunk_arrives_before_the_rest_is_sent(engine: Engine) -> None:
    async with client() as http:
        reply = await http.request("POST", engine.url, "/slow-stream", BODY, HEADERS)
        chunks = reply.iter_chunks()
        assert await asyncio.wait_for(anext(chunks), 30) == b"data: first\n\n"
        engine.gate.set()
        assert b"".join([c async for c in chunks]) == b"data: second\n\ndata: [DONE]\n\n"
        reply.close()


@pytest.mark.parametrize("path", ["/slow-stream", "/hang"])
async def test_a_cancelled_request_aborts_its_connection(engine: Engine, path: str) -> None:
    """Cancelled mid-stream, or before its answer began: the engine sees the connection go,
    and it is not pooled."""
    got = asyncio.Event()

    async def consume(http: UpstreamClient) -> None:
        reply = await http.request("POST", engine.url, path, BODY, HEADERS)
        try:
            async for _ in reply.iter_chunks():
                got.set()
        finally:
            reply.close()

    async with client() as http:
        task = asyncio.create_task(consume(http), name="cancelled-upstream-request")
        if path == "/slow-stream":
            await asyncio.wait_for(got.wait(), 30)
        else:
            await eventually(lambda: len(engine.requests) == 1, "the engine has the request")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(engine.gone.is_set, "the engine saw the connection closed")
        await ours(http, engine.url, "/ok")
        assert engine.accepted == 2


async def test_a_reply_dropped_unclosed_aborts_its_connection(engine: Engine) -> None:
    async with client() as http:
        reply = await http.request("POST", engine.url, "/slow-stream", BODY, HEADERS)
        assert reply.status == 200
        del reply
        gc.collect()
        await eventually(engine.gone.is_set, "the engine saw the connection closed")
        await ours(http, engine.url, "/ok")
        assert engine.accepted == 2


async def test_closing_the_client_fails_an_answer_in_progress(engine: Engine) -> None:
    http = UpstreamClient()
    reply = await http.request("POST", engine.url, "/slow-stream", BODY, HEADERS)
    chunks = reply.iter_chunks()
    await asyncio.wait_for(anext(chunks), 30)
    await http.close()
    with pytest.raises(CutShort):
        await asyncio.wait_for(anext(chunks), 30)
    await eventually(engine.gone.is_set, "the engine saw the connection closed")


# What the prototype lacked: interim answers, limits.


async def test_interim_answers_are_skipped(engine: Engine) -> None:
    async with client() as http:
        for _ in range(2):
            assert await ours(http, engine.url, "/interim") == (200, "application/json", OK)
    assert engine.accepted == 1  # and the connection is reused after them


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/many-headers", "over 128 header fields"),
        ("/big-header", "head over 64 KiB"),
        ("/endless-head", "head over 64 KiB"),
    ],
)
async def test_a_head_over_the_limits_is_a_bad_answer(engine: Engine, path: str, why: str) -> None:
    async with client() as http:
        with pytest.raises(BadAnswer, match=why):
            await asyncio.wait_for(http.request("POST", engine.url, path, BODY, HEADERS), 30)
        await ours(http, engine.url, "/ok")
    assert engine.accepted == 2  # the connection was closed, not pooled


async def test_a_body_read_whole_over_the_limit_is_a_bad_answer(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream_http, "MAX_BODY_BYTES", 1 << 20)
    async with client() as http:
        with pytest.raises(BadAnswer, match="body over 1 MiB"):
            await ours(http, engine.url, "/large", whole=True)
        streamed = await ours(http, engine.url, "/large")  # relayed chunk by chunk: no limit
        assert len(streamed[2]) == 2 << 20
