"""How every command reports failure: one line to stderr, no traceback, an exit code."""

from __future__ import annotations

from collections.abc import Iterable

import typer
from rich.console import Console

__all__ = ["err", "fail", "out", "spec_problems"]

out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]gpufleet:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def spec_problems(problems: Iterable[str]) -> None:
    """One line per field at fault, as the spec layer words them."""
    for problem in problems:
        err.print(f"[red]error:[/] {problem}", highlight=False, soft_wrap=True)
