"""The lean client's checks against aiohttp: ``bench/upstream_client.py``'s smoke step.

Before its CPU is compared with aiohttp's, ``bench/lean_client.py`` must do what the proxy needs
of aiohttp: the same answers byte for byte from the null engine, the same request as the engine
sees it, connections kept alive and reused (and not reused once closed, asked to close, or idle
too long), bodies framed by length, chunks or the close, and every failure the proxy tells
apart raised as an error the proxy would read alike — refused, no connection within the connect
timeout, closed or reset under the request (on a fresh or a kept-alive connection), an answer
cut short, one that does not parse — checked against a small server of its own that fails on
purpose (``Misbehaving``), with aiohttp's error for each beside it. A streamed chunk must arrive
before the rest is sent, and a request cancelled mid-stream or before its answer must abort its
connection, not pool it. Any mismatch stops the bench (``SystemExit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from common import free_port, table
from gpufleet.gateway.proxy import IDLE_CONNECTION_S, _broke
from lean_client import BadAnswer, Broken, ConnectTimeout, CutShort, LeanClient, Refused

__all__ = ["Request", "smoke"]


@dataclass(frozen=True, slots=True)
class Request:
    """The bench's request: its route, plain and streamed bodies, and headers."""

    route: str
    plain: bytes
    stream: bytes
    headers: Mapping[str, str]


#: Makes an aiohttp session as the proxy does, with this connect timeout.
NewSession = Callable[[float], aiohttp.ClientSession]


