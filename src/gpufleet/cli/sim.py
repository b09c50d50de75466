"""``gpufleet sim``: a spec file's models on an inventory, under a trace, in virtual time.

The trace is a file (CSV or JSONL, see docs/sim-traces.md) or a synthetic one named with its
parameters: ``poisson:rate=5,duration=3600`` or ``diurnal:peak=20,duration=86400`` (any other
keyword of the generator by its own name, numbers only; ``seed`` from ``--seed``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from gpufleet.cli.output import fail, spec_problems
from gpufleet.errors import GpufleetError, SpecError

__all__ = ["parse_synthetic", "sim_command"]

#: Short names of the synthetic generators' leading arguments.
_ALIASES = {
    "rate": "rate_per_s",
    "duration": "duration_s",
    "peak": "peak_rate_per_s",
    "sessions": "sessions_per_s",
}


def parse_synthetic(text: str, seed: int) -> Iterable[Any]:
    """``name:key=value,…`` → the named generator of ``gpufleet.sim.traces`` called with them."""
    from gpufleet.sim import traces

    name, _, args = text.partition(":")
    generators: dict[str, Callable[..., Iterable[Any]]] = {
        "poisson": traces.poisson,
        "diurnal": traces.diurnal,
        "chats": traces.chats,
        "batch_night": traces.batch_night,
    }
    generator = generators.get(name)
    if generator is None:
        raise ValueError(f"unknown synthetic trace {name!r}; known: {', '.join(generators)}")
    kwargs: dict[str, Any] = {"seed": seed}
    for part in filter(None, args.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{text}: {part!r} is not key=value")
        number = float(value)
        kwargs[_ALIASES.get(key.strip(), key.strip())] = (
            int(number) if number.is_integer() else number
        )
    return generator(**kwargs)


def sim_command(
    file: Annotated[list[Path], typer.Option("--file", "-f", help="models YAML; repeatable")],
    inventory: Annotated[Path, typer.Option("--inventory", "-i", help="kind: Inventory YAML")],
    trace: Annotated[
        str,
        typer.Option("--trace", "-t", help="a CSV/JSONL file or e.g. poisson:rate=5,duration=3600"),
    ],
    ttft: Annotated[float | None, typer.Option("--ttft", help="TTFT objective, seconds")] = None,
    itl: Annotated[
        float | None, typer.Option("--itl", help="inter-token objective, seconds")
    ] = None,
    e2e: Annotated[
        float | None, typer.Option("--e2e", help="end-to-end objective, seconds")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of a synthetic trace")] = 0,
    tick: Annotated[float, typer.Option(help="autoscaler interval, seconds")] = 1.0,
    hold: Annotated[float, typer.Option(help="longest wait for a slot before refusal")] = 60.0,
    routing: Annotated[
        str | None, typer.Option(help="routing policy for every model (default: each spec's)")
    ] = None,
    startup: Annotated[
        float | None, typer.Option(help="replica start-up seconds (default: from model size)")
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
) -> None:
    """Simulate the models in FILE on INVENTORY under TRACE, with the fleet's own policies."""
    from gpufleet.hardware import load_inventory
    from gpufleet.sim import Objectives, SimSettings, read_trace, render_table, sim_model, simulate
    from gpufleet.spec import load_file

    try:
        models = [m for f in file for m in load_file(f)]
        fleet = load_inventory(inventory)
        sized = [sim_model(m, startup_s=startup) for m in models]
        source = Path(trace)
        requests = read_trace(source) if source.exists() else parse_synthetic(trace, seed)
        settings = SimSettings(tick_s=tick, hold_s=hold, routing=routing, seed=seed)
        result = simulate(sized, fleet, requests, Objectives(ttft, itl, e2e), settings)
    except SpecError as exc:  # a bad spec, inventory or trace file: every problem, by line
        spec_problems(exc.problems)
        raise typer.Exit(1) from exc
    except (GpufleetError, ValueError, TypeError) as exc:
        raise fail(str(exc)) from exc
    if output == "json":
        typer.echo(result.to_json())
    else:
        typer.echo(render_table(result))
