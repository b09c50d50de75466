"""Checks on OpenAI request bodies, strict where a wrong value would fail deep in an engine.

A top-level field neither OpenAI nor an engine the gateway runs defines is refused, as OpenAI
refuses it (``known_fields``). Only fields whose type we can state with certainty are checked;
the others pass to the engine unchanged (engines add their own, and the OpenAI API grows; a new
field of the SDK's is added to ``known_fields``, which a test keeps in step). Hand-written rather
than a pydantic model: it costs microseconds on the hot path and names the field in ``param``.

What an engine would choke on is refused here, before it is sent: a role or a content part type
the OpenAI API does not define (llama-cpp-python answers those with its pydantic dump), numbers
outside the API's ranges, and bodies nested deeper than ``MAX_DEPTH``. Python's ``json`` has no
depth option: its C decoder raises ``RecursionError`` past about 1,000 levels (caught here, the
decoder's own guard, so nothing is left half done), and anything deeper than ``MAX_DEPTH`` that
did decode is found by a level-by-level walk, so no later ``json.dumps`` or recursive reader
meets it. The walk costs per array and object, not per byte: about 1 µs on a short chat body,
10 µs on a 40-turn one, a fraction of what decoding it costs (measured with timeit). Whether
``max_tokens`` fits the model's context is ``request.prepare``'s check: only it knows the
model.
"""

from __future__ import annotations

import json
from typing import Any

from gpufleet.gateway.errors import ApiError, bad_request
from gpufleet.gateway.known_fields import KNOWN_FIELDS

__all__ = [
    "CONTENT_PART_TYPES",
    "MAX_DEPTH",
    "ROLES",
    "check_chat",
    "check_completion",
    "check_embeddings",
    "parse_body",
]

#: Nesting deeper than this is refused. OpenAI bodies need fewer than ten levels; a JSON schema
#: in ``response_format`` or a tool's ``parameters`` a few dozen at most.
MAX_DEPTH = 64
#: The message roles of the OpenAI chat API.
ROLES = ("system", "user", "assistant", "tool", "function", "developer")
#: The content part types of the OpenAI chat API.
CONTENT_PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")
#: The OpenAI API's bound on ``n``.
MAX_N = 128


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise bad_request("The request body is empty; send a JSON object")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError as exc:
        raise _too_deep() from exc
    except (UnicodeDecodeError, json.JSONDecodeError, _NotJson) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from exc
    except ValueError as exc:  # the one other: an integer Python will not convert
        raise bad_request(
            "The request body holds an integer of more than 4,300 digits", param=None
        ) from exc
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, not {_name(data)}")
    if _deeper_than(data, MAX_DEPTH):
        raise _too_deep()
    return data


class _NotJson(ValueError):
    """``NaN`` and ``Infinity``: Python's decoder accepts them, JSON and engines do not."""


def _no_constant(name: str) -> None:
    raise _NotJson(f"{name} is not a JSON value")


def _too_deep() -> ApiError:
    return bad_request(f"The request body nests arrays and objects more than {MAX_DEPTH} deep")


