"""The Files and Batches API through the official SDK, on emulated replicas (the engine
emulator stands in for GPUs): answers, validation, cancellation, restarts, and batches that
yield to interactive requests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from gpufleet.gateway import GatewaySettings, GatewayStack
from gpufleet.gateway.batch_runner import BatchRunner
from gpufleet.spec import API_VERSION, parse_tenant
from gpufleet.store import Store
from tests import sites
from tests.conftest import eventually

CONFIG = sites.CONFIG
MODELS = f"""
apiVersion: gpufleet.io/v1alpha1
kind: Model
metadata: {{name: llama}}
spec:
  source: "file:{CONFIG}"
  engine: emulator
  contextLength: 8192
  resources: {{gpus: 1, gpuTypes: [H100]}}
  routing: {{maxInFlightPerReplica: 2}}
"""


def jsonl(n: int, *, max_tokens: int = 8, prefix: str = "q") -> bytes:
    rows = [
        {
            "custom_id": f"{prefix}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "llama",
                "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": max_tokens,
            },
        }
        for i in range(n)
    ]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


@dataclass
class Site:
    url: str
    store: Store
    stack: GatewayStack
    keys: dict[str, str]
    clients: list[AsyncOpenAI] = field(default_factory=list)

    def client(self, who: str) -> AsyncOpenAI:
        c = AsyncOpenAI(base_url=self.url + "/v1", api_key=self.keys[who], max_retries=0)
        self.clients.append(c)
        return c

    async def finished(self, who: str, batch_id: str, timeout: float = 30.0) -> Any:
        client = self.client(who)
        deadline = time.monotonic() + timeout
        while True:
            batch = await client.batches.retrieve(batch_id)
            if batch.status in ("completed", "cancelled", "expired", "failed"):
                return batch
            assert time.monotonic() < deadline, f"batch still {batch.status}"
            await asyncio.sleep(0.05)

    async def output(self, who: str, file_id: str | None) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        content = await self.client(who).files.content(file_id)
        return [json.loads(line) for line in content.text.splitlines() if line]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    keys: dict[str, str] = {}

    def tenancy(stack: GatewayStack) -> None:
        keyring = stack.keyring
        keyring.bootstrap_admin(None)
        for name in ("acme", "globex"):
            keyring.store.apply_tenant(
                parse_tenant(
                    {"apiVersion": API_VERSION, "kind": "Tenant", "metadata": {"name": name}}
                )
            )
        keyring.load()
        for name in ("acme", "globex"):
            keys[name] = keyring.create_key(name, name="app", role="user")[0]
        stack.batches.interval_s = 0.05

    engine = [("llama", sites.emulated(time_scale=0.05))]
    async with (
        sites.replica_servers(engine) as (url,),
        sites.site(
            tmp_path,
            MODELS,
            lambda _r, _i: url,
            GatewaySettings(batch_concurrency=6),
            auth=True,
            prepare=tenancy,
            key_refresh_s=0.2,
            ledger_flush_s=0.05,
        ) as s,
    ):
        here = Site(s.url, s.store, s.stack, keys)
        yield here
        for client in here.clients:
            await client.close()


async def test_a_batch_answers_every_line_once_in_its_output_file(site: Site) -> None:
    client = site.client("acme")
    upload = await client.files.create(file=("in.jsonl", jsonl(20)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes > 0
    batch = await client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 20  # type: ignore[union-attr]
    done = await site.finished("acme", batch.id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (20, 0)  # type: ignore[union-attr]
    assert done.error_file_id is None and done.metadata == {"job": "nightly"}
    rows = await site.output("acme", done.output_file_id)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"q-{i}" for i in range(20))
    for row in rows:
        assert row["error"] is None
        assert row["response"]["status_code"] == 200
        assert row["response"]["body"]["choices"][0]["message"]["content"]
    listed = await client.batches.list()
    assert [b.id for b in listed.data] == [batch.id]
    # Each line is a request in the usage ledger, billed to the tenant that sent the batch.
    ledger = site.stack.ledger
    assert ledger is not None

    async def billed() -> int:
        await ledger.flush()
        return sum(1 for u in site.store.usage_rows() if u.tenant == "acme" and u.model == "llama")

    async def all_billed() -> bool:
        return await billed() >= 20

    await eventually(all_billed, "20 rows in the ledger")
    assert await billed() == 20


async def test_bad_input_gets_a_clear_error_and_creates_nothing(site: Site) -> None:
    client = site.client("acme")
    good = jsonl(2).decode().splitlines()

    async def try_batch(content: str, purpose: str = "batch") -> openai.APIStatusError:
        upload = await client.files.create(file=("x.jsonl", content.encode()), purpose=purpose)  # type: ignore[arg-type]
        with pytest.raises(openai.APIStatusError) as caught:
            await client.batches.create(
                input_file_id=upload.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
        return caught.value

    dup = good[0] + "\n" + good[0]
    err = await try_batch(dup)
    assert err.status_code == 400
    assert "line 2 of file-" in err.message and "custom_id 'q-0' appears twice" in err.message
    wrong_url = good[0].replace("/v1/chat/completions", "/v1/embeddings")
    assert "url is '/v1/embeddings'" in (await try_batch(wrong_url)).message
    streaming = good[0].replace('"max_tokens": 8', '"max_tokens": 8, "stream": true')
    assert "stream must not be true" in (await try_batch(streaming)).message
    assert "not JSON" in (await try_batch("{nope")).message
    assert "purpose 'user_data'" in (await try_batch(good[0], purpose="user_data")).message
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(
            input_file_id="file-missing",
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert (await client.batches.list()).data == []


async def test_tenants_do_not_see_each_others_files_or_batches(site: Site) -> None:
    acme = site.client("acme")
    upload = await acme.files.create(file=("in.jsonl", jsonl(1)), purpose="batch")
    batch = await acme.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    globex = site.client("globex")
    with pytest.raises(openai.NotFoundError):
        await globex.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await globex.files.content(upload.id)
    assert (await globex.files.list()).data == []


async def test_cancel_stops_the_batch_with_what_was_answered(site: Site) -> None:
    client = site.client("acme")
    upload = await client.files.create(
        file=("in.jsonl", jsonl(60, max_tokens=400)), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await answered(site, batch.id)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = await site.finished("acme", batch.id)
    assert done.status == "cancelled"
    counts = done.request_counts
    assert counts is not None and 0 < counts.completed < 60
    rows = await site.output("acme", done.output_file_id)
    assert len(rows) == len({r["custom_id"] for r in rows}) == counts.completed
    with pytest.raises(openai.ConflictError) as caught:
        await _cancel_completed(site)  # a completed batch cannot be cancelled
    assert "only a batch in progress can be cancelled" in caught.value.message


async def answered(site: Site, batch_id: str) -> None:
    """Wait until the batch has answered some of its lines (and is still running)."""

    def some() -> bool:
        batch = site.store.get_batch(batch_id)
        return batch is not None and batch.completed > 0

    await eventually(some, f"{batch_id} answered a line")


async def _cancel_completed(site: Site) -> None:
    client = site.client("acme")
    upload = await client.files.create(file=("in.jsonl", jsonl(1)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await site.finished("acme", batch.id)
    await client.batches.cancel(batch.id)


async def test_a_restarted_runner_finishes_the_batch_without_losing_or_repeating_lines(
    site: Site,
) -> None:
    client = site.client("acme")
    upload = await client.files.create(
        file=("in.jsonl", jsonl(30, max_tokens=200)), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await answered(site, batch.id)
    await site.stack.batches.close()  # gpufleet stops mid-batch, lines in flight
    stopped = site.store.get_batch(batch.id)
    assert stopped is not None and stopped.status == "in_progress"
    assert 0 < stopped.completed < 30
    runner = BatchRunner(
        site.store,
        site.stack.gateway.execute,
        site.stack.batches.principal_for,
        gateway_id="gw-next",
        interval_s=0.05,
        take_over=True,
    )
    runner.start()
    try:
        done = await site.finished("acme", batch.id)
    finally:
        await runner.close()
    assert done.status == "completed" and done.request_counts.completed == 30  # type: ignore[union-attr]
    rows = await site.output("acme", done.output_file_id)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"q-{i}" for i in range(30))


async def test_a_batch_yields_to_interactive_requests_and_then_finishes(site: Site) -> None:
    client = site.client("acme")
    upload = await client.files.create(
        file=("in.jsonl", jsonl(24, max_tokens=600, prefix="night")), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # The batch holds both slots of the replica, its other lines queue behind.
    queue = site.stack.gateway.queues.get("llama")
    await eventually(lambda: queue.in_flight == 2 and queue.waiting > 0, "the batch queued")
    interactive = site.client("globex")
    started = time.monotonic()
    replies = await asyncio.gather(
        *(
            interactive.chat.completions.create(
                model="llama",
                messages=[{"role": "user", "content": f"hi {i}"}],
                max_tokens=4,
            )
            for i in range(6)
        )
    )
    waited = time.monotonic() - started
    assert all(r.choices[0].message.content for r in replies)
    during = site.store.get_batch(batch.id)
    assert during is not None and during.status == "in_progress"
    # Interactive requests jumped the batch's queue: they were served while most of the batch
    # still waited.
    assert during.completed < 24
    done = await site.finished("acme", batch.id, timeout=60)
    assert done.status == "completed"
    rows = await site.output("acme", done.output_file_id)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"night-{i}" for i in range(24))
    assert waited < 10
