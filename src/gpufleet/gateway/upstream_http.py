"""The gateway's HTTP/1.1 client for its calls to engines: an ``asyncio.Protocol`` around
httptools' response parser (llhttp, the parser Node uses), and not much else.

Why not aiohttp: profiled under load, aiohttp's client (``ClientSession._request``, the
connector, ``ClientResponse``, the body's ``StreamReader``) was a quarter to a third of the
gateway's ~580 µs of CPU a request (issue 17). The gateway asks little of its client — POST a
body it already has to an engine on a plain TCP address, read the status, one header and the
whole body, or relay a stream chunk by chunk — and this client's prototype did that in
0.29–0.40× of aiohttp's CPU a plain request, 0.46–0.77× a stream (``bench/upstream_client.py``
measures this one against aiohttp).

What it does:

- a base URL (a replica's ``http://host:port[/prefix]``, or an external endpoint's
  ``https://host[:port][/prefix]``) is parsed once; a host that is not an IP address (a
  Kubernetes Service name) is resolved with ``loop.getaddrinfo`` when a connection is made, its
  addresses kept ``RESOLVE_TTL_S``;
- TLS for ``https://`` (issue 21: external OpenAI-compatible servers, hosted APIs): the
  server's certificate must be trusted and name the host (SNI sent; an IP-address host is
  checked against the certificate's IP addresses), by one ``ssl.create_default_context()``
  made on the first ``https://`` URL (loading the system's CAs takes ~30 ms) and shared. It
  trusts the system's CAs, or ``SSL_CERT_FILE``'s in their place (OpenSSL reads it, for every
  client in the process); ``UpstreamClient(ca_file=...)`` adds a PEM bundle's CAs to the
  system's (a company CA). The connect timeout covers the handshake. An ``http://`` request
  does no more work than before: its scheme, pool key and (no) context are the parsed URL's;
- a request is one write of head and body; the head carries ``Host``, ``Accept: */*`` and
  ``Content-Length`` (as aiohttp sends them) and the caller's headers, a CR or LF in one
  refused (``ValueError``, before any connection);
- interim answers (100 Continue, 103 Early Hints) are skipped; an answer's heads (interim ones
  included) over ``MAX_HEAD_BYTES`` or ``MAX_HEADERS`` fields, or a body read whole
  (``Reply.read``) over ``MAX_BODY_BYTES``, are ``BadAnswer`` (httptools enforces no limit);
- bodies framed by ``Content-Length``, chunked, or (without either) ended by the close; a
  streamed body is read chunk by chunk as it arrives, reading paused above ``HIGH_WATER``
  unread bytes;
- a keep-alive pool per (scheme, host, port): a connection goes back once its answer is
  complete and the engine did not ask to close it; the most recently used is taken first; one
  idle over ``keepalive_s`` (the gateway's ``IDLE_CONNECTION_S``, under the engines' own 5 s)
  or closed by the engine is never used, and a timer closes those;
- errors the proxy tells apart: ``Refused``, ``ConnectTimeout``, ``TLSFailed`` and other
  ``Unconnected`` (the engine never had the request), ``Broken`` (closed or reset with the
  request on it before the answer began; ``reused``: on a kept-alive connection), ``CutShort``
  (the answer began and its connection ended before it did) and ``BadAnswer`` (it does not
  parse, or is over a limit);
- a reply is done with by ``close()`` (callers close in ``finally``); one not complete is
  aborted, never pooled — also when a request is cancelled before its head arrives, and when
  a reply is dropped without ``close()`` (its connection holds it only weakly, and aborts
  when it is collected, as aiohttp's ``ClientResponse.__del__`` does).

A failed TLS handshake (a certificate not trusted or not for the host, no TLS spoken) is
``TLSFailed``, a ``ConnectTimeout``: the proxy reads any other ``Unconnected`` as a refusal —
nothing listens, the engine crashed — and sits the replica out, holding requests for its
restart; a server that answers with the wrong certificate has not crashed and will not restart
into the right one, so its requests fail at once (a 502 naming ``TLSFailed``, the host and the
reason in the log) and its failures count toward outlier ejection, as a connect timeout's do.

Left out, on purpose (the gateway does not need them): client certificates, a CA per base
URL, HTTP/2 and ALPN, proxies, redirects, cookies, authentication schemes, decompression
(bodies are passed on as they come), pipelining, upgrades, trailers, HEAD (its answer's length
describes no body), a cap on connections per engine (aiohttp's was ``limit=0``).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import socket
import ssl
import weakref
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

__all__ = [
    "BadAnswer",
    "Broken",
    "ConnectTimeout",
    "CutShort",
    "Refused",
    "Reply",
    "TLSFailed",
    "Unconnected",
    "UpstreamClient",
    "UpstreamError",
]

#: Unread bytes of a streamed body above which the connection stops reading.
HIGH_WATER = 256 * 1024
#: An answer's status lines and header fields, its interim answers' included.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
#: A body read whole. Generous: an embeddings answer of 2,048 inputs of 4,096 floats, as
#: JSON text, is ~170 MB; the cap is there for an engine that never ends one.
MAX_BODY_BYTES = 256 * 1024 * 1024
#: How long a host name's addresses are used before it is resolved again.
RESOLVE_TTL_S = 5.0
#: Base URLs kept parsed (replicas' addresses; pod IPs come and go).
_TARGETS_KEPT = 1024
#: A body under this is joined to its head (one write); a larger one is written after it.
_JOINED = 64 * 1024
_NO_BODY = frozenset({204, 304})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UpstreamError(Exception):
    """A request to an engine that got no complete answer."""


class Unconnected(UpstreamError):
    """No connection was made: the engine never had the request."""


class Refused(Unconnected):
    """The connection was refused: nothing listens on the engine's address."""


