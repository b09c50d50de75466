"""A Redis server of a test's own: on a free port, in a temp dir, to kill, freeze and restart.

The machine's Redis on 6379 is shared by other tests; faults are injected into this one. With
``appendonly`` it persists every write to its append-only file (what a restart recovers from);
without, a restart comes back empty. ``kill`` is SIGKILL (no shutdown, the AOF as written so
far), ``stop`` SIGTERM, ``pause``/``resume`` SIGSTOP/SIGCONT: a hung Redis whose port still
accepts connections.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from tests.conftest import free_port

__all__ = ["RedisServer"]


class RedisServer:
    def __init__(self, directory: Path, *, appendonly: bool) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.directory = directory
        self.appendonly = appendonly
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout: float = 30.0) -> None:
        """Start (or start again, same port and dir) and wait until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("redis-server is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--appendonly", "yes" if self.appendonly else "no",
                "--save", "",
                "--daemonize", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        self.paused = False
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    tail = (self.directory / "redis.log").read_text()[-2000:]
                    raise RuntimeError(f"redis-server exited {self.proc.returncode}: {tail}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass  # not listening yet, or still loading its AOF
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {self.port} not ready in {timeout} s")
                time.sleep(0.02)
        finally:
            client.close()

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("redis-server is not running")
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM: Redis shuts down cleanly (flushing its AOF)."""
        self.resume()
        self._signal(signal.SIGTERM)
        assert self.proc is not None
        self.proc.wait(30)

    def kill(self) -> None:
        """SIGKILL: gone at once, with whatever its AOF holds."""
        self._signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(30)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: hung — connections are accepted by the kernel, nothing is answered."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self._signal(signal.SIGCONT)
            self.paused = False

    def restart(self) -> None:
        """Start again after ``kill`` or ``stop``, on the same port and dir."""
        self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
