"""An engine's error answer turned into the gateway's own OpenAI-shaped error.

Engines answer errors in their own shapes and, on some inputs, with their internals:
llama-cpp-python wraps an unexpected exception as ``{"error": {"message": str(exc)}}``, which for
a pydantic ``ValidationError`` is a multi-line dump with input values and a link to
errors.pydantic.dev, and FastAPI answers 422 with ``{"detail": [{"loc", "msg", "input"}]}``;
vLLM and SGLang answer ``{"error": {...}}`` or ``{"object": "error", "message", "code": 400}``;
some answers are empty. None of that reaches a client verbatim: ``engine_error`` keeps an
engine's message only when it is one short line with no path, traceback or validation dump,
else says "The engine rejected the request" and names the field when it can be read safely.

A prompt that does not fit the context is the client's 400 with ``code:
context_length_exceeded`` as OpenAI answers it, whichever engine noticed and however it said so
(llama.cpp's "Requested tokens (N) exceed context window of M", vLLM's "maximum context length",
llama-server's "exceeds the available context size"). An engine refusing the gateway itself
(401/403: the engine's secret; 404/405: a model or route it does not serve) or failing (5xx) is
the gateway's problem, not the client's: a 502 with no engine text. The caller logs the engine's
full body for operators.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gpufleet.gateway.errors import ApiError, upstream_failed

__all__ = ["engine_error", "is_clean"]

_MAX_MESSAGE = 300
#: Marks of engine internals: tracebacks, source paths, pydantic dumps.
_INTERNALS = (
    "traceback",
    'file "',
    ".py",
    "site-packages",
    "validation error",
    "input_value=",
    "input_type=",
    "errors.pydantic.dev",
    "pydantic",
    "llama_cpp",
    "exception",
    "{'",
    "'loc'",
    "'input'",
    '"loc"',
    '"input"',
)
_PATH = re.compile(r"(?:^|[\s'\"(=:])(?:/[\w.+-]+){2,}|[A-Za-z]:\\")
_FIELD = re.compile(r"^[A-Za-z_][\w.\[\]]{0,63}$")
_DUMP_FIELD = re.compile(r"validation errors? for \w+\s*\n\s*([A-Za-z_][\w.\[\]]{0,63})\s*\n")
_LLAMA_CONTEXT = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
_CONTEXT_MARKS = (
    "maximum context length",
    "context window",
    "context size",
    "maximum model length",
    "exceeds limit of",
    "exceeds the maximum allowed length",
    "context_length_exceeded",
    "exceed_context_size",
)
#: Engine statuses a client can act on, kept as they are; any other 4xx is a 400.
_KEPT = frozenset({400, 413, 429})
#: Engine statuses that mean the gateway and its engine disagree (secret, model, route).
_ENGINE_FAULT = frozenset({401, 403, 404, 405})


def engine_error(model: str, status: int, payload: bytes, route: str) -> ApiError:
    """The error a client sees for an engine's ``status`` answer with body ``payload``."""
    message, param, code, kind = _read(payload)
    context = _context_error(message, code, kind, route, strict=status >= 500)
    if context is not None:
        return context
    if status >= 500 or status in _ENGINE_FAULT:
        return upstream_failed(model, f"engine answered {status}")
    field = param if param is not None and _FIELD.match(param) else _dump_field(message)
    if is_clean(message):
        named = f"{field}: " if field is not None and field not in message else ""
        text = f"The engine rejected the request: {named}{message}"
    elif field is not None:
        text = f"The engine rejected the request: invalid value for '{field}'"
    else:
        text = "The engine rejected the request"
    safe_code = code if code is not None and _FIELD.match(code) else None
    return ApiError(status if status in _KEPT else 400, text, param=field, code=safe_code)


def is_clean(message: str) -> bool:
    """One short line with no mark of an engine's internals."""
    if not message or len(message) > _MAX_MESSAGE or "\n" in message or "\r" in message:
        return False
    lowered = message.lower()
    return not any(mark in lowered for mark in _INTERNALS) and not _PATH.search(message)


def _read(payload: bytes) -> tuple[str, str | None, str | None, str | None]:
    """Message, param, code and type of an engine's error body, in whichever shape it came."""
    text = payload.decode("utf-8", "replace").strip()
    try:
        data: Any = json.loads(payload)
    except ValueError:
        return text, None, None, None
    if not isinstance(data, dict):
        return text, None, None, None
    err = data.get("error")
    if isinstance(err, str):
        return err.strip(), None, None, None
    source = err if isinstance(err, dict) else data
    detail = source.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return _fastapi_detail(detail[0])
    message = source.get("message", detail)
    return (
        message.strip() if isinstance(message, str) else "",
        _str(source.get("param")),
        _str(source.get("code")),
        _str(source.get("type")),
    )


def _fastapi_detail(item: dict[str, Any]) -> tuple[str, str | None, str | None, str | None]:
    """FastAPI's 422 item: its ``msg`` and the field from ``loc`` (``input`` is never read)."""
    loc = item.get("loc")
    parts = [str(p) for p in loc if isinstance(p, str | int)] if isinstance(loc, list) else []
    if parts and parts[0] == "body":
        parts = parts[1:]
    msg = item.get("msg")
    return msg.strip() if isinstance(msg, str) else "", ".".join(parts) or None, None, None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _dump_field(message: str) -> str | None:
    """The first field a pydantic ``ValidationError`` dump names."""
    match = _DUMP_FIELD.search(message)
    return match.group(1) if match else None


def _context_error(
    message: str, code: str | None, kind: str | None, route: str, *, strict: bool
) -> ApiError | None:
    """A context-length refusal as OpenAI words it; ``strict`` (an engine's 5xx, which may
    mention context sizes for its own reasons) accepts only llama.cpp's exact sentence."""
    param = (
        "input"
        if route.endswith("/embeddings")
        else "messages"
        if route.endswith("/chat/completions")
        else "prompt"
    )
    llama = _LLAMA_CONTEXT.search(message)
    if llama is not None:
        text = (
            f"This model's maximum context length is {llama.group(2)} tokens; the request "
            f"needs {llama.group(1)}. Please reduce the length of the {param} or completion."
        )
    elif not strict and any(mark in f"{message} {code} {kind}".lower() for mark in _CONTEXT_MARKS):
        text = (
            message
            if is_clean(message)
            else "The request does not fit in the model's context window; "
            f"please reduce the length of the {param} or completion."
        )
    else:
        return None
    return ApiError(400, text, param=param, code="context_length_exceeded")
