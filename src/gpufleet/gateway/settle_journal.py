"""Pending quota settlements on local disk, so a gateway restarted during an outage resends them.

A settlement the quota store (Redis) cannot take is retried from memory
(``gateway.settlements``); if the gateway dies before the store is back — SIGKILLed, OOM-killed,
restarted by its supervisor — the memory is gone, and the tenant's concurrency slots stay taken
until their leases expire (30 s after their last renewal, ``SHARED_LEASE_S``) while its
reservations stay charged. The journal keeps them across that: each kept settlement is one JSON
line (its lease and the store's call) handed to the kernel with one ``write()`` on an
``O_APPEND`` file, so once ``append`` returns it survives a SIGKILL of the process (it is in the
page cache). The retry loop fsyncs now and then (``sync``, in a thread), never the hot path;
power loss in between costs what the journal did not have, slots freed by their leases' expiry
as before.

There are no per-settlement "done" lines: when the backlog is empty everything in the file has
landed, and the file is emptied (``clear``). A line whose settlement landed before a crash is
simply sent again at the next start, which is harmless — settlements are idempotent per lease
(the store's script removes the lease by id and applies corrections only while the admission's
marker is there). The file grows only while settlements are pending; a long outage that keeps
adding them (a hung store voids every admission it timed out) is compacted into what is still
pending (``rewrite``: a new file renamed over the old one) once it holds twice the backlog's
bound.

At start ``open`` reads what a previous process left: a last line without its newline is a
write cut short by a crash (skipped, and cut off so the next line starts clean), a line that is
not a settlement is skipped; each kind is logged once. The file lives in the gateway's local
durable directory (the ledger spool's), which one process owns at a time (the spool's
``flock``), so two gateways never share a journal.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["FILENAME", "SettleJournal"]

log = logging.getLogger("gpufleet.gateway.quotas")

#: The journal's name in the gateway's local durable directory.
FILENAME = "quota-settlements.jsonl"

T = TypeVar("T")


class SettleJournal(Generic[T]):
    """Settlements of type ``T`` by lease, one JSON line each: ``encode`` makes a settlement
    JSON-serialisable, ``decode`` takes it back (raising ``ValueError``/``TypeError``/``KeyError``
    for a value that is not one)."""

    def __init__(
        self, path: Path, encode: Callable[[T], object], decode: Callable[[object], T]
    ) -> None:
        self.path = path
        self._encode = encode
        self._decode = decode
        self._fd = -1
        #: Held while ``sync`` (in its thread) uses the descriptor, and while it is replaced.
        self._fd_lock = threading.Lock()
        self._dirty = False
        #: Lines in the file (what ``rewrite`` is measured against).
        self.lines = 0

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def open(self) -> list[tuple[str, T]]:
        """What a previous process left, oldest first (blocking); then the file is open for
        appending."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        left: list[tuple[str, T]] = []
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning(
                "quota settlement journal %s ends with %d bytes of a line cut short by a crash "
                "(skipped)",
                self.path,
                len(data) - end,
            )
            os.truncate(self.path, end)
        bad, first_error = 0, ""
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                left.append(self._decode_line(line))
            except (ValueError, TypeError, KeyError) as exc:
                bad += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
        if bad:
            log.error(
                "quota settlement journal %s: %d unreadable lines skipped (first: %s)",
                self.path,
                bad,
                first_error,
            )
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.lines = len(left) + bad
        return left

    def _decode_line(self, line: bytes) -> tuple[str, T]:
        value = json.loads(line)
        if not isinstance(value, dict) or not isinstance(value.get("lease"), str):
            raise ValueError("not a settlement line")
        return value["lease"], self._decode(value["settlement"])

    def _line(self, lease: str, item: T) -> bytes:
        body = {"lease": lease, "settlement": self._encode(item)}
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    def append(self, lease: str, item: T) -> None:
        """One settlement, in one ``write()``. Raises ``OSError`` (disk full)."""
        line = self._line(lease, item)
        written = os.write(self._fd, line)
        if written != len(line):  # a regular file writes whole unless the disk is full
            raise OSError(f"quota settlement journal: wrote {written} of {len(line)} bytes")
        self.lines += 1
        self._dirty = True

    def clear(self) -> None:
        """Nothing is pending: empty the file."""
        if self.lines:
            os.ftruncate(self._fd, 0)
            self.lines = 0

    def rewrite(self, items: Iterable[tuple[str, T]]) -> None:
        """Replace the file by ``items`` (what is still pending): a new file, synced, renamed
        over the old one, so a crash leaves one or the other whole."""
        lines = [self._line(lease, item) for lease, item in items]
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            data = b"".join(lines)
            if os.write(fd, data) != len(data):
                raise OSError("quota settlement journal: short write while compacting")
            os.fsync(fd)
            tmp.replace(self.path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        with self._fd_lock:
            old, self._fd = self._fd, fd
            os.close(old)
        self.lines = len(lines)
        self._dirty = False

    def sync(self) -> None:
        """fsync what was appended since the last call (blocking: call it in a thread)."""
        with self._fd_lock:
            if self._dirty and self._fd >= 0:
                self._dirty = False
                os.fsync(self._fd)

    def close(self) -> None:
        """Sync and close; the file stays as it is (empty unless settlements are pending)."""
        self.sync()
        with self._fd_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
