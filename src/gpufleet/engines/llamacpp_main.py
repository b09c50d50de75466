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

llama-cpp-python streams no usage, so the gateway counts a finished stream with the engine
(``gateway/stream_usage.py``). This entry point adds ``POST /extras/count/v1/chat/completions``
(and ``…/v1/completions``): given the request and the streamed text, it answers the prompt's
tokens exactly as the server would count them — the request goes through the same chat
template, tokenizer and context-window check, and is stopped where generation would begin, so
no token is evaluated — and the text's tokens (what the tokenizer makes of it, less what it adds
to an empty text). One call and one wait for the model lock, where asking the request again
with ``max_tokens: 1`` evaluated the whole prompt anew whenever another request had run since.

The server's ``api_key`` (a 401 on every route but ``/health`` without it) comes from
``GPUFLEET_ENGINE_KEY``, handed to the server's settings as ``API_KEY`` (they are
pydantic-settings, which read it from the environment), so it never shows in ``ps``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from gpufleet.engines.base import ENGINE_KEY_ENV, LIVENESS_PATH, LLAMACPP_COUNT_PATH

__all__ = ["QuietLiveness", "count_tokens", "main"]

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


class _Counted(Exception):
    """Raised where generation would begin: the prompt's tokens, counted."""

    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self.tokens = tokens


def count_tokens(llama: Any, call: Any, kwargs: dict[str, Any], text: str) -> dict[str, int]:
    """The prompt's tokens of ``call(**kwargs)`` (``llama.create_chat_completion`` or
    ``llama`` itself) as it would evaluate them, stopped before it does; and ``text``'s tokens.
    Blocking, under the model lock: the server's own path up to ``Llama.generate``."""

    def generate(tokens: list[int], *args: Any, **kw: Any) -> Any:
        raise _Counted(len(tokens))

    llama.generate = generate  # the instance's, for this call only
    try:
        call(**kwargs)
    except _Counted as counted:
        prompt = counted.tokens
    else:
        raise RuntimeError("the engine answered without reaching generation")
    finally:
        del llama.generate
    completion = 0
    if text:
        empty = len(llama.tokenize(b"", special=True))
        completion = max(0, len(llama.tokenize(text.encode("utf-8"), special=True)) - empty)
    return {"prompt_tokens": prompt, "completion_tokens": completion}


def _add_count() -> None:
    """Registers ``POST /extras/count/v1/chat/completions`` and ``…/v1/completions``: body
    ``{"request": <the request>, "text": <what was streamed>}``; answers ``{"prompt_tokens",
    "completion_tokens"}``, 400 with the reason for a request the engine would refuse."""
    from fastapi import Body, Depends, HTTPException
    from llama_cpp.server.app import (
        authenticate,
        get_llama_proxy,
        prepare_request_resources,
        router,
    )
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
    from pydantic import ValidationError

    # What the server's own routes leave out of the call (chat; completions also best_of).
    exclude = {"n", "logit_bias_type", "user", "min_tokens"}

    # FastAPI's declarations, read from the parameters' defaults.
    whole_body, model_lock = Body(...), Depends(get_llama_proxy)

    def route(kind: type[Any], chat: bool) -> Any:
        async def count(
            payload: dict[str, Any] = whole_body, llama_proxy: Any = model_lock
        ) -> dict[str, int]:
            text = payload.get("text", "")
            try:
                body = kind.model_validate(payload.get("request"))
            except ValidationError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from exc
            if not isinstance(text, str):
                raise HTTPException(status_code=422, detail="text must be a string")
            if not chat and isinstance(body.prompt, list):  # as the server's route does
                if len(body.prompt) > 1:
                    raise HTTPException(status_code=422, detail="one prompt at a time")
                body.prompt = body.prompt[0] if body.prompt else ""
            kwargs = body.model_dump(exclude=exclude if chat else exclude | {"best_of"})
            kwargs.update(stream=False, max_tokens=1)
            llama = prepare_request_resources(body, llama_proxy, body.model, kwargs)
            call = llama.create_chat_completion if chat else llama
            try:
                return await asyncio.to_thread(count_tokens, llama, call, kwargs, text)
            except ValueError as exc:  # beyond the context window, as the server refuses it
                raise HTTPException(status_code=400, detail=str(exc)) from exc

        return count

    for path, kind, chat in (
        ("/v1/chat/completions", CreateChatCompletionRequest, True),
        ("/v1/completions", CreateCompletionRequest, False),
    ):
        router.add_api_route(
            LLAMACPP_COUNT_PATH + path,
            route(kind, chat),
            methods=["POST"],
            dependencies=[Depends(authenticate)],
            include_in_schema=False,
        )


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
    _add_count()
    from llama_cpp.server.__main__ import main as serve

    sys.argv = [sys.argv[0], *argv]
    serve()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
