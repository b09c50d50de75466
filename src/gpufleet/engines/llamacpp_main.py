"""Entry point of a llama.cpp replica: llama-cpp-python's server, with pooling and a liveness path.

llama-cpp-python's server (0.3.x) has no pooling option, and a chat model's GGUF seldom names a
pooling type, so with ``--embedding true`` its ``/v1/embeddings`` answers one vector per *token*
rather than one per input, which no OpenAI client expects. ``--pooling mean`` (ours, removed
before the server parses its arguments) makes every ``Llama`` it creates pool by mean, giving
one vector per input. Run as ``python -m gpufleet.engines.llamacpp_main [server args]``.

The server has no ``/health``, and every route it does have except the docs waits for the one
model lock, which a generation holds for its whole length: a liveness probe on ``/v1/models``
would time out under load, and one on a missing path fills the log with 404s. So this entry
point adds ``GET /health`` (the liveness path of every engine, ``LIVENESS_PATH``), answered
without the lock or the API key, and keeps its successful answers out of uvicorn's access log,
which otherwise writes a line per probe; a probe that fails is still logged.

The server's ``api_key`` (a 401 on every route but ``/health`` without it) comes from
``GPUFLEET_ENGINE_KEY``, handed to the server's settings as ``API_KEY`` (they are
pydantic-settings, which read it from the environment), so it never shows in ``ps``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from gpufleet.engines.base import ENGINE_KEY_ENV, LIVENESS_PATH

__all__ = ["QuietLiveness", "main"]

_POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}


class QuietLiveness(logging.Filter):
    """Drops uvicorn's access-log line of a successful ``GET`` of the liveness path.

    uvicorn logs each answer as ``'%s - "%s %s HTTP/%s" %d'`` with (client, method, path,
    version, status) as the record's arguments.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        _, method, path, _, status = args
        return not (method == "GET" and path == LIVENESS_PATH and status == 200)


def _take_pooling(argv: list[str]) -> tuple[list[str], str | None]:
    if "--pooling" not in argv:
        return argv, None
    i = argv.index("--pooling")
    if i + 1 >= len(argv) or argv[i + 1] not in _POOLING:
        raise SystemExit(f"--pooling needs one of {', '.join(_POOLING)}")
    return argv[:i] + argv[i + 2 :], argv[i + 1]


def _add_liveness() -> None:
    """Registers ``GET /health`` on the server's router, before its app includes the router."""
    from llama_cpp.server.app import router

    async def health() -> dict[str, str]:
        return {"status": "ok"}

    router.add_api_route(LIVENESS_PATH, health, methods=["GET"], include_in_schema=False)
    # uvicorn's logging setup replaces this logger's handlers but keeps its filters.
    logging.getLogger("uvicorn.access").addFilter(QuietLiveness())


def main() -> None:
    argv, pooling = _take_pooling(sys.argv[1:])
    key = os.environ.pop(ENGINE_KEY_ENV, None)
    if key:
        os.environ["API_KEY"] = key
    import llama_cpp

    if pooling is not None:
        original = llama_cpp.Llama.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("pooling_type", _POOLING[pooling])
            original(self, *args, **kwargs)

        llama_cpp.Llama.__init__ = init  # type: ignore[method-assign]

    _add_liveness()
    from llama_cpp.server.__main__ import main as serve

    sys.argv = [sys.argv[0], *argv]
    serve()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
