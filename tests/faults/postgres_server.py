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
import time
from pathlib import Path

import psycopg

from tests.faults.server import FaultServer

__all__ = ["PostgresServer"]


def _bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed")
    return str(found[-1])


class PostgresServer(FaultServer):
    name = "PostgreSQL"

    def __init__(self, *, user: str = "postgres") -> None:
        self.user = user
        self.root = Path(tempfile.mkdtemp(prefix="gpufleet-pg-"))
        shutil.chown(self.root, user=user, group=user)
        self.data = self.root / "data"
        super().__init__(self.root / "postgres.log")
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
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}{self.log_tail()}")

    def _launch(self) -> None:
        """Initialise the data directory the first time; pg_ctl -w returns once the server
        accepts connections (or has failed to start: then it raises with the log's tail)."""
        if not self._initialised:
            self._run(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "--no-sync")  # fmt: skip
            self._initialised = True
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip

    def _answers(self) -> bool:
        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=self.port,
                user="postgres",
                dbname="postgres",
                connect_timeout=2,
            ):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """Fast shutdown: sessions are ended, the server is gone when this returns."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster (its backends follow); a start recovers from the WAL.

        Returns once the postmaster is reaped: PostgreSQL refuses to start while the pid in
        its stale lock file still exists, and a zombie does (init reaps it when it gets to it).
        """
        pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30.0
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL's postmaster {pid} not reaped in 30 s")
            time.sleep(0.02)

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def _end(self) -> None:
        # Already gone (killed): its pid file is stale and pg_ctl says so.
        with contextlib.suppress(RuntimeError):
            self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def _discard(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
