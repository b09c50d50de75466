"""Replay traces from CSV or JSONL files, and save traces so a synthetic one can be replayed.

Public production traces give a timestamp and two token counts per request under their own
names (Azure's LLM inference traces: ``TIMESTAMP,ContextTokens,GeneratedTokens``, datetimes
with seven fractional digits), so columns are matched by alias, ignoring case, spaces,
underscores and hyphens, and those three columns alone are a trace. Timestamps may be seconds
(relative or absolute) or ISO-8601; the first request is moved to 0. Rows out of time order are
sorted (stably) rather than refused: merged logs often are, and the order carries no meaning
the simulator could use; the count is logged. Every bad row is reported at once, with its line
number and the fix, so one pass over a large file finds them all. Columns: docs/sim-traces.md.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import IO, Literal

from gpufleet.errors import SpecError
from gpufleet.sim.traces import TraceRequest

__all__ = ["COLUMNS", "TraceError", "read_trace", "write_trace"]

log = logging.getLogger("gpufleet.sim.trace_files")

Format = Literal["csv", "jsonl"]

#: Canonical column -> accepted names (compared lower-case without spaces, "_" or "-").
COLUMNS: dict[str, tuple[str, ...]] = {
    "at": ("at", "timestamp", "arrival_time", "arrival_timestamp"),
    "prompt_tokens": (
        "prompt_tokens", "input_tokens", "ContextTokens", "input_length", "request_tokens",
    ),
    "output_tokens": (
        "output_tokens", "GeneratedTokens", "completion_tokens", "output_length", "response_tokens",
    ),
    "model": ("model",),
    "tenant": ("tenant",),
    "session": ("session", "session_id"),
    "prefix_group": ("prefix_group",),
    "prefix_tokens": ("prefix_tokens",),
}  # fmt: skip
_REQUIRED = ("at", "prompt_tokens", "output_tokens")
_TEXT = ("model", "tenant", "session", "prefix_group")
_MAX_LISTED = 20
_FIX_TOKENS = "token counts are whole numbers >= 1"


def _key(name: str) -> str:
    return "".join(c for c in name.lower() if c not in " _-")


_ALIASES = {_key(alias): column for column, names in COLUMNS.items() for alias in names}


class TraceError(SpecError, ValueError):
    """A trace file that cannot be replayed; ``problems`` holds one ``line N: …`` per fault."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(problems)
        listed = problems[:_MAX_LISTED]
        if len(problems) > _MAX_LISTED:
            listed.append(f"and {len(problems) - _MAX_LISTED} more")
        noun = "problem" if len(problems) == 1 else "problems"
        self.args = (f"{source}: {len(problems)} {noun}:\n  " + "\n  ".join(listed),)


def _format_of(path: Path, format: Format | None) -> Format:
    if format is not None:
        return format
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    if suffixes and suffixes[-1] == ".csv":
        return "csv"
    if suffixes and suffixes[-1] in (".jsonl", ".ndjson"):
        return "jsonl"
    raise TraceError(str(path), [f"cannot tell the format of {path.name}: name it .csv or "
                                 ".jsonl, or pass format='csv' or format='jsonl'"])  # fmt: skip


def _open(path: Path, mode: Literal["r", "w"]) -> IO[str]:
    encoding = "utf-8-sig" if mode == "r" else "utf-8"  # spreadsheets start files with a BOM
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.GzipFile(path, mode + "b"), encoding=encoding, newline="")
    return path.open(mode, encoding=encoding, newline="")


# --- reading ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Row:
    time: float | datetime
    prompt_tokens: int
    output_tokens: int
    text: dict[str, str | None]
    prefix_tokens: int


