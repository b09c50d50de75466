"""Request ids in front of the real llama.cpp, whose server (llama-cpp-python) answers an empty
400 to an ``x-request-id`` that is not a UUID: a client's own id and a batch line's
``batch_req_…`` still get answers, because the engine is sent only the gateway's UUID."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from tests.integration.fleet import ADMIN_KEY, Fleet, smollm2_fleet, wait_until

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
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2",
                "messages": [{"role": "user", "content": f"Say {i}."}],
                "max_tokens": 4,
            },
        }
        for i in range(3)
    ]
    content = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
    upload = client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def finished() -> Any:
        b = client.batches.retrieve(batch.id)
        return b if b.status in ("completed", "failed", "cancelled", "expired") else None

    done = wait_until(finished, timeout=120)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 0), (
        client.files.content(done.error_file_id).text if done.error_file_id else ""
    )
    rows = [json.loads(r) for r in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in rows) == ["line-0", "line-1", "line-2"]
    for row in rows:
        assert row["response"]["status_code"] == 200
        assert row["response"]["request_id"].startswith("batch_req_")
        assert row["response"]["body"]["choices"][0]["message"]["content"]
