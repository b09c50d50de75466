"""The README's own examples, read from README.md, so tests run what a user copies and fail when
the README drifts: the models file of "Declare models" and the commands of "Kubernetes"."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

__all__ = ["README", "ROOT", "kubernetes_commands", "models_yaml"]


def _blocks(section: str, language: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return re.findall(rf"```{language}\n(.*?)```", body, re.S)


def models_yaml() -> str:
    """The models file of "Declare models" (the one ``examples/smollm2.yaml`` ships)."""
    return _blocks("Declare models", "yaml")[0]  # the first: its subsections show more


def kubernetes_commands(program: str | None = None) -> list[list[str]]:
    """The commands of the "Kubernetes" block as argument lists (continuations joined, comments
    dropped; a ``> FILE`` redirection stays in the list), optionally only ``program``'s."""
    (block,) = _blocks("Kubernetes", "bash")
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and (program is None or words[0] == program):
            commands.append(words)
    return commands
