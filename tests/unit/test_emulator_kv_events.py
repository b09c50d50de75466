"""The emulator's KV-cache events: vLLM's flag, wire format, ``/tokenize`` and
``/kv_event_sources``, over real sockets (aiohttp and ZeroMQ on 127.0.0.1), read by the
gateway's own subscriber; and the event log against the cache it reports on."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufleet.emulator import EmulatedEngine, ReplicaServer
from gpufleet.emulator.kv_publisher import KvEventsConfig, parse_kv_events_config
from gpufleet.emulator.kvcache import BLOCK_TOKENS, BlockEventLog, KVCache, block_hashes
from gpufleet.emulator.main import parse_args
from gpufleet.emulator.server import render_chat
from gpufleet.gateway.kv_subscriber import KvEventSubscriber, connect_endpoint
from gpufleet.hardware import CATALOG
from gpufleet.routing.kv_events import (
    BlockRemoved,
    BlockStored,
    KvBlockIndex,
    block_keys,
    decode_batch,
)
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel
from tests.conftest import eventually, free_port

LLAMA_8B = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
RECORDED = json.loads(
    (Path(__file__).parents[1] / "data" / "vllm_kv_events" / "stream.json").read_text()
)
EVENTS = {"enable_kv_cache_events": True, "publisher": "zmq",
          "endpoint": "tcp://127.0.0.1:*", "topic": "kv-events"}  # fmt: skip
SYSTEM = "You answer questions about parcels, in one sentence, politely. " * 12


def chat(question: str, system: str = SYSTEM) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


class Replica:
    def __init__(self, server: ReplicaServer, url: str, http: aiohttp.ClientSession) -> None:
        self.server, self.url, self.http = server, url, http

    @property
    def endpoint(self) -> str:
        assert self.server.kv_publisher is not None
        return connect_endpoint(self.server.kv_publisher.endpoint, "127.0.0.1")

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.http.post(self.url + path, json=body) as resp:
            return resp.status, await resp.json()

    async def tokens(self, messages: list[dict[str, str]]) -> list[int]:
        status, answer = await self.post("/tokenize", {"model": "llama", "messages": messages})
        assert status == 200
        ids: list[int] = answer["tokens"]
        return ids

    async def ask(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        status, answer = await self.post(
            "/v1/chat/completions", {"model": "llama", "messages": messages, "max_tokens": 2}
        )
        assert status == 200
        usage: dict[str, Any] = answer["usage"]
        return usage

    def cached(self, ids: list[int]) -> int:
        """Leading blocks of ``ids`` the replica's cache holds: the truth the index is held to."""
        return self.server.engine.cache.cached_prefix(block_hashes(ids))


@asynccontextmanager
async def replica(
    kv_events: dict[str, Any] | None = EVENTS, kv_blocks: int = 64
) -> AsyncIterator[Replica]:
    perf = PerfModel(load_architecture(LLAMA_8B), CATALOG["H100"])
    engine = EmulatedEngine(perf, kv_blocks * BLOCK_TOKENS, time_scale=0.001)
    config = parse_kv_events_config(json.dumps(kv_events)) if kv_events is not None else None
    server = ReplicaServer(engine, "llama", kv_events=config)
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as http:
            yield Replica(server, f"http://127.0.0.1:{port}", http)
    finally:
        await server.stop()


async def subscribed(r: Replica, sub: KvEventSubscriber) -> None:
    """Until the replica's publisher has the subscription (so nothing published is missed)."""
    publisher = r.server.kv_publisher
    assert publisher is not None
    await eventually(lambda: sub.subscribed() and publisher.subscriptions >= 1, "subscribed")


# -- /tokenize -----------------------------------------------------------------------------


async def test_tokenize_answers_as_vllm_with_the_ids_the_cache_holds() -> None:
    async with replica(kv_events=None) as r:
        messages = chat("Where is parcel 4471?")
        status, answer = await r.post("/tokenize", {"model": "llama", "messages": messages})
        assert status == 200
        assert set(answer) == set(RECORDED["requests"][0]["tokenize"])  # vLLM's fields
        assert answer["count"] == len(answer["tokens"]) and answer["token_strs"] is None
        assert answer["max_model_len"] == r.server.engine.perf.arch.max_context
        ids = answer["tokens"]
        assert r.cached(ids) == 0
        usage = await r.ask(messages)
        assert usage["prompt_tokens"] == len(ids)
        assert r.cached(ids) == len(ids) // BLOCK_TOKENS > 0
        # Without the generation prompt the chat ends earlier; a completion's prompt as sent.
        _, open_turn = await r.post("/tokenize", {"model": "llama", "messages": messages,
                                                 "add_generation_prompt": False})  # fmt: skip
        assert open_turn["count"] < len(ids)
        text = render_chat(messages)
        _, plain = await r.post("/tokenize", {"model": "llama", "prompt": text})
        assert plain["tokens"] == ids
        status, bad = await r.post("/tokenize", {"model": "llama"})
        assert status == 400 and bad["error"]["param"] == "prompt"


