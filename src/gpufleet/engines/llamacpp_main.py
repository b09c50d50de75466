"""Entry point of a llama.cpp replica: llama-cpp-python's server, with pooling when embedding.

llama-cpp-python's server (0.3.x) has no pooling option, and a chat model's GGUF seldom names a
pooling type, so with ``--embedding true`` its ``/v1/embeddings`` answers one vector per *token*
rather than one per input, which no OpenAI client expects. ``--pooling mean`` (ours, removed
before the server parses its arguments) makes every ``Llama`` it creates pool by mean, giving
one vector per input. Run as ``python -m gpufleet.engines.llamacpp_main [server args]``.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["main"]

_POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}


def _take_pooling(argv: list[str]) -> tuple[list[str], str | None]:
    if "--pooling" not in argv:
        return argv, None
    i = argv.index("--pooling")
    if i + 1 >= len(argv) or argv[i + 1] not in _POOLING:
        raise SystemExit(f"--pooling needs one of {', '.join(_POOLING)}")
    return argv[:i] + argv[i + 2 :], argv[i + 1]


def main() -> None:
    argv, pooling = _take_pooling(sys.argv[1:])
    import llama_cpp

    if pooling is not None:
        original = llama_cpp.Llama.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("pooling_type", _POOLING[pooling])
            original(self, *args, **kwargs)

        llama_cpp.Llama.__init__ = init  # type: ignore[method-assign]

    from llama_cpp.server.__main__ import main as serve

    sys.argv = [sys.argv[0], *argv]
    serve()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
