"""Checks on OpenAI request bodies, strict where a wrong value would fail deep in an engine.

Only fields whose type we can state with certainty are checked; everything else passes to the
engine unchanged (engines add their own fields, and the OpenAI API grows). Hand-written rather
than a pydantic model: it costs microseconds on the hot path and names the field in ``param``.
"""

from __future__ import annotations

import json
from typing import Any

from gpufleet.gateway.errors import bad_request

__all__ = ["check_chat", "check_completion", "check_embeddings", "parse_body"]


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise bad_request("The request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, not {_name(data)}")
    return data


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


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if model is None:
        raise bad_request(
            "Missing required parameter: 'model'", param="model", code="missing_required_parameter"
        )
    if not isinstance(model, str) or not model:
        raise bad_request(f"'model' must be a non-empty string, not {_name(model)}", param="model")
    return model


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
    temperature = data.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 <= temperature <= 2
    ):
        raise bad_request(
            f"'temperature' must be a number from 0 to 2 (got {temperature!r})", param="temperature"
        )
    top_p = data.get("top_p")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 <= top_p <= 1
    ):
        raise bad_request(f"'top_p' must be a number from 0 to 1 (got {top_p!r})", param="top_p")


def check_chat(data: dict[str, Any]) -> str:
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
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{where}' must be an object, not {_name(message)}", param=where)
        role = message.get("role")
        if not isinstance(role, str):
            raise bad_request(
                f"Missing or invalid '{where}.role': must be a string", param=f"{where}.role"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request(
                f"'{where}.content' must be a string or an array of content parts, not {_name(content)}",
                param=f"{where}.content",
            )
    _common(data)
    return model


def check_completion(data: dict[str, Any]) -> str:
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
    model = _model(data)
    value = data.get("input")
    if value is None:
        raise bad_request(
            "Missing required parameter: 'input'", param="input", code="missing_required_parameter"
        )
    if not isinstance(value, (str, list)) or (isinstance(value, list) and not value):
        raise bad_request("'input' must be a string or a non-empty array", param="input")
    return model
