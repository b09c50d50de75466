"""Bad input in front of the real SmolLM2 on llama.cpp: a 400 OpenAI-shaped error from the
gateway, never the engine's validation dump, and the gateway keeps serving.

llama-cpp-python answers an unknown role with a pydantic dump naming its own source files, and
a ``max_tokens`` beyond the context with a 200; the gateway must answer both before the engine
sees them. The official ``openai`` SDK is the client where it can send the body.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.integration.fleet import ADMIN_KEY, Fleet, smollm2_fleet

pytestmark = pytest.mark.engine

USER = {"role": "user", "content": "Name a colour."}
#: What must never reach a client: the engine's internals.
INTERNALS = ("Traceback", "llama_cpp", ".py", "pydantic", "validation error")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    yield from smollm2_fleet(tmp_path_factory.mktemp("bad-input"))


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> OpenAI:
    return OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=60)


def refused(client: OpenAI, **kw: Any) -> dict[str, Any]:
    """The body's ``error`` object of a request the SDK raised ``BadRequestError`` for."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", **kw)
    text = caught.value.response.text
    error: dict[str, Any] = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == caught.value.type == "invalid_request_error"
    assert (caught.value.param, caught.value.code) == (error["param"], error["code"])
    assert not [s for s in INTERNALS if s in text], text
    assert caught.value.response.headers["x-request-id"]
    return error


def answers(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2", messages=[USER], max_tokens=4, temperature=0
    )
    assert reply.choices[0].message.content is not None


def test_an_unknown_role_is_400_naming_it(client: OpenAI) -> None:
    error = refused(client, messages=[USER, {"role": "wizard", "content": "x"}], max_tokens=4)
    assert (error["param"], error["code"]) == ("messages[1].role", "invalid_value")
    assert "'developer'" in error["message"]
    answers(client)


def test_an_unknown_content_part_is_400_naming_it(client: OpenAI) -> None:
    parts = [{"type": "text", "text": "x"}, {"type": "hologram"}]
    error = refused(client, messages=[{"role": "user", "content": parts}], max_tokens=4)
    assert (error["param"], error["code"]) == ("messages[0].content[1].type", "invalid_value")
    answers(client)


def test_a_developer_message_is_served_as_a_system_message(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "developer", "content": "Answer in one word."}, USER],
        max_tokens=4,
        temperature=0,
    )
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize("max_tokens", [2049, 5000, 10**12])
def test_a_completion_longer_than_the_context_is_400_like_openai(
    client: OpenAI, max_tokens: int
) -> None:
    error = refused(client, messages=[USER], max_tokens=max_tokens)
    assert (error["param"], error["code"]) == ("max_tokens", "invalid_value")
    assert error["message"].startswith(f"max_tokens is too large: {max_tokens}.")
    assert "maximum context length is 2048 tokens" in error["message"]
    answers(client)


def test_deep_nesting_is_400_at_any_depth(client: OpenAI, fleet: Fleet) -> None:
    deep: Any = []
    for _ in range(80):
        deep = [deep]
    error = refused(client, messages=[USER], max_tokens=4, extra_body={"x": deep})
    assert "nests arrays and objects more than 64 deep" in error["message"]
    # Far deeper than any JSON encoder the SDK would use: sent as bytes.
    raw = b'{"model": "smollm2", "messages": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    request = urllib.request.Request(
        fleet.base_url + "/chat/completions",
        data=raw,
        headers={"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    body = json.loads(caught.value.read())
    assert "nests arrays and objects more than 64 deep" in body["error"]["message"]
    answers(client)
