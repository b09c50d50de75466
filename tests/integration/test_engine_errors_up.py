"""An error only the engine can see, on the real SmolLM2 on llama.cpp: a prompt longer than the
model's 2048-token context. The gateway does not count prompt tokens before the engine, so
llama.cpp refuses it; the client gets OpenAI's 400 (``context_length_exceeded``) and none of the
engine's internals, on chat and completions, streamed or not, and the gateway keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.integration.fleet import ADMIN_KEY, Fleet, smollm2_fleet

pytestmark = pytest.mark.engine

#: Well over 2048 tokens in SmolLM2's vocabulary (each " colour" is one token or more).
LONG = "Name a colour." + " colour" * 3000
INTERNALS = ("Traceback", "llama_cpp", ".py", "pydantic", "validation error", 'File "')


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    yield from smollm2_fleet(tmp_path_factory.mktemp("engine-errors"))


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> OpenAI:
    return OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=60)


def context_error(caught: pytest.ExceptionInfo[openai.BadRequestError], param: str) -> str:
    text = caught.value.response.text
    for mark in INTERNALS:
        assert mark not in text, f"{mark!r} reached the client: {text}"
    error: dict[str, Any] = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == ("context_length_exceeded", param)
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", param)
    assert "2048" in error["message"]
    return str(error["message"])


def test_a_prompt_beyond_the_context_is_openais_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": LONG}], max_tokens=8
        )
    context_error(caught, "messages")


def test_a_streamed_prompt_beyond_the_context_is_openais_400(client: OpenAI) -> None:
    """llama-cpp-python answers it with a 200 and no event; the gateway commits a stream's
    status only with its first event, and asks the engine again unstreamed for the reason."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": LONG}],
            max_tokens=8,
            stream=True,
        )
    context_error(caught, "messages")
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="smollm2", prompt=LONG, max_tokens=8, stream=True)
    context_error(caught, "prompt")


def test_a_completion_beyond_the_context_names_the_prompt(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="smollm2", prompt=LONG, max_tokens=8)
    context_error(caught, "prompt")


def test_the_engine_keeps_serving_after_its_refusals(client: OpenAI, fleet: Fleet) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=4
    )
    assert answer.choices[0].message.content
    # The operator's log has what the engine said; the client got only the gateway's words.
    assert "maximum context length" in fleet.stderr()
