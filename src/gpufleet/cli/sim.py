"""``gpufleet sim``: a spec file's models on an inventory, under a trace, in virtual time.

The trace is a file (CSV or JSONL, see docs/sim-traces.md) or a synthetic one named with its
parameters: ``poisson:rate=5,duration=3600`` or ``diurnal:peak=20,duration=86400`` (any other
keyword of the generator by its own name, numbers only; ``seed`` from ``--seed``).

Three ways to run: one fleet (``-f`` and ``-i``); ``--compare`` variants side by side, each on
the same trace (the file re-read, or the synthetic trace regenerated from the same seed); and
``--search`` for the cheapest count of each GPU type that meets ``--attainment``. Any of them
can also write ``--report out.html`` (matplotlib, from ``gpufleet[sim]``). A long run shows a
progress bar on stderr when it is a terminal. ``kind: Tenant`` documents in the files bring
their quotas, priority and weight to the trace's requests of that tenant.

An ``engine: external`` model is simulated as a hosted API (``gpufleet.sim.external``): the
spec says where its endpoints are and what they charge, not how fast they answer, so their
latency is the run's assumption — ``--external-ttft`` and ``--external-tpot``, for every
external model of the run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpufleet.cli.output import fail, spec_problems
from gpufleet.errors import GpufleetError, SpecError

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from gpufleet.sim import HostedLatency, Objectives, SimResult, SimSettings, TraceRequest
    from gpufleet.spec import Inventory, Model, Tenant

__all__ = ["parse_compare", "parse_synthetic", "sim_command"]

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


def synthetic_duration(text: str) -> float | None:
    """The virtual seconds a synthetic trace spans, when its text names them (for the bar)."""
    for part in text.partition(":")[2].split(","):
        key, _, value = part.partition("=")
        if key.strip() in ("duration", "duration_s"):
            try:
                return float(value)
            except ValueError:
                return None
    return None


def parse_compare(text: str) -> tuple[str, list[Path], Path | None]:
    """``NAME=MODELS[+MODELS…]:INVENTORY`` → (name, model files, inventory); an empty part
    means the command's own ``-f`` files or ``-i`` inventory."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--compare {text!r}: expected NAME=MODELS.yaml:INVENTORY.yaml")
    models, sep, inventory = rest.rpartition(":")
    if not sep:
        raise ValueError(f"--compare {text!r}: expected NAME=MODELS.yaml:INVENTORY.yaml")
    files = [Path(f) for f in models.split("+") if f]
    return name.strip(), files, Path(inventory) if inventory else None


class _Bar:
    """A progress bar fed with virtual time, shown on a terminal once a run has taken a
    couple of seconds (a short run prints nothing extra)."""

    def __init__(self, label: str, total_s: float | None, after_s: float = 2.0) -> None:
        self.label, self.total_s, self.after_s = label, total_s, after_s
        self.enabled = sys.stderr.isatty()
        self.started = time.perf_counter()
        self.last = 0.0
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def __call__(self, t: float) -> None:
        if not self.enabled:
            return
        wall = time.perf_counter()
        if wall - self.last < 0.1:
            return
        self.last = wall
        if self.bar is None:
            if wall - self.started < self.after_s:
                return
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total_s)
        assert self.task is not None
        self.bar.update(self.task, completed=t, description=f"{self.label} {t / 3600:.2f} h")

    def __enter__(self) -> _Bar:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.bar is not None:
            self.bar.stop()


def _run(
    label: str,
    models: list[Model],
    inventory: Inventory,
    trace: Callable[[], Iterable[TraceRequest]],
    total_s: float | None,
    objectives: Objectives,
    settings: SimSettings,
    startup: float | None,
    tenants: list[Tenant],
    hosted: HostedLatency,
) -> SimResult:
    import dataclasses

    from gpufleet.sim import sim_model, simulate, unsimulated

    sized = [sim_model(m, startup_s=startup, hosted=hosted) for m in models]
    for m in models:
        for note in unsimulated(m):
            typer.echo(f"note: {m.name}: {note}", err=True)
    with _Bar(label, total_s) as bar:
        return simulate(
            sized,
            inventory,
            trace(),
            objectives,
            dataclasses.replace(settings, progress=bar),
            tenants,
        )


