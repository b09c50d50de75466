"""``gpufleet plan``: where the models of a spec file would run on an inventory, and why.

A replica bigger than a node shows its pipeline stages (PP nodes of TP GPUs each), one per line;
the JSON output carries them as ``workers`` beside the leader's ``node`` and ``gpus``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from gpufleet.cli.output import fail, out, spec_problems
from gpufleet.cli.tables import print_table
from gpufleet.errors import GpufleetError, SpecError

__all__ = ["plan_command"]

GiB = 1 << 30


def plan_command(
    file: Annotated[list[Path], typer.Option("--file", "-f", help="models YAML; repeatable")],
    inventory: Annotated[Path, typer.Option("--inventory", "-i", help="kind: Inventory YAML")],
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
    kv_sequences: Annotated[
        int, typer.Option(help="full-context sequences of KV cache each replica must hold")
    ] = 4,
    no_defragment: Annotated[
        bool, typer.Option("--no-defragment", help="never move running replicas")
    ] = False,
) -> None:
    """Plan placements of the models in FILE onto the GPUs in INVENTORY."""
    from gpufleet.cli.sizing import size_pools_here
    from gpufleet.hardware import load_inventory
    from gpufleet.planner import PlanSettings, plan
    from gpufleet.spec import load_file

    try:
        models = [m for f in file for m in load_file(f)]
        fleet = load_inventory(inventory)
        deployments = [d for m in models for d in size_pools_here(m, kv_sequences=kv_sequences)]
    except SpecError as exc:
        spec_problems(exc.problems)
        raise typer.Exit(1) from exc
    except GpufleetError as exc:
        raise fail(str(exc)) from exc
    result = plan(fleet, deployments, settings=PlanSettings(defragment=not no_defragment))
    if output == "json":
        typer.echo(json.dumps(_jsonable(dataclasses.asdict(result)), indent=2))
        return
    table = Table(box=None, header_style="bold")
    for col in ("REPLICA", "WHERE", "GPU", "TP", "PP", "MEMORY/GPU", "SHARE"):
        table.add_column(col)
    for placement in result.placements:
        table.add_row(
            str(placement.replica),
            # A replica across nodes: one pipeline stage per line, the leader's first.
            placement.where().replace(" + ", "\n"),
            placement.gpu_type or "cpu",
            str(placement.tp),
            str(placement.pp),
            f"{placement.memory_per_gpu / GiB:.1f} GiB",
            f"{placement.memory_fraction:.2f}" if placement.gpus else "-",
        )
    print_table(table)
    for r in result.relayouts:
        out.print(
            f"[cyan]MIG re-layout[/] {r.node}/gpu-{r.gpu}: {' + '.join(r.layout)} — {r.reason}",
            highlight=False,
        )
    for u in result.unplaced:
        out.print(f"[yellow]unplaced[/] {u.replica}: {u.reason}", highlight=False, soft_wrap=True)
    out.print(
        f"GPUs used: {result.gpus_used} of {result.gpus_total}; memory handed out on them: "
        f"{result.memory_utilisation:.0%}; solver: {result.solver}",
        highlight=False,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