class Misbehaving:
    """A tiny HTTP/1.1 server whose answer is chosen by the request's path, some wrong."""

    OK = b'{"ok":true}'

    def __init__(self) -> None:
        self.accepted = 0
        self.requests: list[bytes] = []
        self.gate = asyncio.Event()
        self.gone = asyncio.Event()  # a connection the client dropped mid-answer
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                path = head.split(b" ", 2)[1].decode()
                if not await self._answer(path, reader, writer):
                    return
        finally:
            writer.close()

    async def _answer(
        self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer ``path``; False closes the connection afterwards."""
        json_head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        chunked = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        if path in ("/ok", "/drop"):
            writer.write(json_head + b"content-length: %d\r\n\r\n%s" % (len(self.OK), self.OK))
            await writer.drain()
            return path == "/ok"
        if path == "/close-after":  # kept open: closing it is the client's part
            writer.write(json_head + b"connection: close\r\ncontent-length: 11\r\n\r\n" + self.OK)
            await writer.drain()
            return True
        if path == "/close-before":
            return False
        if path == "/reset-before":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if path == "/cut-length":
            writer.write(json_head + b"content-length: 100\r\n\r\n" + b'{"choices":')
            await writer.drain()
            return False
        if path == "/cut-chunked":
            writer.write(chunked + _chunk(b"data: one\n\n"))
            await writer.drain()
            return False
        if path == "/garbage":
            writer.write(b"HELLO THERE\r\n\r\n")
            await writer.drain()
            return False
        if path == "/eof-body":
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n"
            )
            writer.write(b"ended by the close")
            await writer.drain()
            return False
        if path == "/big":
            writer.write(chunked)
            for i in range(64):
                writer.write(_chunk(bytes([65 + i % 26]) * 65536))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if path in ("/slow-stream", "/hang"):
            if path == "/slow-stream":  # closed after it: no race with the client's next request
                close = chunked.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n")
                writer.write(close + _chunk(b"data: first\n\n"))
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
            writer.write(_chunk(b"data: second\n\n") + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
            return False
        raise ValueError(path)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def aiohttp_fetch(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    method: str = "POST",
    whole: bool = False,
) -> tuple[int, str | None, bytes]:
    """An answer as the proxy reads one: whole (``read``), or chunk by chunk."""
    async with session.request(method, url, data=body or None, headers=headers) as resp:
        if whole:
            return resp.status, resp.headers.get("content-type"), await resp.read()
        parts = [chunk async for chunk in resp.content.iter_any()]
        return resp.status, resp.headers.get("content-type"), b"".join(parts)


async def lean_fetch(
    client: LeanClient,
    port: int,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    method: str = "POST",
    whole: bool = False,
) -> tuple[int, str | None, bytes]:
    reply = await client.request(method, "127.0.0.1", port, path, body, headers)
    try:
        if whole:
            return reply.status, reply.header("content-type"), await reply.read()
        parts = [chunk async for chunk in reply.iter_chunks()]
    finally:
        reply.close()
    return reply.status, reply.header("content-type"), b"".join(parts)


def describe(exc: BaseException | None) -> str:
    if exc is None:
        return "answered"
    name = type(exc).__name__
    code = getattr(exc, "errno", None)
    if code:
        name += f" ({os.strerror(code)})"
    if isinstance(exc, Broken) and exc.reused:
        name += ", reused"
    return name


async def outcome(coro: Awaitable[object]) -> BaseException | None:
    try:
        await coro
    except Exception as exc:
        return exc
    return None


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"smoke: {what}")
    print(f"  ok: {what}", file=sys.stderr)


async def smoke(engine_port: int, new_session: NewSession, req: Request) -> None:
    """Check the lean client against aiohttp (``new_session``) on the engine at
    ``engine_port`` and on a server that fails on purpose, with the bench's request."""
    print("smoke: the prototype against aiohttp", file=sys.stderr)
    session = new_session(5.0)
    lean = LeanClient(keepalive_s=IDLE_CONNECTION_S)
    engine = f"http://127.0.0.1:{engine_port}"
    for method, path, body in [
        ("POST", req.route, req.plain),
        ("POST", req.route, req.stream),
        ("GET", "/v1/models", b""),
        ("GET", "/metrics", b""),
        ("GET", "/health", b""),
    ]:
        theirs = await aiohttp_fetch(session, engine + path, body, req.headers, method=method)
        ours = await lean_fetch(lean, engine_port, path, body, req.headers, method=method)
        check(theirs == ours and theirs[0] == 200, f"{method} {path}: identical answers")
    many = await asyncio.gather(
        *(lean_fetch(lean, engine_port, req.route, req.stream, req.headers) for _ in range(64))
    )
    check(len({m for m in many}) == 1, "64 concurrent streams, identical answers")
    check(
        lean.opened == 64, "connections reused (64 opened for 5 requests in turn, then 64 at once)"
    )

    server = Misbehaving()
    port = await server.start()
    here = f"http://127.0.0.1:{port}"
    await aiohttp_fetch(session, here + "/ok", req.plain, req.headers)
    await lean_fetch(lean, port, "/ok", req.plain, req.headers)
    theirs_head, ours_head = (_fields(r) for r in server.requests[-2:])
    check(theirs_head == ours_head, f"the same request as the engine sees it: {sorted(ours_head)}")

    fresh = LeanClient()
    accepted = server.accepted
    for _ in range(20):
        await lean_fetch(fresh, port, "/ok", req.plain, req.headers)
    check(fresh.opened == 1 and server.accepted == accepted + 1, "20 requests, one connection")
    await lean_fetch(fresh, port, "/close-after", req.plain, req.headers)
    await lean_fetch(fresh, port, "/ok", req.plain, req.headers)
    check(fresh.opened == 2, "an answer with 'connection: close' is not pooled")
    await lean_fetch(fresh, port, "/drop", req.plain, req.headers)  # the engine drops it once idle
    await _until(
        lambda: all(c.closed for c in fresh._idle[("127.0.0.1", port)]),
        "a connection the engine closed is seen closed",
    )
    check(
        (await lean_fetch(fresh, port, "/ok", req.plain, req.headers))[0] == 200
        and fresh.opened == 3,
        "a connection the engine closed while idle is not used again",
    )
    brief = LeanClient(keepalive_s=0.05)
    await lean_fetch(brief, port, "/ok", req.plain, req.headers)
    idle = list(brief._idle[("127.0.0.1", port)])
    await asyncio.sleep(0.1)  # timers run in order: the sweep's (0.05 s) has run
    check(bool(idle) and all(c.closed for c in idle), "the sweep closes a connection idle too long")
    await lean_fetch(brief, port, "/ok", req.plain, req.headers)
    check(brief.opened == 2, "a connection idle over keepalive_s is not used again")
    await brief.close()

    big_theirs = await aiohttp_fetch(session, here + "/big", req.plain, req.headers)
    big_ours = await lean_fetch(fresh, port, "/big", req.plain, req.headers)
    reply = await fresh.request("POST", "127.0.0.1", port, "/big", req.plain, req.headers)
    whole = await reply.read()
    check(
        big_theirs == big_ours and whole == big_ours[2] and len(whole) == 64 * 65536,
        "a 4 MiB chunked body, iterated and read whole (past the high-water pause)",
    )

    await _failures(session, fresh, port, here, new_session, req)

    server.gate.clear()
    reply = await fresh.request("POST", "127.0.0.1", port, "/slow-stream", req.stream, req.headers)
    chunks = reply.iter_chunks()
    first = await anext(chunks)
    check(first == b"data: first\n\n", "a streamed chunk arrives before the rest")
    server.gate.set()
    rest = [c async for c in chunks]
    check(b"".join(rest) == b"data: second\n\ndata: [DONE]\n\n", "then the rest of the stream")
    server.gate.clear()

    for path, where in [("/slow-stream", "mid-stream"), ("/hang", "before its answer")]:
        server.gone.clear()
        got = asyncio.Event()

        async def consume(path: str = path, got: asyncio.Event = got) -> None:
            reply = await fresh.request("POST", "127.0.0.1", port, path, req.stream, req.headers)
            try:
                async for _ in reply.iter_chunks():
                    got.set()
            finally:
                reply.close()

        task = asyncio.create_task(consume())
        if path == "/slow-stream":
            await asyncio.wait_for(got.wait(), 5)
        else:
            await _until(
                lambda: server.requests[-1].split(b" ", 2)[1] == b"/hang", "the server has it"
            )
        opened = fresh.opened  # the cancelled request's connection among them
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await _until(server.gone.is_set, f"a request cancelled {where}: its connection closed")
        await lean_fetch(fresh, port, "/ok", req.plain, req.headers)
        check(
            fresh.opened == opened + 1,
            f"a request cancelled {where}: its connection aborted, not pooled",
        )
    await fresh.close()
    await server.close()
    await session.close()
    await lean.close()


async def _failures(
    session: aiohttp.ClientSession,
    lean: LeanClient,
    port: int,
    here: str,
    new_session: NewSession,
    req: Request,
) -> None:
    """Every failure the proxy tells apart, through both clients."""
    refused_port = free_port()
    backlog = socket.socket()
    backlog.bind(("127.0.0.1", 0))
    backlog.listen(0)
    full = socket.create_connection(backlog.getsockname())  # fills the queue: SYNs dropped
    quick = new_session(0.3)
    quick_lean = LeanClient(connect_timeout_s=0.3)
    stuck = backlog.getsockname()[1]
    cases: list[tuple[str, Awaitable[object], Awaitable[object], type[Exception]]] = [
        (
            "connection refused",
            aiohttp_fetch(session, f"http://127.0.0.1:{refused_port}/ok", req.plain, req.headers),
            lean_fetch(lean, refused_port, "/ok", req.plain, req.headers),
            Refused,
        ),
        (
            "no connection within the connect timeout",
            aiohttp_fetch(quick, f"http://127.0.0.1:{stuck}/ok", req.plain, req.headers),
            lean_fetch(quick_lean, stuck, "/ok", req.plain, req.headers),
            ConnectTimeout,
        ),
    ]
    rows = []
    for name, theirs, ours, expected in cases:
        rows.append(await _case(name, theirs, ours, expected, connect=True))
    # The rest on connections of their own, then on a kept-alive one.
    for path, name, expected, whole in [
        ("/close-before", "closed under the request", Broken, False),
        ("/reset-before", "reset under the request", Broken, False),
        ("/cut-length", "Content-Length body cut short, read whole", CutShort, True),
        ("/cut-length", "Content-Length body cut short, iterated", CutShort, False),
        ("/cut-chunked", "chunked stream cut short, read whole", CutShort, True),
        ("/cut-chunked", "chunked stream cut short, iterated", CutShort, False),
        ("/garbage", "an answer that does not parse", BadAnswer, False),
        ("/eof-body", "body ended by the close (no length)", type(None), True),
        ("/eof-body", "body ended by the close (no length), iterated", type(None), False),
    ]:
        fresh_session, fresh_lean = new_session(5.0), LeanClient()
        rows.append(
            await _case(
                name,
                aiohttp_fetch(fresh_session, here + path, req.plain, req.headers, whole=whole),
                lean_fetch(fresh_lean, port, path, req.plain, req.headers, whole=whole),
                expected,
            )
        )
        await fresh_session.close()
        await fresh_lean.close()
    kept_session, kept_lean = new_session(5.0), LeanClient()
    await aiohttp_fetch(kept_session, here + "/ok", req.plain, req.headers)
    await lean_fetch(kept_lean, port, "/ok", req.plain, req.headers)
    rows.append(
        await _case(
            "closed under a request on a kept-alive connection",
            aiohttp_fetch(kept_session, here + "/close-before", req.plain, req.headers),
            lean_fetch(kept_lean, port, "/close-before", req.plain, req.headers),
            Broken,
        )
    )
    check(kept_lean.opened == 1, "... and it was sent on the kept-alive connection")
    await kept_session.close()
    await kept_lean.close()
    await quick.close()
    await quick_lean.close()
    full.close()
    backlog.close()
    print(table(["failure", "aiohttp raises", "proxy reads it as", "lean raises"], rows))


async def _case(
    name: str,
    theirs: Awaitable[object],
    ours: Awaitable[object],
    expected: type[BaseException],
    *,
    connect: bool = False,
) -> list[str]:
    their_exc, our_exc = await outcome(theirs), await outcome(ours)
    check(isinstance(our_exc, expected), f"{name}: lean raises {describe(our_exc)}")
    if connect:
        reading = "no connection"
        parity = isinstance(
            their_exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
        )
    elif their_exc is None:
        reading = "answered"
        parity = our_exc is None
    else:
        broke = _broke(their_exc)
        reading = "broke: replica sits out" if broke else "failed: retried elsewhere"
        parity = broke == isinstance(our_exc, Broken | CutShort)
    check(parity, f"{name}: the proxy would read both alike ({reading})")
    return [name, describe(their_exc), reading, describe(our_exc)]


def _fields(raw: bytes) -> set[tuple[str, str]]:
    """A request as a set: its request line and body, and its header fields (names lowered)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    line, *fields = head.decode().split("\r\n")
    got = {("", line), ("body", body.decode())}
    for field in fields:
        name, _, value = field.partition(":")
        got.add((name.strip().lower(), value.strip()))
    return got


async def _until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(5):
            while not condition():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise SystemExit(f"smoke: {what}: not within 5 s") from None
