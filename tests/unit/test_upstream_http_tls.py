"""The gateway's upstream client over TLS (``https://`` base URLs: issue 21's external
endpoints), against an aiohttp server with a certificate from a CA made in the test
(``trustme``): answers and streams as over plain HTTP, one handshake for many requests, pools
kept apart by scheme, and every TLS failure — a CA not trusted, a certificate for another
host, no TLS spoken, a handshake that never ends — an ``Unconnected`` the proxy does not read
as a refusal. Also run under uvloop, the gateway's loop, whose TLS is its own code."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme
import uvloop
from aiohttp import web

from gpufleet.gateway import upstream_http
from gpufleet.gateway.proxy import IDLE_CONNECTION_S, _broke
from gpufleet.gateway.upstream_http import (
    ConnectTimeout,
    Refused,
    TLSFailed,
    Unconnected,
    UpstreamClient,
    UpstreamError,
)

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
HEADERS = {"content-type": "application/json", "authorization": "Bearer engine-secret"}


class Server:
    """An HTTPS engine stand-in: ``POST /ok`` answers JSON naming what it got, ``POST /stream``
    sends one event, then the rest once ``gate`` is set. It notes each TLS handshake's server
    name (SNI; None: none sent) and each request's ``Host``."""

    def __init__(self, cert: trustme.LeafCert) -> None:
        self.handshakes: list[str | None] = []
        self.hosts: list[str] = []
        self.gate = asyncio.Event()
        self.port = 0
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self._context)
        self._context.sni_callback = self._hello
        app = web.Application()
        app.router.add_post("/ok", self._ok)
        app.router.add_post("/stream", self._stream)
        self._runner = web.AppRunner(app, access_log=None)

    def _hello(self, _: ssl.SSLObject, name: str | None, __: ssl.SSLContext) -> None:
        self.handshakes.append(name)

    async def _ok(self, request: web.Request) -> web.Response:
        self.hosts.append(request.host)
        return web.json_response({"got": len(await request.read()), "tls": request.secure})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        self.hosts.append(request.host)
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await self.gate.wait()
        await response.write(b"data: second\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def url(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.port}"

    async def __aenter__(self) -> Server:
        await self._runner.setup()
        self.port = await serve(self._runner, self._context)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.gate.set()
        await self._runner.cleanup()


async def serve(runner: web.AppRunner, context: ssl.SSLContext | None = None) -> int:
    """Serve ``runner``'s app on a free loopback port (over TLS with ``context``): the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=context).start()
    port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "company-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def server(ca: trustme.CA) -> AsyncIterator[Server]:
    async with Server(ca.issue_cert("localhost", "127.0.0.1")) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_contexts() -> Iterator[None]:
    """The process-wide contexts made again in each test (one reads ``SSL_CERT_FILE``)."""
    upstream_http._tls_context.cache_clear()
    yield
    upstream_http._tls_context.cache_clear()


@contextlib.asynccontextmanager
async def client(ca_file: str | None, **options: float) -> AsyncIterator[UpstreamClient]:
    http = UpstreamClient(keepalive_s=IDLE_CONNECTION_S, ca_file=ca_file, **options)
    try:
        yield http
    finally:
        await http.close()


async def post(http: UpstreamClient, base: str, path: str = "/ok") -> dict[str, object]:
    status, payload = await http.fetch(base, path, BODY, HEADERS)
    assert status == 200
    answer: dict[str, object] = json.loads(payload)
    return answer


async def tls_failure(http: UpstreamClient, base: str) -> TLSFailed:
    with pytest.raises(TLSFailed) as caught:
        await http.fetch(base, "/ok", BODY, HEADERS)
    return caught.value


async def test_a_base_url_is_parsed_with_its_scheme_port_and_context() -> None:
    """The ``Host`` header omits the scheme's own port, as aiohttp's does."""
    async with client(None) as http:
        secure = http._target("https://api.example.com/v1/")
        assert (secure.port, secure.authority, secure.prefix) == (443, "api.example.com", "/v1")
        assert secure.key == ("https", "api.example.com", 443) and secure.tls is not None
        assert http._target("https://api.example.com:443").authority == "api.example.com"
        assert http._target("https://[::1]:443").authority == "[::1]"
        assert http._target("https://user@h:8443").authority == "h:8443"
        assert http._target("https://h:443").tls is secure.tls  # one context, made once
        plain = http._target("http://api.example.com:80")
        assert plain.key == ("http", "api.example.com", 80) and plain.tls is None
        assert plain.authority == "api.example.com"
        assert http._target("http://h:443").key == ("http", "h", 443)
        with pytest.raises(Unconnected, match="not an http:// or https:// URL"):
            http._target("ftp://api.example.com")


# Answers over TLS, as over plain HTTP.


async def test_a_post_is_answered_over_tls_with_sni_and_the_host(
    server: Server, ca_file: str
) -> None:
    async with client(ca_file) as http:
        assert await post(http, server.url()) == {"got": len(BODY), "tls": True}
        assert await post(http, server.url("127.0.0.1")) == {"got": len(BODY), "tls": True}
    # A host name is sent as SNI; an IP address is not (it is checked against the
    # certificate's IP addresses instead).
    assert server.handshakes == ["localhost", None]
    assert server.hosts == [f"localhost:{server.port}", f"127.0.0.1:{server.port}"]


async def test_a_stream_is_relayed_over_tls_chunk_by_chunk(server: Server, ca_file: str) -> None:
    async with client(ca_file) as http:
        reply = await http.request("POST", server.url(), "/stream", BODY, HEADERS)
        try:
            assert reply.status == 200 and reply.header("content-type") == "text/event-stream"
            chunks = reply.iter_chunks()
            assert await asyncio.wait_for(anext(chunks), 30) == b"data: first\n\n"
            server.gate.set()
            assert b"".join([c async for c in chunks]) == b"data: second\n\ndata: [DONE]\n\n"
        finally:
            reply.close()
        assert await post(http, server.url()) == {"got": len(BODY), "tls": True}
    assert len(server.handshakes) == 1  # the stream's connection was kept, and reused


async def test_tls_connections_are_kept_alive_one_handshake_for_many_requests(
    server: Server, ca_file: str
) -> None:
    async with client(ca_file) as http:
        for _ in range(10):
            await post(http, server.url())
        assert len(server.handshakes) == 1
        await asyncio.gather(*(post(http, server.url()) for _ in range(4)))
        assert len(server.handshakes) == 4  # the kept one and 3 more, all then kept
        await asyncio.gather(*(post(http, server.url()) for _ in range(4)))
        assert len(server.handshakes) == 4


async def test_pools_are_per_scheme_never_mixed(server: Server, ca_file: str) -> None:
    """A kept-alive TLS connection is not taken for ``http://`` to the same host and port
    (over it, the plain request would be answered), nor a plain one for ``https://``."""

    async def answer(_: web.Request) -> web.Response:
        return web.json_response({"tls": False})

    plain = web.Application()
    plain.router.add_post("/ok", answer)
    runner = web.AppRunner(plain, access_log=None)
    await runner.setup()
    port = await serve(runner)
    try:
        async with client(ca_file) as http:
            await post(http, server.url("127.0.0.1"))
            with pytest.raises(UpstreamError):  # a plain request to the TLS server
                await post(http, f"http://127.0.0.1:{server.port}")
            assert await post(http, f"http://127.0.0.1:{port}") == {"tls": False}
            failed = await tls_failure(http, f"https://127.0.0.1:{port}")  # no TLS spoken
            reason = str(failed).removeprefix(f"TLS with 127.0.0.1:{port} failed: ")
            assert reason and reason != str(failed)  # OpenSSL's words: "wrong version number"
            assert await post(http, server.url("127.0.0.1")) == {"got": len(BODY), "tls": True}
        assert len(server.handshakes) == 1
    finally:
        await runner.cleanup()


# TLS failures: Unconnected (the engine never had the request), not refusals.


async def test_a_server_not_trusted_is_tls_failed_with_the_reason(server: Server) -> None:
    async with client(None) as http:
        failed = await tls_failure(http, server.url())
    assert str(failed) == (
        f"TLS with localhost:{server.port} failed: certificate verify failed: unable to get"
        " local issuer certificate"
    )
    assert isinstance(failed.__cause__, ssl.SSLCertVerificationError)
    assert server.hosts == []  # no request reached it
    # The proxy's reading: the engine never had the request (``Unconnected``), and a
    # ``ConnectTimeout``, not a refusal: the replica does not sit out waiting for a restart.
    assert isinstance(failed, Unconnected) and isinstance(failed, ConnectTimeout)
    assert not isinstance(failed, Refused) and not _broke(failed)


async def test_a_certificate_for_another_host_is_refused_by_verification(
    ca: trustme.CA, ca_file: str
) -> None:
    async with (
        Server(ca.issue_cert("engine.example")) as elsewhere,
        client(ca_file) as http,
    ):
        by_name = await tls_failure(http, elsewhere.url())
        by_address = await tls_failure(http, elsewhere.url("127.0.0.1"))
    assert str(by_name).endswith(
        "certificate verify failed: Hostname mismatch, certificate is not valid for 'localhost'."
    )
    assert str(by_address).endswith(
        "IP address mismatch, certificate is not valid for '127.0.0.1'."
    )
    assert elsewhere.hosts == []


async def test_the_ca_file_makes_the_server_trusted_besides_the_systems_cas(
    server: Server, ca_file: str, tmp_path: Path
) -> None:
    async with client(None) as http:
        await tls_failure(http, server.url())
    async with client(ca_file) as trusting:
        assert await post(trusting, server.url()) == {"got": len(BODY), "tls": True}
        context = trusting._tls
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]
    assert context is not None and context.cert_store_stats()["x509_ca"] == system + 1
    with pytest.raises(FileNotFoundError):  # read when the client is made, not on a request
        UpstreamClient(ca_file=str(tmp_path / "missing.pem"))


