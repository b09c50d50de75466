"""Slow clients are cut off: a request's headers must arrive within a bound.

uvicorn has a keep-alive timeout (between requests) but none while a request's headers arrive,
so a client that drips its headers a byte at a time (slowloris) holds a connection, and a file
descriptor, for as long as it likes: 500 such connections stayed open indefinitely (issue 16).
As nginx's ``client_header_timeout``: the clock starts when the connection opens (a client that
sends nothing is as slow), or at the first byte of a later request on a kept-alive connection,
and stops when the headers are complete; a late one is closed and counted. The body's bound
(progress at least every ``body_idle_s``) is ``asgi.read_body``'s: only the app knows when it
waits for the body rather than the body for the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

__all__ = ["HeaderDeadline", "HeaderTimeoutProtocol", "header_timeout_protocol"]


@dataclass(frozen=True, slots=True)
class HeaderDeadline:
    timeout_s: float = 30.0
    #: Told what was late ("headers") each time a slow client is closed.
    on_slow: Callable[[str], None] | None = None


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's headers."""

    deadline: ClassVar[HeaderDeadline] = HeaderDeadline()

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._headers_due is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._headers_due = self.loop.call_later(self.deadline.timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _headers_late(self) -> None:
        self._headers_due = None
        if self.transport.is_closing():
            return
        self.transport.close()
        if self.deadline.on_slow is not None:
            self.deadline.on_slow("headers")


def header_timeout_protocol(deadline: HeaderDeadline) -> type[HeaderTimeoutProtocol]:
    """The protocol class for ``uvicorn.Config(http=…)``, which instantiates it itself."""

    class Protocol(HeaderTimeoutProtocol):
        pass

    Protocol.deadline = deadline
    return Protocol
