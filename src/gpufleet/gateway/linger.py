"""Answer a request before its body is read, and let the client read the answer.

The gateway answers some requests without reading their bodies: a 413 for a Content-Length over
the limit (refused before a byte of it is buffered), a 401, a 404. A connection closed with body
bytes unread is reset by the kernel, and a client that sends its whole body before it reads
(Python's urllib, ``requests``) then sees only the reset. uvicorn (httptools and h11 alike)
closes at once when the client sent ``Connection: close``, as urllib does, and otherwise reads
and discards the rest of the body with no bound at all. So, as nginx's lingering close does:
the answer is sent whole with ``connection: close``, then the rest of the body is read and
dropped one read at a time (uvicorn hands over at most ~64 KiB a read, so nothing is buffered)
until it ends, the client goes, or a bound is met — ``Linger``, nginx's 30 s in all and 5 s
without data, and a byte count — and only then is the response finished and the connection
closed.

An ``Expect: 100-continue`` client (curl, for bodies over 1 MiB) is never asked for its body:
uvicorn sends the 100 on the app's first ``receive`` only while no response has started, so it
gets the final answer instead, sends nothing and closes, which ends the drain.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Linger", "LingeringClose"]


@dataclass(frozen=True, slots=True)
class Linger:
    """How long an unread body is drained after its answer was sent."""

    total_s: float = 30.0
    idle_s: float = 5.0
    #: Far more than any body a gateway accepts, little for loopback or a LAN to carry in 30 s.
    max_bytes: int = 1 << 30


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for key, value in headers:
        if key == b"content-length":
            return value.strip() != b"0"
        if key == b"transfer-encoding":
            return True
    return False


class LingeringClose:
    """ASGI middleware: a response sent before its request's body was read to the end is sent
    with ``connection: close``, and finished only once the body is drained (within ``linger``)."""

    def __init__(self, app: ASGIApp, linger: Linger | None = None) -> None:
        self.app = app
        self.linger = linger or Linger()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        unread = True

        async def tracked() -> Message:
            nonlocal unread
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                unread = False
            return message

        async def lingering(message: Message) -> None:
            if unread:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
                elif message["type"] == "http.response.body" and not message.get("more_body"):
                    await send({**message, "more_body": True})
                    await self._drain(receive)
                    message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, tracked, lingering)

    async def _drain(self, receive: Receive) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger.total_s
        left = self.linger.max_bytes
        while left > 0:
            wait = min(self.linger.idle_s, deadline - loop.time())
            if wait <= 0:
                return
            try:
                async with asyncio.timeout(wait):
                    message = await receive()
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            left -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return
