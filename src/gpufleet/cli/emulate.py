"""``gpufleet emulate``: emulated replicas of a model on a GPU, for tests and benchmarks."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["emulate"]


def emulate(
    args: Annotated[
        list[str] | None,
        typer.Argument(help="emulator options; see 'gpufleet emulate -- --help'"),
    ] = None,
) -> None:
    """Serve emulated replicas (no real inference): --arch CONFIG --gpu H100 --replicas N --port P."""
    from gpufleet.emulator.main import main

    main(args or [])