# -- the wire --------------------------------------------------------------------------------


async def test_the_emulator_publishes_vllms_wire_format() -> None:
    async with replica() as r:
        sub = zmq.asyncio.Context.instance().socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
            sub.connect(r.endpoint)
            publisher = r.server.kv_publisher
            assert publisher is not None
            await eventually(lambda: publisher.subscriptions >= 1, "the subscription arrived")
            ids = await r.tokens(chat("Hello?"))
            await r.ask(chat("Hello?"))
            topic, seq, payload = await sub.recv_multipart()
        finally:
            sub.close(linger=0)
    assert (topic, seq) == (b"kv-events", (0).to_bytes(8, "big"))
    raw = msgpack.unpackb(payload)
    assert isinstance(raw, list) and len(raw) == 3 and raw[2] == 0
    recorded = msgpack.unpackb(base64.b64decode(RECORDED["frames"][0][2]))
    assert [list(e) for e in raw[1]] == [list(e) for e in recorded[1]]  # vLLM's fields, in order
    (event,) = decode_batch(payload).events
    assert isinstance(event, BlockStored)
    n = len(ids) // BLOCK_TOKENS
    assert event.block_size == BLOCK_TOKENS and event.parent_block_hash is None
    assert event.block_hashes == tuple(block_hashes(ids))
    assert list(event.token_ids) == ids[: n * BLOCK_TOKENS]


async def test_kv_event_sources_says_where_as_vllm_does() -> None:
    async with replica(kv_events={**EVENTS, "replay_endpoint": "tcp://*:*"}) as r:
        async with r.http.get(r.url + "/kv_event_sources") as resp:
            sources = await resp.json()
        assert list(sources) == ["0"]
        assert set(sources["0"]) == set(RECORDED["kv_event_sources"]["0"])
        assert sources["0"]["endpoint"] == r.endpoint and sources["0"]["topic"] == "kv-events"
        assert sources["0"]["replay_endpoint"].startswith("tcp://*:")
        assert not sources["0"]["replay_endpoint"].endswith(":*")
    async with replica(kv_events=None) as r, r.http.get(r.url + "/kv_event_sources") as resp:
        assert await resp.json() == {}


# -- the gateway's subscriber on the emulator -----------------------------------------------


async def test_the_index_follows_stores_evictions_and_clears() -> None:
    async with replica(kv_blocks=32) as r:
        index = KvBlockIndex()
        sub = KvEventSubscriber(index, "r0", r.endpoint)
        await sub.start()
        try:
            await subscribed(r, sub)
            prompts = [chat(f"Question {i}: " + "where and when " * 10) for i in range(3)]
            prompts.append(chat("Something else entirely. " * 40, system="Be terse."))
            ids = [await r.tokens(m) for m in prompts]
            keys = [block_keys(i, BLOCK_TOKENS) for i in ids]

            def agrees() -> bool:
                return all(
                    index.matched("r0", k) == r.cached(i) for k, i in zip(keys, ids, strict=True)
                )

            for m in prompts:
                await r.ask(m)
                await eventually(agrees, "the index agrees with the cache")
            # The last prompt evicted blocks of the first ones (32 blocks hold 3 of them).
            assert r.cached(ids[3]) == len(keys[3])
            assert r.cached(ids[0]) < len(keys[0])
            assert index.stats("r0").removed > 0 and index.block_size("r0") == BLOCK_TOKENS
            status, answer = await r.post("/reset_prefix_cache", {})
            assert status == 200 and answer == {"success": True}
            await eventually(lambda: index.stats("r0").blocks == 0, "AllBlocksCleared applied")
            assert sub.stats().gaps == 0 and sub.stats().errors == {}
        finally:
            await sub.close()


async def test_a_late_subscriber_replays_what_it_missed() -> None:
    async with replica(kv_events={**EVENTS, "replay_endpoint": "tcp://127.0.0.1:*"}) as r:
        publisher = r.server.kv_publisher
        assert publisher is not None and publisher.replay_endpoint is not None
        early = await r.tokens(chat("Asked before anyone listened."))
        await r.ask(chat("Asked before anyone listened."))
        await eventually(lambda: publisher.batches == 1, "published to nobody")
        index = KvBlockIndex()
        sub = KvEventSubscriber(index, "r0", r.endpoint, replay_endpoint=publisher.replay_endpoint)
        await sub.start()
        try:
            await subscribed(r, sub)
            late = await r.tokens(chat("Asked later."))
            await r.ask(chat("Asked later."))
            both = (block_keys(early, BLOCK_TOKENS), block_keys(late, BLOCK_TOKENS))
            await eventually(
                lambda: [index.matched("r0", k) for k in both] == [len(k) for k in both],
                "both prompts indexed",
            )
            stats = sub.stats()
            assert (stats.replays, stats.replayed_batches, stats.last_sequence) == (1, 1, 1)
        finally:
            await sub.close()


