"""``gpufleet plan``: where the models of a spec file would run on an inventory, and why.

A replica bigger than a node shows its pipeline stages (PP nodes of TP GPUs each), one per line;
the JSON output carries them as ``workers`` beside the leader's ``node`` and ``gpus``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from gpufleet.cli.output import fail, out, spec_problems
from gpufleet.cli.tables import print_table
from gpufleet.errors import GpufleetError, SpecError

if TYPE_CHECKING:
    from gpufleet.spec import Model

__all__ = ["engine_notes", "plan_command"]

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
        # Served by endpoints gpufleet does not run: nothing to place.
        external = [m.name for m in models if m.spec.engine == "external"]
        models = [m for m in models if m.spec.engine != "external"]
        fleet = load_inventory(inventory)
        deployments = [d for m in models for d in size_pools_here(m, kv_sequences=kv_sequences)]
    except SpecError as exc:
        spec_problems(exc.problems)
        raise typer.Exit(1) from exc
    except GpufleetError as exc:
        raise fail(str(exc)) from exc
    result = plan(fleet, deployments, settings=PlanSettings(defragment=not no_defragment))
    if output == "json":
        doc = {**_jsonable(dataclasses.asdict(result)), "external": external}
        doc["notes"] = engine_notes(models)
        typer.echo(json.dumps(doc, indent=2))
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
    for name in external:
        out.print(f"not placed: {name} (engine external: served by its endpoints)", highlight=False)
    for note in engine_notes(models):
        out.print(f"[cyan]note[/] {note}", highlight=False, soft_wrap=True)
    out.print(
        f"GPUs used: {result.gpus_used} of {result.gpus_total}; memory handed out on them: "
        f"{result.memory_utilisation:.0%}; solver: {result.solver}",
        highlight=False,
    )


def engine_notes(models: list[Model]) -> list[str]:
    """What the plan cannot promise for some engines: a TensorRT engine (trtllm backend
    tensorrt) runs only with the TP degree and on the GPU type it was built for; Triton takes
    its TP degree, memory share and batch size from its model repository."""
    from gpufleet.engines.triton import plan_note
    from gpufleet.engines.trtllm import build_note

    notes = []
    for model in models:
        if model.spec.engine == "trtllm":
            note = build_note(model.spec)
        elif model.spec.engine == "triton":
            note = plan_note(model.spec)
        else:
            note = None
        if note is not None:
            notes.append(f"{model.name}: {note}")
    return notes


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
