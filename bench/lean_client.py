"""A lean HTTP/1.1 client for the gateway's upstream calls: a prototype for issue 17, not product.

Why it exists: profiled under load, aiohttp's client (``ClientSession._request``, the connector,
the ``ClientResponse`` object, the body's ``StreamReader``) is a quarter to a third of the
gateway's ~580 µs of CPU a request. The gateway asks little of its client — POST a body it
already has to an engine on a plain TCP address, read the status, one header and the whole
body, or relay a stream chunk by chunk — so this client is an ``asyncio.Protocol`` around
httptools' response parser (llhttp, the parser Node uses) and not much else.
``bench/upstream_client.py`` measures it against aiohttp configured as ``Upstream._http()``.

What it does:

- a request is one ``transport.write`` of head and body; the head carries ``Host``,
  ``Content-Length``, ``Accept: */*`` (as aiohttp sends it) and the caller's headers (a CR or
  LF in one is refused);
- bodies framed by ``Content-Length``, chunked, or (without either) ended by the close; a
  streamed body is read chunk by chunk as it arrives, reading paused above ``HIGH_WATER``
  bytes unread;
- a keep-alive pool per (host, port): a connection goes back once its answer is complete on the
  wire and the engine did not ask to close it; the most recently used is taken first, one idle
  over ``keepalive_s`` (or closed by the engine) is never used, and a timer closes those;
- errors the proxy can tell apart: ``Refused`` / ``ConnectTimeout`` (both ``Unconnected``: the
  engine never had the request), ``Broken`` (the connection closed or reset with the request on
  it before the answer began; ``reused`` says whether it was a kept-alive one), ``CutShort``
  (the answer began and its connection ended before the body did) and ``BadAnswer`` (what
  came back does not parse);
- cancellation: a reply closed before its answer is complete, or a request cancelled before
  its head arrives, aborts its connection, so a connection never returns to the pool
  mid-answer.

Left out, on purpose (the gateway does not need them): TLS, proxies, redirects, cookies,
authentication schemes, decompression (the gateway passes bodies on as they come), request
bodies that are not bytes, pipelining, upgrades, trailers, a cap on connections per engine
(the gateway's aiohttp has none either: ``limit=0``). Left out, and a product version would
need them: limits on the size of headers and of a body read whole (httptools enforces none),
skipping 1xx interim answers, a reply dropped without ``close()`` giving its connection back
(here it stays out of the pool until the engine closes it), name resolution with a cache (a
host that is not an IP is resolved on every new connection), and a test suite.
"""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import cast

import httptools

__all__ = [
    "BadAnswer",
    "Broken",
    "ConnectTimeout",
    "CutShort",
    "LeanClient",
    "Refused",
    "Reply",
    "Unconnected",
    "UpstreamError",
]

#: Unread bytes of a streamed body above which the connection stops reading.
HIGH_WATER = 256 * 1024
_NO_BODY = frozenset({204, 304})


class UpstreamError(Exception):
    """A request to an engine that got no complete answer."""


class Unconnected(UpstreamError):
    """No connection was made: the engine never had the request."""


class Refused(Unconnected):
    """The connection was refused: nothing listens on the engine's address."""


class ConnectTimeout(Unconnected):
    """The connection was not made within the connect timeout."""


class Broken(UpstreamError):
    """The connection closed or reset with the request on it, before any of the answer."""

    def __init__(self, message: str, *, reused: bool, errno: int | None = None) -> None:
        super().__init__(message)
        self.reused = reused
        self.errno = errno


class CutShort(UpstreamError):
    """The answer began and its connection ended before its end."""


class BadAnswer(UpstreamError):
    """What the engine sent does not parse as an HTTP/1.1 answer."""


class Reply:
    """One answer: ``status`` and raw ``headers`` once returned by ``LeanClient.request``; the
    body through ``read`` or ``iter_chunks``. ``close`` when done (idempotent)."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_head",
        "_waiter",
        "_whole",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: UpstreamError | None = None
        self._whole = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for field, value in self.headers:
            if field.lower() == key:
                return value.decode("latin-1")
        return None

    async def read(self) -> bytes:
        """The whole body (read without the high-water pause: it is all wanted)."""
        if not self._whole:
            self._whole = True
            self._conn.resume()
        while not self._done:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._take()

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: what has arrived since the last chunk, joined."""
        while True:
            if self._chunks:
                yield self._take()
            elif self._done:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._wait()

    def close(self) -> None:
        """Done with the answer: a connection still carrying it is aborted, never pooled."""
        if not self._done and self._conn.reply is self:
            self._conn.abort()

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._buffered >= HIGH_WATER:
            self._conn.resume()
        self._buffered = 0
        return data

    async def _wait(self) -> None:
        self._waiter = self._conn.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= HIGH_WATER and not self._whole:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: a request cancelled meanwhile never awaits it
        self._wake()