class ConnectTimeout(Unconnected):
    """The connection was not made within the connect timeout."""


class TLSFailed(ConnectTimeout):
    """The TLS handshake failed: the certificate was not trusted or not for the host, or the
    server spoke no TLS. A ``ConnectTimeout`` for the proxy: not a refusal (nothing listening)
    that a restart mends, so the replica does not sit out for it (the module's docstring)."""


class Broken(UpstreamError):
    """The connection closed or reset with the request on it, before any of the answer."""

    def __init__(self, message: str, *, reused: bool, errno: int | None = None) -> None:
        super().__init__(message)
        self.reused = reused
        self.errno = errno


class CutShort(UpstreamError):
    """The answer began and its connection ended before its end."""


class BadAnswer(UpstreamError):
    """What the engine sent does not parse as an HTTP/1.1 answer, or is over a limit."""


@dataclass(frozen=True, slots=True)
class _Target:
    """A base URL, parsed: where to connect, the ``Host`` header, the path prefix."""

    host: str
    port: int
    authority: str
    prefix: str
    numeric: bool  # an IP address: nothing to resolve
    key: tuple[str, str, int]  # its keep-alive pool: (scheme, host, port)
    tls: ssl.SSLContext | None  # https: what verifies the server's certificate


class Reply:
    """One answer: ``status`` and raw ``headers`` once ``UpstreamClient.request`` returns it;
    the body through ``read`` or ``iter_chunks``. ``close`` when done (idempotent)."""

    __slots__ = (
        "__weakref__",
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
        """The whole body (read without the high-water pause: it is all wanted), at most
        ``MAX_BODY_BYTES``."""
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
        if not self._done:
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
        if self._whole:
            if self._buffered > MAX_BODY_BYTES:
                raise BadAnswer(f"a body over {MAX_BODY_BYTES >> 20} MiB")
        elif self._buffered >= HIGH_WATER:
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
    """One connection to an engine and its response parser. The reply it carries is held
    weakly (``_carried``): a reply its caller dropped unfinished aborts the connection."""

    def __init__(self, client: UpstreamClient, key: tuple[str, str, int]) -> None:
        self.loop = client.loop
        self._client = client
        self.key = key
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._carried: weakref.ref[Reply] | None = None
        self.closed = False
        self.sent = 0
        self.idle_since = 0.0
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = False  # the request sent, its answer's final head not yet parsed
        self._head_left = 0  # bytes the connection may still receive before then
        self._field_bytes = 0  # the answer's header fields, its interim answers' included
        self._interim = False
        self._framed = True
        self._keep = True
        self._paused = False

    # the client's side

    def send(self, head: bytes, body: bytes, reply: Reply) -> None:
        assert self.transport is not None
        self._carried = weakref.ref(reply, self._dropped)
        self.sent += 1
        self._in_head = True
        self._head_left = MAX_HEAD_BYTES
        self._field_bytes = 0
        if len(body) < _JOINED:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)

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

    def _reply(self) -> Reply | None:
        carried = self._carried
        return None if carried is None else carried()

    def _dropped(self, carried: weakref.ref[Reply]) -> None:
        if carried is self._carried:  # collected before its answer was complete
            self._carried = None
            self.abort()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._client._open.add(self)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_left -= len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            cause = exc.__context__
            self._lost(
                cause
                if isinstance(cause, BadAnswer)
                else BadAnswer(f"the engine's answer does not parse: {exc!r}")
            )
            self.abort()
            return
        if self._in_head and self._head_left < 0:  # one header line never ending, say
            self._lost(_head_over())
            self.abort()

    def eof_received(self) -> bool:
        self.closed = True  # never taken from the pool again
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._client._open.discard(self)
        reply = self._reply()
        if reply is None:
            return
        if reply._head.done() and not self._framed and exc is None:
            self._carried = None
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
        reply = self._reply()
        self._carried = None
        if reply is not None:
            reply._fail(error)

    # httptools callbacks (an exception raised in one comes back from feed_data)

    def on_message_begin(self) -> None:
        if self._carried is None:  # bytes nobody asked for: the connection cannot be trusted
            self.abort()
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._field_bytes += len(name) + len(value)
        if self._field_bytes > MAX_HEAD_BYTES:
            raise _head_over()
        if len(self._headers) > MAX_HEADERS:
            raise BadAnswer(f"an answer with over {MAX_HEADERS} header fields")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            if status == 101:
                raise BadAnswer("the engine switched protocols")
            self._interim = True  # 100 Continue, 103 Early Hints: the answer is still to come
            return
        self._in_head = False
        reply = self._reply()
        if reply is None:
            return
        reply.status = status
        reply.headers = self._headers
        self._keep = self._parser.should_keep_alive()
        framed = status in _NO_BODY
        for name, _ in self._headers:
            lowered = name.lower()
            if lowered == b"content-length" or lowered == b"transfer-encoding":
                framed = True
                break
        self._framed = framed
        if not reply._head.done():  # not cancelled meanwhile
            reply._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        reply = self._reply()
        if reply is not None:
            reply._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        reply = self._reply()
        self._carried = None
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


