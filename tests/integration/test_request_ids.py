"""Request ids in front of the real llama.cpp, whose server (llama-cpp-python) answers an empty
400 to an ``x-request-id`` that is not a UUID: a client's own id and a batch line's
``batch_req_…`` still get answers, because the engine is sent only the gateway's UUID."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from tests.integration.fleet import (
    ADMIN_KEY,
    Fleet,
    assert_batch_answers_every_line,
    smollm2_fleet,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    yield from smollm2_fleet(tmp_path_factory.mktemp("request-ids"))


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> Iterator[OpenAI]:
    with OpenAI(base_url=fleet.base_url, api_key=ADMIN_KEY, max_retries=0, timeout=60) as c:
        yield c


def test_a_client_id_that_is_not_a_uuid_is_answered_and_echoed(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=4,
        extra_headers={"x-request-id": "my-request-1"},
    )
    assert raw.http_response.status_code == 200
    assert raw.headers["x-request-id"] == "my-request-1"
    assert raw.parse().choices[0].message.content


def test_a_batch_on_llama_cpp_answers_every_line(client: OpenAI) -> None:
    assert_batch_answers_every_line(client, "smollm2", lines=3, timeout=120)