def _deeper_than(data: dict[str, Any], limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` levels: one level at a time, so no
    recursion, and each level a comprehension, so the cost is a fraction of decoding's."""
    level: list[Any] = [data]
    for _ in range(limit):
        level = [
            child
            for value in level
            for child in (value.values() if type(value) is dict else value)
            if type(child) is dict or type(child) is list
        ]
        if not level:
            return False
    return True


def _name(value: object) -> str:
    return {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        dict: "an object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _one_of(value: object, allowed: tuple[str, ...], param: str) -> ApiError:
    """OpenAI's wording for a value outside an enumeration."""
    listed = ", ".join(f"'{a}'" for a in allowed[:-1]) + f", and '{allowed[-1]}'"
    return bad_request(
        f"Invalid value: {value!r}. Supported values are: {listed}.",
        param=param,
        code="invalid_value",
    )


_CHAT_FIELDS = KNOWN_FIELDS["/v1/chat/completions"]
_COMPLETION_FIELDS = KNOWN_FIELDS["/v1/completions"]
_EMBEDDINGS_FIELDS = KNOWN_FIELDS["/v1/embeddings"]


def _known(data: dict[str, Any], known: frozenset[str]) -> None:
    if data.keys() <= known:
        return
    name = next(n for n in data if n not in known)
    raise bad_request(
        f"Unrecognized request argument supplied: {name[:100]} (neither an OpenAI parameter nor "
        "one of the engines served here: vLLM, SGLang, llama.cpp)",
        param=name[:100],
        code="unknown_parameter",
    )


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if model is None:
        raise bad_request(
            "Missing required parameter: 'model'", param="model", code="missing_required_parameter"
        )
    if not isinstance(model, str) or not model:
        raise bad_request(f"'model' must be a non-empty string, not {_name(model)}", param="model")
    return model


def _number(data: dict[str, Any], field: str, low: float, high: float) -> None:
    value = data.get(field)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high
    ):
        raise bad_request(
            f"'{field}' must be a number from {low:g} to {high:g} (got {value!r})", param=field
        )


def _common(data: dict[str, Any]) -> None:
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"'stream' must be a boolean, not {_name(stream)}", param="stream")
    for field in ("max_tokens", "max_completion_tokens", "n"):
        value = data.get(field)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise bad_request(f"'{field}' must be an integer ≥ 1 (got {value!r})", param=field)
    n = data.get("n")
    if isinstance(n, int) and n > MAX_N:
        raise bad_request(f"'n' must be an integer from 1 to {MAX_N} (got {n!r})", param="n")
    _number(data, "temperature", 0, 2)
    _number(data, "top_p", 0, 1)
    _number(data, "presence_penalty", -2, 2)
    _number(data, "frequency_penalty", -2, 2)
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request(f"'seed' must be an integer (got {seed!r})", param="seed")
    stop = data.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise bad_request(
            f"'stop' must be a string or an array of strings, not {_name(stop)}", param="stop"
        )


def _message(message: object, where: str) -> None:
    if not isinstance(message, dict):
        raise bad_request(f"'{where}' must be an object, not {_name(message)}", param=where)
    role = message.get("role")
    if not isinstance(role, str):
        raise bad_request(
            f"Missing or invalid '{where}.role': must be a string", param=f"{where}.role"
        )
    if role not in ROLES:
        raise _one_of(role, ROLES, f"{where}.role")
    content = message.get("content")
    if content is None:
        # An assistant turn may carry tool_calls instead, a function result may be null.
        if role not in ("assistant", "function"):
            raise bad_request(
                f"Missing required parameter: '{where}.content'",
                param=f"{where}.content",
                code="missing_required_parameter",
            )
        return
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise bad_request(
            f"'{where}.content' must be a string or an array of content parts, not {_name(content)}",
            param=f"{where}.content",
        )
    if not content:
        raise bad_request(
            f"'{where}.content' must be a string or a non-empty array of content parts",
            param=f"{where}.content",
        )
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"'{at}' must be an object, not {_name(part)}", param=at)
        kind = part.get("type")
        if kind not in CONTENT_PART_TYPES:
            if kind is None:
                raise bad_request(
                    f"Missing required parameter: '{at}.type'",
                    param=f"{at}.type",
                    code="missing_required_parameter",
                )
            raise _one_of(kind, CONTENT_PART_TYPES, f"{at}.type")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise bad_request(
                f"'{at}.text' must be a string, not {_name(part.get('text'))}", param=f"{at}.text"
            )


def check_chat(data: dict[str, Any]) -> str:
    _known(data, _CHAT_FIELDS)
    model = _model(data)
    messages = data.get("messages")
    if messages is None:
        raise bad_request(
            "Missing required parameter: 'messages'",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of messages", param="messages")
    for i, message in enumerate(messages):
        _message(message, f"messages[{i}]")
    _common(data)
    return model


def check_completion(data: dict[str, Any]) -> str:
    _known(data, _COMPLETION_FIELDS)
    model = _model(data)
    prompt = data.get("prompt")
    if prompt is None:
        raise bad_request(
            "Missing required parameter: 'prompt'",
            param="prompt",
            code="missing_required_parameter",
        )
    if not isinstance(prompt, (str, list)):
        raise bad_request(
            f"'prompt' must be a string or an array, not {_name(prompt)}", param="prompt"
        )
    _common(data)
    return model


def check_embeddings(data: dict[str, Any]) -> str:
    _known(data, _EMBEDDINGS_FIELDS)
    model = _model(data)
    value = data.get("input")
    if value is None:
        raise bad_request(
            "Missing required parameter: 'input'", param="input", code="missing_required_parameter"
        )
    if not isinstance(value, (str, list)) or (isinstance(value, list) and not value):
        raise bad_request("'input' must be a string or a non-empty array", param="input")
    return model