async def test_ssl_cert_file_is_trusted_in_place_of_the_systems_cas(
    server: Server, ca_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    async with client(None) as http:
        assert await post(http, server.url()) == {"got": len(BODY), "tls": True}
        assert http._tls is not None and http._tls.cert_store_stats()["x509_ca"] == 1


async def test_the_connect_timeout_covers_the_tls_handshake() -> None:
    """A server that accepts the connection (the kernel's backlog) and never answers the
    client's hello: a ``ConnectTimeout``, and the half-made connection closed."""
    loop = asyncio.get_running_loop()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"https://127.0.0.1:{silent.getsockname()[1]}"
        async with client(None, connect_timeout_s=0.3) as http:
            with pytest.raises(ConnectTimeout, match="TLS handshake included") as caught:
                await asyncio.wait_for(http.fetch(url, "/ok", BODY, {}), 30)
        assert not isinstance(caught.value, TLSFailed)
        accepted, _ = silent.accept()
        with accepted:
            accepted.setblocking(False)
            hello = b""
            while got := await asyncio.wait_for(loop.sock_recv(accepted, 65536), 30):
                hello += got
        assert hello.startswith(b"\x16\x03")  # a TLS handshake record, then the close


def test_tls_under_uvloop_as_the_gateway_runs(ca: trustme.CA, ca_file: str) -> None:
    async def scenario() -> None:
        async with Server(ca.issue_cert("localhost", "127.0.0.1")) as running:
            async with client(ca_file) as http:
                for _ in range(3):
                    assert await post(http, running.url()) == {"got": len(BODY), "tls": True}
                reply = await http.request("POST", running.url(), "/stream", BODY, HEADERS)
                chunks = reply.iter_chunks()
                assert await asyncio.wait_for(anext(chunks), 30) == b"data: first\n\n"
                running.gate.set()
                assert b"".join([c async for c in chunks]).endswith(b"data: [DONE]\n\n")
                reply.close()
            assert running.handshakes == ["localhost"]
            async with client(None) as untrusting:
                failed = await tls_failure(untrusting, running.url())
            assert "certificate verify failed" in str(failed)

    uvloop.run(scenario())
