"""``gpufleet jobs``: GPU jobs (``kind: GpuJob``) from the terminal — submit, list, get, logs,
cancel — through the admin API (role ``operator``, the key in ``GPUFLEET_API_KEY``).

A spec file is validated here before anything is sent, with the same messages ``gpufleet up``
gives; relative paths in it (``workingDir``, ``checkpoint.path``) are made absolute from the
file's folder, since the job runs where the server runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from gpufleet.cli.accounts import DEFAULT_SERVER, ServerOpt, call
from gpufleet.cli.output import fail, out, spec_problems
from gpufleet.cli.tables import Output, new_table, print_table
from gpufleet.errors import SpecError

__all__ = ["jobs_app"]

jobs_app = typer.Typer(
    help="Submit, list and cancel GPU jobs (kind: GpuJob).", no_args_is_help=True
)

OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table, wide or json")]


@jobs_app.command("submit")
def submit(
    file: Annotated[list[Path], typer.Option("--file", "-f", help="GpuJob YAML; repeatable")],
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Queue the jobs in FILE; they start when the fleet has their GPUs free."""
    from gpufleet.spec import load_jobs_file

    problems: list[str] = []
    documents = []
    for f in file:
        try:
            documents += [j.document() for j in load_jobs_file(f)]
        except SpecError as exc:
            problems += exc.problems
    if problems:
        spec_problems(problems)
        raise fail("the spec is invalid; nothing was submitted")
    if not documents:
        raise fail("no GpuJob in the given files")
    for job in call(server, "POST", "/admin/v1/jobs", {"documents": documents})["jobs"]:
        out.print(f"gpujob/{job['name']} queued (tenant {job['tenant']})", highlight=False)


@jobs_app.command("list")
def list_jobs(
    tenant: Annotated[str | None, typer.Option("--tenant", "-t")] = None,
    output: OutputOpt = Output.table,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """Every job: phase, attempts, preemptions, GPU time and cost."""
    path = "/admin/v1/jobs" + (f"?tenant={tenant}" if tenant else "")
    rows = call(server, "GET", path)["jobs"]
    if output is Output.json:
        out.print_json(json.dumps(rows))
        return
    wide = output is Output.wide
    columns = [
        "NAME",
        "TENANT",
        "PHASE",
        "GPUS",
        "ATTEMPTS",
        "PREEMPTED",
        "GPU-H",
        "COST",
        "REASON",
    ]
    cells = [
        [
            j["name"],
            j["tenant"],
            j["phase"],
            str(j["gpus"]),
            str(j["attempt"]),
            str(j["preemptions"]),
            f"{j['gpu_seconds'] / 3600:.3f}",
            f"${j['cost_usd']:.4f}",
            j["reason"] if wide else (j["reason"].splitlines() or [""])[0],
        ]
        for j in rows
    ]
    table = new_table(columns, keys=("NAME", "TENANT"), rows=cells)
    print_table(table, wide=wide)


@jobs_app.command("get")
def get(name: str, server: ServerOpt = DEFAULT_SERVER) -> None:
    """One job, as JSON (its spec, placement, attempts and totals)."""
    out.print_json(json.dumps(call(server, "GET", f"/admin/v1/jobs/{name}")))


@jobs_app.command("logs")
def logs(
    name: str,
    attempt: Annotated[int | None, typer.Option(help="which attempt (default: the last)")] = None,
    tail: Annotated[int, typer.Option(help="lines from the end")] = 200,
    server: ServerOpt = DEFAULT_SERVER,
) -> None:
    """The log of a job's attempt (stdout and stderr)."""
    query = f"?tail={tail}" + (f"&attempt={attempt}" if attempt is not None else "")
    # Written as they are: a log line is never wrapped or cut to a console's width.
    sys.stdout.write(call(server, "GET", f"/admin/v1/jobs/{name}/logs{query}"))


@jobs_app.command("cancel")
def cancel(name: str, server: ServerOpt = DEFAULT_SERVER) -> None:
    """Stop a job for good: a running attempt gets SIGTERM and its grace period."""
    job = call(server, "POST", f"/admin/v1/jobs/{name}/cancel")
    out.print(f"gpujob/{job['name']} {job['phase'].lower()}", highlight=False)
