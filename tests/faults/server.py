"""What every dependency of a test's own shares: a free port, a log, and one life cycle.

A fault test needs a server it may kill, stop and start again on the same port with the same
data, and it must know when the server answers again — not when its process exists. The
subclasses say how to launch one, how to ask it once whether it answers, and how to stop and
kill it; starting (launch, then wait until it answers, failing early with the server's log tail
when it died instead), restarting, closing and the ``with`` block are here once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from tests.conftest import free_port

__all__ = ["FaultServer"]


class FaultServer(ABC):
    #: How messages name it ("redis-server", "PostgreSQL").
    name: ClassVar[str]

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log

    @property
    @abstractmethod
    def url(self) -> str:
        """Where clients reach it."""

    @abstractmethod
    def _launch(self) -> None:
        """Start the server process on ``self.port`` with its data as it was left."""

    @abstractmethod
    def _answers(self) -> bool:
        """One short attempt to talk to it: True once it serves clients."""

    def _exited(self) -> int | None:
        """The launched server's exit status once it is gone (waiting on it is then pointless);
        None while it runs, or where the subclass cannot tell."""
        return None

    @abstractmethod
    def stop(self) -> None:
        """An orderly shutdown; gone when this returns."""

    @abstractmethod
    def kill(self) -> None:
        """SIGKILL: gone at once, with whatever its files hold."""

    @abstractmethod
    def running(self) -> bool:
        """Whether ``close`` has a server to end."""

    def _end(self) -> None:
        """How ``close`` ends a running server: killed, unless a subclass knows better."""
        self.kill()

    @abstractmethod
    def _discard(self) -> None:
        """Remove what ``close`` should once the server is gone (its files, if temporary)."""

    def start(self, *, timeout: float = 30.0) -> None:
        """Start (or start again, same port and data) and wait until it answers."""
        self._launch()
        deadline = time.monotonic() + timeout
        while not self._answers():
            status = self._exited()
            if status is not None:
                raise RuntimeError(f"{self.name} exited {status}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} on {self.port} not ready in {timeout} s")
            time.sleep(0.02)

    def restart(self) -> None:
        """Start again after ``kill`` or ``stop``, on the same port with the same data."""
        self.start()

    def close(self) -> None:
        if self.running():
            self._end()
        self._discard()

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
