"""``gpufleet emulate``: emulated replicas of a model on a GPU, for tests and benchmarks.

The emulator's options are declared once, by the argparse parser in
:mod:`gpufleet.emulator.main` — it also serves ``python -m gpufleet.emulator``, where no typer
exists. So this command declares none of its own: every argument, ``--help`` included, goes to
that parser, and ``gpufleet emulate --help`` prints its list of options. A copy of them as typer
options would be a second list to keep in step with the first.
"""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["EMULATE_SETTINGS", "emulate"]

# Click keeps every word for the emulator's parser: unknown options, and --help (no help option).
EMULATE_SETTINGS = {
    "allow_extra_args": True,
    "ignore_unknown_options": True,
    "help_option_names": [],
}


def emulate(
    args: Annotated[
        list[str] | None,
        typer.Argument(help="emulator options; see 'gpufleet emulate --help'"),
    ] = None,
) -> None:
    """Serve emulated replicas (no real inference): --arch CONFIG --gpu H100 --replicas N --port P."""
    from gpufleet.emulator.main import main

    main(args or [])
