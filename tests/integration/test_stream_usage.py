"""Usage on streams in front of the real llama.cpp, whose server (llama-cpp-python) streams no
usage even when asked: the gateway counts with the engine (``gateway.stream_usage``), so the
OpenAI SDK's ``include_usage`` gets a usage chunk equal to what the engine counts for the same
request answered whole, and the ledger records the same numbers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from tests.integration.fleet import ADMIN_KEY, Fleet, smollm2_fleet, wait_until

pytestmark = pytest.mark.engine


MESSAGES: Any = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Name a colour of the sky."},
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    yield from smollm2_fleet(tmp_path_factory.mktemp("stream-usage"))


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> Iterator[OpenAI]:
    with OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=60) as c:
        yield c


def test_a_stream_asking_for_usage_gets_the_engines_count(fleet: Fleet, client: OpenAI) -> None:
    whole = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=24, temperature=0, seed=1
    )
    assert whole.usage is not None
    stream = client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": "stream-usage-1"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1])
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 0
    assert usage.completion_tokens == whole.usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    def row() -> Any:
        rows = fleet.admin("/admin/v1/usage/requests?limit=50")["requests"]
        return next((r for r in rows if r["client_request_id"] == "stream-usage-1"), None)

    found = wait_until(row, timeout=30)
    assert found["prompt_tokens"] == usage.prompt_tokens
    assert found["completion_tokens"] == usage.completion_tokens


def test_a_stream_not_asking_for_usage_gets_none_and_is_still_counted(
    fleet: Fleet, client: OpenAI
) -> None:
    stream = client.chat.completions.create(
        model="smollm2",
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        seed=1,
        stream=True,
        extra_headers={"x-request-id": "stream-usage-2"},
    )
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)

    def row() -> Any:
        rows = fleet.admin("/admin/v1/usage/requests?limit=50")["requests"]
        return next((r for r in rows if r["client_request_id"] == "stream-usage-2"), None)

    found = wait_until(row, timeout=30)
    whole = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=24, temperature=0, seed=1
    )
    assert whole.usage is not None
    assert found["prompt_tokens"] == whole.usage.prompt_tokens
    assert found["completion_tokens"] == whole.usage.completion_tokens


def test_a_completions_stream_gets_the_engines_count(fleet: Fleet, client: OpenAI) -> None:
    """``/v1/completions`` goes through the engine's counting route for completions (no chat
    template: the prompt tokenized as the engine does, its BOS included)."""
    prompt = "The three primary colours are"
    whole = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=16, temperature=0, seed=1
    )
    assert whole.usage is not None
    stream = client.completions.create(
        model="smollm2",
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 0
    assert usage.completion_tokens == whole.usage.completion_tokens > 0