class _Connection(asyncio.Protocol):
    """One connection to an engine and its response parser; ``reply`` is the answer it
    carries (None while idle)."""

    def __init__(self, client: LeanClient, key: tuple[str, int]) -> None:
        self.loop = client.loop
        self._client = client
        self.key = key
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.reply: Reply | None = None
        self.closed = False
        self.sent = 0
        self.idle_since = 0.0
        self._headers: list[tuple[bytes, bytes]] = []
        self._framed = True
        self._keep = True
        self._paused = False

    # the client's side

    def send(self, data: bytes, reply: Reply) -> None:
        assert self.transport is not None
        self.reply = reply
        self.sent += 1
        self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost(BadAnswer(f"the engine's answer does not parse: {exc}"))
            self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reply = self.reply
        if reply is None:
            return
        if reply._head.done() and not self._framed and exc is None:
            self.reply = None
            reply._finish()  # a body ended by the close: complete
            return
        if reply._head.done():
            self._lost(CutShort(f"the answer was cut short ({exc or 'closed'})"))
            return
        code = exc.errno if isinstance(exc, OSError) else None
        reason = errno.errorcode.get(code, "") if code else ""
        self._lost(
            Broken(
                f"the connection {'reset' if code else 'closed'} with the request on it"
                + (f" ({reason})" if reason else ""),
                reused=self.sent > 1,
                errno=code,
            )
        )

    def _lost(self, error: UpstreamError) -> None:
        reply, self.reply = self.reply, None
        if reply is not None:
            reply._fail(error)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.reply is None:  # bytes nobody asked for: the connection cannot be trusted
            self.abort()
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        reply = self.reply
        if reply is None:
            return
        status = self._parser.get_status_code()
        reply.status = status
        reply.headers = self._headers
        self._keep = self._parser.should_keep_alive()
        framed = status in _NO_BODY or status < 200
        for name, _ in self._headers:
            lowered = name.lower()
            if lowered == b"content-length" or lowered == b"transfer-encoding":
                framed = True
                break
        self._framed = framed
        if not reply._head.done():  # not cancelled meanwhile
            reply._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.reply is not None:
            self.reply._feed(body)

    def on_message_complete(self) -> None:
        reply, self.reply = self.reply, None
        if reply is None:
            return
        reply._finish()
        if self._keep and not self.closed:
            self.resume()
            self._client._put(self)
        else:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class LeanClient:
    """Requests to engines over kept-alive HTTP/1.1 connections, one pool per (host, port)."""

    def __init__(self, *, connect_timeout_s: float = 5.0, keepalive_s: float = 4.0) -> None:
        self.loop = asyncio.get_running_loop()
        self._connect_timeout = connect_timeout_s
        self._keepalive = keepalive_s
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        #: Connections opened, for the bench's checks of reuse.
        self.opened = 0

    async def request(
        self,
        method: str,
        host: str,
        port: int,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send the request; the reply once its status and headers have arrived."""
        head = _head(method, host, port, path, len(body), headers or {})
        conn = self._take((host, port)) or await self._connect(host, port)
        reply = Reply(conn)
        conn.send(head + body if body else head, reply)
        try:
            await reply._head
        except BaseException:
            reply.close()  # cancelled (or broken): this connection is not reused
            raise
        return reply

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest = self.loop.time() - self._keepalive
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closing
            if conn.closed:
                continue
            if conn.idle_since < oldest:  # and every one under it is older still
                conn.abort()
                for stale in idle:
                    stale.abort()
                idle.clear()
                return None
            return conn
        return None

    async def _connect(self, host: str, port: int) -> _Connection:
        key = (host, port)
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self, key), host, port
                )
        except TimeoutError as exc:
            raise ConnectTimeout(f"no connection within {self._connect_timeout:g} s") from exc
        except ConnectionRefusedError as exc:
            raise Refused("connection refused") from exc
        except OSError as exc:
            raise Unconnected(f"could not connect: {exc}") from exc
        self.opened += 1
        return conn

    def _put(self, conn: _Connection) -> None:
        conn.idle_since = self.loop.time()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self._keepalive, self._drop_idle)

    def _drop_idle(self) -> None:
        """Close connections idle over ``keepalive_s``; again when the next one will be."""
        self._sweep = None
        now = self.loop.time()
        oldest = now - self._keepalive
        next_due: float | None = None
        for idle in self._idle.values():
            keep = [c for c in idle if not c.closed and c.idle_since >= oldest]
            for conn in idle:
                if not conn.closed and conn.idle_since < oldest:
                    conn.abort()
            idle[:] = keep
            if keep:  # in the order they went idle: the first is due first
                due = keep[0].idle_since + self._keepalive
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self._sweep = self.loop.call_at(next_due, self._drop_idle)


def _head(
    method: str, host: str, port: int, path: str, length: int, headers: Mapping[str, str]
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\n"]
    for name, value in headers.items():
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"a CR or LF in header {name!r}")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {length}\r\n\r\n")
    return "".join(lines).encode()
