"""A PostgreSQL server of a test's own: on a free port, in a temp dir, to stop and start again.

The machine's PostgreSQL on 5432 is shared by other tests; outages are injected into this one.
PostgreSQL refuses to run as root, so its binaries run as the ``postgres`` user (``runuser``)
in a directory of its own under /tmp (pytest's temp dirs are root's alone, 0700). ``stop`` is
pg_ctl's fast shutdown (clients are disconnected), ``kill`` SIGKILLs the postmaster;
``start`` after either comes back on the same port with the same data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.conftest import free_port

__all__ = ["PostgresServer"]


def _bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed")
    return str(found[-1])


class PostgresServer:
    def __init__(self, *, user: str = "postgres") -> None:
        self.user = user
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="gpufleet-pg-"))
        shutil.chown(self.root, user=user, group=user)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._initialised = False

    @property
    def url(self) -> str:
        """The SQLAlchemy URL ``gpufleet up --store`` takes (trust auth on loopback)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        done = subprocess.run(
            ["runuser", "-u", self.user, "--", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            tail = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}{tail}")

    def start(self) -> None:
        """Start (initialising the data directory the first time); returns once it accepts
        connections (pg_ctl -w)."""
        if not self._initialised:
            self._run(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "--no-sync")  # fmt: skip
            self._initialised = True
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        """Fast shutdown: sessions are ended, the server is gone when this returns."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster (its backends follow); a start recovers from the WAL."""
        pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)

    def restart(self) -> None:
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        if self.running():
            # Already gone (killed): its pid file is stale and pg_ctl says so.
            with contextlib.suppress(RuntimeError):
                self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
