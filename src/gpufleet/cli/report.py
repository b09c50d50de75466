"""``gpufleet report``: what the fleet cost in a window, and who it is charged to.

Reads ``/admin/v1/report`` (role ``operator``): per model, tenant or key the busy cost (what
requests used), the share of idle time charged to it, and the cost of one successful request
and of 1M tokens; below, the fleet's own figures (GPUs nobody held: fleet idle). A model priced
per token (``engine: external``) is counted beside the GPU-priced ones, marked ``per token``:
what its requests cost, with no placed cost nor idle share. ``-o csv`` prints the lines for a
spreadsheet, ``-o json`` everything.
"""

from __future__ import annotations

import csv
import json
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from gpufleet.cli.accounts import DEFAULT_SERVER, ServerOpt, call
from gpufleet.cli.output import fail, out
from gpufleet.cli.tables import print_table

__all__ = ["report"]

_COLUMNS = (
    ("placed_cost", "PLACED $"),
    ("busy_cost", "BUSY $"),
    ("idle_cost", "IDLE $"),
    ("total_cost", "TOTAL $"),
    ("successful", "OK REQS"),
    ("cost_per_successful_request", "$/OK REQ"),
    ("cost_per_million_tokens", "$/1M TOK"),
)


def _money(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _per_token(fleet: dict[str, Any]) -> str:
    cost = fleet.get("per_token_cost") or 0.0
    return f" priced per token ${cost:.4f};" if cost else ""


def report(
    by: Annotated[str, typer.Option(help="group by model, tenant or key")] = "model",
    since: Annotated[
        str, typer.Option(help="ISO date/time or a span back from now such as 24h, 7d")
    ] = "7d",
    until: Annotated[str | None, typer.Option(help="end of the window (default: now)")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table, json or csv")] = "table",
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Cost per model, tenant or key, idle time included, and the cost of one successful
    request."""
    if by not in ("tenant", "model", "key"):
        raise fail("--by must be model, tenant or key")
    if output not in ("table", "json", "csv"):
        raise fail("--output must be table, json or csv")
    query = f"?by={by}&since={since}" + (f"&until={until}" if until else "")
    data = call(server, "GET", "/admin/v1/report" + query)
    if output == "json":
        out.print_json(json.dumps(data))
        return
    columns = [(k, t) for k, t in _COLUMNS if by == "model" or k != "placed_cost"]
    if output == "csv":
        writer = csv.writer(sys.stdout)
        keys = [by, *(k for k, _ in columns), "requests", "prompt_tokens", "completion_tokens"]
        keys += ["priced"] if by == "model" else []
        keys.append("per_token_cost")
        writer.writerow(keys)
        for line in data["lines"]:
            writer.writerow(["" if line.get(k) is None else line[k] for k in keys])
        for item in data["unattributed"]:
            idle = item["idle_cost"]
            writer.writerow([f"(unused: {item['model']})", "", idle, idle])
        return
    if by != "model" and any(line.get("per_token_cost") for line in data["lines"]):
        columns.append(("per_token_cost", "PER-TOKEN $"))  # of BUSY $: per-token prices
    since_text, until_text = data["since"][:19], data["until"][:19]
    table = Table(box=None, header_style="bold", title=f"cost {since_text} – {until_text} UTC")
    table.add_column(by.upper())
    if by == "model":
        table.add_column("PRICED")
    for _, title in columns:
        table.add_column(title, justify="right")
    for line in data["lines"]:
        cells = [str(line[k]) if k == "successful" else _money(line.get(k)) for k, _ in columns]
        if by == "model":
            cells.insert(0, "per token" if line.get("priced") == "per_token" else "replica time")
        table.add_row(line[by], *cells)
    for item in data["unattributed"]:
        # A model nobody used in the window keeps its idle cost: charged to no tenant.
        idle = _money(item["idle_cost"])
        rest = ["-"] * (len(columns) - 3)
        table.add_row(f"(unused: {item['model']})", "-", idle, idle, *rest)
    print_table(table)
    fleet = data["fleet"]
    out.print(
        f"fleet: {fleet['gpus']:g} GPUs, ${fleet['gpu_cost']:.4f} owned; placed "
        f"${fleet['placed_cost']:.4f}; idle GPUs ${fleet['idle_cost']:.4f} (charged to nobody);"
        f"{_per_token(fleet)} total ${fleet['total_cost']:.4f}; per successful request "
        f"{_money(fleet['cost_per_successful_request'])}",
        highlight=False,
    )
    for note in data["notes"]:
        out.print(f"note: {note}", highlight=False)
