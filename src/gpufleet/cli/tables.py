"""How the CLI prints tables, and the rows of ``gpufleet get`` and ``gpufleet events``.

Rich sizes a console to the terminal, and to 80 columns when stdout is not one (a pipe, a file,
CI), then cuts whatever does not fit with an ellipsis — which turned a time into
``2026-12-02T16:45:…``. kubectl's rule is the one scripts and people rely on, so it is ours:

* piped output and ``-o wide`` are never cut: each row is one line, however long (``grep`` and
  ``awk`` see whole values; a terminal wraps a wide row itself);
* a ``table`` on a terminal uses the terminal's width (rich reads ``COLUMNS`` or asks the
  terminal), wrapping free text at word breaks; if even that cannot fit the table, the table is
  printed wider than the terminal rather than cut.

Ids, names and times are *keys*: a cut one is a wrong one, so their columns never wrap or shrink
(``no_wrap`` and a minimum width of their longest value).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.segment import Segments
from rich.table import Table

from gpufleet.cli.output import out
from gpufleet.runtime.startup import duration, progress

__all__ = ["Kind", "Output", "event_table", "new_table", "print_table", "resource_table"]

# The widest a table is ever laid out at when it need not fit a screen.
_UNBOUNDED = 1 << 16


class Output(StrEnum):
    table = "table"
    wide = "wide"
    json = "json"


class Kind(StrEnum):
    """What ``gpufleet get`` lists; each value is also the key of the admin API's reply."""

    models = "models"
    replicas = "replicas"
    events = "events"

    @classmethod
    def parse(cls, word: str) -> Kind | None:
        """``model`` or ``models`` (any case), as kubectl accepts both; None when unknown."""
        word = word.lower()
        for kind in cls:
            if word in (kind.value, kind.value.removesuffix("s")):
                return kind
        return None


def new_table(
    columns: Sequence[str], keys: Iterable[str] = (), rows: Sequence[Sequence[str]] = ()
) -> Table:
    """A borderless table of ``rows``; the columns named in ``keys`` are never wrapped or cut."""
    keyed = set(keys)
    table = Table(box=None, header_style="bold")
    for i, name in enumerate(columns):
        if name in keyed:
            longest = max((len(row[i]) for row in rows), default=0)
            table.add_column(name, no_wrap=True, min_width=max(longest, len(name)))
        else:
            table.add_column(name)
    for row in rows:
        table.add_row(*row)
    return table


def print_table(table: Table, *, wide: bool = False, console: Console = out) -> None:
    """Print ``table`` by the rule in the module docstring."""
    options = console.options.update_width(_UNBOUNDED)
    need = Measurement.get(console, options, table)
    fit_screen = console.is_terminal and not wide
    width = max(console.width, need.minimum) if fit_screen else need.maximum
    # Console.print clamps a width to the console's own, so lay the lines out here and print them
    # uncropped.
    lines = console.render_lines(table, options.update_width(width), pad=False, new_lines=True)
    console.print(Segments(segment for line in lines for segment in line), crop=False)


def resource_table(kind: Kind, rows: list[dict[str, Any]], *, wide: bool = False) -> Table:
    """The table ``gpufleet get KIND`` prints; ``wide`` adds columns and full-precision times."""
    if kind is Kind.models:
        columns = ["NAME", "ENGINE", "STATUS", "READY", "GEN", "SOURCE", "PROBLEM"]
        cells = [
            [
                m["name"],
                m["engine"],
                m["status"],
                f"{m['ready']}/{m['desired']}",
                str(m["generation"]),
                m["source"],
                m["problem"],
            ]
            for m in rows
        ]
        if wide:
            columns.append("ROLLOUT")
            for row, m in zip(cells, rows, strict=True):
                row.append(m.get("rollout") or "")
        return new_table(columns, ("NAME", "SOURCE"), cells)
    if kind is Kind.replicas:
        columns = ["ID", "MODEL", "PHASE", "STARTUP", "RESTARTS", "PID", "URL", "MESSAGE"]
        cells = [
            [
                r["id"],
                r["model"],
                r["phase"],
                startup_cell(r),
                str(r["restarts"]),
                str(r["pid"] or ""),
                r["url"] or "",
                r["message"],
            ]
            for r in rows
        ]
        if wide:
            columns.insert(2, "GEN")
            columns[5:5] = ["FETCH", "LOAD", "PROBE"]
            for row, r in zip(cells, rows, strict=True):
                row.insert(2, str(r.get("generation", "")))
                row[5:5] = [_seconds(r.get(k)) for k in ("fetch_s", "load_s", "ready_s")]
        return new_table(columns, ("ID", "MODEL", "URL"), cells)
    return event_table(rows, wide=wide)


def startup_cell(replica: dict[str, Any]) -> str:
    """A replica's start-up in one cell: how long it took, once ready; while it starts, the
    weights' bytes so far of how many where its source tells them (``fetching 1.2/3.4 GiB``
    before the fetch is over, ``loading …`` after); nothing otherwise."""
    total = replica.get("startup_s")
    if total is not None:
        return duration(total)
    done = progress(replica.get("fetched_bytes"), replica.get("weights_bytes"))
    if done is None:
        return ""
    return f"{'fetching' if replica.get('fetch_s') is None else 'loading'} {done}"


def _seconds(value: float | None) -> str:
    return "" if value is None else duration(value)


def event_table(rows: list[dict[str, Any]], *, wide: bool = False) -> Table:
    """Events, newest last; the time to the second, or as the server wrote it with ``wide``."""
    cells = [
        [e["at"] if wide else e["at"][:19], e["model"], e["type"], e["reason"], e["message"]]
        for e in rows
    ]
    return new_table(("TIME", "MODEL", "TYPE", "REASON", "MESSAGE"), ("TIME", "MODEL"), cells)
