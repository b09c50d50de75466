"""The ledger's local spool: every usage row on disk before its answer's last byte leaves.

A row is one JSON line handed to the kernel with one ``write()`` on an ``O_APPEND`` file: once
``write`` returns, the row survives a SIGKILL of the process (it is in the page cache). Power
loss is covered by an ``fsync`` every ~100 ms (``sync``, off the event loop), so the hot path
pays a ``write`` (a few µs), never a disk flush.

Rows go to numbered segment files (``usage-000000000001.jsonl``…). The ledger seals the open
segment before it writes to the store, and removes a sealed segment once every row in it is in
the store (or set aside as a dead letter); segments left by a process that died are sealed and
replayed at start. Replay may write a row twice; the store's unique request id skips the
second. A last line without its newline is a write cut short by a crash: it is skipped (its
request was never answered — the row is written before the answer's last byte). One process
owns a spool directory at a time (an ``flock`` on ``.lock``).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.store import UsageRow

__all__ = ["BadLine", "Segment", "Spool", "SpoolBusy", "decode_row", "encode_row"]

log = logging.getLogger("gpufleet.gateway.ledger")

_PREFIX, _SUFFIX = "usage-", ".jsonl"


class SpoolBusy(RuntimeError):
    """Another process holds the spool directory."""


#: A line is a JSON array: this version number, then the row's fields in ``UsageRow``'s order
#: (``at`` in ISO 8601). Encoded by an encoder built once (``json.dumps`` with arguments builds
#: one a call), it costs ~0.6 of the CPU of the JSON object naming each field that lines were
#: before (bench/ledger_cpu.py), and is on every answer's path. Such a line still decodes.
#: ``UsageRow`` gains fields only at its end, each with a default, so a line spooled before a
#: field existed is shorter and decodes with the default. A line is as wide as a row was at
#: some release (``_WIDTHS``: add the new width with a new field), never anything between: a
#: line a field short in the middle is not read as an older row.
_VERSION = 1
_FIELDS = UsageRow.__slots__
_WIDTHS = frozenset({_FIELDS.index("client_request_id") + 1, _FIELDS.index("estimated") + 1})
_AT = _FIELDS.index("at") + 1
_values = operator.attrgetter(*_FIELDS)
_encode = json.JSONEncoder(separators=(",", ":")).encode


def encode_row(row: UsageRow) -> bytes:
    values = [_VERSION, *_values(row)]
    values[_AT] = row.at.isoformat()
    return _encode(values).encode() + b"\n"


def decode_row(line: bytes) -> UsageRow:
    """One spool line back into a row (raises ``ValueError``/``TypeError`` when it is not one)."""
    values = json.loads(line)
    if isinstance(values, list):
        if len(values) - 1 not in _WIDTHS or values[0] != _VERSION:
            widths = " or ".join(map(str, sorted(_WIDTHS)))
            raise ValueError(f"not a version {_VERSION} row of {widths} fields")
        values[_AT] = dt.datetime.fromisoformat(values[_AT])
        return UsageRow(*values[1:])
    if not isinstance(values, dict):
        raise ValueError("not a JSON array or object")
    values["at"] = dt.datetime.fromisoformat(values["at"])
    return UsageRow(**values)


@dataclass(frozen=True, slots=True)
class BadLine:
    """A complete line of a segment that is not a row (set aside, never retried)."""

    line: bytes
    error: str


@dataclass(slots=True)
class Segment:
    """A sealed segment read back."""

    seq: int
    rows: list[tuple[UsageRow, bytes]] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    #: Bytes after the last newline: a write cut short by a crash.
    torn: int = 0


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock_fd = -1
        self._fd = -1
        self._seq = 0
        #: Rows written to the open segment.
        self.open_rows = 0
        self._dirty = False
        self._new_file = False
        self._sealed: list[int] = []
        #: Sealed segments' descriptors: ``sync`` (in its thread) fsyncs and closes them, so a
        #: seal on the event loop never waits for a disk flush nor closes under an fsync.
        self._retired: list[int] = []

    def open(self) -> None:
        """Take the directory, seal what a previous process left, open a fresh segment."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise SpoolBusy(f"another process uses the ledger spool {self.directory}") from exc
        self._lock_fd = fd
        self._sealed = sorted(
            int(p.name[len(_PREFIX) : -len(_SUFFIX)])
            for p in self.directory.glob(f"{_PREFIX}*{_SUFFIX}")
            if p.name[len(_PREFIX) : -len(_SUFFIX)].isdigit()
        )
        self._seq = self._sealed[-1] if self._sealed else 0
        self._open_next()

    def _path(self, seq: int) -> Path:
        return self.directory / f"{_PREFIX}{seq:012d}{_SUFFIX}"

    def _open_next(self) -> None:
        self._seq += 1
        self._fd = os.open(
            self._path(self._seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        self.open_rows = 0
        self._new_file = True

    @property
    def seq(self) -> int:
        """The open segment's number."""
        return self._seq

    def append(self, line: bytes) -> int:
        """Write one encoded row; returns its segment's number. Raises ``OSError`` (disk full)."""
        written = os.write(self._fd, line)
        if written != len(line):  # a regular file writes whole unless the disk is full
            raise OSError(f"ledger spool: wrote {written} of {len(line)} bytes")
        self.open_rows += 1
        self._dirty = True
        return self._seq

    def seal(self) -> list[int]:
        """Close the open segment (if it has rows) and open the next; the sealed segments."""
        if self.open_rows:
            self._retired.append(self._fd)
            self._dirty = False
            self._sealed.append(self._seq)
            self._open_next()
        return list(self._sealed)

    def sync(self) -> None:
        """fsync what was written since the last call (power loss); blocking: call it in a
        thread, one call at a time."""
        while self._retired:
            fd = self._retired.pop(0)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self._fd >= 0:
            self._sync_open()

    def _sync_open(self) -> None:
        if self._dirty:
            self._dirty = False
            os.fsync(self._fd)
        if self._new_file:
            self._new_file = False
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def read(self, seq: int) -> Segment:
        """A sealed segment's rows (blocking: call it in a thread)."""
        data = self._path(seq).read_bytes()
        segment = Segment(seq)
        end = data.rfind(b"\n") + 1
        segment.torn = len(data) - end
        if segment.torn:
            log.warning(
                "ledger spool: segment %d ends with %d bytes of a row cut short (skipped)",
                seq,
                segment.torn,
            )
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                segment.rows.append((decode_row(line), line))
            except (ValueError, TypeError, KeyError) as exc:
                segment.bad.append(BadLine(line, f"unreadable spool line: {exc}"))
        return segment

    def remove(self, seq: int) -> None:
        """A sealed segment is in the store: delete it."""
        self._path(seq).unlink(missing_ok=True)
        self._sealed.remove(seq)

    def backlog(self) -> list[int]:
        return list(self._sealed)

    def close(self) -> None:
        """Sync and close (once ``sync`` is no longer running); an empty open segment is
        removed."""
        self.sync()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if not self.open_rows:
                self._path(self._seq).unlink(missing_ok=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
