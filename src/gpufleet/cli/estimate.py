"""``gpufleet estimate``: how much GPU memory a model needs, before anything is downloaded or run.

It reads only the model's ``config.json`` or GGUF header, so it answers offline and in well under
a second, and prints one row per tensor-parallel size the architecture allows (or the one asked
for). The sizing modules are imported inside the command, keeping ``gpufleet``'s start-up light.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from gpufleet.cli.output import fail, out
from gpufleet.cli.tables import print_table
from gpufleet.errors import GpufleetError

if TYPE_CHECKING:
    from gpufleet.hardware import Accelerator
    from gpufleet.sizing import MemoryEstimate, ModelArch

__all__ = ["estimate"]

UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization
MAX_CONTEXT_DEFAULT = 8192
GIB = float(1 << 30)


class EstimateOutput(StrEnum):
    table = "table"
    json = "json"


class EngineChoice(StrEnum):
    auto = "auto"
    vllm = "vllm"
    sglang = "sglang"
    trtllm = "trtllm"
    triton = "triton"
    llamacpp = "llamacpp"
    emulator = "emulator"


def estimate(
    model: Annotated[
        Path, typer.Argument(help="config.json, a .gguf file, or a directory holding one")
    ],
    gpu: Annotated[
        str | None, typer.Option("--gpu", help="accelerator to check against, e.g. H100")
    ] = None,
    tp: Annotated[
        int | None,
        typer.Option("--tp", min=1, help="tensor parallel size; default: every valid one"),
    ] = None,
    context: Annotated[
        int | None,
        typer.Option(
            "--context", min=1, help="tokens per sequence; default min(max context, 8192)"
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="sequences held at once")
    ] = 1,
    engine: Annotated[
        EngineChoice,
        typer.Option("--engine", help="engine whose overhead to count; auto: llamacpp for GGUF"),
    ] = EngineChoice.auto,
    output: Annotated[
        EstimateOutput, typer.Option("--output", "-o", help="table or json")
    ] = EstimateOutput.table,
) -> None:
    """Estimate weights, KV cache and overhead per GPU for a model, from its config or GGUF."""
    from gpufleet.hardware import accelerator
    from gpufleet.sizing import estimate_memory, load_architecture, valid_tp_degrees

    try:
        arch = load_architecture(model)
    except GpufleetError as exc:
        raise fail(str(exc)) from None
    card = None
    if gpu is not None:
        try:
            card = accelerator(gpu)
        except KeyError as exc:
            raise fail(str(exc.args[0])) from None
    engine_name = engine.value
    if engine is EngineChoice.auto:
        # load_architecture took a directory without config.json only if it held one GGUF.
        is_gguf = model.suffix == ".gguf" or (
            model.is_dir() and not (model / "config.json").is_file()
        )
        engine_name = "llamacpp" if is_gguf else "vllm"
    ctx = context or min(arch.max_context, MAX_CONTEXT_DEFAULT) or MAX_CONTEXT_DEFAULT
    degrees = [tp] if tp is not None else valid_tp_degrees(arch)
    try:
        estimates = [
            estimate_memory(arch, context=ctx, concurrency=concurrency, tp=d, engine=engine_name)
            for d in degrees
        ]
    except ValueError as exc:
        raise fail(str(exc)) from None
    rows = [_row(arch, e, card, engine_name) for e in estimates]
    if output is EstimateOutput.json:
        doc = {
            "architecture": {**dataclasses.asdict(arch), "is_moe": arch.is_moe},
            "gpu": None if card is None else {"name": card.name, "memory_bytes": card.memory_bytes},
            "engine": engine_name,
            "context": ctx,
            "concurrency": concurrency,
            "utilization": UTILIZATION,
            "estimates": [r.document() for r in rows],
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    _print_table(arch, card, engine_name, ctx, concurrency, rows)


@dataclass(frozen=True, slots=True)
class _Row:
    estimate: MemoryEstimate
    fits: bool | None  # None: no GPU to check against
    max_concurrency: int | None

    def document(self) -> dict[str, Any]:
        e = self.estimate
        return {
            **dataclasses.asdict(e),
            "total_bytes_per_gpu": e.total_per_gpu,
            "total_bytes": e.total,
            "fits": self.fits,
            "max_concurrency": self.max_concurrency,
        }


def _row(arch: ModelArch, e: MemoryEstimate, card: Accelerator | None, engine: str) -> _Row:
    from gpufleet.sizing import fits, max_concurrency

    if card is None or not card.is_gpu:
        return _Row(e, None, None)
    most = max_concurrency(
        arch, card.memory_bytes, context=e.context, tp=e.tp, engine=engine, utilization=UTILIZATION
    )
    return _Row(e, fits(e, card.memory_bytes, UTILIZATION), most)


def _print_table(
    arch: ModelArch,
    card: Accelerator | None,
    engine: str,
    context: int,
    concurrency: int,
    rows: list[_Row],
) -> None:
    from gpufleet.sizing import kv_bytes_per_token

    moe = f", {arch.experts} experts ({arch.experts_per_token} active)" if arch.is_moe else ""
    out.print(
        f"[bold]{arch.name or 'model'}[/] ({arch.family}{moe}): "
        f"{arch.parameters / 1e9:.2f}B parameters, {arch.dtype} "
        f"({arch.bits_per_weight:.2f} bits/weight), weights {arch.weights_bytes / 1e9:.2f} GB "
        f"= {arch.weights_bytes / GIB:.2f} GiB",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"{arch.layers} layers, hidden {arch.hidden_size}, {arch.attention_heads} heads, "
        f"{arch.kv_heads} KV heads × {arch.head_dim}, vocab {arch.vocab_size}, "
        f"max context {arch.max_context}; KV {kv_bytes_per_token(arch) / 1024:.0f} KiB/token",
        highlight=False,
        soft_wrap=True,
    )
    where = "no GPU given"
    if card is not None:
        where = f"{card.name} ({card.memory_bytes / 1e9:.0f} GB) at {UTILIZATION:.0%}"
    out.print(f"{engine}, {concurrency} × {context} tokens, {where}", highlight=False, style="dim")
    table = Table(box=None, header_style="bold")
    for col in ("TP", "WEIGHTS/GPU", "KV/GPU", "OVERHEAD/GPU", "TOTAL/GPU", "FITS", "MAX SEQS"):
        table.add_column(col, justify="right")
    for r in rows:
        e = r.estimate
        fit = {None: "-", True: "[green]yes[/]", False: "[red]no[/]"}[r.fits]
        table.add_row(
            str(e.tp),
            f"{e.weights_bytes_per_gpu / GIB:.2f} GiB",
            f"{e.kv_bytes_per_gpu / GIB:.2f} GiB",
            f"{e.overhead_bytes_per_gpu / GIB:.2f} GiB",
            f"{e.total_per_gpu / GIB:.2f} GiB",
            fit,
            "-" if r.max_concurrency is None else str(r.max_concurrency),
        )
    print_table(table)