class UpstreamClient:
    """Requests to engines over kept-alive HTTP/1.1 connections, one pool per (scheme, host,
    port). Made inside the event loop it runs on. ``ca_file``: a PEM bundle of CAs trusted for
    ``https://`` besides the system's (an unreadable one is an ``OSError`` here)."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = 5.0,
        keepalive_s: float = 4.0,
        ca_file: str | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._connect_timeout = connect_timeout_s
        self._keepalive = keepalive_s
        self._tls = None if ca_file is None else _tls_context(ca_file)  # None: made when needed
        self._targets: dict[str, _Target] = {}
        self._resolved: dict[str, tuple[float, list[str]]] = {}
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None

    async def request(
        self,
        method: str,
        base: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send the request to ``base`` + ``path``; the reply once its status and headers have
        arrived. The caller closes it."""
        target = self._targets.get(base) or self._target(base)
        head = _head(method, target, path, len(body), headers or {})
        conn = self._take(target.key) or await self._connect(target)
        reply = Reply(conn)
        conn.send(head, body, reply)
        try:
            await reply._head
        except BaseException:
            reply.close()  # cancelled (or broken): this connection is not reused
            raise
        return reply

    async def fetch(
        self, base: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        """POST, and the answer's status and whole body."""
        reply = await self.request("POST", base, path, body, headers)
        try:
            return reply.status, await reply.read()
        finally:
            reply.close()

    async def close(self) -> None:
        """Close every connection, idle or carrying an answer (which then fails)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._idle.clear()
        for conn in list(self._open):
            conn.abort()

    def _target(self, base: str) -> _Target:
        parts = urlsplit(base)
        scheme, host = parts.scheme, parts.hostname
        default = _DEFAULT_PORTS.get(scheme)
        if default is None or not host:
            raise Unconnected(f"not an http:// or https:// URL: {base!r}")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            numeric = False
        else:
            numeric = True
        port = parts.port or default
        authority = parts.netloc.rpartition("@")[2]
        if parts.port == default:  # as aiohttp sends it: the scheme's port goes without saying
            authority = authority.rpartition(":")[0]
        prefix = parts.path.rstrip("/")
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = _tls_context(None)
            tls = self._tls
        target = _Target(host, port, authority, prefix, numeric, (scheme, host, port), tls)
        if len(self._targets) >= _TARGETS_KEPT:
            self._targets.clear()
        self._targets[base] = target
        return target

    def _take(self, key: tuple[str, str, int]) -> _Connection | None:
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

    async def _connect(self, target: _Target) -> _Connection:
        error: OSError | None = None
        tls = target.tls
        try:
            async with asyncio.timeout(self._connect_timeout):  # the TLS handshake included
                for address in await self._addresses(target):
                    try:
                        _, conn = await self.loop.create_connection(
                            lambda: _Connection(self, target.key),
                            address,
                            target.port,
                            ssl=tls,
                            server_hostname=None if tls is None else target.host,
                        )
                    except ssl.SSLError as exc:  # the server's answer: its other addresses' too
                        raise _tls_failed(target, exc) from exc
                    except OSError as exc:
                        error = exc
                    else:
                        return conn
        except TimeoutError as exc:
            raise ConnectTimeout(
                f"no connection within {self._connect_timeout:g} s"
                + ("" if tls is None else " (the TLS handshake included)")
            ) from exc
        if isinstance(error, ConnectionRefusedError):
            raise Refused("connection refused") from error
        raise Unconnected(f"could not connect: {error}") from error

    async def _addresses(self, target: _Target) -> Sequence[str]:
        """The addresses to try: the host itself if it is one, else its name resolved (kept
        ``RESOLVE_TTL_S``)."""
        if target.numeric:
            return (target.host,)
        now = self.loop.time()
        known = self._resolved.get(target.host)
        if known is not None and known[0] > now:
            return known[1]
        try:
            found = await self.loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Unconnected(f"could not resolve {target.host!r}: {exc}") from exc
        addresses = list(dict.fromkeys(a[4][0] for a in found if isinstance(a[4][0], str)))
        if not addresses:
            raise Unconnected(f"{target.host!r} resolved to no address")
        self._resolved[target.host] = (now + RESOLVE_TTL_S, addresses)
        return addresses

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
        oldest = self.loop.time() - self._keepalive
        next_due: float | None = None
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.closed and c.idle_since >= oldest]
            for conn in idle:
                if not conn.closed and conn.idle_since < oldest:
                    conn.abort()
            if not keep:
                del self._idle[key]
                continue
            idle[:] = keep
            due = keep[0].idle_since + self._keepalive  # in the order they went idle
            next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self._sweep = self.loop.call_at(next_due, self._drop_idle)


@functools.cache
def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The context verifying servers' certificates: the system's CAs, and ``ca_file``'s."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


def _tls_failed(target: _Target, exc: ssl.SSLError) -> TLSFailed:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"certificate verify failed: {exc.verify_message}"
    else:
        reason = (exc.reason or str(exc)).replace("_", " ").lower()
    return TLSFailed(f"TLS with {target.host}:{target.port} failed: {reason}")


def _head_over() -> BadAnswer:
    return BadAnswer(f"an answer's head over {MAX_HEAD_BYTES >> 10} KiB")


def _head(
    method: str, target: _Target, path: str, length: int, headers: Mapping[str, str]
) -> bytes:
    lines = [
        f"{method} {target.prefix}{path} HTTP/1.1\r\nHost: {target.authority}\r\nAccept: */*\r\n"
    ]
    for name, value in headers.items():
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"a CR or LF in header {name!r}")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {length}\r\n\r\n")
    return "".join(lines).encode()