class _Parser:
    """Checks rows one by one, collecting every problem instead of stopping at the first."""

    def __init__(self, timestamp_unit_s: float) -> None:
        self.unit = timestamp_unit_s
        self.problems: list[str] = []
        self.rows: list[_Row] = []
        self.time_kind: type | None = None  # float or datetime, set by the first good row

    def fail(self, line: int, message: str) -> None:
        self.problems.append(f"line {line}: {message}")

    def row(self, line: int, fields: Mapping[str, object]) -> None:
        missing = [c for c in _REQUIRED if fields.get(c) in (None, "")]
        if missing:
            names = "; ".join(f"{c} (one of {', '.join(COLUMNS[c])})" for c in missing)
            self.fail(line, f"missing {names}: every request needs an arrival time and both "
                      "token counts")  # fmt: skip
            return
        time = self._time(line, fields["at"])
        prompt = self._int(line, "prompt_tokens", fields["prompt_tokens"], lowest=1)
        output = self._int(line, "output_tokens", fields["output_tokens"], lowest=1)
        text: dict[str, str | None] = {}
        ok = True
        for column in _TEXT:
            value = fields.get(column)
            if isinstance(value, str):
                text[column] = value.strip() or None
            elif value is None or (isinstance(value, int) and not isinstance(value, bool)):
                text[column] = None if value is None else str(value)
            else:
                self.fail(line, f"{column} {value!r} is not a string: give a name or leave it out")
                ok = False
        raw = fields.get("prefix_tokens")
        shared = 0 if raw in (None, "") else self._int(line, "prefix_tokens", raw, lowest=0)
        if time is None or prompt is None or output is None or shared is None or not ok:
            return
        if shared and text["prefix_group"] is None:
            self.fail(line, f"prefix_tokens {shared} without a prefix_group: name the group whose "
                      "requests share those tokens, or drop prefix_tokens")  # fmt: skip
        elif shared > prompt:
            self.fail(line, f"prefix_tokens {shared} exceeds prompt_tokens {prompt}: the shared "
                      "prefix is part of the prompt")  # fmt: skip
        else:
            self.rows.append(_Row(time, prompt, output, text, shared))

    def _int(self, line: int, column: str, raw: object, lowest: int) -> int | None:
        n: float | None = None
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            n = raw
        elif isinstance(raw, str):
            try:
                n = float(raw.strip())
            except ValueError:
                n = None
        if n is None or not math.isfinite(n) or n != int(n):
            fix = _FIX_TOKENS if lowest else "prefix_tokens is a whole number >= 0"
            self.fail(line, f"{column} {raw!r} is not a whole number: {fix}")
            return None
        if n < lowest:
            why = "negative" if n < 0 else "zero"
            fix = _FIX_TOKENS if lowest else "prefix_tokens is a whole number >= 0"
            self.fail(line, f"{column} {raw!r} is {why}: {fix}")
            return None
        return int(n)

    def _time(self, line: int, raw: object) -> float | datetime | None:
        value: float | datetime | None = None
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            value = float(raw) * self.unit
        elif isinstance(raw, str):
            try:
                value = float(raw) * self.unit
            except ValueError:
                try:
                    parsed = datetime.fromisoformat(raw.strip())
                except ValueError:
                    parsed = None
                if parsed is not None:
                    value = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            self.fail(line, f"timestamp {raw!r} is neither seconds nor an ISO-8601 datetime: "
                      "write e.g. 12.5 or 2024-05-10T14:03:07.250Z")  # fmt: skip
            return None
        kind = type(value)
        if self.time_kind is None:
            self.time_kind = kind
        elif kind is not self.time_kind:
            first = "seconds" if self.time_kind is float else "datetimes"
            self.fail(line, f"timestamp {raw!r} mixes kinds: earlier rows are {first}; "
                      "use one kind throughout")  # fmt: skip
            return None
        return value


def _csv_rows(handle: IO[str], parser: _Parser) -> None:
    reader = csv.reader(handle)
    header = next(reader, None)
    if not header:
        parser.fail(1, "no header: the first line names the columns, e.g. "
                    "timestamp,prompt_tokens,output_tokens")  # fmt: skip
        return
    columns: list[str | None] = []
    for name in header:
        column = _ALIASES.get(_key(name))
        if column is not None and column in columns:
            parser.fail(1, f"two columns for {column} ({name!r} and an earlier one): keep one")
        columns.append(column)
    absent = [c for c in _REQUIRED if c not in columns]
    if absent:
        names = "; ".join(f"{c}: one of {', '.join(COLUMNS[c])}" for c in absent)
        parser.fail(1, f"the header {','.join(header)!r} lacks {names}")
    if parser.problems:
        return
    while True:
        line = reader.line_num + 1
        cells = next(reader, None)
        if cells is None:
            return
        if not cells:
            continue
        if len(cells) != len(columns):
            parser.fail(line, f"{len(cells)} fields but the header has {len(columns)}: "
                        "quote values that contain commas")  # fmt: skip
            continue
        parser.row(line, {c: v for c, v in zip(columns, cells, strict=True) if c is not None})