async def test_a_crash_closes_the_stream_and_the_subscriber_resets() -> None:
    async with replica() as r:
        index = KvBlockIndex()
        sub = KvEventSubscriber(index, "r0", r.endpoint)
        await sub.start()
        try:
            await subscribed(r, sub)
            ids = await r.tokens(chat("Before the crash."))
            await r.ask(chat("Before the crash."))
            keys = block_keys(ids, BLOCK_TOKENS)
            await eventually(lambda: index.matched("r0", keys) == len(keys), "indexed")
            await r.server.crash()
            await eventually(lambda: not sub.subscribed(), "disconnected")
            assert index.matched("r0", keys) == 0
        finally:
            await sub.close()


# -- the flag --------------------------------------------------------------------------------


def test_the_flag_is_vllms() -> None:
    opts = parse_args(["--arch", str(LLAMA_8B), "--replicas", "3", "--kv-events-config",
                       json.dumps({"enable_kv_cache_events": True, "endpoint": "tcp://*:5557",
                                   "replay_endpoint": "tcp://*:5600"})])  # fmt: skip
    config = opts.kv_events
    assert config is not None and config.publisher == "zmq" and config.publishes
    assert config.topic == "" and config.buffer_steps == 10_000
    third = config.for_replica(2)
    assert (third.endpoint, third.replay_endpoint) == ("tcp://*:5559", "tcp://*:5602")
    assert KvEventsConfig(enable_kv_cache_events=False).publishes is False
    assert parse_args(["--arch", str(LLAMA_8B)]).kv_events is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{", "not JSON"),
        ('{"enable_kv_cache_events": true, "endpont": "x"}', "unknown field(s) endpont"),
        ('{"enable_kv_cache_events": "yes"}', "enable_kv_cache_events has the wrong type"),
        ('{"publisher": "kafka"}', "publisher must be"),
        ('{"endpoint": "http://x:1"}', "endpoint must be tcp://"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        parse_kv_events_config(text)


# -- the event log against the cache (no sockets) ---------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=25),
    capacity=st.integers(8, 30),
)
def test_the_index_fed_by_the_log_is_the_cache(prompts: list[list[int]], capacity: int) -> None:
    """Random prompts built from a few shared chunks go through a small cache (allocate, then
    release, sometimes two at once); after every step the index fed by the cache's events holds
    exactly the leading blocks the cache holds, for every prompt."""
    cache, log, index = KVCache(capacity), BlockEventLog(), KvBlockIndex()
    cache.listener = log
    chunks = [[c * 100 + i for i in range(BLOCK_TOKENS)] for c in range(4)]
    texts = [[t for c in p for t in chunks[c]] + [7] * (len(p) % 3) for p in prompts]
    held = []
    for n, ids in enumerate(texts):
        hashes = log.describe(ids)
        allocation = cache.allocate(hashes, 1)
        if allocation is not None:
            held.append(allocation)
        if n % 2 or len(held) > 1:
            for a in held:
                cache.release(a)
            held = []
        index.apply("r", log.drain())
        for other in texts:
            keys = block_keys(other, BLOCK_TOKENS)
            assert index.matched("r", keys) == cache.cached_prefix(block_hashes(other))
    assert log.undescribed == 0


def test_a_block_stored_without_description_is_counted_not_published() -> None:
    cache, log = KVCache(8), BlockEventLog()
    cache.listener = log
    ids = list(range(3 * BLOCK_TOKENS))
    cache.allocate(block_hashes(ids), 0)
    assert log.drain() == [] and log.undescribed == 3
    cache2 = KVCache(2)
    cache2.listener = log
    log.describe(ids[:32])
    first = cache2.allocate(block_hashes(ids[:32]), 0)
    assert first is not None
    cache2.release(first)
    log.drain()
    other = list(range(1000, 1032))
    log.describe(other)
    cache2.allocate(block_hashes(other), 0)
    removed, stored = log.drain()
    assert isinstance(removed, BlockRemoved) and len(removed.block_hashes) == 2
    assert isinstance(stored, BlockStored) and list(stored.token_ids) == other