def _load(files: list[Path]) -> tuple[list[Model], list[Tenant]]:
    """The models and tenants of spec files (a tenant's quotas and share apply to its requests
    in the trace)."""
    from gpufleet.spec import load_file_resources

    models: list[Model] = []
    tenants: list[Tenant] = []
    for f in files:
        m, t = load_file_resources(f)
        models += m
        tenants += t
    return models, tenants


def sim_command(
    file: Annotated[
        list[Path] | None, typer.Option("--file", "-f", help="models YAML; repeatable")
    ] = None,
    inventory: Annotated[
        Path | None, typer.Option("--inventory", "-i", help="kind: Inventory YAML")
    ] = None,
    trace: Annotated[
        str,
        typer.Option("--trace", "-t", help="a CSV/JSONL file or e.g. poisson:rate=5,duration=3600"),
    ] = "",
    ttft: Annotated[float | None, typer.Option("--ttft", help="TTFT objective, seconds")] = None,
    itl: Annotated[
        float | None, typer.Option("--itl", help="inter-token objective, seconds")
    ] = None,
    e2e: Annotated[
        float | None, typer.Option("--e2e", help="end-to-end objective, seconds")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of a synthetic trace")] = 0,
    tick: Annotated[float, typer.Option(help="autoscaler interval, seconds")] = 1.0,
    hold: Annotated[
        float, typer.Option(help="longest wait for a model's first ready replica, seconds")
    ] = 60.0,
    queue_wait: Annotated[
        float, typer.Option(help="longest wait in a model's fair queue for a slot, seconds")
    ] = 30.0,
    routing: Annotated[
        str | None, typer.Option(help="routing policy for every model (default: each spec's)")
    ] = None,
    startup: Annotated[
        float | None, typer.Option(help="replica start-up seconds (default: from model size)")
    ] = None,
    external_ttft: Annotated[
        float,
        typer.Option(help="engine external: a hosted API's time to first token, seconds (assumed)"),
    ] = 0.5,
    external_tpot: Annotated[
        float,
        typer.Option(help="engine external: its time per further output token, seconds (assumed)"),
    ] = 0.01,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
    report: Annotated[
        Path | None,
        typer.Option(
            help="also write a self-contained HTML report with plots "
            "(needs matplotlib: gpufleet\\[sim])"
        ),
    ] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=MODELS.yaml[+MORE.yaml]:INVENTORY.yaml, repeatable: variants side by "
            "side on the same trace; an empty MODELS or INVENTORY means -f or -i"
        ),
    ] = None,
    search: Annotated[
        str | None,
        typer.Option(
            help="GPU types, e.g. H100,L40S,L4: the fewest GPUs of each (binary search; "
            "attainment is assumed monotone in GPUs) meeting --attainment, cheapest first"
        ),
    ] = None,
    attainment: Annotated[
        float, typer.Option(help="--search: SLO attainment target (share of requests)")
    ] = 0.99,
    max_gpus: Annotated[int, typer.Option(help="--search: most GPUs of one type tried")] = 64,
    node_gpus: Annotated[int, typer.Option(help="--search: GPUs per node")] = 8,
) -> None:
    """Simulate the models in FILE on INVENTORY under TRACE, with the fleet's own policies."""
    from gpufleet.hardware import load_inventory
    from gpufleet.sim import HostedLatency, Objectives, SimSettings, read_trace, render_table
    from gpufleet.sim.compare import Variant, compare_rows, comparison_to_dict, render_comparison
    from gpufleet.sim.report import require_matplotlib, write_report
    from gpufleet.sim.search import (
        for_gpu_type,
        gpu_type_name,
        node_inventory,
        render_search,
        search_fleet,
    )

    files = file or []
    if not trace:
        raise fail("--trace is required")
    if output not in ("table", "json"):
        raise fail(f"--output must be table or json, not {output!r}")
    if compare and search:
        raise fail("--compare and --search are separate runs; give one of them")
    source = Path(trace)
    total_s = None if source.exists() else synthetic_duration(trace)

    def requests() -> Iterable[TraceRequest]:
        return read_trace(source) if source.exists() else parse_synthetic(trace, seed)

    objectives = Objectives(ttft, itl, e2e)
    try:
        hosted = HostedLatency(external_ttft, external_tpot)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    settings = SimSettings(
        tick_s=tick, hold_s=hold, queue_max_wait_s=queue_wait, routing=routing, seed=seed
    )
    variants: list[Variant] = []
    try:
        if report is not None:
            require_matplotlib()
        if search:
            if not files:
                raise fail("--search needs the models: -f FILE")
            models, tenants = _load(files)
            types = [gpu_type_name(t.strip()) for t in search.split(",") if t.strip()]
            if not types:
                raise fail("--search needs GPU types, e.g. H100,L40S,L4")

            def run(gpu_type: str, count: int) -> SimResult:
                restricted = [for_gpu_type(m, gpu_type) for m in models]
                fleet = node_inventory(gpu_type, count, node_gpus)
                label = f"{count}×{gpu_type}"
                return _run(
                    label,
                    restricted,
                    fleet,
                    requests,
                    total_s,
                    objectives,
                    settings,
                    startup,
                    tenants,
                    hosted,
                )

            rows = search_fleet(run, types, attainment, max_gpus)
            variants = [Variant(f"{r.gpus or max_gpus}×{r.gpu_type}", r.result) for r in rows]
            if output == "json":
                typer.echo(
                    json.dumps(
                        {
                            "target": attainment,
                            "rows": [
                                {
                                    "gpu_type": r.gpu_type,
                                    "gpus": r.gpus,
                                    "fleet_per_hour": r.fleet_per_hour,
                                    "attainment": r.attainment,
                                    "tried": r.tried,
                                    "result": r.result.to_dict(),
                                }
                                for r in rows
                            ],
                            "winner": rows[0].gpu_type if rows[0].gpus is not None else None,
                        },
                        indent=2,
                    )
                )
            else:
                typer.echo(render_search(rows, attainment))
        elif compare:
            for text in compare:
                name, variant_files, variant_inventory = parse_compare(text)
                variant_files = variant_files or files
                variant_inventory = variant_inventory or inventory
                if not variant_files or variant_inventory is None:
                    raise fail(f"--compare {text!r}: no models or inventory (and no -f / -i)")
                models, tenants = _load(variant_files)
                fleet = load_inventory(variant_inventory)
                result = _run(
                    name,
                    models,
                    fleet,
                    requests,
                    total_s,
                    objectives,
                    settings,
                    startup,
                    tenants,
                    hosted,
                )
                variants.append(Variant(name, result))
            if output == "json":
                typer.echo(json.dumps(comparison_to_dict(variants), indent=2))
            else:
                typer.echo(render_comparison(compare_rows(variants)))
        else:
            if not files or inventory is None:
                raise fail("give the models (-f FILE) and the inventory (-i FILE)")
            models, tenants = _load(files)
            fleet = load_inventory(inventory)
            result = _run(
                "sim",
                models,
                fleet,
                requests,
                total_s,
                objectives,
                settings,
                startup,
                tenants,
                hosted,
            )
            variants = [Variant(inventory.stem, result)]
            if output == "json":
                typer.echo(result.to_json())
            else:
                typer.echo(render_table(result))
        if report is not None:
            write_report(report, variants)
            typer.echo(f"report written to {report}", err=True)
    except SpecError as exc:  # a bad spec, inventory or trace file: every problem, by line
        spec_problems(exc.problems)
        raise typer.Exit(1) from exc
    except (GpufleetError, ValueError, TypeError, OSError) as exc:
        from rich.markup import escape

        raise fail(escape(str(exc))) from exc  # "gpufleet[sim]" is not markup
