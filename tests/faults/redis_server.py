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
from pathlib import Path

import redis

from tests.faults.server import FaultServer

__all__ = ["RedisServer"]


class RedisServer(FaultServer):
    name = "redis-server"

    def __init__(self, directory: Path, *, appendonly: bool) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        super().__init__(directory / "redis.log")
        self.binary = binary
        self.directory = directory
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _launch(self) -> None:
        if self.running():
            raise RuntimeError("redis-server is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
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
        self.paused = False

    def _answers(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False  # not listening yet, or still loading its AOF
        finally:
            client.close()

    def _exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _discard(self) -> None:
        pass  # the directory is the caller's (a test's tmp_path): its AOF may be looked at

    def _signal(self, sig: signal.Signals) -> None:
        if not self.running():
            raise RuntimeError("redis-server is not running")
        assert self.proc is not None
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