def _jsonl_rows(handle: IO[str], parser: _Parser) -> None:
    for line, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            parser.fail(line, f"not JSON ({e.msg}): each line is one JSON object")
            continue
        if not isinstance(obj, dict):
            parser.fail(line, f"a JSON {type(obj).__name__}, not an object: write one "
                        '{"timestamp": …, "prompt_tokens": …, "output_tokens": …} per line')  # fmt: skip
            continue
        fields: dict[str, object] = {}
        for name, value in obj.items():
            column = _ALIASES.get(_key(name))
            if column is None:
                continue
            if column in fields:
                parser.fail(line, f"two keys for {column} ({name!r} and an earlier one): keep one")
            fields[column] = value
        parser.row(line, fields)


def read_trace(
    path: str | Path, *, format: Format | None = None, timestamp_unit_s: float = 1.0
) -> list[TraceRequest]:
    """The requests of a CSV or JSONL trace (``.gz`` too), in arrival order from 0.

    The format comes from the extension unless ``format`` names it. ``timestamp_unit_s``
    scales numeric timestamps (0.001 for milliseconds). Raises :class:`TraceError` listing
    every bad row.
    """
    path = Path(path)
    parser = _Parser(timestamp_unit_s)
    kind = _format_of(path, format)
    with _open(path, "r") as handle:
        (_csv_rows if kind == "csv" else _jsonl_rows)(handle, parser)
    if parser.problems:
        raise TraceError(str(path), parser.problems)
    rows = parser.rows
    if not rows:
        return []
    seconds = _relative_seconds([row.time for row in rows])
    late = sum(b < a for a, b in pairwise(seconds))
    if late:
        log.info("%s: %d rows out of time order; sorted by time", path, late)
        order = sorted(range(len(rows)), key=seconds.__getitem__)  # stable: ties keep file order
        rows, seconds = [rows[i] for i in order], [seconds[i] for i in order]
    return [
        TraceRequest(
            at, r.prompt_tokens, r.output_tokens, r.text["model"], r.text["tenant"],
            r.text["session"], r.text["prefix_group"], r.prefix_tokens,
        )
        for at, r in zip(seconds, rows, strict=True)
    ]  # fmt: skip


def _relative_seconds(times: list[float | datetime]) -> list[float]:
    """Seconds after the earliest time (all of one kind, the parser saw to that)."""
    dates = [t for t in times if isinstance(t, datetime)]
    if dates:
        first = min(dates)
        return [(d - first).total_seconds() for d in dates]
    numbers = [t for t in times if not isinstance(t, datetime)]
    start = min(numbers)
    return [t - start for t in numbers]


# --- writing ------------------------------------------------------------------------------------


def write_trace(
    path: str | Path, requests: Iterable[TraceRequest], *, format: Format | None = None
) -> int:
    """Save ``requests`` (streamed, any length) so :func:`read_trace` gives them back; returns
    how many were written. CSV always has every column; JSONL leaves out empty fields."""
    path = Path(path)
    kind = _format_of(path, format)
    with _open(path, "w") as handle:
        rows = _write_csv(handle, requests) if kind == "csv" else _write_jsonl(handle, requests)
        return sum(1 for _ in rows)


def _write_csv(handle: IO[str], requests: Iterable[TraceRequest]) -> Iterator[None]:
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in requests:
        writer.writerow(
            (repr(r.at), r.prompt_tokens, r.output_tokens, r.model or "", r.tenant or "",
             r.session or "", r.prefix_group or "", r.prefix_tokens or "")
        )  # fmt: skip
        yield None


def _write_jsonl(handle: IO[str], requests: Iterable[TraceRequest]) -> Iterator[None]:
    for r in requests:
        obj: dict[str, object] = {
            "at": r.at, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
        }  # fmt: skip
        for column in _TEXT:
            value = getattr(r, column)
            if value is not None:
                obj[column] = value
        if r.prefix_tokens:
            obj["prefix_tokens"] = r.prefix_tokens
        handle.write(json.dumps(obj, separators=(",", ":")) + "\n")
        yield None
